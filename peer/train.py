"""The training loop: batch -> forward -> finite-loss guard -> backward -> optimizer.step() -> report each epoch."""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from peer.faults import FaultInjector, gradients_finite, parameters_finite, recover_parameters
from peer.lifecycle import ExitCode, StopRequested
from peer.rejoin import Rejoiner
from peer.runtime import Peer

logger = logging.getLogger(__name__)


def train(peer: Peer) -> int:
    """Contribute to the swarm until --max-epochs or a stop signal; returns the process exit code."""
    model, optimizer, reporter, config = peer.model, peer.optimizer, peer.reporter, peer.config
    autocast = torch.autocast(peer.device.type, dtype=peer.precision, enabled=peer.precision != torch.float32)
    scaler = torch.amp.GradScaler(peer.device.type) if peer.precision == torch.float16 else None
    faults, epoch = FaultInjector(), optimizer.local_epoch
    # alone for two progress lifetimes: the others' entries expired, so they are unreachable rather than slow
    rejoiner = Rejoiner(peer.dht, patience=2 * optimizer.tracker.metadata_expiration)
    model.train()

    while not peer.stop.requested:
        if config.max_epochs and epoch >= config.max_epochs:
            logger.info(f"Reached --max-epochs {config.max_epochs}")
            return ExitCode.OK
        started = time.perf_counter()
        loss = accumulate_gradients(peer, autocast, scaler)
        faults.maybe_poison_gradients(model, epoch)
        computed = time.perf_counter()
        if not torch.isfinite(loss):
            reporter.batch_skipped(f"non-finite loss {loss.item()}")
        elif scaler is None and not gradients_finite(model):
            reporter.batch_skipped("non-finite gradients")
        else:
            reporter.status("averaging with the swarm" if optimizer.tracker.ready_to_update_epoch else "training")
            with contextlib.suppress(StopRequested), peer.stop.interruptible():
                step(optimizer, scaler, config.samples_per_step)
            reporter.batch_done(
                loss.item(), config.samples_per_step, computed - started, time.perf_counter() - computed
            )
        optimizer.zero_grad(set_to_none=True)
        rejoiner.check(optimizer.tracker.global_progress.num_peers)

        if optimizer.local_epoch != epoch:
            epoch = optimizer.local_epoch
            faults.maybe_poison_parameters(model, epoch)
            if not parameters_finite(model):
                peer.reporter.metrics.recoveries.inc()
                with peer.stop.interruptible():
                    if not recover_parameters(model, optimizer, peer.backups):
                        return ExitCode.DIVERGED
            reporter.epoch_done(epoch)
            if config.backup_every and epoch % config.backup_every == 0:
                peer.backups.save(model, optimizer)
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


def step(optimizer, scaler, samples: int) -> None:
    """Hand this contribution to hivemind; with fp16, the scaler unscales it and skips it if it overflowed."""
    if scaler is None:
        optimizer.step(batch_size=samples)
    else:
        scaler.step(optimizer, batch_size=samples)
        scaler.update()
