"""The training loop: batch -> forward -> finite-loss guard -> backward -> step with the swarm -> report each epoch.

It talks to the swarm only through the peer's training mode (peer/training_mode.py).
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from peer.faults import gradients_finite, parameters_finite, recover_parameters
from peer.hivemind_gaps.rejoin import Rejoiner
from peer.lifecycle import ExitCode, StopRequested
from peer.runtime import Peer

logger = logging.getLogger(__name__)


def train(peer: Peer) -> int:
    """Contribute to the swarm until --max-epochs or a stop signal; returns the process exit code."""
    model, training, reporter, config = peer.model, peer.training, peer.reporter, peer.config
    autocast = torch.autocast(peer.device.type, dtype=peer.precision, enabled=peer.precision != torch.float32)
    scaler = torch.amp.GradScaler(peer.device.type) if peer.precision == torch.float16 else None
    epoch = training.epoch
    # alone for two progress lifetimes: the others' entries expired, so they are unreachable rather than slow
    rejoiner = Rejoiner(peer.dht, patience=2 * training.presence_expiration)
    model.train()

    while not peer.stop.requested:
        if config.max_epochs and epoch >= config.max_epochs:
            logger.info(f"Reached --max-epochs {config.max_epochs}")
            return ExitCode.OK
        started = time.perf_counter()
        loss = accumulate_gradients(peer, autocast, scaler)
        computed = time.perf_counter()
        if not torch.isfinite(loss):
            reporter.batch_skipped(f"non-finite loss {loss.item()}")
        elif scaler is None and not gradients_finite(model):
            reporter.batch_skipped("non-finite gradients")
        else:
            reporter.status("averaging with the swarm" if training.is_averaging else "training")
            with contextlib.suppress(StopRequested), peer.stop.interruptible():
                training.step(config.samples_per_step, scaler)
            reporter.batch_done(
                loss.item(), config.samples_per_step, computed - started, time.perf_counter() - computed
            )
        training.zero_grad()
        rejoiner.check(training.num_peers)

        if training.epoch != epoch:
            epoch = training.epoch
            if not parameters_finite(model):
                peer.reporter.metrics.recoveries.inc()
                with peer.stop.interruptible():
                    if not recover_parameters(model, training, peer.backups):
                        return ExitCode.DIVERGED
                epoch = training.epoch  # the recovered state's: a backup or a lagging donor may be older
            reporter.epoch_done(epoch)
            if config.backup_every and epoch % config.backup_every == 0:
                peer.backups.save(model, training)
    return peer.stop.exit_code()


def accumulate_gradients(peer: Peer, autocast, scaler) -> torch.Tensor:
    """Forward and backward over --grad-accumulation batches; returns their mean loss (detached)."""
    total = torch.zeros((), device=peer.device)
    for _ in range(peer.config.grad_accumulation):
        batch = {name: tensor.to(peer.device, non_blocking=True) for name, tensor in next(peer.batches).items()}
        with autocast:
            loss = peer.model(**batch).loss / peer.config.grad_accumulation
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach().float()
    return total
