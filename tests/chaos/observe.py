"""Watching a chaos run from outside: when the swarm stepped, what the monitor served, and the judgments on both.

An ``Observer`` thread records the time each peer reached each epoch (its per-epoch backup appearing), the monitor's
status epoch and checkpoint listing, and downloads every checkpoint the monitor lists to verify it. The functions
below turn those records into the suite's judgments: steps in a window, the longest gap between steps, agreement of
parameters, and the loss.
"""

from __future__ import annotations

import itertools
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from monitor.checkpoint_cli import CheckpointError, download
from peer.swarm.run_key import RunKey
from tests.chaos.processes import ChaosMonitor, ChaosPeer

# A checkpoint that fails one of these checks was served damaged; other download errors are the monitor being away.
VERIFICATION_ERRORS = (
    "does not match",
    "failed verification",
    "should hold one checkpoint directory",
    "signed",
    "signature",
    "does not list",
    "model code",
)
# Parameters of two peers agree if they differ by less than half of one epoch's update: peers that missed a step
# differ by a whole update, peers that trained apart by many (see tests/peer/test_swarm.py for the measurements).
AGREEMENT = 0.5


@dataclass
class MonitorLog:
    """What the observer saw of the monitor."""

    status_epochs: list[tuple[float, int]] = field(default_factory=list)  # (time, /api/status epoch)
    newest_checkpoints: list[tuple[float, int]] = field(default_factory=list)  # (time, newest listed epoch)
    verified: set[int] = field(default_factory=set)  # epochs downloaded and verified file by file
    damaged: dict[int, str] = field(default_factory=dict)  # epoch -> why its download failed verification


class Observer(threading.Thread):
    """Polls the peers' backup directories (every 0.5 s) and the monitor's API (every 2 s) until stopped.

    Args:
        peers: the run's peers by name (the dict may grow while the observer runs).
        monitor: a callable returning the current monitor process (it is replaced when restarted).
        workdir: scratch space for checkpoint downloads.
    """

    def __init__(self, peers: dict[str, ChaosPeer], monitor, workdir: Path):
        super().__init__(daemon=True, name="chaos-observer")
        self.peers, self.monitor, self.workdir = peers, monitor, workdir
        self.epoch_times: dict[str, dict[int, float]] = {}
        self.monitor_log = MonitorLog()
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        next_monitor_poll = 0.0
        while not self._halt.is_set():
            self._scan_backups()
            if time.monotonic() >= next_monitor_poll:
                self._poll_monitor()
                next_monitor_poll = time.monotonic() + 2.0
            self._halt.wait(0.5)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=60)

    def _scan_backups(self) -> None:
        for name, peer in list(self.peers.items()):
            seen = self.epoch_times.setdefault(name, {})
            for path in peer.backup_dir.glob("epoch-*.pt"):
                epoch = int(path.stem.split("-")[1])
                if epoch not in seen:
                    try:
                        seen[epoch] = path.stat().st_mtime
                    except FileNotFoundError:  # rotated away between listing and stat
                        continue

    def _poll_monitor(self) -> None:
        monitor: ChaosMonitor = self.monitor()
        status, listing = monitor.get("/api/status"), monitor.get("/api/checkpoints")
        now, log = time.time(), self.monitor_log
        if status is not None:
            log.status_epochs.append((now, status["epoch"]))
        if listing:
            log.newest_checkpoints.append((now, max(entry["epoch"] for entry in listing)))
            for entry in listing:
                if entry["epoch"] not in log.verified and entry["epoch"] not in log.damaged:
                    self._verify(monitor, entry["epoch"])

    def _verify(self, monitor: ChaosMonitor, epoch: int) -> None:
        """Download a listed checkpoint as a user would (sha256 of the archive, then of every file)."""
        with tempfile.TemporaryDirectory(dir=self.workdir) as scratch:
            try:
                run_key = RunKey.load_or_create(monitor.run_dir / "run_key.pem").fingerprint
                manifest = download(
                    monitor.url, Path(scratch) / "checkpoint", epoch=epoch, timeout=60, run_key=run_key
                )
            except CheckpointError as error:
                if any(sign in str(error) for sign in VERIFICATION_ERRORS):
                    self.monitor_log.damaged[epoch] = str(error)
                return  # the monitor went away or retired it meanwhile: not a damaged checkpoint
            if manifest["epoch"] != epoch:
                self.monitor_log.damaged[epoch] = f"served as epoch {epoch}, its manifest says {manifest['epoch']}"
            else:
                self.monitor_log.verified.add(epoch)

    def swarm_timeline(self, names, excluded=None) -> list[tuple[float, int]]:
        """(time, epoch) of each epoch the given peers reached, at the first of them to reach it, in time order.

        ``excluded`` maps a peer to intervals (start, end) whose epochs do not count (a peer cut off from the swarm
        steps on its own: those are not the swarm's steps).
        """
        first: dict[int, float] = {}
        for name in names:
            skip = (excluded or {}).get(name, [])
            for epoch, when in list(self.epoch_times.get(name, {}).items()):
                if not any(start <= when <= end for start, end in skip):
                    first[epoch] = min(when, first.get(epoch, when))
        return sorted((when, epoch) for epoch, when in first.items())


@dataclass
class Window:
    """What the swarm did between two moments: steps taken and the longest time without one."""

    steps: int
    longest_gap: float
    epochs: tuple[int, int] | None  # first and last epoch reached in the window


def judge_window(timeline: list[tuple[float, int]], start: float, end: float) -> Window:
    """Steps are new epochs (beyond every epoch reached before ``start``); gaps count from ``start`` to ``end``."""
    reached_before = max((epoch for when, epoch in timeline if when < start), default=-1)
    steps = []
    for when, epoch in timeline:
        if start <= when <= end and epoch > reached_before:
            steps.append((when, epoch))
            reached_before = epoch
    moments = [start, *(when for when, _ in steps), end]
    gap = max(later - earlier for earlier, later in itertools.pairwise(moments))
    epochs = (steps[0][1], steps[-1][1]) if steps else None
    return Window(steps=sum(1 for _ in steps), longest_gap=gap, epochs=epochs)


def relative_gap(peer: ChaosPeer, other: ChaosPeer, epoch: int) -> float | None:
    """||peer - other|| at ``epoch`` over ``peer``'s own update into that epoch; None if a backup is missing."""
    here, before, there = peer.parameters(epoch), peer.parameters(epoch - 1), other.parameters(epoch)
    if here is None or before is None or there is None:
        return None
    update = (here - before).norm()
    return ((here - there).norm() / update).item() if update > 0 else None


def agreement_at(peers: list[ChaosPeer], epoch: int) -> dict[str, float] | None:
    """Gap of every peer to the first one at ``epoch`` (None if some backup is missing)."""
    reference, gaps = peers[0], {}
    for other in peers[1:]:
        gap = relative_gap(reference, other, epoch)
        if gap is None:
            return None
        gaps[f"{reference.name}~{other.name}"] = gap
    return gaps


def losses_by_epoch(peers) -> dict[int, float]:
    """Mean over peers of the training loss each logged for an epoch."""
    collected: dict[int, list[float]] = {}
    for peer in peers:
        for epoch, loss in peer.losses().items():
            collected.setdefault(epoch, []).append(loss)
    return {epoch: sum(values) / len(values) for epoch, values in collected.items()}
