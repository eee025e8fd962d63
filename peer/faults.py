"""Keeping non-finite numbers out of the swarm: checks, recovery from peers or a backup, and test-only injection."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import hivemind
import torch

from peer.backup import Backups
from peer.swarm import download_state

logger = logging.getLogger(__name__)

# Test-only fault injection (never set these in production): poison this peer's gradients for a number of
# batches once it reaches an epoch, or its parameters right after it reaches an epoch.
NAN_GRADS_AT_EPOCH = "ALBERT_TEST_ONLY_NAN_GRADS_AT_EPOCH"
NAN_GRADS_BATCHES = "ALBERT_TEST_ONLY_NAN_GRADS_BATCHES"
NAN_PARAMS_AT_EPOCH = "ALBERT_TEST_ONLY_NAN_PARAMS_AT_EPOCH"


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (one device sync, not one per tensor)."""
    flags = [torch.isfinite(tensor).all() for tensor in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def gradients_finite(model: torch.nn.Module) -> bool:
    return all_finite(param.grad for param in model.parameters() if param.grad is not None)


def parameters_finite(model: torch.nn.Module) -> bool:
    return all_finite(model.parameters())


def recover_parameters(model: torch.nn.Module, optimizer: hivemind.Optimizer, backups: Backups) -> bool:
    """After non-finite parameters: reload state from peers, else from the newest backup. True if finite again."""
    logger.error(f"Parameters became non-finite at epoch {optimizer.local_epoch}: reloading state from peers")
    download_state(optimizer)
    if parameters_finite(model):
        logger.warning(f"Recovered: parameters reloaded from peers at epoch {optimizer.local_epoch}")
        return True
    for epoch in reversed(backups.epochs()):
        logger.error(f"Peers could not provide usable state: restoring the local backup of epoch {epoch}")
        if backups.restore(epoch, model, optimizer) and parameters_finite(model):
            return True
    logger.critical("No peer and no local backup holds finite parameters: cannot go on")
    return False


class FaultInjector:
    """Test-only: poisons gradients or parameters when the ALBERT_TEST_ONLY_* variables ask for it."""

    def __init__(self, environ=os.environ):
        self.grads_at_epoch = _optional_int(environ.get(NAN_GRADS_AT_EPOCH))
        self.grad_batches_left = _optional_int(environ.get(NAN_GRADS_BATCHES)) or 20
        self.params_at_epoch = _optional_int(environ.get(NAN_PARAMS_AT_EPOCH))
        if self.grads_at_epoch is not None or self.params_at_epoch is not None:
            logger.warning("TEST-ONLY fault injection is enabled: this peer will produce NaNs on purpose")

    @torch.no_grad()
    def maybe_poison_gradients(self, model: torch.nn.Module, epoch: int) -> None:
        if self.grads_at_epoch is not None and epoch >= self.grads_at_epoch and self.grad_batches_left > 0:
            self.grad_batches_left -= 1
            next(param for param in model.parameters() if param.grad is not None).grad.fill_(float("nan"))
            logger.warning("TEST-ONLY: gradients poisoned with NaN")

    @torch.no_grad()
    def maybe_poison_parameters(self, model: torch.nn.Module, epoch: int) -> None:
        if self.params_at_epoch is not None and epoch >= self.params_at_epoch:
            self.params_at_epoch = None
            next(iter(model.parameters())).fill_(float("nan"))
            logger.warning("TEST-ONLY: parameters poisoned with NaN")


def _optional_int(value) -> int | None:
    return int(value) if value not in (None, "") else None
