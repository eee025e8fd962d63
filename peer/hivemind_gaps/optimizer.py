"""hivemind.Optimizer built on this package's averagers (averagers.py), and able to leave the swarm at once.

hivemind 1.1.12 builds its state averager in the private ``Optimizer._make_state_averager``, with no way to pass
another class: ``SwarmOptimizer`` overrides it with the same arguments. It also cancels the averaging rounds under
way on shutdown (cancellable_rounds.py), keeps LAMB's averaged moments the optimizer's own when a backup is
restored (consistent_state.py), and reads the swarm's progress through ``VouchedProgressTracker``
(vouched_progress.py; hivemind's ``Optimizer._make_progress_tracker`` overridden likewise). With a robust
gradient averager and ``robust_quorum``, it keeps the averager's smallest group a share of the peers training
(robust_allreduce.py), from a thread: the main thread waits inside a round for as long as the round lasts.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial

import hivemind
from hivemind.optim.state_averager import TrainingStateAverager

from peer.hivemind_gaps.averager_guard import MembershipCheck
from peer.hivemind_gaps.averagers import (
    ConsistentTrainingStateAverager,
    GuardedGradientAverager,
    GuardedTrainingStateAverager,
)
from peer.hivemind_gaps.robust_allreduce import QuorumKeeper
from peer.hivemind_gaps.state_check import EPOCH_MARGIN
from peer.hivemind_gaps.vouched_progress import VouchedProgressTracker, distrust_unvouched_epoch
from peer.swarm.centered_clip import ClipSettings

logger = logging.getLogger(__name__)
QUORUM_REFRESH = 1.0  # seconds between two reads of the peer count for the robust rounds' smallest group


class SwarmOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer built on ``state_averager_class`` (a TrainingStateAverager serving consistent state)."""

    state_averager_class: type[TrainingStateAverager] = ConsistentTrainingStateAverager

    def __init__(self, *args, robust_quorum: float = 0.0, state_clip_settings: ClipSettings | None = None, **kwargs):
        self._state_clip_settings = state_clip_settings  # read by _make_state_averager, inside hivemind's __init__
        super().__init__(*args, **kwargs)
        # a donor's epoch may be ahead of what this peer knows of the swarm, but not by more than a margin
        self.state_averager.epoch_limit = lambda: max(self.local_epoch, self.tracker.global_epoch) + EPOCH_MARGIN
        self._stopping = threading.Event()
        if robust_quorum:
            threading.Thread(
                target=self._keep_robust_quorum, args=(robust_quorum,), name="robust-quorum", daemon=True
            ).start()

    def _keep_robust_quorum(self, quorum: float) -> None:
        """Keep the smallest group of the gradient rounds (and of the robust state rounds) ``quorum`` of the peers
        training (until shutdown); a lower count must last as long as a silent peer's progress entry does before the
        minimum follows it down."""
        keeper = QuorumKeeper(quorum, hold=self.tracker.metadata_expiration)
        while not self._stopping.wait(QUORUM_REFRESH):
            peers = self.tracker.global_progress.num_peers
            size = keeper.update(peers, time.monotonic())
            if size is None:
                continue
            try:
                self.grad_averager.set_min_group_size(size)
                if self._state_clip_settings is not None:  # robust state rounds: the same minimum
                    self.state_averager.set_min_group_size(size)
            except OSError:  # the averager's process has ended: the optimizer is shutting down
                return
            logger.info(f"Robust quorum: groups of {size} or more wanted ({quorum:g} of {peers} peers reporting)")

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> VouchedProgressTracker:
        # hivemind.Optimizer._make_progress_tracker (1.1.12) with the tracker that leaves out unvouched entries
        return VouchedProgressTracker(
            dht=self.dht,
            prefix=self.run_id,
            target_batch_size=target_batch_size,
            client_mode=self.client_mode,
            status_loglevel=self.status_loglevel,
            start=True,
            **kwargs,
        )

    def load_state_from_peers(self, **kwargs) -> None:
        super().load_state_from_peers(**kwargs)
        # still behind after the download: no donor has the epoch an entry claims (vouched_progress.py)
        distrust_unvouched_epoch(self.tracker, self.local_epoch)

    def cancel_averaging(self) -> None:
        """Leaving the swarm: cancel the averaging rounds this peer is part of, and start none (thread-safe)."""
        cancelled = self.state_averager.cancel_averaging()
        if self.scheduled_grads is not None and not self.scheduled_grads.done() and self.scheduled_grads.cancel():
            cancelled += 1
        if cancelled:
            logger.info(f"Leaving: cancelled {cancelled} averaging round(s) in progress")

    def shutdown(self) -> None:
        self._stopping.set()
        # hivemind first waits for background rounds, each up to its timeout, while the other peers may be leaving
        self.cancel_averaging()
        super().shutdown()

    def load_state_dict(self, state_dict: dict) -> None:
        # a backup restored: keep the averaged statistics the optimizer's own (see consistent_state.py)
        with self.state_averager.statistics_kept_in_place():
            super().load_state_dict(state_dict)

    def _state_averager_options(self) -> dict:
        """Extra keyword arguments for ``state_averager_class`` (subclasses add theirs)."""
        return {"state_clip_settings": self._state_clip_settings}

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        # the same arguments as hivemind.Optimizer._make_state_averager (1.1.12), with this class's averager
        return self.state_averager_class(
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **self._state_averager_options(),
            **kwargs,
        )


class GuardedOptimizer(SwarmOptimizer):
    """The swarm's optimizer whose gradient and state averagers serve run members only.

    Args:
        membership: the membership check of this peer.
        grad_averager_class: the gradient averager (a guarded one: GuardedGradientAverager or
            GuardedRobustGradientAverager).
        kwargs: passed to ``hivemind.Optimizer``.
    """

    state_averager_class = GuardedTrainingStateAverager

    def __init__(self, *, membership: MembershipCheck, grad_averager_class=GuardedGradientAverager, **kwargs):
        self._membership = membership
        super().__init__(grad_averager_factory=partial(grad_averager_class, membership=membership), **kwargs)

    def _state_averager_options(self) -> dict:
        return {**super()._state_averager_options(), "membership": self._membership}
