"""Robust all-reduce: each reducer of hivemind's butterfly all-reduce aggregates its part with CenteredClip.

hivemind 1.1.12 averages whatever the members send: ``TensorPartReducer.accumulate_part`` adds every sender's part
into one running sum, so one member moves every peer's gradient as far as it likes. Here ``CenteredClipReducer``
keeps the received parts of the current part index instead and, once all live senders have sent theirs, returns
their CenteredClip (peer/swarm/centered_clip.py) and scores each sender on it. ``RobustAllReduceRunner`` is
hivemind's ``AllReduceRunner`` with that reducer; ``RobustAggregation`` is an averager mixin whose
``_run_allreduce_inplace_`` (hivemind's, but applying the results once all are in) builds that runner, and which
hands each round's scores from the averager's process to the peer's through a bounded queue.

Every sender's first part carries a digest of its view of the group, and a reducer refuses parts under another
(group_views.py: a leader telling members different groups). Everything else of the protocol is hivemind's:
senders, deltas, timeouts, bans. A peer running this averages with peers running hivemind's mean (the wire format
is the same: hivemind leaves the digest's field alone); only the parts it reduces are robust, which is why
``--aggregation`` is a run-wide setting.

CenteredClip outvotes a minority of a group only: where attackers are half of a small group, the group is theirs.
hivemind's ``min_group_size`` binds a leader alone (a follower averages in whatever group its leader assembles, so an
attacker leading itself and one honest follower owns that follower's round) and is fixed when the averager starts.
``GroupQuorum`` (``RobustAggregation``'s base, and the robust state rounds') refuses, as follower and as leader, a
group under its minimum, and ``set_min_group_size`` changes the minimum while the averager runs
(``quorum_group_size``: a share of the peers training).

The peers training are counted from progress entries, which anyone can sign: entries under a few extra keys would
raise the minimum out of reach, every round would find no group, and each peer would step on its own gradients. So
the minimum is capped at the peers seen in this averager's last SEEN_GROUPS assembled groups, which only peers that
took part in matchmaking enter. The price: a peer that has seen no group yet (one just started) averages in any group.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import queue
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.utils import get_dht_time

from peer.hivemind_gaps.averager_guard import fail_group
from peer.hivemind_gaps.checked_parts import CheckedAllReduceRunner, check_size, collect_outputs, start_runner
from peer.hivemind_gaps.group_views import ViewBoundRunner, refuse_split_group, view_digest
from peer.swarm.centered_clip import ClipSettings, centered_clip

logger = logging.getLogger(__name__)
# Two senders are each as far from their midpoint, the median: both score 1 whoever lies. Only 3 or more can outvote.
MIN_SENDERS_TO_SCORE = 3
MAX_QUEUED_ROUNDS = 64  # rounds whose scores wait for the peer to read them; later ones are dropped, not buffered
# groups whose members cap the minimum: enough that peers of split rounds (3 + 2 of five) are all in, few enough
# that a peer gone long ago is not (the progress count drops it sooner anyway)
SEEN_GROUPS = 10


def quorum_group_size(quorum: float, num_peers: int) -> int:
    """The smallest group a robust round may average in: ``quorum`` of the ``num_peers`` training (hivemind's 2 at
    least). With 2 attackers of 5, only groups of all 5 keep them a minority: quorum 1.0."""
    return max(2, math.ceil(quorum * num_peers - 1e-9))


class QuorumKeeper:
    """The smallest group to average in: the largest ``quorum_group_size`` of the peer counts a progress tracker read
    over the last ``hold`` seconds. So it rises at once and falls only when a lower count has lasted ``hold``.

    A live peer's progress entry can lapse for a few seconds when it reports late (seen with 8 peers on 2 cores: the
    count flapped between 6 and 8 dozens of times in a run), and each dip would let a round average in a group that
    a minority can be half of. A dead peer's entry is gone for good, so waiting ``hold`` more seconds costs a round.

    Args:
        quorum: the share of the peers training (quorum_group_size).
        hold: seconds a lower count must last before the minimum follows it down.
    """

    def __init__(self, quorum: float, hold: float):
        self.quorum, self.hold = quorum, hold
        self.size = 2  # hivemind's default, an averager's at start
        self._recent: deque[tuple[float, int]] = deque()  # (when, wanted size), oldest first

    def update(self, num_peers: int, now: float) -> int | None:
        """The new minimum group size when it changes with this count, else None."""
        self._recent.append((now, quorum_group_size(self.quorum, num_peers)))
        while now - self._recent[0][0] > self.hold:
            self._recent.popleft()
        wanted = max(size for _, size in self._recent)
        if wanted == self.size:
            return None
        self.size = wanted
        return wanted


@dataclass
class RoundScores:
    """What one reducer saw in one all-reduce round: each sender's mean score over the parts it reduced (keyed by
    base58 peer id), how many parts, and the seconds CenteredClip took."""

    scores: dict[str, float]
    parts: int
    aggregation_seconds: float
    finished_at: float


class CenteredClipReducer(TensorPartReducer):
    """hivemind's TensorPartReducer that returns the CenteredClip of each part instead of its weighted mean.

    Args:
        part_shapes: shapes of the parts this peer reduces.
        num_senders: senders in the group.
        settings: CenteredClip's settings.
    """

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, settings: ClipSettings):
        self.settings = settings
        self.received: list[tuple[int, torch.Tensor, float]] = []  # (sender, part, weight) of the current part
        self.score_sums, self.parts_scored = [0.0] * num_senders, [0] * num_senders
        self.aggregation_seconds, self.parts_reduced = 0.0, 0
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        self.received = []
        super().reset_accumulators()

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        """hivemind's accumulate_part (1.1.12), keeping the part instead of adding it to a sum."""
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        # before it is counted: hivemind then bans this sender alone and the others' round completes (a part of
        # another size would fail the stack of the whole part, in whichever sender's call completed it)
        check_size(sender_index, part_index, tensor_part, self.part_shapes[part_index])
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await self._wait_for_previous_part()
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self.received.append((sender_index, tensor_part, weight))
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future

    async def _wait_for_previous_part(self) -> None:
        await asyncio.wait(
            {self.current_part_future, asyncio.create_task(self.finished.wait())},
            return_when=asyncio.FIRST_COMPLETED,
        )
        if self.finished.is_set():
            raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            self.current_part_future.set_result(self._robust_average())
            self.reset_accumulators()

    def _robust_average(self) -> torch.Tensor:
        shape = self.part_shapes[self.current_part_index]
        if not self.received:  # every sender failed: hivemind's mean would be 0/0 too
            return torch.full(shape, float("nan"))
        started = time.perf_counter()
        senders = [sender for sender, _, _ in self.received]
        parts = torch.stack([part.reshape(-1).float() for _, part, _ in self.received])
        weights = torch.tensor([float(weight) for _, _, weight in self.received])
        result = centered_clip(parts, weights, self.settings)
        if len(senders) >= MIN_SENDERS_TO_SCORE:
            for sender, score in zip(senders, result.scores):
                self.score_sums[sender] += score
                self.parts_scored[sender] += 1
        self.aggregation_seconds += time.perf_counter() - started
        self.parts_reduced += 1
        return result.centre.reshape(shape)

    def mean_scores(self) -> dict[int, float]:
        """Each sender's mean score over the parts it was scored on (senders of no scored part left out)."""
        return {
            sender: total / count
            for sender, (total, count) in enumerate(zip(self.score_sums, self.parts_scored))
            if count
        }


def equal_shares(averager, group_info: GroupInfo) -> GroupInfo:
    """``group_info`` with every peer's declared bandwidth (what hivemind sizes each peer's share of the vector to
    reduce by) made equal: each reducing peer reduces 1/n of the vector, whatever it declares. Call it in the
    averager's process, where ``averager`` is this peer's.

    A reducer returns the aggregate of its share to everybody, and nobody can check it: a member that declared a
    bandwidth of 1e9 reduced the whole vector, CenteredClip or not (tests/peer/test_equal_shares.py). A declared 0 is
    made equal too (this project's peers never declare it: --bandwidth must be positive); client-mode peers still
    reduce nothing. Every robust peer rewrites the same gathered data the same way, so their shares agree.

    The leader relays what each member declared, and could rewrite it (mark honest peers as clients, which reduce
    nothing): a peer whose own declaration the leader altered refuses the group. A leader that tells each follower
    something else about the others has its parts refused by the reducers (group_views.py: each part carries its
    sender's view; nobody is accused, as the parts do not tell who lied).
    """
    try:
        declared = [averager.serializer.loads(entry) for entry in group_info.gathered]
        own_bandwidth, own_mode, _ = declared[group_info.peer_ids.index(averager.peer_id)]
        gathered = tuple(averager.serializer.dumps([None, mode, user_data]) for _, mode, user_data in declared)
    except Exception as error:  # noqa: BLE001 - whatever the leader sent: hivemind looks for another group then
        malformed = MatchmakingException(f"malformed group metadata from the leader: {error!r}")
        fail_group(averager._running_groups, group_info.group_id, malformed)
    if own_bandwidth != averager.bandwidth or own_mode != averager.mode.value:
        altered = AllreduceException(
            f"the leader relayed this peer's bandwidth and mode as {own_bandwidth!r}, {own_mode!r}, not "
            f"{averager.bandwidth!r}, {averager.mode.value!r}: it could size the shares to reduce its way"
        )
        logger.warning(f"Not averaging in this group: {altered}")
        fail_group(averager._running_groups, group_info.group_id, altered)
    return GroupInfo(group_info.group_id, group_info.peer_ids, gathered)


class RobustAllReduceRunner(ViewBoundRunner, CheckedAllReduceRunner):
    """hivemind's AllReduceRunner whose reducer is a CenteredClipReducer (built with ``clip_settings``), whose
    received results must be finite (checked_parts.py), and which refuses parts sent under another view of the group
    (group_views.py: pass ``view_digest=``)."""

    def __init__(self, *, clip_settings: ClipSettings, **kwargs):
        self.clip_settings = clip_settings
        super().__init__(**kwargs)

    def make_reducer(self) -> CenteredClipReducer:
        shapes = tuple(part.shape for part in self.parts_for_local_averaging)
        return CenteredClipReducer(shapes, len(self.sender_peer_ids), self.clip_settings)

    def round_scores(self) -> RoundScores:
        reducer = self.tensor_part_reducer
        scores = {self.sender_peer_ids[index].to_base58(): score for index, score in reducer.mean_scores().items()}
        return RoundScores(scores, reducer.parts_reduced, reducer.aggregation_seconds, get_dht_time())


class GroupQuorum:
    """Averager mixin: robust rounds average in groups of a minimum size that can change while the averager runs
    (``set_min_group_size``), refused as follower as well as leader (``refuse_small_group``; module doc)."""

    rounds_name = "Robust rounds"  # how its log lines name the rounds it binds

    def __init__(self, *args, **kwargs):
        # in the averager's process: the minimum asked for (None: hivemind's, left alone) and the recent groups
        self._wanted_group_size: int | None = None
        self._recent_groups: deque[frozenset] = deque(maxlen=SEEN_GROUPS)
        super().__init__(*args, **kwargs)

    def set_min_group_size(self, size: int) -> None:
        """Average in groups of ``size`` peers or more from the next matchmaking on (returns at once), or of as many
        as took part in this averager's last SEEN_GROUPS groups, if fewer."""
        self._outer_pipe.send(("_set_min_group_size", [size], {}))

    async def _set_min_group_size(self, size: int) -> None:
        self._wanted_group_size = size
        self._apply_min_group_size()

    def _apply_min_group_size(self) -> None:
        # hivemind's leader reads the minimum each time its matchmaking time is up, and keeps looking while its group
        # is smaller; the follower check below reads it too
        if self._wanted_group_size is None:
            return
        seen = len(frozenset().union(*self._recent_groups))
        size = max(2, min(self._wanted_group_size, seen))
        if size != self._matchmaking.min_group_size:
            self._matchmaking.min_group_size = size
            logger.info(
                f"{self.rounds_name} now average in groups of {size} or more ({self._wanted_group_size} wanted; "
                f"{seen} peers took part in this peer's last {len(self._recent_groups)} groups)"
            )

    def refuse_small_group(self, group_info: GroupInfo, averaged: str) -> None:
        """As a follower too, fail a group under the minimum (hivemind checks it for leaders only); call it first in
        ``_aggregate_with_group``. ``averaged`` names what the round averages, for the log."""
        self._recent_groups.append(frozenset(group_info.peer_ids))
        self._apply_min_group_size()
        needed = self._matchmaking.min_group_size
        if len(group_info.peer_ids) < needed:
            refusal = AllreduceException(
                f"a group of {len(group_info.peer_ids)} peers: {self.rounds_name.lower()} average in groups of "
                f"{needed} or more "
                f"(in a smaller one a minority of the swarm can be half of the group); looking for another"
            )
            logger.warning(f"Not averaging {averaged} with {len(group_info.peer_ids) - 1} peer(s): {refusal}")
            fail_group(self._running_groups, group_info.group_id, refusal)


class RobustAggregation(GroupQuorum):
    """Averager mixin: the parts this peer reduces are aggregated with CenteredClip, and each round's sender scores
    can be read with ``take_round_scores`` from the process that built the averager.

    Args:
        clip_settings: CenteredClip's settings (its defaults if None).
        kwargs: passed to the hivemind averager.
    """

    def __init__(self, *args, clip_settings: ClipSettings | None = None, **kwargs):
        self.clip_settings = clip_settings or ClipSettings()
        # made before hivemind forks the averager's process (in super().__init__), which puts into it
        self._round_scores: multiprocessing.Queue = multiprocessing.Queue(maxsize=MAX_QUEUED_ROUNDS)
        super().__init__(*args, **kwargs)

    async def _aggregate_with_group(self, group_info, *args, **kwargs):
        self.refuse_small_group(group_info, "gradients")
        return await super()._aggregate_with_group(equal_shares(self, group_info), *args, **kwargs)

    def take_round_scores(self) -> list[RoundScores]:
        """The rounds reduced since the previous call, oldest first (thread-safe, never blocks)."""
        rounds = []
        while True:
            try:
                rounds.append(self._round_scores.get_nowait())
            except queue.Empty:
                return rounds

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id: bytes | None = None, **kwargs):
        """hivemind's DecentralizedAverager._run_allreduce_inplace_ (1.1.12) with a RobustAllReduceRunner, applying
        the results once all are in and the round kept enough members of this peer's view (group_views.py)."""
        options = dict(clip_settings=self.clip_settings, view_digest=view_digest(group_info), **kwargs)
        runner = start_runner(self, RobustAllReduceRunner, tensors, group_info, group_id, **options)
        deltas = await collect_outputs(self, runner, group_info)
        self._report(runner)
        refuse_split_group(runner, group_info, self._matchmaking.min_group_size)
        if not deltas:
            return  # an aux peer: it receives nothing
        for tensor, delta in zip(tensors, deltas, strict=True):
            tensor.add_(delta, alpha=self._averaging_alpha)
        self.last_updated = get_dht_time()
        self._state_updated.set()

    def _report(self, runner: RobustAllReduceRunner) -> None:
        scores = runner.round_scores()
        if not scores.parts:
            return  # this peer reduced nothing (a client-mode peer): nobody to score
        # in the averager's process: never wait at exit for the peer to read what is still queued (a full pipe
        # would hang the shutdown); unread scores of a leaving peer are worth nothing
        self._round_scores.cancel_join_thread()
        try:
            self._round_scores.put_nowait(scores)
        except queue.Full:
            logger.debug("Sender scores not read by the peer: dropping a round's")
