"""A poisoning member of a real swarm: its NaN, 1e30 and outsized gradients go through real averaging rounds, and the
state it serves is NaN or 2**62 epochs ahead. Two honest peers refuse its non-finite parts and replies (the round
averages without it) and skip the outsized steps (counted in their /metrics), stay finite and keep learning; a joiner and the monitor's state keeper refuse the poisoned state and take an honest one.
"""

from __future__ import annotations

import re
import statistics
import sys
import urllib.request

import hivemind
import pytest
import torch

from monitor.state import StateKeeper, build_run_model
from peer.hivemind_gaps.state_check import EPOCH_MARGIN
from peer.hivemind_gaps.update_guard import FACTOR, WARMUP, WINDOW
from peer.swarm.config import OptimConfig, SwarmConfig
from tests.harness import TINY_OPTIM, GroupProcess, free_port, wait_until
from tests.peer.conftest import PEER_FLAGS, RUN_ID
from tests.peer.poisoner import poisoner_announced

pytestmark = [pytest.mark.slow]

# the optimizer settings PEER_FLAGS give the peers, for the state keeper built in this process
TEST_OPTIM = OptimConfig(**TINY_OPTIM)


class Poisoner(GroupProcess):
    """tests/peer/poisoner.py in its own process group, output in a file."""

    def __init__(self, swarm, name: str, *args: str):
        self.out_path = swarm.workdir / f"{name}.log"
        command = [sys.executable, "-m", "tests.peer.poisoner", *args, "--run_id", RUN_ID, *PEER_FLAGS]
        command += ["--initial_peers", *swarm.initial_peers]
        super().__init__(name, command, self.out_path, log_mode="w")

    def output(self) -> str:
        return self.log_text()


@pytest.fixture(scope="module")
def swarm(make_swarm):
    """Two honest peers serving their Prometheus metrics; their early epochs run before any attack."""
    swarm = make_swarm()
    swarm.metrics_ports = {}
    for name in ("a", "b"):
        swarm.metrics_ports[name] = free_port()
        swarm.start_peer(name, extra_flags=["--metrics_port", str(swarm.metrics_ports[name])])
    swarm.wait_for_epoch(WARMUP + 3, peers=2, timeout=240)  # past the guard's warm-up
    return swarm


def skipped_updates(swarm, name: str) -> dict[str, float]:
    url = f"http://127.0.0.1:{swarm.metrics_ports[name]}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        reason: float(count)
        for reason, count in re.findall(
            r'^albert_peer_skipped_updates_total\{reason="(\w+)"\} (\S+)$', text, re.MULTILINE
        )
    }


def update_norms(log: str) -> list[float]:
    return [float(norm) for norm in re.findall(r"update norm ([0-9.e+-]+) -> epoch", log)]


def latest_parameters_finite(peer) -> bool:
    parameters = peer.parameters(peer.backup_epochs()[-1])
    return all(torch.isfinite(tensor).all() for tensor in parameters.values())


@pytest.mark.timeout(900)
def test_poisoned_gradients_are_skipped_counted_and_learning_goes_on(swarm):
    honest_before = {name: update_norms(swarm.peers[name].log_text()) for name in ("a", "b")}
    attack_started_at = max(swarm.epochs())
    poisoner = Poisoner(swarm, "poisoner-grads", "--mode", "grads", "--schedule", "nan,huge,outlier")
    try:
        poisoner.process.wait(timeout=600)
    finally:
        poisoner.kill()
    output = poisoner.output()
    assert poisoner.process.returncode == 0 and "DONE" in output, output[-3000:]
    for phase in ("nan", "huge", "outlier"):
        assert f"POISONED {phase}" in output, output[-3000:]
    attack_ended_at = max(swarm.epochs())
    swarm.wait_for_epoch(attack_ended_at + 8, peers=2, timeout=300)

    skipped = {name: skipped_updates(swarm, name) for name in ("a", "b")}
    for name in ("a", "b"):
        peer = swarm.peers[name]
        print(f"peer {name}: skipped updates {skipped[name]}")
        # the NaN parts (and the 1e30 ones, which scaled-fp16 compression turns into NaN: their spread overflows
        # float32) are refused by each honest reducer (checked_parts.py), and the poisoner's own NaN replies by each
        # honest member: those rounds average without it. The finite outliers meet the update guard
        assert "sent non-finite values in part" in peer.log_text(), peer.log_text()[-3000:]
        assert skipped[name]["non_finite"] == 0, skipped  # no non-finite value reached an average
        assert "Skipping the optimizer step: the swarm-averaged gradient" in peer.log_text()
        assert latest_parameters_finite(peer), f"peer {name} was poisoned"
        norms = [norm for norm in honest_before[name] if norm > 0]  # 0: before this peer's first step
        ratios = [
            norm / statistics.median(norms[max(0, i - WINDOW) : i]) for i, norm in enumerate(norms) if i >= WARMUP
        ]
        print(
            f"peer {name}: honest update norms {norms}; max ratio to the running median {max(ratios, default=0):.2f}"
        )
        # the guard's margin (update_guard.py's docstring: 1.54x measured, FACTOR 50): honest steps stay far below it
        assert max(ratios, default=0) < FACTOR / 5, f"honest norms came within 5x of the outlier bound: {norms}"
    assert any(counts["outlier"] + counts["above_cap"] for counts in skipped.values()), skipped

    early = swarm.mean_loss(range(1, 3))
    late = swarm.mean_loss(range(max(swarm.epochs()) - 2, max(swarm.epochs()) + 1))
    print(f"mean loss: epochs 1-2 {early:.3f}, last epochs {late:.3f} (attack from epoch {attack_started_at})")
    assert late < early - 0.25


@pytest.fixture
def keeper(swarm):
    """The monitor's state keeper (client mode: it only downloads) on a DHT of its own in this process."""
    dht = hivemind.DHT(initial_peers=swarm.initial_peers, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    swarm_config = SwarmConfig(run_id=RUN_ID, initial_peers=swarm.initial_peers)
    keeper = StateKeeper(dht, swarm_config, TEST_OPTIM, build_run_model("tiny", None), client_mode=True)
    yield keeper
    keeper.shutdown()
    dht.shutdown()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("poison", ["nan", "epoch", "shape", "oversize"])
def test_poisoned_state_is_refused_and_an_honest_donor_used(swarm, keeper, poison):
    poisoner = Poisoner(swarm, f"poisoner-state-{poison}", "--mode", "state", "--poison", poison)
    try:
        wait_until(lambda: "SERVING" in poisoner.output(), 180, f"the poisoner to serve; {poisoner.out_path}")
        wait_until(lambda: poisoner_announced(swarm.dht, RUN_ID), 60, "the poisoner's state offer to reach the DHT")
        swarm_epoch = max(swarm.epochs())
        # before: a state of the wrong shape failed inside hivemind, and fetch raised ModelMismatch
        assert keeper.fetch(timeout=30, swarm_epoch=swarm_epoch), "no state was taken"
        # the poisoner is asked first (highest priority) and refused; then an honest peer's state is taken. On a
        # loaded machine the poisoner's first part can come later than the keeper waits (3 s, hivemind's
        # request_timeout): that is a failed download, not a refusal, and the next fetch asks the poisoner again
        for _ in range(3):
            if keeper.averager.refused_states:
                break
            keeper.fetch(timeout=30, swarm_epoch=max(swarm.epochs()))
        assert keeper.averager.refused_states >= 1, "the poisoner's state was never refused"
        assert keeper.state_problem() is None
        assert swarm_epoch - 5 <= keeper.epoch <= swarm_epoch + EPOCH_MARGIN
        if poison in JOINER_REFUSAL:
            joiner = swarm.start_peer(f"joiner-{poison}")
            refusal = wait_until(lambda: refusals(joiner.log_text()), 180, "the joiner's refusal")
            print(f"joiner: {refusal[0]}")
            assert re.search(JOINER_REFUSAL[poison], refusal[0]), refusal
            swarm.wait_for_epoch(max(swarm.epochs()), peers=3, timeout=180)  # the joiner caught up with the swarm
            wait_until(lambda: joiner.backup_epochs(), 60, "a backup of the joiner")
            assert latest_parameters_finite(joiner)
            assert "StateDownloadFailed" not in joiner.log_text()
            joiner.close()  # fewer processes on the test machine; the fixture's teardown still checks its p2pd
    finally:
        poisoner.kill()


# what a joiner's log names when it refuses the poisoner's state (the honest tiny model's first matrix: 12032 rows)
JOINER_REFUSAL = {
    "nan": r"tensor 0 \(shape \(\d+, \d+\)\) holds NaN",
    "shape": r"tensor \d+ has shape \(\d+, \d+\), expected \(\d+, \d+\)",
    # the decoded bound comes first for 1 MiB tensors; the stream bound for one huge one (test_state_check.py)
    "oversize": r"its tensors take over \d+ bytes|it streamed over \d+ bytes",
}


def refusals(log: str) -> list[str]:
    return re.findall(r"Refused the training state downloaded from peer \S+: (.*)", log)
