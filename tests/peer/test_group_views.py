"""A leader that tells members different groups cannot make a robust round average slices of different places
(real DHTs, real averagers; group_views.py).

hivemind's leader sends each follower the assembled group in a message of its own. Told the same members in another
order, a follower sends each groupmate the slice that groupmate reduces in its own order, and the results come back
into the wrong places, silently: every slice has the same size. Robust rounds send a digest of the sender's view with
its parts, and reducers refuse parts under another view.
"""

from __future__ import annotations

import ctypes
import inspect
import multiprocessing as mp
import re
import time
from types import SimpleNamespace
from typing import AsyncIterator  # noqa: UP035 - hivemind's servicer tells a stream by typing's alias only

import pytest
import torch
from hivemind.averaging import allreduce
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MSGPackSerializer, get_dht_time

from peer.hivemind_gaps import robust_allreduce, state_rounds
from peer.hivemind_gaps.group_views import refuse_split_group, view_digest
from tests.peer.test_equal_shares import SIZE, BigSwarm, StateRoundAverager
from tests.peer.test_hivemind_gaps import REVIEW
from tests.peer.test_robust_quorum import RobustAverager, average_together


def group(order: list[int], gathered: dict[int, bytes] | None = None) -> GroupInfo:
    gathered = gathered or {}
    return GroupInfo(
        b"g",
        tuple(PeerID(b"peer %d" % index) for index in order),
        tuple(gathered.get(index, MSGPackSerializer.dumps([None, 0, b""])) for index in order),
    )


def test_a_view_is_the_members_in_order_with_what_they_declared():
    assert view_digest(group([0, 1, 2])) == view_digest(group([0, 1, 2]))
    assert view_digest(group([0, 1, 2])) != view_digest(group([2, 0, 1]))  # the same members in another order
    assert view_digest(group([0, 1, 2])) != view_digest(group([0, 1]))
    other_declaration = {1: MSGPackSerializer.dumps([None, 1, b""])}  # a member shown as a client
    assert view_digest(group([0, 1, 2])) != view_digest(group([0, 1, 2], other_declaration))
    # fields are length-prefixed: moving a byte from one entry to the next is another view
    assert view_digest(group([0, 1], {0: b"ab", 1: b"c"})) != view_digest(group([0, 1], {0: b"a", 1: b"bc"}))


def test_a_round_left_under_the_minimum_by_other_views_is_refused():
    three = group([0, 1, 2])
    senders = three.peer_ids
    runner = SimpleNamespace(sender_peer_ids=senders, banned_senders=set(), refused_views=set())
    refuse_split_group(runner, three, min_group_size=3)  # nobody refused: nothing to say
    runner.refused_views = runner.banned_senders = {senders[1]}
    refuse_split_group(runner, three, min_group_size=2)  # the parts of two members averaged: enough
    with pytest.raises(AllreduceException, match="1 of 2 groupmates were told of another group.* of 2 member"):
        refuse_split_group(runner, three, min_group_size=3)
    # a member that never sent (a leader can name peers that are not there) does not count as averaged either
    runner.banned_senders = {senders[1], senders[2]}
    with pytest.raises(AllreduceException, match="the parts of 1 member"):
        refuse_split_group(runner, three, min_group_size=2)


def test_hivemind_leaves_the_field_the_digest_travels_in_alone():
    """The digest rides in AveragingData.peer_id, which hivemind 1.1.12 declares and neither sets nor reads."""
    assert "peer_id" in averaging_pb2.AveragingData.DESCRIPTOR.fields_by_name
    source = inspect.getsource(allreduce)
    assert not re.search(r"AveragingData\([^)]*peer_id=", source), REVIEW
    assert not re.search(r"\b(request|msg|message)\.peer_id\b", source), REVIEW


def rotated(message: averaging_pb2.MessageFromLeader) -> averaging_pb2.MessageFromLeader:
    """The leader's word with the members in another order, each keeping its own declaration."""
    peers, gathered = list(message.ordered_peer_ids), list(message.gathered)
    return averaging_pb2.MessageFromLeader(
        code=message.code,
        group_id=message.group_id,
        ordered_peer_ids=peers[-1:] + peers[:-1],
        gathered=gathered[-1:] + gathered[:-1],
    )


class Equivocating:
    """Averager mixin: as leader, it tells its first follower of each group the members in another order (every
    member's own declaration intact, so nothing else refuses the group); it averages honestly."""

    def __init__(self, *args, **kwargs):
        # made before hivemind forks the averager's process: whether to lie, and how many times it did
        self.lying, self.lies = mp.Value(ctypes.c_bool, False), mp.Value(ctypes.c_int64, 0)
        self._told: set[bytes] = set()
        super().__init__(*args, **kwargs)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        async for message in super().rpc_join_group(request, context):
            lie = self.lying.value and message.code == averaging_pb2.BEGIN_ALLREDUCE
            if lie and message.group_id not in self._told:
                self._told.add(message.group_id)
                message = rotated(message)
                with self.lies.get_lock():
                    self.lies.value += 1
            yield message


class EquivocatingAverager(Equivocating, RobustAverager):
    pass


class EquivocatingStateAverager(Equivocating, StateRoundAverager):
    pass


KINDS = {"gradient": (RobustAverager, EquivocatingAverager), "state": (StateRoundAverager, EquivocatingStateAverager)}


def off_its_place(averager) -> float:
    """How far the averager's vector is from 0, 1, 2, ... (where every member started)."""
    with averager.get_tensors() as tensors:
        return float((tensors[0] - torch.arange(SIZE, dtype=torch.float32)).abs().max())


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("views", ["bound", "unbound-control"])
def test_a_follower_told_another_order_does_not_average_slices_of_other_places(monkeypatch, views, kind):
    """Three robust members, each holding 0, 1, 2, ... (three slices of equal size); the leader starts first (so it
    leads) and tells one follower the members in another order. Bound, every member still holds 0, 1, 2, ...
    afterwards: the misled follower's parts are refused and it keeps its own. Unbound (the control: every digest the
    same), the misled follower's slices come back from the wrong places."""
    if views == "unbound-control":  # before the averagers' processes fork: they run the patched modules
        for module in (robust_allreduce, state_rounds):
            monkeypatch.setattr(module, "view_digest", lambda group_info: b"same")
    honest_class, leader_class = KINDS[kind]
    swarm = BigSwarm(3)
    try:
        start = torch.arange(SIZE, dtype=torch.float32)
        options = {"bandwidth": 100.0, "target_group_size": 3}
        leader = swarm.averager(leader_class, 0, 0.0, **options)
        followers = [swarm.averager(honest_class, index, 0.0, **options) for index in (1, 2)]
        average_together([leader, *followers])  # every DHT knows every other: the leader is found at once
        for each in (leader, *followers):
            with each.get_tensors() as tensors:
                tensors[0].copy_(start)
        leader.lying.value = True
        # the leader's round is due first: the followers, looking later, find it the earliest leader to join
        rounds = [leader.step(gather=0, scheduled_time=get_dht_time() + 6, timeout=20, wait=False)]
        time.sleep(1.5)
        rounds += [
            each.step(gather=index, scheduled_time=get_dht_time() + 8, timeout=20, wait=False)
            for index, each in enumerate(followers, 1)
        ]
        failed = 0
        for future in rounds:
            try:
                future.result(timeout=60)
            except Exception:  # noqa: BLE001 - the misled follower's round: refused, or no group left to retry in
                failed += 1
        assert leader.lies.value >= 1, "the attacker did not lead: nobody was misled"
        worst = max(off_its_place(each) for each in (leader, *followers))
        print(f"{kind}, {views}: lies {leader.lies.value}, failed rounds {failed}, worst distance {worst:.1f}")
        if views == "bound":
            assert failed == 1, "the misled follower's round was not refused (or another's was)"
            assert worst < 1e-3
        else:
            assert failed == 0
            assert worst > 1000.0, "the control's misled follower averaged the right slices"
    finally:
        swarm.shutdown()
