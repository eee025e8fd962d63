"""A state averaging round's result is checked before it is applied, and with centered-clip aggregated robustly.

Every ``--average-state-every`` epochs hivemind 1.1.12's TrainingStateAverager averages the peers' parameters and
optimizer statistics, and writes the mean into them as the parts arrive (in place: with the offloaded optimizer these
are the very tensors the optimizer steps). Nothing checks what the members sent: one member sending NaN makes every
peer of its group NaN, one sending its parameters x1000 moves every peer's by x1000 / group size, and with
``--aggregation centered-clip`` the gradient all-reduce is robust while this round, which every member also enters,
is not.

``CheckedStateRounds`` (a TrainingStateAverager mixin, hivemind's ``_run_allreduce_inplace_`` with the updates held
back until the round is whole):

- with ``state_clip_settings`` the parts this peer reduces are aggregated with CenteredClip (robust_allreduce.py's
  runner), every member reduces an equal share (``equal_shares``), and a group under the minimum size that
  ``set_min_group_size`` asks for is refused, as follower and as leader, as is a round left under it by members a
  leader told of another group (group_views.py). Honest peers' states lie close together (they
  apply the same averaged gradients), so a far part is left out. Its scores are not published: a peer that stepped
  on its own gradients for a while is far for honest reasons;
- the result is refused whole (this peer keeps its own state) if any value is not finite;
- each group of tensors (the parameters, each averaged optimizer statistic, the extra tensors) moves at most
  ``MAX_STATE_ROUND_CHANGE`` of its own norm, and each parameter tensor whose norm is at least its even share of
  the parameters' (the LayerNorm gains) at most that much of its own (peer/swarm/bounded_moves.py): a farther
  mean is approached by that much, as the local-steps re-sync does (peer/local_steps.py).

So in a mean run a member moves the others' state by at most 5% of each group's norm per state round, and cannot put
all of that into a LayerNorm gain (measured in tests/peer/test_state_rounds.py, a member sending one gain x1000: the
honest peers' gain x1.37 a round with the group's bound alone, x1.05 with the gain's own); it can into a bias or a
weight matrix, each below its even share (bounded_moves.py says why). In a centered-clip run what it sends is left
out while it is a minority of the group, but not the share it reduces itself (1/n of the vector, returned to
everybody unchecked) nor its part in a group of two (CenteredClip of two is their mean; ``--robust-quorum`` keeps
state rounds from being that small, robust_allreduce.py's GroupQuorum): there the 5% bound is the defence. A
joiner's state is its download, not a round, and is checked there (state_check.py).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp

import torch
from hivemind.utils import get_dht_time

from peer.hivemind_gaps.checked_parts import CheckedAllReduceRunner, collect_outputs, start_runner
from peer.hivemind_gaps.group_views import refuse_split_group, view_digest
from peer.hivemind_gaps.robust_allreduce import GroupQuorum, RobustAllReduceRunner, equal_shares
from peer.swarm.bounded_moves import bound_moves
from peer.swarm.centered_clip import ClipSettings

logger = logging.getLogger(__name__)
# Relative to a group's own norm, per round: the local-steps re-sync's bound (MAX_RESYNC_CHANGE there). Honest rounds
# of tests/peer/test_state_rounds.py moved the parameters by 2.4e-2 at the first round of a run (epoch 2: the peers
# stepped alone while they found each other), 2e-3 to 4e-3 in the next two, under 1e-3 after; LAMB's moments by up to
# 0.30 at the first round, approached 5% at a time then (logged by every round: "relative change")
MAX_STATE_ROUND_CHANGE = 0.05
# CenteredClip's settings for robust state rounds: every honest peer weighs 1 in a state round (hivemind's default
# weight), so a sender's weight counts no more than that (the gradient rounds' cap of 4x the median would let one
# sender claiming 4 outweigh three honest ones inside the rejection radius)
STATE_ROUND_CLIP = ClipSettings(max_weight_ratio=1.0)


class CheckedStateRounds(GroupQuorum):
    """TrainingStateAverager mixin: a state round's mean is applied only when finite, and moves each group of tensors
    (and each parameter tensor above its even share of the parameters' norm) by at most MAX_STATE_ROUND_CHANGE of
    its norm (module doc). Put it before TrainingStateAverager among the bases.

    Args:
        state_clip_settings: CenteredClip's settings for the parts this peer reduces (None: hivemind's mean); such
            robust rounds also keep the group's minimum size that ``set_min_group_size`` asks for (``--robust-quorum``),
            as follower and as leader (robust_allreduce.py's GroupQuorum).
        kwargs: passed to the hivemind averager.
    """

    rounds_name = "Robust state rounds"

    def __init__(self, *args, state_clip_settings: ClipSettings | None = None, **kwargs):
        self.state_clip_settings = state_clip_settings
        # counted in the averager's process, read in the peer's (made before hivemind forks it)
        self._refused_rounds = mp.Value(ctypes.c_int64, 0)
        super().__init__(*args, **kwargs)

    @property
    def refused_state_rounds(self) -> int:
        """State rounds whose mean was not finite: this peer kept its own state."""
        return int(self._refused_rounds.value)

    async def _aggregate_with_group(self, group_info, *args, **kwargs):
        if self.state_clip_settings is not None:  # robust: a group of the minimum size, equal shares to reduce
            self.refuse_small_group(group_info, "the training state")
            group_info = equal_shares(self, group_info)
        return await super()._aggregate_with_group(group_info, *args, **kwargs)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id: bytes | None = None, **kwargs):
        """hivemind's DecentralizedAverager._run_allreduce_inplace_ (1.1.12), applying the updates once all are in
        and checked."""
        if self.state_clip_settings is None:
            runner = start_runner(self, CheckedAllReduceRunner, tensors, group_info, group_id, **kwargs)
        else:
            options = dict(clip_settings=self.state_clip_settings, view_digest=view_digest(group_info), **kwargs)
            runner = start_runner(self, RobustAllReduceRunner, tensors, group_info, group_id, **options)
        updates = await collect_outputs(self, runner, group_info)
        if not updates:
            return  # an aux peer: it receives nothing
        if isinstance(runner, RobustAllReduceRunner):
            refuse_split_group(runner, group_info, self._matchmaking.min_group_size)
        peers = len(group_info.peer_ids) - 1
        updates = self._checked_updates(tensors, updates, peers)
        if updates is None:
            return
        for tensor, update in zip(tensors, updates, strict=True):
            tensor.add_(update, alpha=self._averaging_alpha)
        self.last_updated = get_dht_time()
        self._state_updated.set()

    def _checked_updates(self, tensors, updates, peers: int) -> list[torch.Tensor] | None:
        """The updates to apply: None if any is not finite, each group's scaled down to MAX_STATE_ROUND_CHANGE."""
        if not all(bool(torch.isfinite(update).all()) for update in updates):
            with self._refused_rounds.get_lock():
                self._refused_rounds.value += 1
            logger.error(
                f"Refused the state round with {peers} peer(s): its mean is not finite; keeping this peer's own"
            )
            return None
        bounded, changes = list(updates), []
        for name, indices in self._tensor_groups(len(tensors)):
            group = [updates[i] for i in indices]
            own = [tensors[i] for i in indices]
            # each tensor bounded among the parameters only: LAMB bounds a step by its trust ratio whatever the
            # moments, and honest peers' moments lie far apart per tensor (held so, they met too slowly: CI, stop 28)
            decided = bound_moves(group, own, MAX_STATE_ROUND_CHANGE, per_tensor=name == "parameters")
            changes.append(f"{name} {decided.change:.2e}")
            if decided.bounded:
                for i, move in zip(indices, decided.apply(group), strict=True):
                    bounded[i] = move
                logger.warning(
                    f"The state round's mean {name} lies far from this peer's (relative change {decided.change:.2e}, "
                    f"{decided.held} tensor(s) beyond their own bound): moving at most {MAX_STATE_ROUND_CHANGE} "
                    "toward it"
                )
        logger.info(f"Averaged the training state with {peers} peer(s) (relative change: {', '.join(changes)})")
        return bounded

    def _tensor_groups(self, count: int) -> list[tuple[str, range]]:
        """The averaged tensors in hivemind's order: parameters, then each averaged statistic's, then the extras."""
        size = len(self.main_parameters)
        groups = [("parameters", range(size))]
        for number, key in enumerate(self.opt_keys_for_averaging, start=1):
            groups.append((key, range(number * size, (number + 1) * size)))
        end = size * (1 + len(self.opt_keys_for_averaging))
        if count > end:
            groups.append(("extra tensors", range(end, count)))
        return groups
