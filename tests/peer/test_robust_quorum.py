"""Robust rounds average in groups of a minimum size, as follower and as leader (real DHTs, real averagers).

CenteredClip outvotes a minority of its group only. hivemind's ``min_group_size`` binds a leader alone and is fixed at
start; ``GroupQuorum`` (``RobustAggregation``, robust state rounds) also refuses, as a follower, a group under the
minimum, and takes a new minimum while it runs (``set_min_group_size``, what ``SwarmOptimizer`` calls with
``--robust-quorum``).
"""

from __future__ import annotations

import re
import threading
import time
from functools import partial

import pytest
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.utils import get_dht_time

from peer.hivemind_gaps.averagers import ConsistentTrainingStateAverager, HivemindHandleNames
from peer.hivemind_gaps.robust_allreduce import QuorumKeeper, RobustAggregation, quorum_group_size
from peer.hivemind_gaps.state_rounds import MAX_STATE_ROUND_CHANGE, STATE_ROUND_CLIP
from peer.swarm.config import OptimConfig
from tests.harness import wait_until
from tests.peer.conftest import RUN_ID
from tests.peer.hostile_progress import HostileProgress
from tests.peer.test_averager_guard import PlainAverager, start_dht

PREFIX = "quorum_test"
HONEST, ATTACKER = 1.0, 1000.0


class RobustAverager(HivemindHandleNames, RobustAggregation, DecentralizedAverager):
    """hivemind's base averager with the robust mixin (what the swarm's robust gradient averagers compose)."""


class Swarm:
    """DHT nodes on 127.0.0.1, the first one everybody's initial peer, and the averagers made on them."""

    def __init__(self, size: int):
        first = start_dht()
        self.dhts = [first] + [start_dht(first) for _ in range(size - 1)]
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


def average_together(averagers: list[DecentralizedAverager]) -> None:
    """One round of all of them, each looking at once: after it, each has seen a group of all of them."""
    rounds = [each.step(gather=index, timeout=40, wait=False) for index, each in enumerate(averagers)]
    for future in rounds:
        assert len(future.result(timeout=60)) == len(averagers)


class PlainStateAverager(HivemindHandleNames, TrainingStateAverager):
    """hivemind's state averager on 64 parameters and plain SGD: its averaged tensors are one vector of 64, as the
    other averagers' here (its RPCs keep hivemind's TrainingStateAverager names, as the swarm's state averagers do:
    averagers meet only their own kind)."""

    def __init__(self, tensors, dht, **kwargs):
        params = [torch.nn.Parameter(tensors[0])]
        super().__init__(params=params, optimizer=partial(torch.optim.SGD, lr=0.1), dht=dht, **kwargs)

    def step(self, *args, **kwargs):
        # the bare averaging round, what TrainingStateAverager.step(averaging_round=True) runs inside
        return DecentralizedAverager.step(self, *args, **kwargs)


class RobustStateAverager(PlainStateAverager, ConsistentTrainingStateAverager):
    """The swarm's state averager with --aggregation centered-clip: its state rounds robust."""

    def __init__(self, tensors, dht, **kwargs):
        super().__init__(tensors, dht, state_clip_settings=STATE_ROUND_CLIP, **kwargs)


# (plain averager, robust averager): the gradient rounds' kind and the state rounds' (the swarm's state averager with
# --aggregation centered-clip, whose minimum --robust-quorum sets too)
KINDS = {"gradients": (PlainAverager, RobustAverager), "state": (PlainStateAverager, RobustStateAverager)}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("minimum", [3, 2])
def test_a_follower_refuses_a_small_group_an_attacker_leads(swarm_of_three, minimum, kind):
    """After a round of all three, the attacker starts looking first, so it leads; it assembles itself and the honest
    peer, a group of two. With a minimum of 3 the honest peer refuses it (its round finds no group, its value stays);
    with hivemind's 2 it averages with the attacker (the control: two senders are averaged, the honest value is
    dragged away: all the way in a gradient round, by the 5% bound on a state round's move in a state round)."""
    plain, robust = KINDS[kind]
    attacker = swarm_of_three.averager(plain, 0, HONEST)
    honest = swarm_of_three.averager(robust, 1, HONEST)
    bystander = swarm_of_three.averager(plain, 2, HONEST)
    honest.set_min_group_size(minimum)
    average_together([attacker, honest, bystander])  # the honest peer has seen three peers take part
    with attacker.get_tensors() as tensors:
        tensors[0].fill_(ATTACKER)
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
        dragged = 100 * HONEST if kind == "gradients" else HONEST * (1 + MAX_STATE_ROUND_CHANGE) * 0.999
        assert value_of(honest) > dragged, "the control did not average with the attacker"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("minimum", [3, 100, 2])
def test_a_leader_waits_past_its_matchmaking_time_for_its_minimum(swarm_of_three, minimum):
    """After a round of all three, two peers look for a group at once, the third 6 s later (three times the
    matchmaking time). With a minimum of 3 all three average together. A minimum of 100 (what progress entries under
    97 extra keys would ask for) is capped at the 3 peers that took part in the last groups: all three average, no
    round fails. With hivemind's 2 the first two average alone (the control)."""
    averagers = [swarm_of_three.averager(RobustAverager, index, float(index)) for index in range(3)]
    for each in averagers:
        each.set_min_group_size(minimum)
    average_together(averagers)
    for index, each in enumerate(averagers):
        with each.get_tensors() as tensors:
            tensors[0].fill_(float(index))
    rounds = [each.step(gather=index, timeout=40, wait=False) for index, each in enumerate(averagers[:2])]
    time.sleep(6.0)
    late = averagers[2].step(gather=2, timeout=40, wait=False)
    if minimum > 2:
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


class SybilEntries:
    """A hostile DHT node's progress entries under ``count`` keys of its own, at the swarm's epoch, refreshed every
    few seconds as hivemind's peers refresh theirs: ``count`` more peers training, to every tracker."""

    def __init__(self, swarm, count: int):
        self.hostile, self.stop = HostileProgress(swarm.initial_peers), threading.Event()
        self.swarm, self.count = swarm, count
        self.thread = threading.Thread(target=self._refresh, daemon=True)
        self.thread.start()

    def _refresh(self) -> None:
        while not self.stop.is_set():
            epoch = max(self.swarm.epochs())
            for identity in range(self.count):
                self.hostile.store(RUN_ID, epoch=epoch, samples=0, rate=0.1, identity=identity)
            self.stop.wait(3.0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        self.hostile.shutdown()


def logs_after(swarm, offsets: dict[str, int], marker: str, timeout: float) -> dict[str, int]:
    """Wait until every peer's log shows ``marker`` after its offset; where each first shows it."""
    found = {}
    for name, offset in offsets.items():
        log_of = swarm.peers[name].log_text
        wait_until(lambda: marker in log_of()[offset:], timeout, f"{marker!r} in peer {name}'s log")  # noqa: B023
        found[name] = log_of().index(marker, offset)
    return found


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_a_quorum_swarm_averages_in_full_groups_despite_sybil_entries_and_after_a_death(make_swarm):
    """Three CLI peers with --robust-quorum 1.0: each raises its minimum group to 3 as it sees the others, and no
    round averages in a smaller group. Progress entries under 5 extra keys (a hostile DHT node) make the quorum want
    8: the minimum stays at the 3 peers that took part in the last groups and the rounds still average (uncapped,
    every round would find no group). After a kill -9 the two survivors lower the minimum to 2 and keep training."""
    swarm = make_swarm()
    for name in ("a", "b", "c"):
        swarm.start_peer(name, extra_flags=["--aggregation", "centered-clip", "--robust_quorum", "1.0"])
    swarm.wait_for_epoch(5, peers=3, timeout=300)
    full = "Robust rounds now average in groups of 3 or more"
    logs = {name: peer.log_text() for name, peer in swarm.peers.items()}
    for name, log in logs.items():
        sizes = rounds_after(log, full)
        print(f"peer {name}: rounds after the quorum rose to 3: {sizes}")
        assert sizes and set(sizes) == {3}, f"peer {name} averaged in a group under the quorum: {sizes}"

    sybils = SybilEntries(swarm, count=5)
    try:
        inflated = "groups of 8 or more wanted (1 of 8 peers reporting)"
        began = logs_after(swarm, {name: len(log) for name, log in logs.items()}, inflated, 90)
        attacked_at = max(swarm.epochs())
        swarm.wait_for_epoch(attacked_at + 3, peers=3, timeout=240)
    finally:
        sybils.close()
    for name, offset in began.items():
        log = swarm.peers[name].log_text()[offset:]
        sizes = rounds_after(log, inflated)
        print(f"peer {name}: rounds while 8 were wanted: {sizes}")
        assert len(sizes) >= 2 and set(sizes) == {3}, f"peer {name}: {sizes}"
        assert not re.search(r"Robust rounds now average in groups of ([4-9]|\d\d)", log), log[-3000:]

    # the entries lapse: back to 3 wanted, then a member dies
    settled = {name: len(peer.log_text()) for name, peer in swarm.peers.items()}
    logs_after(swarm, settled, "groups of 3 or more wanted (1 of 3 peers reporting)", 90)
    swarm.peers["c"].kill()
    killed_at = max(swarm.epochs())
    swarm.wait_for_epoch(killed_at + 3, peers=2, timeout=180)
    for name in ("a", "b"):
        log = swarm.peers[name].log_text()
        assert "Robust rounds now average in groups of 2 or more" in log[settled[name] :], name
