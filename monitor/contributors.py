"""Who contributed what: the contributors table, folded from each aggregated snapshot. Pure: no I/O, no clock.

A peer's contribution is the lifetime total its signed records carry (peer/contribution.py), not a sum of the
per-epoch records this monitor happened to read: records expire or are overwritten unread, and a peer can die
between two, so a sum would miss samples while the total is exact as soon as any later record is read. The table
keeps the largest total read so far (a record read late never lowers it). A total is the peer's own claim: bounded
by the record schema (MAX_COUNT), checked for nothing else, and shown as that peer's claim. Uptime is what this
monitor saw: time between two refreshes that both found the peer alive. The table holds at most MAX_CONTRIBUTORS
rows (alive and largest first), since keys are free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from monitor.aggregate import PeerRow, SwarmSnapshot

MAX_CONTRIBUTORS = 1024


@dataclass(frozen=True)
class Contributor:
    """One row of the contributors table.

    Args:
        peer_id: the short id of the peer's signing key (``key-`` + 12 hex digits): unique, unlike names.
        name: the display name of its latest record ("" if none); display only.
        samples: the largest lifetime sample total its signed records claimed.
        compute_seconds: the largest lifetime compute time (forward and backward) they claimed.
        uptime_seconds: how long this monitor saw it alive.
        first_seen: time of the first record of it this monitor read.
        last_seen: time of its latest record.
        device: device of its latest record.
        status: "training", "recovering" or "gone" (as in the peers table).
        epoch, loss, samples_per_second: from its latest record.
    """

    peer_id: str
    name: str
    samples: int
    compute_seconds: float
    uptime_seconds: float
    first_seen: float
    last_seen: float
    device: str
    status: str
    epoch: int
    loss: float | None
    samples_per_second: float


@dataclass(frozen=True)
class ContributorPoint:
    """One point of a contributor's history: what one of its records said."""

    peer_id: str
    time: float
    epoch: int
    loss: float | None
    samples_per_second: float
    samples: int


@dataclass(frozen=True)
class ContributorsUpdate:
    """The new table, and the points of the records read since the previous one."""

    contributors: dict[str, Contributor]
    points: list[ContributorPoint]


def update_contributors(
    previous: Mapping[str, Contributor],
    snapshot: SwarmSnapshot,
    previous_time: float,
    max_rows: int = MAX_CONTRIBUTORS,
) -> ContributorsUpdate:
    """Fold a snapshot's peers table into the contributors table.

    Args:
        previous: the table after the previous refresh (after a restart: as saved, every row "gone").
        snapshot: the snapshot just aggregated; its rows carry each peer's latest report.
        previous_time: time of the previous refresh; a peer alive then and now gains the time in between.
        max_rows: most rows kept.
    """
    table = {pid: replace(row, status="gone") for pid, row in previous.items()}
    points = []
    for row in snapshot.peers:
        before = previous.get(row.peer_id)
        if before is not None and row.last_seen <= before.last_seen and not row.alive:
            continue  # nothing new about a peer already gone
        if before is None or row.last_seen > before.last_seen:
            points.append(_point(row))
        table[row.peer_id] = _merge(before, row, snapshot.time - previous_time)
    kept = sorted(table.values(), key=lambda c: (c.status == "gone", -c.samples, c.peer_id))[:max_rows]
    kept_ids = {c.peer_id for c in kept}
    return ContributorsUpdate({c.peer_id: c for c in kept}, [p for p in points if p.peer_id in kept_ids])


def _merge(before: Contributor | None, row: PeerRow, elapsed: float) -> Contributor:
    was_alive = before is not None and before.status != "gone"
    gained = max(0.0, elapsed) if row.alive and was_alive else 0.0
    if before is not None and row.last_seen < before.last_seen:  # an older record read late: only its totals count
        return replace(
            before,
            samples=max(row.samples_total, before.samples),
            compute_seconds=max(row.compute_seconds_total, before.compute_seconds),
            uptime_seconds=before.uptime_seconds + gained,
            first_seen=min(row.last_seen, before.first_seen),
            status=row.status if row.alive else "gone",
        )
    return Contributor(
        peer_id=row.peer_id,
        name=row.name,
        samples=max(row.samples_total, before.samples if before else 0),
        compute_seconds=max(row.compute_seconds_total, before.compute_seconds if before else 0.0),
        uptime_seconds=(before.uptime_seconds if before else 0.0) + gained,
        first_seen=min(row.last_seen, before.first_seen) if before else row.last_seen,
        last_seen=row.last_seen,
        device=row.device,
        status=row.status if row.alive else "gone",
        epoch=row.epoch,
        loss=row.loss,
        samples_per_second=row.samples_per_second,
    )


def _point(row: PeerRow) -> ContributorPoint:
    return ContributorPoint(
        peer_id=row.peer_id,
        time=row.last_seen,
        epoch=row.epoch,
        loss=row.loss,
        samples_per_second=row.samples_per_second,
        samples=row.samples_total,
    )
