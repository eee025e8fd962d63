"""Local steps with the outer all-reduce overlapping the next inner phase (--delay-optimizer-step), with real peers
through the CLI: rounds of two land while both train on, their loss falls, and their outer weights agree after each
re-sync."""

from __future__ import annotations

import re

import pytest

from tests.harness import wait_until
from tests.peer.test_local_steps import LOCAL_STEPS, gap

pytestmark = [pytest.mark.slow]

# the harness's 2 s matchmaking is also hivemind's wait for a member's next part unless told otherwise: on a loaded
# CI machine a part came later, the round went partial (each peer kept its own pseudo-gradient for the missing part)
# and the peers were 1.4e-2 apart until the next re-sync healed it. 5 s waits for a late part; a part that never comes
# (seen here: "received 99.6% results") still leaves the round partial, not failed whole at the 15 s averaging timeout
OVERLAPPED = [*LOCAL_STEPS, "--delay_optimizer_step", "--next_chunk_timeout", "5"]
ROUND = re.compile(r"averaged pseudo-gradients with 2 peers in ([\d.]+) s, overlapped")
PARTIAL = re.compile(r"Averaging: received ([\d.]+)% results")
RESYNCED = re.compile(r"Re-synced the outer state with 2 peers at epoch (\d+) \(relative change: weights (\S+),")
# measured here: 8e-6 to 1.4e-5 apart at epochs 5-10 (re-syncs changing the weights by 5e-6 to 1.7e-5); without any
# re-sync fp16 drift reached 1.2e-2 after 19 rounds (test_local_steps.py)
DRIFT_BOUND = 1e-4


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm = make_swarm()
    first = swarm.start_peer("a", OVERLAPPED)
    wait_until(lambda: "Starting at epoch" in first.log_text(), 180, "peer a to start")
    swarm.start_peer("b", OVERLAPPED)
    swarm.wait_for_epoch(3, peers=2, timeout=180)
    return swarm


@pytest.mark.timeout(400)
def test_overlapped_rounds_of_two_land_the_loss_falls_and_outer_weights_agree(swarm):
    first, second = swarm.peers["a"], swarm.peers["b"]
    for peer in (first, second):
        wait_until(lambda: len(ROUND.findall(peer.log_text())) >= 3, 180, f"{peer.name} to land 3 rounds of two")  # noqa: B023
    swarm.wait_for_epoch(10, peers=2, timeout=240)
    early, late = swarm.early_and_late_loss()
    seconds = [float(value) for value in ROUND.findall(first.log_text())]
    print(f"loss {early:.2f} -> {late:.2f}; peer a's overlapped rounds took {seconds} s")
    # it falls (the tests' LAMB 0.05 is aggressive; bench_wan saw an overlapped H=8 run learn slower than a plain one)
    assert late < early, (early, late)

    def common_epochs():
        both = sorted(set(first.backup_epochs()) & set(second.backup_epochs()))
        return both if len(both) >= 5 else None

    common = wait_until(common_epochs, 180, "five epochs backed up by both peers")
    # the re-sync overlaps the inner steps too: a backup, written at the outer step, holds its epoch's state before
    # that epoch's re-sync lands, so the peers stay within a round or two of fp16 drift instead of agreeing exactly
    gaps = {epoch: gap(first, second, epoch) for epoch in common[-6:]}
    far = [epoch for epoch, apart in gaps.items() if apart >= DRIFT_BOUND]
    if far:  # a partial or failed round left the peers apart: the re-sync of the next even epoch must heal it
        healed = far[-1] + 3  # the re-sync started at the next even epoch has landed by this one's backup
        wait_until(lambda: healed in set(first.backup_epochs()) & set(second.backup_epochs()), 120, f"epoch {healed}")
        gaps[healed] = gap(first, second, healed)
    resyncs = [RESYNCED.findall(peer.log_text()) for peer in (first, second)]
    partial = [PARTIAL.findall(peer.log_text()) for peer in (first, second)]
    print(f"outer weights apart by epoch {gaps}; re-syncs of two (epoch, weights' change): {resyncs}")
    print(f"partial rounds (hivemind's share of parts received, %): {partial}")
    assert min(len(each) for each in resyncs) >= 2, resyncs
    # once in three CI runs a round went partial or failed and one epoch was 1.4e-2 apart: allowed once (one epoch,
    # or two if the next backup came before the re-sync landed), if the re-sync healed it
    assert not far or far[-1] - far[0] <= 1, gaps
    assert max(apart for epoch, apart in gaps.items() if epoch not in far) < DRIFT_BOUND, gaps
