"""The chaos soak, run by hand: random faults of every kind for many minutes (ALBERT_CHAOS_SOAK=1 to enable).

ALBERT_CHAOS_SOAK_SECONDS sets its length (default 600), ALBERT_CHAOS_SEED the random sequence. Peers join, are
killed (-9), leave cleanly (SIGTERM), hang (SIGSTOP beyond the averaging timeout), are cut off for a minute, or join
on a straggler's link; the monitor is killed and restarted. Judged like the short suite, over the whole soak: no gap
between the swarm's optimizer steps beyond LIVENESS_BOUND (a cut-off peer's own steps do not count), the survivors
agree at the end, the monitor's epoch and checkpoints never went back and every served checkpoint verified, the loss
fell, and nothing was left behind.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.chaos.observe import judge_window, losses_by_epoch
from tests.chaos.processes import AVERAGING_TIMEOUT
from tests.chaos.swarm import FIGURES, LIVENESS_BOUND, STRAGGLER_LINK, Figures, stop_signal_for

SOAK_SECONDS = float(os.environ.get("ALBERT_CHAOS_SOAK_SECONDS") or 600)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("ALBERT_CHAOS_SOAK") != "1", reason="the soak runs by hand: ALBERT_CHAOS_SOAK=1"
    ),
]


class Soak:
    """Draws and injects random faults, remembering when each peer was cut off (its steps are not the swarm's)."""

    def __init__(self, run, rng: random.Random):
        self.run, self.rng, self.count = run, rng, 0
        self.excluded: dict[str, list[tuple[float, float]]] = {}
        self.events: list[str] = []
        self.monitor_restarted_at = time.time()

    def trainers(self):
        return [peer for peer in self.run.live_peers() if peer.name != "straggler"]

    def step(self) -> None:
        live = self.trainers()
        choices = ["join"] if len(live) < 5 else []
        if len(live) > 2:
            choices += ["kill", "leave", "hang", "partition"]
        if time.time() - self.monitor_restarted_at > 120:
            choices.append("monitor")
        if "straggler" not in self.run.peers:
            choices.append("straggler")
        getattr(self, self.rng.choice(choices))(live)

    def log(self, event: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {event}")

    def join(self, live) -> None:
        self.count += 1
        self.log(f"join soak{self.count}")
        self.run.start_peer(f"soak{self.count}")

    def straggler(self, live) -> None:
        self.log("straggler joins")
        self.run.start_peer("straggler", link=STRAGGLER_LINK)

    def kill(self, live) -> None:
        victim = self.rng.choice(live)
        self.log(f"kill -9 {victim.name}")
        self.run.kill(victim)

    def leave(self, live) -> None:
        victim = self.rng.choice(live)
        self.log(f"SIGTERM {victim.name}")
        victim.stop()
        assert not victim.leftovers(), victim.name

    def hang(self, live) -> None:
        victim = self.rng.choice(live)
        self.log(f"SIGSTOP {victim.name}")
        stop_signal_for(AVERAGING_TIMEOUT + self.rng.uniform(2, 20), victim)

    def partition(self, live) -> None:
        victim = self.rng.choice(live)
        node, seconds, start = self.run.network.nodes[victim.name], self.rng.uniform(30, 60), time.time()
        self.log(f"partition {victim.name} for {seconds:.0f} s")
        node.partition()
        try:
            time.sleep(seconds)
        finally:
            node.heal()
        self.excluded.setdefault(victim.name, []).append((start, time.time() + LIVENESS_BOUND))

    def monitor(self, live) -> None:
        self.log("monitor kill -9 and restart")
        before = self.run.monitor.get("/api/status")
        self.run.kill(self.run.monitor)
        time.sleep(self.rng.uniform(0, 10))
        donor = self.rng.choice(live)
        restarted = self.run.start_monitor(f"monitor-{self.count}-{len(self.events)}", initial_peers=donor.maddrs())
        if before is not None:
            assert restarted.get("/api/status")["epoch"] >= before["epoch"]
        self.monitor_restarted_at = time.time()


@pytest.mark.timeout(int(SOAK_SECONDS) + 900)
def test_soak(make_run):
    run = make_run()
    run.start_monitor()
    for name in ("a", "b", "c"):
        run.start_peer(name)
    run.wait_for_epoch(["a", "b", "c"], 2, timeout=300)
    run.measure_baseline(["a", "b", "c"], steps=8, timeout=LIVENESS_BOUND * 6)

    soak = Soak(run, random.Random(int(os.environ.get("ALBERT_CHAOS_SEED", "0"))))
    started = time.time()
    while time.time() < started + SOAK_SECONDS:
        soak.step()
        time.sleep(soak.rng.uniform(5, 20))
    ended = time.time()
    print("\n".join(soak.events))

    trainers = [name for name in run.peers if name != "straggler"]
    timeline = run.observer.swarm_timeline(trainers, excluded=soak.excluded)
    window = judge_window(timeline, started, ended)
    expected = run.baseline_rate * (ended - started)
    FIGURES.append(Figures(f"soak {SOAK_SECONDS:.0f} s", ended - started, window.steps, window.steps / expected,
                           window.longest_gap, window.epochs))  # fmt: skip
    assert window.longest_gap <= LIVENESS_BOUND, (window, soak.events)
    assert window.steps / expected > 0.3, (window, expected)

    survivors = [peer.name for peer in soak.trainers()]
    epoch = run.swarm_epoch(survivors)
    run.wait_for_agreement(survivors, after_epoch=epoch, timeout=120)

    log = run.observer.monitor_log
    assert [e for _, e in log.status_epochs] == sorted(e for _, e in log.status_epochs), "monitor epoch went back"
    assert [e for _, e in log.newest_checkpoints] == sorted(e for _, e in log.newest_checkpoints)
    assert not log.damaged and len(log.verified) >= 3, log
    losses = losses_by_epoch(run.peers.values())
    epochs = sorted(losses)
    assert sum(losses[e] for e in epochs[-3:]) / 3 < sum(losses[e] for e in epochs[:3]) / 3 - 0.2, losses
