"""The averager classes the swarm runs: hivemind's averagers with this package's mixins, each composed once.

Each class extends the one before it, so a gap closed for one is closed for the next:

- ``CheckedTrainingStateAverager`` (the monitor's, open run): a downloaded state is checked before it is applied,
  and the scheduler catches up to any epoch in one step (state_check.py). Every averager here checks the parts it
  reduces and the results it receives (checked_parts.py: a non-finite part or weight is refused, its sender banned
  for the round; a non-finite result fails its reducer).
- ``ConsistentTrainingStateAverager`` (a trainer's, open run): also serves one epoch's state and keeps loaded LAMB
  moments the averaged ones (consistent_state.py); its rounds can be cancelled by a leaving peer
  (cancellable_rounds.py); a state round's mean is checked, and bounded, before it is applied (state_rounds.py).
- ``GuardedTrainingStateAverager`` and ``GuardedGradientAverager`` (closed runs, trainers and monitor): also answer
  run members only (averager_guard.py).
- ``CountedGradientAverager`` (the open run's): hivemind's GradientAverager counting the bytes of its all-reduce
  (traffic.py), as every gradient averager here does.
- ``OuterAverager`` (local-steps mode, peer/local_steps.py): all-reduces pseudo-gradients, serves the outer state a
  callable gives, checks downloaded states and cancels its rounds like the others, and counts the bytes of its
  all-reduce (traffic.py); its pseudo-gradient rounds leave every member the same result (mean_replies.py; the
  re-sync's keep hivemind's: mean_replies=False);
  ``GuardedOuterAverager`` answers run members only.
- ``RobustGradientAverager`` and ``GuardedRobustGradientAverager`` (``--aggregation centered-clip``): the parts this
  peer reduces are aggregated with CenteredClip and their senders scored (robust_allreduce.py).

Mixin order matters: a mixin that overrides ``step`` or ``get_current_state`` comes before TrainingStateAverager,
one that TrainingStateAverager must call through (CheckedDownloads, CancellableRounds) after it.
"""

from __future__ import annotations

from collections.abc import Callable

from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager

from peer.hivemind_gaps.averager_guard import GuardedAveragerMixin
from peer.hivemind_gaps.cancellable_rounds import CancellableRounds
from peer.hivemind_gaps.checked_parts import CheckedRounds
from peer.hivemind_gaps.consistent_state import ConsistentStateMixin
from peer.hivemind_gaps.mean_replies import MeanReplies
from peer.hivemind_gaps.robust_allreduce import RobustAggregation
from peer.hivemind_gaps.state_check import CheckedDownloads, FastSchedulerCatchUp
from peer.hivemind_gaps.state_layout import StateLayout
from peer.hivemind_gaps.state_rounds import CheckedStateRounds
from peer.hivemind_gaps.traffic import CountedTraffic


class HivemindHandleNames:
    """Put first among the bases of a subclass of a hivemind averager: its RPC handlers keep hivemind's names.

    hivemind names each RPC handler after the class (``ServicerBase._get_handle_name``), so a subclass would serve,
    and call, handlers that plain hivemind averagers (and peers with another composition) do not know.
    """

    @classmethod
    def _get_handle_name(cls, namespace, method_name: str) -> str:
        hivemind_class = next(base for base in cls.__mro__ if base.__module__.startswith("hivemind."))
        return hivemind_class._get_handle_name(namespace, method_name)


class CheckedTrainingStateAverager(
    HivemindHandleNames, FastSchedulerCatchUp, CheckedRounds, TrainingStateAverager, CheckedDownloads
):
    """hivemind's TrainingStateAverager that refuses non-finite or implausible downloaded states (the monitor's),
    and non-finite parts and results in its rounds (checked_parts.py)."""


class ConsistentTrainingStateAverager(
    ConsistentStateMixin, CheckedStateRounds, CheckedTrainingStateAverager, CancellableRounds
):
    """hivemind's TrainingStateAverager whose served state is always one epoch's, with rounds a leaving peer cancels;
    a downloaded state is checked before it is applied (state_check.py), a state round's mean before it is applied
    (state_rounds.py; robust with ``state_clip_settings``)."""


class GuardedTrainingStateAverager(GuardedAveragerMixin, ConsistentTrainingStateAverager):
    """The swarm's TrainingStateAverager (consistent served state) averaging with and serving run members only."""


class CountedGradientAverager(HivemindHandleNames, CountedTraffic, CheckedRounds, GradientAverager):
    """hivemind's GradientAverager counting the payload bytes its all-reduce sends and receives, whose reducers refuse
    non-finite parts and weights, and whose members non-finite results (checked_parts.py)."""


class GuardedGradientAverager(
    HivemindHandleNames, GuardedAveragerMixin, CountedTraffic, CheckedRounds, GradientAverager
):
    """hivemind's GradientAverager that averages with run members only (pass ``membership=``); rounds checked as
    CountedGradientAverager's."""


class OuterAverager(
    HivemindHandleNames, MeanReplies, CountedTraffic, CheckedRounds, CheckedDownloads, CancellableRounds
):
    """A DecentralizedAverager whose averaged tensors are pseudo-gradients and whose served state is not them.

    Args:
        state_provider: called (in this process, by hivemind's state-serving thread) for what a joiner downloads:
            ``(metadata, tensors, infos)`` as ``DecentralizedAverager.get_current_state`` returns.
        state_layout: what a downloaded state must look like (its tensors' shapes never change, so it is given once:
            reading it from the served state would copy the whole state at every download).
        args, kwargs: as ``DecentralizedAverager``.
    """

    def __init__(self, *args, state_provider: Callable[[], tuple], state_layout: StateLayout, **kwargs):
        self._state_provider, self._state_layout = state_provider, state_layout
        super().__init__(*args, **kwargs)

    def get_current_state(self):
        return self._state_provider()

    def state_layout(self) -> StateLayout:
        return self._state_layout


class GuardedOuterAverager(GuardedAveragerMixin, OuterAverager):
    """The local-steps averager of a closed run: averages with and serves run members only (pass ``membership=``)."""


class RobustGradientAverager(HivemindHandleNames, CountedTraffic, RobustAggregation, GradientAverager):
    """hivemind's GradientAverager reducing its parts with CenteredClip (pass ``clip_settings=``, optional)."""


class GuardedRobustGradientAverager(
    HivemindHandleNames, GuardedAveragerMixin, CountedTraffic, RobustAggregation, GradientAverager
):
    """The closed run's GradientAverager (run members only) reducing its parts with CenteredClip."""
