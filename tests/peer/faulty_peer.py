"""A peer that produces NaNs on purpose, for the fault tests: the CLI's own peer (``python -m peer``) whose training
mode is wrapped, before training starts, in ``FaultyTraining``. The loop itself carries no fault injection.

    ALBERT_TEST_ONLY_NAN_GRADS_AT_EPOCH=2 ALBERT_TEST_ONLY_NAN_PARAMS_AT_EPOCH=4 python -m tests.peer.faulty_peer FLAGS

NAN_GRADS_AT_EPOCH: from that epoch on, the gradients of NAN_GRADS_BATCHES batches (default 20) are NaN, as a
broken GPU would compute them. NAN_PARAMS_AT_EPOCH: the parameters become NaN right after the first step that
reaches that epoch, as a broken update would leave them. Each poisoning logs a "TEST-ONLY: ..." line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from peer.__main__ import main
from peer.runtime import Peer
from peer.training_mode import TrainingMode

logger = logging.getLogger("peer.faulty")

NAN_GRADS_AT_EPOCH = "ALBERT_TEST_ONLY_NAN_GRADS_AT_EPOCH"
NAN_GRADS_BATCHES = "ALBERT_TEST_ONLY_NAN_GRADS_BATCHES"
NAN_PARAMS_AT_EPOCH = "ALBERT_TEST_ONLY_NAN_PARAMS_AT_EPOCH"


class FaultyTraining:
    """A training mode that passes everything to ``inner`` and poisons gradients or parameters on request.

    Gradients are poisoned in backward, by a hook on the model's first parameter, so they are NaN when the loop
    checks them (before it steps); the batches are counted at ``zero_grad``, which the loop calls once per batch.
    Parameters are poisoned after the ``step`` that reaches the epoch, before the loop looks at them.

    Args:
        inner: the peer's real training mode.
        model: the peer's model (the one ``inner`` trains).
        grads_at_epoch: poison gradients from this epoch on (None: never).
        grad_batches: how many batches' gradients to poison.
        params_at_epoch: poison the parameters once, at this epoch (None: never).
    """

    def __init__(
        self,
        inner: TrainingMode,
        model: torch.nn.Module,
        grads_at_epoch: int | None = None,
        grad_batches: int = 20,
        params_at_epoch: int | None = None,
    ):
        self.inner, self.model = inner, model
        self.grads_at_epoch, self.grad_batches_left, self.params_at_epoch = (
            grads_at_epoch,
            grad_batches,
            params_at_epoch,
        )
        self.poisoned_this_batch = False
        first = next(param for param in model.parameters() if param.requires_grad)
        first.register_hook(self._poison_gradient)
        logger.warning("TEST-ONLY fault injection is enabled: this peer will produce NaNs on purpose")

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # everything not poisoned is the real mode's

    def _poison_gradient(self, grad: torch.Tensor) -> torch.Tensor | None:
        if self.grads_at_epoch is None or self.grad_batches_left <= 0 or self.inner.epoch < self.grads_at_epoch:
            return None
        if not self.poisoned_this_batch:
            self.poisoned_this_batch = True
            logger.warning("TEST-ONLY: gradients poisoned with NaN")
        return torch.full_like(grad, float("nan"))

    def zero_grad(self) -> None:
        if self.poisoned_this_batch:
            self.grad_batches_left, self.poisoned_this_batch = self.grad_batches_left - 1, False
        self.inner.zero_grad()

    def step(self, batch_size: int, scaler=None) -> None:
        before = self.inner.epoch
        self.inner.step(batch_size, scaler)
        epoch = self.inner.epoch
        if self.params_at_epoch is not None and epoch != before and epoch >= self.params_at_epoch:
            self.params_at_epoch = None
            with torch.no_grad():
                next(iter(self.model.parameters())).fill_(float("nan"))
            logger.warning("TEST-ONLY: parameters poisoned with NaN")


def faulty_from_environ(inner: TrainingMode, model: torch.nn.Module, environ: Mapping[str, str]) -> TrainingMode:
    """``inner`` wrapped in FaultyTraining as the ALBERT_TEST_ONLY_* variables ask; ``inner`` itself if none is set."""
    grads_at, params_at = (
        _optional_int(environ.get(NAN_GRADS_AT_EPOCH)),
        _optional_int(environ.get(NAN_PARAMS_AT_EPOCH)),
    )
    if grads_at is None and params_at is None:
        return inner
    grad_batches = _optional_int(environ.get(NAN_GRADS_BATCHES)) or 20
    return FaultyTraining(inner, model, grads_at, grad_batches, params_at)


def _optional_int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def make_faulty(peer: Peer) -> None:
    peer.training = faulty_from_environ(peer.training, peer.model, os.environ)


if __name__ == "__main__":
    main(prepare=make_faulty)
