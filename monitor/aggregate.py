"""Aggregate the swarm's validated progress reports into one snapshot: a pure function, no I/O, no clock.

The monitor calls `aggregate` every refresh period with the reports it just read from the DHT, the previous
snapshot (which carries the per-peer contribution ledger) and the current time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

LAGGING_EPOCHS = 2  # a peer this many epochs behind the swarm is shown as recovering (it reloads state)


@dataclass(frozen=True)
class PeerReport:
    """One peer's progress for one epoch, as read from its signed DHT record.

    Args:
        peer_id: base58 id of the peer that signed the record.
        epoch: the peer's local epoch when it reported.
        samples_per_second: the peer's own throughput.
        samples_accumulated: samples this peer contributed to the reported epoch.
        loss_sum: sum of the mini-step losses over the reported epoch.
        mini_steps: number of mini-steps (forward/backward passes) summed in `loss_sum`.
        time: DHT time (seconds since the epoch) at which the record was made.
        device: device name, e.g. "cpu" or "NVIDIA A100".
        version: software version of the peer.
    """

    peer_id: str
    epoch: int
    samples_per_second: float
    samples_accumulated: int
    loss_sum: float
    mini_steps: int
    time: float
    device: str = ""
    version: str = ""


@dataclass(frozen=True)
class PeerRow:
    """A row of the peers table: the peer's latest report plus what the monitor has accumulated about it."""

    peer_id: str
    epoch: int
    samples_per_second: float
    loss: float | None
    device: str
    version: str
    last_seen: float
    contribution: int  # samples contributed over the whole run, as far as this monitor saw
    alive: bool
    status: str  # "training", "recovering" (lagging behind the swarm's epoch) or "gone"


@dataclass(frozen=True)
class SwarmSnapshot:
    """The state of the run at one moment, as shown on the dashboard and exported as metrics."""

    time: float
    epoch: int
    loss: float | None
    samples_per_second: float
    alive_peers: int
    samples_total: int
    invalid_records: int
    peers: tuple[PeerRow, ...] = ()
    # per peer, the (epoch, samples) already counted into its contribution, so a record read twice counts once
    counted: Mapping[str, tuple[int, int]] = field(default_factory=dict)


EMPTY_SNAPSHOT = SwarmSnapshot(
    time=0.0, epoch=0, loss=None, samples_per_second=0.0, alive_peers=0, samples_total=0, invalid_records=0
)


def is_sane(report: PeerReport) -> bool:
    """A schema-valid record can still carry numbers that would poison the sums (NaN, negative counts)."""
    numbers = (report.samples_per_second, report.loss_sum, report.time)
    return (
        report.epoch >= 0
        and report.samples_accumulated >= 0
        and report.mini_steps >= 0
        and all(math.isfinite(x) for x in numbers)
        and report.samples_per_second >= 0
    )


def aggregate(
    reports: Iterable[PeerReport],
    now: float,
    previous: SwarmSnapshot = EMPTY_SNAPSHOT,
    invalid_records: int = 0,
    stale_after: float = 60.0,
    forget_after: float = 3600.0,
) -> SwarmSnapshot:
    """Fold the latest reports into a new snapshot.

    Args:
        reports: reports that passed schema and signature validation (at most one per peer is used: the newest).
        now: current DHT time.
        previous: the last snapshot; its ledger makes contributions and the sample total cumulative, and its epoch
            is the new one's floor (the run's epoch is the highest any alive peer ever reported).
        invalid_records: records rejected by validation during this refresh (shown and exported, not aggregated).
        stale_after: a peer whose newest report is older than this is not alive.
        forget_after: a peer not seen for this long is dropped from the table (its contribution stays counted).
    """
    newest: dict[str, PeerReport] = {}
    for report in reports:
        if not is_sane(report):
            invalid_records += 1
            continue
        if report.peer_id not in newest or report.time > newest[report.peer_id].time:
            newest[report.peer_id] = report

    alive = {pid: r for pid, r in newest.items() if now - r.time <= stale_after}
    # the run's epoch never goes back: when the peer that was ahead stops counting as alive, the others catch up
    epoch = max([previous.epoch, *(r.epoch for r in alive.values())])

    counted = dict(previous.counted)
    contributions = {row.peer_id: row.contribution for row in previous.peers}
    samples_total = previous.samples_total
    for pid, report in newest.items():
        added = _new_samples(report, counted.get(pid))
        if added is not None:
            already = counted[pid][1] if pid in counted and counted[pid][0] == report.epoch else 0
            counted[pid] = (report.epoch, max(already, report.samples_accumulated))
            contributions[pid] = contributions.get(pid, 0) + added
            samples_total += added

    rows = {row.peer_id: replace(row, alive=False, status="gone") for row in previous.peers}
    for pid, report in newest.items():
        rows[pid] = _row(report, contributions[pid], pid in alive, epoch)
    rows = {pid: row for pid, row in rows.items() if row.alive or now - row.last_seen <= forget_after}
    counted = {pid: c for pid, c in counted.items() if pid in rows}

    loss_sum = sum(r.loss_sum for r in alive.values())
    mini_steps = sum(r.mini_steps for r in alive.values())
    return SwarmSnapshot(
        time=now,
        epoch=epoch,
        loss=loss_sum / mini_steps if mini_steps > 0 else None,
        samples_per_second=sum(r.samples_per_second for r in alive.values()),
        alive_peers=len(alive),
        samples_total=samples_total,
        invalid_records=invalid_records,
        peers=tuple(sorted(rows.values(), key=lambda row: (not row.alive, -row.contribution, row.peer_id))),
        counted=counted,
    )


def _new_samples(report: PeerReport, counted: tuple[int, int] | None) -> int | None:
    """Samples of this report not yet counted, or None if the report is older than what was counted."""
    if counted is None or report.epoch > counted[0]:
        return report.samples_accumulated
    if report.epoch == counted[0]:  # the same epoch re-reported with more samples: count the growth only
        return max(0, report.samples_accumulated - counted[1])
    return None


def _row(report: PeerReport, contribution: int, alive: bool, swarm_epoch: int) -> PeerRow:
    if not alive:
        status = "gone"
    elif report.epoch <= swarm_epoch - LAGGING_EPOCHS:
        status = "recovering"
    else:
        status = "training"
    return PeerRow(
        peer_id=report.peer_id,
        epoch=report.epoch,
        samples_per_second=report.samples_per_second,
        loss=report.loss_sum / report.mini_steps if report.mini_steps > 0 else None,
        device=report.device,
        version=report.version,
        last_seen=report.time,
        contribution=contribution,
        alive=alive,
        status=status,
    )
