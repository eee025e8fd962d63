"""Churn and faults with real peers: NaN gradients and parameters, kill -9 of one of three peers, SIGTERM."""

from __future__ import annotations

import itertools
import signal
import time

import pytest
import torch

from tests.harness import process_group_members, wait_until
from tests.peer.faulty_peer import NAN_GRADS_AT_EPOCH, NAN_GRADS_BATCHES, NAN_PARAMS_AT_EPOCH

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def swarm(make_swarm):
    """Three peers; "faulty" (tests/peer/faulty_peer.py) poisons its gradients at epoch 2 (for 6 batches) and its
    parameters at epoch 4."""
    swarm = make_swarm()
    swarm.start_peer("a")
    swarm.start_peer("b")
    faults = {NAN_GRADS_AT_EPOCH: "2", NAN_GRADS_BATCHES: "6", NAN_PARAMS_AT_EPOCH: "4"}
    swarm.start_peer("faulty", extra_env=faults, module="tests.peer.faulty_peer")
    swarm.wait_for_epoch(1, peers=3, timeout=180)
    return swarm


def all_finite(parameters: dict) -> bool:
    return all(torch.isfinite(tensor).all() for tensor in parameters.values())


@pytest.mark.timeout(300)
def test_nan_gradients_are_not_contributed(swarm):
    faulty = swarm.peers["faulty"]
    wait_until(lambda: faulty.log_text().count("TEST-ONLY: gradients poisoned") >= 6, 120, "gradient poisoning")
    assert faulty.log_text().count("Skipping this batch's contribution: non-finite gradients") >= 6
    epochs = swarm.wait_for_epoch(5, peers=2, timeout=150)
    for name in ("a", "b"):
        latest = swarm.peers[name].backup_epochs()[-1]
        assert all_finite(swarm.peers[name].parameters(latest)), f"peer {name} was poisoned at epoch {latest}"
    assert max(epochs) >= 5


@pytest.mark.timeout(300)
def test_nan_parameters_are_reloaded_from_peers(swarm):
    faulty = swarm.peers["faulty"]
    wait_until(lambda: "Recovered: parameters reloaded from peers" in faulty.log_text(), 150, "recovery from peers")
    recovered_at = faulty.backup_epochs()[-1]
    wait_until(lambda: faulty.backup_epochs()[-1] > recovered_at, 120, "the recovered peer to train on")
    assert all_finite(faulty.parameters(faulty.backup_epochs()[-1]))
    for name in ("a", "b"):
        assert all_finite(swarm.peers[name].parameters(swarm.peers[name].backup_epochs()[-1]))


@pytest.mark.timeout(300)
def test_survivors_keep_stepping_after_kill_9(swarm):
    swarm.wait_for_epoch(max(swarm.epochs()), peers=3, timeout=120)  # all three are in the swarm
    before = {name: swarm.peers[name].backup_epochs()[-1] for name in ("a", "faulty")}
    killed_at = time.monotonic()
    swarm.peers["b"].kill()
    # each survivor must make 4 more optimizer steps (epochs) without the dead peer
    for name, survivor in (("a", swarm.peers["a"]), ("faulty", swarm.peers["faulty"])):
        target = before[name] + 4
        wait_until(lambda: survivor.backup_epochs()[-1] >= target, 120, f"{name} to keep stepping")  # noqa: B023
    print(
        f"survivors made 4 epochs in {time.monotonic() - killed_at:.1f} s after kill -9; "
        f"back to full speed {seconds_to_full_speed(swarm.peers['a'], time.time() - (time.monotonic() - killed_at))}"
    )
    assert not process_group_members(swarm.peers["b"].pgid)


def seconds_to_full_speed(peer, killed_at: float) -> str:
    """Seconds from the kill until the first epoch no slower than 1.5x the median epoch before it (a measurement)."""
    times = sorted(peer.epoch_times().values())
    before = [later - earlier for earlier, later in itertools.pairwise(times) if later <= killed_at][-5:]
    after = [(earlier, later) for earlier, later in itertools.pairwise(times) if later > killed_at]
    if not before or not after:
        return "unknown"
    typical = sorted(before)[len(before) // 2]
    recovered = next((later for earlier, later in after if later - earlier <= 1.5 * typical), None)
    return f"{recovered - killed_at:.1f} s (typical epoch {typical:.1f} s)" if recovered else "not within the test"


@pytest.mark.timeout(120)
def test_sigterm_exits_quickly_with_a_backup_and_no_p2pd(swarm):
    faulty = swarm.peers["faulty"]
    backups_before = set(faulty.backup_epochs())
    signalled_at = time.monotonic()
    faulty.process.send_signal(signal.SIGTERM)
    code = faulty.process.wait(timeout=30)
    elapsed = time.monotonic() - signalled_at
    assert elapsed < 15, f"took {elapsed:.1f} s to stop"
    assert code == 128 + signal.SIGTERM
    assert "Backup of epoch" in faulty.log_text().split("Received SIGTERM")[-1]  # the final backup
    assert faulty.backup_epochs()[-1] >= max(backups_before)
    wait_until(lambda: not process_group_members(faulty.pgid), 10, "the peer's p2pd and children to exit")
