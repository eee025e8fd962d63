"""No member reduces more than its share of a robust all-reduce, whatever bandwidth it declares (real DHTs, real
averagers).

hivemind sizes each peer's share of the vector to reduce by the bandwidth the peer declares, and a reducer returns
the aggregate of its share to everybody, unchecked. A member declaring 1e9 became the reducer of the whole vector,
so CenteredClip at the honest peers had nothing to reduce. ``equal_shares`` (robust_allreduce.py) gives every
reducing peer 1/n.
"""

from __future__ import annotations

import pytest
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import AllreduceException
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer

from peer.hivemind_gaps import robust_allreduce, state_rounds
from peer.hivemind_gaps.averagers import HivemindHandleNames
from peer.hivemind_gaps.robust_allreduce import equal_shares
from peer.hivemind_gaps.state_rounds import STATE_ROUND_CLIP, CheckedStateRounds
from tests.peer.test_robust_quorum import ATTACKER, HONEST, RobustAverager, Swarm, average_together

SIZE = 3 * 2**17  # three of hivemind's 2**19-byte parts: one share each when shares are equal
NODE, CLIENT = AveragingMode.NODE.value, AveragingMode.CLIENT.value


class Peer:
    """What equal_shares reads of this peer's averager: its declaration, and the groups it is averaging in."""

    serializer = MSGPackSerializer

    def __init__(self, bandwidth=100.0, mode=AveragingMode.NODE):
        self.peer_id, self.bandwidth, self.mode, self._running_groups = PeerID(b"me"), bandwidth, mode, {}


def group_of(entries: list[list], me: int = 0) -> GroupInfo:
    peer_ids = tuple(PeerID(b"me") if index == me else PeerID(b"peer %d" % index) for index in range(len(entries)))
    return GroupInfo(b"g", peer_ids, tuple(MSGPackSerializer.dumps(entry) for entry in entries))


def shares(entries: list[list], peer: Peer) -> tuple[int, ...]:
    gathered = equal_shares(peer, group_of(entries)).gathered
    bandwidths = [MSGPackSerializer.loads(entry)[0] for entry in gathered]
    modes = [MSGPackSerializer.loads(entry)[1] for entry in gathered]
    return load_balance_peers(900, [0.0 if mode == CLIENT else share for share, mode in zip(bandwidths, modes)])


def test_declared_bandwidths_are_made_equal():
    assert shares([[100.0, NODE, b""], [1e9, NODE, b""], [None, NODE, b""]], Peer()) == (300, 300, 300)
    assert shares([[100.0, NODE, b""], [1e9, NODE, b""], [0.0, NODE, b""]], Peer()) == (300, 300, 300)
    # a client reduces nothing; the user data each peer gathered is kept
    assert shares([[100.0, NODE, b""], [5.0, CLIENT, b"x"]], Peer()) == (900, 0)
    gathered = equal_shares(Peer(), group_of([[100.0, NODE, b""], [5.0, CLIENT, b"epoch 7"]])).gathered
    assert MSGPackSerializer.loads(gathered[1]) == [None, CLIENT, b"epoch 7"]


def test_a_leader_that_alters_this_peers_declaration_or_sends_garbage_is_refused():
    with pytest.raises(
        AllreduceException,
        match=f"the leader relayed this peer's bandwidth and mode as 100.0, {CLIENT}, not 100.0, {NODE}",
    ):
        equal_shares(Peer(), group_of([[100.0, CLIENT, b""], [1e9, NODE, b""]]))  # made a client: reduces nothing
    with pytest.raises(AllreduceException, match=f"as 0.0, {NODE}"):
        equal_shares(Peer(), group_of([[0.0, NODE, b""], [1e9, NODE, b""]]))
    garbage = GroupInfo(b"g", (PeerID(b"me"),), (b"\xc1 not msgpack",))
    with pytest.raises(MatchmakingException, match="malformed group metadata from the leader"):
        equal_shares(Peer(), garbage)


class MeanReducer(HivemindHandleNames, DecentralizedAverager):
    """The attacker: it shares the vector as the robust peers do (or every round would fail: parts of the wrong
    sizes), and reduces its own share with hivemind's mean, which it returns to everybody."""

    async def _aggregate_with_group(self, group_info, *args, **kwargs):
        shared = robust_allreduce.equal_shares(self, group_info)  # looked up here: the control patches it
        return await super()._aggregate_with_group(shared, *args, **kwargs)


class StateRoundAverager(HivemindHandleNames, CheckedStateRounds, DecentralizedAverager):
    """A robust state round's averager on hivemind's base averager: its one tensor is the "parameters" group."""

    opt_keys_for_averaging = ()

    def __init__(self, tensors, *args, **kwargs):
        self.main_parameters = list(tensors)
        super().__init__(tensors, *args, state_clip_settings=STATE_ROUND_CLIP, **kwargs)


class BigSwarm(Swarm):
    def averager(self, cls, index: int, value: float, **kwargs):
        made = cls(
            [torch.full((SIZE,), value)],
            self.dhts[index],
            prefix="shares_test",
            min_matchmaking_time=2.0,
            request_timeout=1.0,
            # not min_matchmaking_time, hivemind's default: on a loaded CI machine a part came later than 2 s, the
            # round went partial and the honest peer kept its own values for that part (0.333 kept in the control)
            next_chunk_timeout=20.0,
            start=True,
            **kwargs,
        )
        self.averagers.append(made)
        return made


@pytest.mark.timeout(150)
@pytest.mark.parametrize("honest_class", [RobustAverager, StateRoundAverager], ids=["gradient", "state"])
@pytest.mark.parametrize("balancing", ["equal", "hivemind-control"])
def test_a_member_declaring_a_huge_bandwidth_reduces_only_its_share(monkeypatch, balancing, honest_class):
    """Two robust peers (of gradient rounds, or of state rounds) and an attacker declaring 1e9 Mbit/s that sends 1000
    where they send 1. The share it reduces comes back as the mean (334; a state round moves 5% toward it), the parts
    they reduce with CenteredClip as 1. With equal shares they reduce 2/3 of the vector; with hivemind's balancing
    (the control) next to nothing."""
    if balancing == "hivemind-control":  # before the averagers' processes fork: they run the patched modules
        for module in (robust_allreduce, state_rounds):
            monkeypatch.setattr(module, "equal_shares", lambda averager, group_info: group_info)
    swarm = BigSwarm(3)
    try:
        attacker = swarm.averager(MeanReducer, 0, ATTACKER, bandwidth=1e9)
        # 100 Mbit/s: what the swarm's peers declare by default (--bandwidth)
        honest = [swarm.averager(honest_class, index, HONEST, bandwidth=100.0) for index in (1, 2)]
        average_together([attacker, *honest])
        for each in honest:
            with each.get_tensors() as tensors:
                kept = float((tensors[0] - HONEST).abs().lt(1e-3).float().mean())
            print(
                f"{balancing}, {honest_class.__name__}: share of the honest peer's vector still at the honest value: {kept:.3f}"
            )
            if balancing == "equal":
                assert kept == pytest.approx(2 / 3, abs=0.01)
            else:
                assert kept < 0.1
    finally:
        swarm.shutdown()
