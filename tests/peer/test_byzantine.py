"""A Byzantine member in a real 4-peer swarm that aggregates with CenteredClip: three honest peers and one that flips
and scales its gradients (x -1000) from an epoch on. The honest peers keep learning with finite parameters that
agree, the reducers' signed scores single the attacker out for the monitor's suspicion reader, and the time robust
aggregation takes per round is measured against the round's time.
"""

from __future__ import annotations

import itertools
import re
import statistics
import sys

import pytest
import torch

from monitor.suspicion import suspects
from peer.hivemind_gaps.update_guard import WARMUP
from peer.swarm.scores import fetch_scores
from tests.harness import GroupProcess, wait_until, wait_until_or_none
from tests.peer.conftest import PEER_FLAGS, RUN_ID

pytestmark = [pytest.mark.slow]

ROBUST = ["--aggregation", "centered-clip"]
ATTACK_FROM = 4  # epochs of honest training first: the loss has started to fall when the attack begins
ATTACK_EPOCHS = 16
HONEST = ("a", "b", "c")


class Byzantine(GroupProcess):
    """tests/peer/byzantine.py in its own process group, output in a file."""

    def __init__(self, swarm, name: str, *args: str):
        self.out_path = swarm.workdir / f"{name}.log"
        backups = swarm.workdir / name / "backups"
        command = [sys.executable, "-m", "tests.peer.byzantine", *args, "--run_id", RUN_ID, *PEER_FLAGS]
        command += ["--initial_peers", *swarm.initial_peers, "--backup_dir", str(backups)]
        super().__init__(name, command, self.out_path, log_mode="w")

    def peer_id(self) -> str | None:
        found = re.search(r"^PEER_ID (\w+)$", self.log_text(), re.MULTILINE)
        return found.group(1) if found else None

    def attacked_epochs(self) -> list[int]:
        return [int(epoch) for epoch in re.findall(r"^ATTACK sign-flip epoch (\d+)$", self.log_text(), re.MULTILINE)]


def honest_peer_id(peer) -> str:
    return re.search(r"Joined run '[^']+' as (\w+)", peer.log_text()).group(1)


def mean_losses(swarm, epochs) -> float:
    """The honest peers' mean loss over `epochs`, from the line each peer logs per epoch."""
    losses = [
        float(loss)
        for name in HONEST
        for epoch, loss in re.findall(r"epoch (\d+) \| loss ([0-9.]+) \|", swarm.peers[name].log_text())
        if int(epoch) in epochs
    ]
    assert losses, f"no loss logged for epochs {epochs}"
    return sum(losses) / len(losses)


def parameter_gap(swarm, epoch: int) -> float:
    """The largest relative distance between two honest peers' parameters (all tensors together) at `epoch`."""
    params = [swarm.peers[name].parameters(epoch) for name in HONEST]

    def distance(first, second) -> float:
        return float(torch.sqrt(sum(((first[key] - second[key]) ** 2).sum() for key in first)))

    norm = float(torch.sqrt(sum((tensor**2).sum() for tensor in params[0].values())))
    return max(distance(first, second) for first, second in itertools.combinations(params, 2)) / norm


def aggregation_rounds(log: str) -> list[tuple[int, float]]:
    """(rounds, milliseconds) of each epoch's robust aggregation, from a peer's log."""
    found = re.findall(r"Robust aggregation: \d+ parts of (\d+) round\(s\) in ([0-9.]+) ms", log)
    return [(int(rounds), float(ms)) for rounds, ms in found]


def attacked_swarm(make_swarm, aggregation: list[str], from_epoch: int = ATTACK_FROM):
    swarm = make_swarm()
    for name in HONEST:
        swarm.start_peer(name, extra_flags=aggregation)
    attack = ["--attack", "sign-flip", "--from_epoch", str(from_epoch), *aggregation]
    swarm.attacker = Byzantine(swarm, "attacker", *attack)
    return swarm


def stop(swarm) -> None:
    """Stop the peers now, so the next test's swarm has the CPUs (make_swarm's teardown checks for leftovers)."""
    swarm.attacker.stop(timeout=20)
    for peer in swarm.peers.values():
        peer.close()


def run_attack(swarm) -> int:
    """Wait for the attack to start and last ATTACK_EPOCHS epochs of the honest peers; returns its first epoch."""
    attacker = swarm.attacker
    wait_until(lambda: len(attacker.attacked_epochs()) >= 1, 600, f"the attack to start; {attacker.out_path}")
    started = attacker.attacked_epochs()[0]
    swarm.wait_for_epoch(started + ATTACK_EPOCHS, peers=len(HONEST), timeout=900)
    assert attacker.alive() and len(attacker.attacked_epochs()) >= ATTACK_EPOCHS // 2, attacker.log_text()[-3000:]
    return started


def skipped_steps(swarm) -> int:
    return sum(swarm.peers[name].log_text().count("Skipping the optimizer step") for name in HONEST)


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm = attacked_swarm(make_swarm, ROBUST)
    yield swarm
    stop(swarm)


@pytest.mark.timeout(1500)
def test_a_sign_flipper_is_outvoted_and_flagged(swarm):
    attacker = swarm.attacker
    started = run_attack(swarm)
    early = mean_losses(swarm, range(1, 3))
    late_epochs = range(started + ATTACK_EPOCHS - 3, started + ATTACK_EPOCHS)
    late = mean_losses(swarm, late_epochs)
    print(f"mean loss: epochs 1-2 {early:.3f}, epochs {list(late_epochs)} {late:.3f} (attack from epoch {started})")
    print(f"honest optimizer steps skipped by the update guard: {skipped_steps(swarm)}")

    backed_up = sorted(set.intersection(*(set(swarm.peers[name].backup_epochs()) for name in HONEST)))
    common = backed_up[-1]
    # a peer that caught up by a download has no backup of the epochs it skipped: the first one all have, from the start
    first = next(epoch for epoch in backed_up if epoch >= started)
    for name in HONEST:
        params = swarm.peers[name].parameters(common)
        assert all(torch.isfinite(tensor).all() for tensor in params.values()), f"peer {name} was poisoned"
    # peers start from their own initialisation and merge states every --average-state-every epochs, so honest
    # parameters differ by a few percent in this swarm with or without an attack: the gap must not grow with it. A
    # round in a group of two (an honest peer and the attacker) is refused by that peer alone, so gaps of ~1% come
    # and go between merges (seen: 3.9e-3 at the attack's start, 1.09e-2 at the end); a poisoned peer is far beyond.
    at_start, at_end = parameter_gap(swarm, first), parameter_gap(swarm, common)
    print(f"largest relative gap between honest parameters: {at_start:.2e} at epoch {first}, {at_end:.2e} at {common}")
    assert at_end < max(2 * at_start, 0.02)

    def attacker_first():
        ranked = suspects(fetch_scores(swarm.dht, RUN_ID, limit=64).values())
        return ranked if ranked and ranked[0].peer_id == attacker.peer_id() else None

    # what the monitor reads each refresh: the reporters' latest records, each over their last rounds
    ranked = wait_until_or_none(attacker_first, 60) or suspects(fetch_scores(swarm.dht, RUN_ID, limit=64).values())
    print("suspects: " + ", ".join(f"{row.peer_id[-8:]} {row.suspicion:.3g} ({row.reporters})" for row in ranked))
    honest_ids = {honest_peer_id(swarm.peers[name]) for name in HONEST}
    assert ranked[0].peer_id == attacker.peer_id() and ranked[0].suspicious, ranked
    assert not any(row.suspicious for row in ranked if row.peer_id in honest_ids), ranked

    rounds = [item for name in HONEST for item in aggregation_rounds(swarm.peers[name].log_text())]
    per_round = statistics.median(ms / count for count, ms in rounds)
    times = sorted(swarm.peers["a"].epoch_times().values())
    epoch_ms = statistics.median(later - earlier for earlier, later in itertools.pairwise(times)) * 1e3
    print(
        f"CenteredClip per round and reducer: median {per_round:.1f} ms over {len(rounds)} epochs; an epoch takes "
        f"{epoch_ms:.0f} ms: {per_round / epoch_ms:.1%} of it (on this shared 2-core machine)"
    )
    assert per_round < 0.5 * epoch_ms
    # measured: -0.32 and -0.22 over 12 attacked epochs (noisy on a shared machine), hence 16 epochs and -0.2
    assert late < early - 0.2


@pytest.mark.timeout(1500)
def test_the_same_attack_on_a_mean_swarm_stops_its_learning(swarm, make_swarm):
    """The control: the attack matters. With hivemind's mean, every round the attacker joins averages -250x the
    gradient: the update guard skips those steps (nothing is corrupted), and the swarm stops learning."""
    stop(swarm)
    # from past the update guard's warm-up, so that it can tell the poisoned averages (else they are taken, clipped)
    mean_swarm = attacked_swarm(make_swarm, ["--aggregation", "mean"], from_epoch=WARMUP + 2)
    try:
        started = run_attack(mean_swarm)
        before = mean_losses(mean_swarm, range(started - 2, started + 1))
        after = mean_losses(mean_swarm, range(started + ATTACK_EPOCHS - 3, started + ATTACK_EPOCHS))
        skipped = skipped_steps(mean_swarm)
        print(f"mean swarm: loss {before:.3f} before the attack, {after:.3f} after; {skipped} honest steps skipped")
        # the logged losses are of fresh 8-sample batches, so they move with few steps taken (seen in CI: 9.168 ->
        # 9.048 with 48 honest steps skipped); the robust swarm above fell 0.22-0.32 in 12 attacked epochs
        assert skipped >= ATTACK_EPOCHS and after > before - 0.15
    finally:
        stop(mean_swarm)
