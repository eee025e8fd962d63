"""Robust rounds average in groups of a minimum size, as follower and as leader (real DHTs, real averagers).

CenteredClip outvotes a minority of its group only. hivemind's ``min_group_size`` binds a leader alone and is fixed at
start; ``RobustAggregation`` also refuses, as a follower, a group under the minimum, and takes a new minimum while it
runs (``set_min_group_size``, what ``SwarmOptimizer`` calls with ``--robust-quorum``).
"""

from __future__ import annotations

import re
import time

import hivemind
import pytest
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.utils import get_dht_time

from peer.hivemind_gaps.averagers import HivemindHandleNames
from peer.hivemind_gaps.robust_allreduce import QuorumKeeper, RobustAggregation, quorum_group_size
from peer.swarm.config import OptimConfig
from tests.peer.test_access import LOOPBACK

PREFIX = "quorum_test"
HONEST, ATTACKER = 1.0, 1000.0


class RobustAverager(HivemindHandleNames, RobustAggregation, DecentralizedAverager):
    """hivemind's base averager with the robust mixin (what the swarm's robust gradient averagers compose)."""


class PlainAverager(HivemindHandleNames, DecentralizedAverager):
    """hivemind's averager: an attacker needs nothing else to lead a group."""


class Swarm:
    """DHT nodes on 127.0.0.1, the first one everybody's initial peer, and the averagers made on them."""

    def __init__(self, size: int):
        first = hivemind.DHT(start=True, host_maddrs=LOOPBACK)
        peers = [str(maddr) for maddr in first.get_visible_maddrs()]
        self.dhts = [first] + [
            hivemind.DHT(initial_peers=peers, start=True, host_maddrs=LOOPBACK) for _ in range(size - 1)
        ]
        self.averagers: list[DecentralizedAverager] = []

    def averager(self, cls, index: int, value: float, **kwargs) -> DecentralizedAverager:
        made = cls(
            [torch.full((64,), value)],
            self.dhts[index],
            prefix=PREFIX,
            min_matchmaking_time=2.0,
            request_timeout=1.0,
            start=True,
            **kwargs,
        )
        self.averagers.append(made)
        return made

    def shutdown(self) -> None:
        for each in self.averagers:
            each.shutdown()
        for dht in self.dhts:
            dht.shutdown()


@pytest.fixture
def swarm_of_three():
    made = Swarm(3)
    yield made
    made.shutdown()


def value_of(averager: DecentralizedAverager) -> float:
    with averager.get_tensors() as tensors:
        return tensors[0].mean().item()


def test_the_quorum_is_a_share_of_the_peers_and_never_under_two():
    assert quorum_group_size(1.0, 5) == 5
    assert quorum_group_size(0.8, 5) == 4
    assert quorum_group_size(0.6, 5) == 3
    assert quorum_group_size(1.0, 1) == 2
    assert quorum_group_size(0.0, 8) == 2


def test_the_minimum_rises_at_once_and_falls_only_when_a_lower_count_lasts():
    keeper = QuorumKeeper(1.0, hold=10.0)
    assert [keeper.update(peers, now) for now, peers in [(0, 1), (1, 3), (2, 5), (3, 5)]] == [None, 3, 5, None]
    # a live peer's entry lapsing for a few seconds: the minimum stays
    assert [keeper.update(peers, now) for now, peers in [(4, 4), (8, 3), (12, 5), (13, 4)]] == [None] * 4
    # a peer gone for good: the minimum follows once no count of 5 was read for the hold (the last at t=12)
    assert [keeper.update(4, now) for now in (20, 21.5, 22.5)] == [None, None, 4]
    assert keeper.update(5, 24) == 5  # back up at once


def test_the_quorum_setting_is_a_share_and_needs_centered_clip():
    assert OptimConfig().robust_quorum == 0.0
    assert OptimConfig(aggregation="centered-clip", robust_quorum=1.0).robust_quorum == 1.0
    with pytest.raises(ValueError, match=r"share of the peers, in \[0, 1\]"):
        OptimConfig(aggregation="centered-clip", robust_quorum=1.5)
    with pytest.raises(ValueError, match="needs --aggregation centered-clip"):
        OptimConfig(robust_quorum=0.5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("minimum", [3, 2])
def test_a_follower_refuses_a_small_group_an_attacker_leads(swarm_of_three, minimum):
    """The attacker starts looking first, so it leads; it assembles itself and the honest peer, a group of two. With
    a minimum of 3 the honest peer refuses it (its round finds no group, its value stays); with hivemind's 2 it
    averages with the attacker (the control: two senders are averaged, the honest value is dragged away)."""
    attacker = swarm_of_three.averager(PlainAverager, 0, ATTACKER, target_group_size=2)
    honest = swarm_of_three.averager(RobustAverager, 1, HONEST)
    honest.set_min_group_size(minimum)
    attacker.step(gather="attacker", scheduled_time=get_dht_time() + 5, timeout=15, wait=False)
    time.sleep(1.5)  # the attacker has declared itself: the honest peer's first leader
    honest_round = honest.step(gather="honest", scheduled_time=get_dht_time() + 3, timeout=12, wait=False)
    if minimum == 3:
        with pytest.raises(Exception):  # noqa: B017 -- hivemind's "could not find a group", whatever its type
            honest_round.result(timeout=60)
        assert value_of(honest) == HONEST
    else:
        gathered = honest_round.result(timeout=60)
        assert len(gathered) == 2
        assert value_of(honest) > 100 * HONEST, "the control did not average with the attacker"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("minimum", [3, 2])
def test_a_leader_waits_past_its_matchmaking_time_for_its_minimum(swarm_of_three, minimum):
    """Two peers look for a group at once, the third 6 s later (three times the matchmaking time). With a minimum of
    3 all three average together; with hivemind's 2 the first two average alone (the control)."""
    averagers = [swarm_of_three.averager(RobustAverager, index, float(index)) for index in range(3)]
    for each in averagers:
        each.set_min_group_size(minimum)
    rounds = [each.step(gather=index, timeout=40, wait=False) for index, each in enumerate(averagers[:2])]
    time.sleep(6.0)
    late = averagers[2].step(gather=2, timeout=40, wait=False)
    if minimum == 3:
        for future in (*rounds, late):
            assert len(future.result(timeout=60)) == 3
        assert [round(value_of(each), 4) for each in averagers] == [1.0, 1.0, 1.0]
    else:
        for future in rounds:
            assert len(future.result(timeout=60)) == 2
        with pytest.raises(Exception):  # noqa: B017 -- the late peer finds nobody left to average with
            late.result(timeout=60)


def rounds_after(log: str, marker: str) -> list[int]:
    """The group size of each gradient round a peer's log shows after its first line holding ``marker``."""
    start = log.find(marker)
    assert start >= 0, f"no line holding {marker!r}"
    return [int(size) for size in re.findall(r"Averaged gradients with (\d+) peers", log[start:])]


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_quorum_swarm_averages_in_full_groups_and_lowers_its_quorum_when_a_member_dies(make_swarm):
    """Three CLI peers with --robust-quorum 1.0: each raises its minimum group to 3 as it sees the others, no round
    averages in a smaller group, and after a kill -9 the two survivors lower the minimum to 2 and keep training."""
    swarm = make_swarm()
    for name in ("a", "b", "c"):
        swarm.start_peer(name, extra_flags=["--aggregation", "centered-clip", "--robust_quorum", "1.0"])
    swarm.wait_for_epoch(5, peers=3, timeout=300)
    full = "Robust rounds now average in groups of 3 or more (1 of 3 peers)"
    logs = {name: peer.log_text() for name, peer in swarm.peers.items()}
    for name, log in logs.items():
        sizes = rounds_after(log, full)
        print(f"peer {name}: rounds after the quorum rose to 3: {sizes}")
        assert sizes and set(sizes) == {3}, f"peer {name} averaged in a group under the quorum: {sizes}"
    swarm.peers["c"].kill()
    killed_at = max(swarm.epochs())
    swarm.wait_for_epoch(killed_at + 3, peers=2, timeout=180)
    for name in ("a", "b"):
        log = swarm.peers[name].log_text()
        assert "Robust rounds now average in groups of 2 or more (1 of 2 peers)" in log[log.find(full) :], name
