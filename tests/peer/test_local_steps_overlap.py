"""Local steps with the outer all-reduce overlapping the next inner phase (--delay-optimizer-step), with real peers
through the CLI: rounds of two land while both train on, their loss falls, and their outer weights agree; a drift
(peer a's, on purpose: tests/peer/drifting_peer.py) is re-synced in the background, and agreeing peers skip the
re-sync."""

from __future__ import annotations

import re

import pytest

from tests.harness import wait_until
from tests.peer.drifting_peer import DRIFT_EVERY
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
# peer a drifts on reaching epochs 5, 11, ...; the first check of --average_state_every 2 whose round gathers its
# fingerprint re-syncs (6 or 8: a round started in the same step as the epoch's arrival gathers it before the
# nudge), and the checks after that find the peers alike until the next nudge
INJECTED_EVERY = 6
# peers taking the same means agree exactly (0.0 measured, test_local_steps.py); a drift of peer a is ~1e-4 or more
DRIFT_BOUND = 1e-5


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm = make_swarm()
    first = swarm.start_peer(
        "a", OVERLAPPED, extra_env={DRIFT_EVERY: str(INJECTED_EVERY)}, module="tests.peer.drifting_peer"
    )
    wait_until(lambda: "Starting at epoch" in first.log_text(), 180, "peer a to start")
    swarm.start_peer("b", OVERLAPPED)
    swarm.wait_for_epoch(3, peers=2, timeout=180)
    return swarm


@pytest.mark.timeout(400)
def test_overlapped_rounds_of_two_land_and_the_loss_falls(swarm):
    first, second = swarm.peers["a"], swarm.peers["b"]
    for peer in (first, second):
        wait_until(lambda: len(ROUND.findall(peer.log_text())) >= 3, 180, f"{peer.name} to land 3 rounds of two")  # noqa: B023
    swarm.wait_for_epoch(10, peers=2, timeout=240)
    early, late = swarm.early_and_late_loss()
    seconds = [float(value) for value in ROUND.findall(first.log_text())]
    print(f"loss {early:.2f} -> {late:.2f}; peer a's overlapped rounds took {seconds} s")
    # it falls (the tests' LAMB 0.05 is aggressive; bench_wan saw an overlapped H=8 run learn slower than a plain one)
    assert late < early, (early, late)


@pytest.mark.timeout(400)
def test_a_drift_is_resynced_in_the_background_and_agreeing_peers_skip_the_resync(swarm):
    first, second = swarm.peers["a"], swarm.peers["b"]
    swarm.wait_for_epoch(17, peers=2, timeout=360)
    common = set(first.backup_epochs()) & set(second.backup_epochs())
    gaps = {epoch: gap(first, second, epoch) for epoch in sorted(common) if epoch >= 2}
    resyncs = [sorted({int(epoch) for epoch, _ in RESYNCED.findall(peer.log_text())}) for peer in (first, second)]
    skipped = [peer.log_text().count("No re-sync at epoch") for peer in (first, second)]
    partial = [PARTIAL.findall(peer.log_text()) for peer in (first, second)]
    print(f"outer weights apart by epoch {gaps}; re-syncs of two at epochs {resyncs}; skipped {skipped}")
    print(f"partial rounds (hivemind's share of parts received, %): {partial}")
    # the drift is there: a backup of a nudged epoch (written after the nudge) holds weights apart
    nudged = [epoch for epoch in gaps if (epoch + 1) % INJECTED_EVERY == 0]
    assert len(nudged) >= 2 and all(gaps[epoch] >= DRIFT_BOUND for epoch in nudged), gaps
    # re-synced: both peers re-synced twice or more, and skipped the checks that found them alike
    assert all(len(each) >= 2 for each in resyncs) and all(count >= 1 for count in skipped), (resyncs, skipped)
    # and healed before the next nudge: a re-sync at 6 or 8 has landed by epoch 10's backup (an overlapped one lands
    # during the inner steps after it); a round gone partial on a loaded machine may keep one of them apart
    before_next = [epoch + INJECTED_EVERY - 1 for epoch in nudged if epoch + INJECTED_EVERY - 1 in gaps]
    print(f"apart just before the next nudge: {[(epoch, gaps[epoch]) for epoch in before_next]}")
    assert len(before_next) >= 2, (before_next, gaps)
    assert sum(gaps[epoch] < DRIFT_BOUND for epoch in before_next) >= len(before_next) - 1, gaps
