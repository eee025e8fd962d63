"""A local-steps peer whose outer weights drift on purpose, for the tests of the outer-state re-sync: the CLI's own
peer (``python -m peer``) whose LocalStepsSwarm is wrapped, before training starts, in ``DriftingOuterState``.

    ALBERT_TEST_ONLY_DRIFT_EVERY=2 python -m tests.peer.drifting_peer --local_steps 2 --average_state_every 2 ...

Peers that take part in the same whole outer rounds hold the same outer state (peer/hivemind_gaps/mean_replies.py),
so a re-sync only happens after a round some peer received in part, stepped alone or split: on a quiet machine,
rarely. This peer stands in for such a round: each time it reaches an epoch one before a multiple of DRIFT_EVERY, it
adds noise of DRIFT_SCALE (relative) to its first outer tensor and the same to its local weights, as a round whose
part for that slice never came back would leave it (outer and local weights moved alike: its next pseudo-gradient is
unchanged). The round of that epoch then gathers a fingerprint the others' do not match, and the group
re-syncs at the multiple. Each nudge logs a "TEST-ONLY: ..." line.
"""

from __future__ import annotations

import logging
import os

import torch

from peer.__main__ import main
from peer.local_steps import LocalStepsSwarm
from peer.runtime import Peer

logger = logging.getLogger("peer.drifting")

DRIFT_EVERY = "ALBERT_TEST_ONLY_DRIFT_EVERY"
DRIFT_SCALE = 1e-3  # of the nudged tensor's values: ~1e-4 of all outer weights, as a partial round left peers in CI


class DriftingOuterState:
    """A training mode that passes everything to ``inner`` (a LocalStepsSwarm) and nudges its outer weights.

    Args:
        inner: the peer's real local-steps mode.
        every: nudge on reaching each epoch one before a multiple of this.
    """

    def __init__(self, inner: LocalStepsSwarm, every: int):
        self.inner, self.every = inner, every
        self.generator = torch.Generator().manual_seed(0)
        logger.warning("TEST-ONLY drift injection is enabled: this peer's outer weights will drift on purpose")

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # everything not nudged is the real mode's

    def step(self, batch_size: int, scaler=None) -> None:
        before = self.inner.epoch
        self.inner.step(batch_size, scaler)
        epoch = self.inner.epoch
        if epoch != before and (epoch + 1) % self.every == 0:
            with self.inner._state_lock, torch.no_grad():
                first = self.inner.outer[0]
                nudge = torch.randn(first.shape, generator=self.generator) * DRIFT_SCALE * first.abs()
                first.add_(nudge)
                local = self.inner.parameters[0]  # the same tensor's local weights (LocalStepsSwarm keeps the order)
                local.add_(nudge.to(local.device, local.dtype))
            logger.warning(f"TEST-ONLY: outer weights nudged at epoch {epoch}")


def make_drifting(peer: Peer) -> None:
    every = int(os.environ[DRIFT_EVERY])
    assert isinstance(peer.training, LocalStepsSwarm), "the drifting peer runs with --local_steps only"
    peer.training = DriftingOuterState(peer.training, every)


if __name__ == "__main__":
    main(prepare=make_drifting)
