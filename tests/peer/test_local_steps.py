"""Local-steps (DiLoCo) mode with real peers through the CLI: outer steps together, loss falls, outer weights agree,
a joiner downloads the outer state, and the swarm goes on after one of three peers is SIGKILLed during a round."""

from __future__ import annotations

import time

import pytest
import torch

from tests.harness import wait_until
from tests.peer.conftest import RUN_ID

pytestmark = [pytest.mark.slow]

# 2 x the tiny swarm's 32-sample target per outer step: each of two peers (8 samples a batch) takes ~4 inner steps.
# Every member of a round takes the same fp16 mean (peer/hivemind_gaps/mean_replies.py), so the outer weights stay
# the same round after round and the re-sync every 2 epochs finds nothing to do (tests/peer/test_local_steps_int4.py
# and test_local_steps_overlap.py make peers drift on purpose to see re-syncs).
LOCAL_STEPS = ["--local_steps", "2", "--grad_compression", "fp16", "--average_state_every", "2"]
# ||outer_a - outer_b|| / ||outer_a|| at the same epoch. When each peer took its own rounding of the mean (hivemind's
# delta replies), this grew steadily without a re-sync: 1.2e-2 after 19 rounds, 7e-3 after 23 (measured here)
AGREEMENT = 1e-5


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm = make_swarm()
    first = swarm.start_peer("a", LOCAL_STEPS)
    # one after the other: two peers starting at once each took the other's fresh epoch-0 state (seen in CI), so
    # their outer weights stayed ~11% apart and every re-sync was refused (over its 5% bound)
    wait_until(lambda: "Starting at epoch" in first.log_text(), 180, "peer a to start")
    swarm.start_peer("b", LOCAL_STEPS)
    swarm.wait_for_epoch(3, peers=2, timeout=180)
    return swarm


def outer_state(peer, epoch: int) -> torch.Tensor:
    """The outer weights a peer backed up at ``epoch``, as one vector."""
    state = torch.load(peer.backup_dir / f"epoch-{epoch:06d}.pt", weights_only=True)["local_steps"]
    return torch.cat([tensor.flatten() for tensor in state["outer"]])


def gap(first, second, epoch: int) -> float:
    mine = outer_state(first, epoch)
    return ((mine - outer_state(second, epoch)).norm() / mine.norm()).item()


def outer_steps_with(peer, peers: int) -> int:
    return peer.log_text().count(f"averaged pseudo-gradients with {peers} peers")


@pytest.mark.timeout(300)
def test_two_peers_make_outer_steps_together_and_their_loss_falls(swarm):
    for name in ("a", "b"):
        wait_until(lambda: outer_steps_with(swarm.peers[name], 2) >= 3, 120, f"peer {name} to average 3 rounds")  # noqa: B023
    swarm.wait_for_epoch(10, peers=2, timeout=180)
    early, late = swarm.early_and_late_loss()
    # measured on this machine: ~9.4 at epoch 1, 7.2-8.2 at epochs 14-24
    assert late < early - 0.5, (early, late)


@pytest.mark.timeout(300)
def test_outer_weights_agree_after_each_round(swarm):
    first, second = swarm.peers["a"], swarm.peers["b"]

    def common_epochs():
        both = sorted(set(first.backup_epochs()) & set(second.backup_epochs()))
        return both if len(both) >= 5 else None

    common = wait_until(common_epochs, 180, "five epochs backed up by both peers")
    gaps = {epoch: gap(first, second, epoch) for epoch in common[-6:]}
    skipped = [peer.log_text().count("No re-sync at epoch") for peer in (first, second)]
    print(f"outer weights apart by epoch {gaps}; re-syncs skipped {skipped}")
    # a round that fails or lands in part (on a loaded machine) leaves the peers apart until a re-sync; most succeed
    assert sum(value < AGREEMENT for value in gaps.values()) >= 3, gaps
    assert all(count >= 1 for count in skipped), skipped  # a round of two that agreed: no state round after it


@pytest.mark.timeout(300)
def test_a_joiner_downloads_the_outer_state(swarm):
    late = swarm.start_peer("late", LOCAL_STEPS)
    joined = wait_until(lambda: late.backup_epochs(), 120, "the late peer to back up the state it downloaded")
    epoch = joined[0]
    assert epoch >= 3
    assert f"Took the swarm's outer state of epoch {epoch}" in late.log_text()
    trainers = wait_until(
        lambda: [peer for peer in (swarm.peers["a"], swarm.peers["b"]) if epoch in peer.backup_epochs()],
        60,
        f"a trainer's backup of epoch {epoch}",
    )
    # it holds its donor's outer weights exactly (the donor is one of the two; they agree up to AGREEMENT)
    assert min(gap(trainer, late, epoch) for trainer in trainers) < AGREEMENT
    swarm.wait_for_epoch(epoch + 2, peers=3, timeout=120)
    wait_until(lambda: outer_steps_with(late, 3) >= 1, 120, "the late peer to average a round with both others")


def round_under_way(swarm) -> bool:
    """The swarm's samples of the current outer epoch (hivemind's tracker records) reach the round's target."""
    found = swarm.dht.get(f"{RUN_ID}_outer_progress", latest=True)
    if found is None or not isinstance(found.value, dict):
        return False
    entries = [entry.value for entry in found.value.values() if isinstance(getattr(entry, "value", None), dict)]
    if not entries:
        return False
    epoch = max(entry["epoch"] for entry in entries)
    return sum(entry["samples_accumulated"] for entry in entries if entry["epoch"] == epoch) >= 64


@pytest.mark.timeout(400)
def test_the_others_go_on_after_a_peer_is_killed_during_a_round(swarm):
    swarm.wait_for_epoch(1, peers=3, timeout=120)
    victim, survivors = swarm.peers["b"], [swarm.peers["a"], swarm.peers["late"]]
    # the round starts when the samples reach the target; matchmaking then takes --matchmaking_time (2 s)
    wait_until(lambda: round_under_way(swarm), 60, "a round to start", poll=0.05)
    victim.kill()
    killed_at = time.time()
    before = {peer.name: max(peer.backup_epochs()) for peer in survivors}
    pairs_before = {peer.name: outer_steps_with(peer, 2) for peer in survivors}
    for peer in survivors:
        wait_until(
            lambda: max(peer.backup_epochs()) >= before[peer.name] + 3,  # noqa: B023
            180,
            f"{peer.name} to make three outer steps after the kill",
        )
    # the survivors average with each other once the dead peer is forgotten (--presence_expiration)
    wait_until(
        lambda: all(outer_steps_with(peer, 2) > pairs_before[peer.name] for peer in survivors),
        120,
        "the survivors to average a round with each other",
    )
    assert all(peer.alive() for peer in survivors), f"a survivor died; logs in {swarm.workdir} (kill at {killed_at})"
