"""A chaos run: the network, the monitor and the peers in their namespaces, the observer, and the faults to inject.

Scenario tests drive a ``ChaosRun`` (start peers, kill, stop, partition, shape links) and judge it with the
observer's records; ``close`` stops every process and asserts that nothing was left behind.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.chaos.netns import Network
from tests.chaos.observe import AGREEMENT, Observer, Window, agreement_at, judge_window, losses_by_epoch
from tests.chaos.processes import (
    AVERAGING_TIMEOUT,
    MATCHMAKING_TIME,
    PRESENCE_EXPIRATION,
    ChaosMonitor,
    ChaosPeer,
    ChaosProcess,
    Relay,
)
from tests.harness import wait_until, wait_until_or_none

# Liveness bound: the longest time the swarm may go without an optimizer step while a fault is injected.
# A round whose group holds a hung or cut-off peer is abandoned after averaging_timeout (a killed peer's closed
# connections fail it sooner); the survivors then step with what they have. Until the lost peer's progress entry
# expires (presence_expiration) they still count it and may match with it again; matchmaking takes its time; and the
# next epoch's samples must be computed (32 samples, ~4-8 s on a loaded 2-core machine with one torch thread each).
COMPUTE_MARGIN = 8.0
LIVENESS_BOUND = MATCHMAKING_TIME + AVERAGING_TIMEOUT + PRESENCE_EXPIRATION + COMPUTE_MARGIN  # 28 s
WINDOW = LIVENESS_BOUND + 2.0  # a scenario is watched longer than the bound, so a stalled swarm fails it
# 50 ms added to the round trip (25 ms each way), 20 Mbit/s each way, 1% of packets dropped in each direction
STRAGGLER_LINK = {"delay_ms": 25.0, "mbit": 20.0, "loss": 0.01}
MIN_RATIO = 0.3  # steps under a fault, relative to the fault-free rate: robust on a shared, noisy machine


@dataclass
class Figures:
    """One scenario's outcome, printed at the end of the session (the README's figures come from here)."""

    scenario: str
    seconds: float
    steps: int
    ratio: float  # steps over the steps of a fault-free window of the same length
    longest_gap: float
    epochs: tuple[int, int] | None


FIGURES: list[Figures] = []


class ChaosRun:
    """One swarm under test: nodes and processes by name, and the observer watching them.

    Args:
        network: the bridge and namespaces (owned by the run: closed with it).
        workdir: logs, backups and the monitor's files.
        run_flags: run-wide flags given to the monitor and every peer (e.g. another training mode).
        liveness_bound: the longest time without an optimizer step a fault may cause (LIVENESS_BOUND: one epoch
            of the default run's size; a run with longer epochs sets its own).
        peer_flags: flags given to every peer only (e.g. its metrics port).
        monitor_flags: flags given to the monitor only.
    """

    def __init__(
        self,
        network: Network,
        workdir: Path,
        run_flags=(),
        liveness_bound: float = LIVENESS_BOUND,
        peer_flags=(),
        monitor_flags=(),
    ):
        self.network, self.workdir = network, workdir
        self.run_flags, self.liveness_bound = list(run_flags), liveness_bound
        self.peer_flags, self.monitor_flags = list(peer_flags), list(monitor_flags)
        self.peers: dict[str, ChaosPeer] = {}
        self.processes: list[ChaosProcess] = []
        self.monitor: ChaosMonitor | None = None
        self.observer = Observer(self.peers, lambda: self.monitor, workdir)
        self.baseline_rate: float | None = None  # fault-free optimizer steps per second, measured in this run

    # --- processes -------------------------------------------------------------------------------------------
    def start_monitor(self, name: str = "monitor", initial_peers=()) -> ChaosMonitor:
        node = self.network.nodes.get("monitor") or self.network.add_node("monitor")
        ports = (self.monitor.dht_port, self.monitor.http_port) if self.monitor else (31337, 8080)
        extra = [*self.run_flags, *self.monitor_flags, *(["--initial_peers", *initial_peers] if initial_peers else [])]
        self.monitor = ChaosMonitor(node, self.workdir, *ports, name=name, extra_flags=extra)
        self.processes.append(self.monitor)
        self.monitor.wait_ready(timeout=180)
        if not self.observer.is_alive():
            self.observer.start()
        return self.monitor

    def start_peer(self, name: str, link: dict | None = None, rate_mbit: float | None = None) -> ChaosPeer:
        """A new peer on a new node; ``link`` makes it a straggler (delay_ms, mbit, loss), ``rate_mbit`` slow."""
        node = self.network.add_node(name)
        if link:
            self.processes.append(Relay(node, self.workdir, port=4000, delay_ms=link["delay_ms"]))
            node.limit_rate(link["mbit"])
            node.drop_randomly(link["loss"])
        elif rate_mbit:
            node.limit_rate(rate_mbit)
        # the monitor and a live peer, as a user would list them: a joiner must not depend on one bootstrap node
        donors = [peer.maddrs() for peer in self.live_peers() if peer.maddrs()][:1]
        initial_peers = [*self.monitor.initial_peers(), *(maddr for d in donors for maddr in d)]
        peer = ChaosPeer(node, name, self.workdir, initial_peers, extra_flags=[*self.run_flags, *self.peer_flags])
        self.peers[name] = peer
        self.processes.append(peer)
        return peer

    def live_peers(self) -> list[ChaosPeer]:
        return [peer for peer in self.peers.values() if peer.alive()]

    def kill(self, process: ChaosProcess) -> None:
        """kill -9 of the whole process group, then check that nothing of it (p2pd included) survived."""
        process.kill()
        wait_until(lambda: not process.leftovers(), 30, f"every process of {process.name} to die")

    # --- waiting ---------------------------------------------------------------------------------------------
    def wait_for_log(self, process: ChaosProcess, text: str, timeout: float, after: int = 0) -> int:
        """Poll (every 20 ms, so a fault lands right after) until ``text`` appears past offset ``after``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = process.log_text().find(text, after)
            if found >= 0:
                return found
            if not process.alive():
                pytest.fail(f"{process.name} exited while waiting for {text!r}:\n{process.log_text()[-3000:]}")
            time.sleep(0.02)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {text!r} in {process.log_path}")

    def wait_for_epoch(self, names, epoch: int, timeout: float) -> None:
        """Until each named peer has backed up ``epoch`` or a later one."""
        wait_until(
            lambda: all(max(self.observer.epoch_times.get(n, {}), default=-1) >= epoch for n in names),
            timeout,
            f"peers {sorted(names)} to reach epoch {epoch}; logs in {self.workdir}",
        )

    def swarm_epoch(self, names) -> int:
        return max((epoch for _, epoch in self.observer.swarm_timeline(names)), default=0)

    def wait_for_agreement(self, names, after_epoch: int, timeout: float) -> dict[str, float]:
        """Until the named peers back up a common epoch past ``after_epoch`` on which they all agree."""
        peers, seen = [self.peers[name] for name in names], {}

        def agreed():
            common = set.intersection(*(set(peer.backup_epochs()) for peer in peers))
            for epoch in sorted(e for e in common if e > after_epoch + 1 and e not in seen):
                gaps = agreement_at(peers, epoch)
                if gaps is not None:
                    seen[epoch] = gaps
                    if max(gaps.values()) < AGREEMENT:
                        return gaps
            return None

        found = wait_until_or_none(agreed, timeout, poll=1.0)
        assert found, f"peers {sorted(names)} never agreed after epoch {after_epoch}: gaps by epoch {seen}"
        return found

    def disagreement(self, names) -> dict:
        """The gaps between the named peers at their newest common backed-up epoch (for the record)."""
        peers = [self.peers[name] for name in names]
        common = sorted(set.intersection(*(set(peer.backup_epochs()) for peer in peers)))
        for epoch in reversed(common[-3:]):
            gaps = agreement_at(peers, epoch)
            if gaps is not None:
                return {"epoch": epoch, **gaps}
        return {}

    # --- judging ---------------------------------------------------------------------------------------------
    def window(self, names, start: float, end: float) -> Window:
        return judge_window(self.observer.swarm_timeline(names), start, end)

    def measure_baseline(self, names, steps: int, timeout: float) -> float:
        """Fault-free steps per second: the time the swarm takes for ``steps`` steps (it fails if it cannot)."""
        start = time.time()
        wait_until(lambda: self.window(names, start, time.time()).steps >= steps, timeout, f"{steps} fault-free steps")
        seconds = time.time() - start
        window = self.window(names, start, start + seconds)
        self.baseline_rate = window.steps / seconds
        FIGURES.append(Figures("no faults (baseline)", seconds, window.steps, 1.0, window.longest_gap, window.epochs))
        return self.baseline_rate

    def judge(self, scenario: str, names, start: float, end: float) -> Figures:
        """Record and return a scenario's figures; assert the liveness bound (the caller asserts the rest)."""
        window = self.window(names, start, end)
        expected = (self.baseline_rate or 0.0) * (end - start)
        figures = Figures(
            scenario, end - start, window.steps, window.steps / expected if expected else 0.0, window.longest_gap,
            window.epochs,
        )  # fmt: skip
        FIGURES.append(figures)
        assert window.longest_gap <= self.liveness_bound, (
            f"{scenario}: no optimizer step for {window.longest_gap:.1f} s (bound {self.liveness_bound:.0f} s); "
            f"timeline {self.observer.swarm_timeline(names)}"
        )
        return figures

    def watch(self, scenario: str, names, start: float, seconds: float | None = None) -> Figures:
        """Wait out the scenario's window (by default just longer than the liveness bound, so a stalled swarm fails
        it), then judge liveness and the step ratio, and check the loss."""
        seconds = self.liveness_bound + 2.0 if seconds is None else seconds
        time.sleep(max(0.0, start + seconds - time.time()))
        figures = self.judge(scenario, names, start, time.time())
        assert figures.ratio > MIN_RATIO, figures
        self.assert_loss_below_start(scenario, figures)
        return figures

    def assert_loss_below_start(self, scenario: str, window: Figures) -> None:
        """The loss the peers logged in the scenario's epochs is below the loss of the run's first epochs."""
        losses = losses_by_epoch(self.peers.values())
        first = [losses[epoch] for epoch in sorted(losses)[:3]]
        assert window.epochs, f"{scenario}: no epoch was reached"
        during = [loss for epoch, loss in losses.items() if window.epochs[0] <= epoch <= window.epochs[1]]
        assert during and sum(during) / len(during) < sum(first) / len(first), (scenario, losses)

    # --- teardown --------------------------------------------------------------------------------------------
    def close(self) -> list[str]:
        """Stop everything; returns what was left behind (processes, namespaces, links), empty if nothing."""
        if self.observer.is_alive():
            self.observer.stop()
        for process in reversed(self.processes):
            process.stop(timeout=15)
        nodes = self.network.nodes.values()
        # killed children being reaped
        wait_until_or_none(lambda: not any(node.pids() for node in nodes), 20, poll=1.0)
        left = [f"{p.name}: pids {p.leftovers()}" for p in self.processes if p.leftovers()]
        left += [f"namespace {n.namespace}: pids {n.pids()}" for n in nodes if n.pids()]
        self.network.close()
        return left + [f"network: {name}" for name in self.network.leftovers()]


def stop_signal_for(seconds: float, process: ChaosProcess) -> None:
    """SIGSTOP the process group (a hung machine: p2pd freezes too) for ``seconds``, then SIGCONT."""
    process.signal_group(signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        process.signal_group(signal.SIGCONT)
