"""The monitor's memory in SQLite (WAL mode): snapshots over time, per-epoch aggregates, the per-peer ledger and
the checkpoint index.

A restarted monitor reopens the same file and keeps its charts, its sample total and its list of checkpoints.
Growth is bounded: the time series is thinned as it ages (monitor/thinning.py), while the per-epoch view stays exact
because it is kept in its own table, updated as each snapshot is recorded. Every read answer is capped in points.

Two connections: the refresh loop writes through one (under the write lock, which thinning takes a batch at a time)
and the HTTP server reads through the other (under its own lock). WAL lets the reader see the last commit while a
write is under way, so a dashboard poll never waits for the refresh loop and the refresh loop never waits for it.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from monitor.aggregate import EMPTY_SNAPSHOT, PeerRow, SwarmSnapshot
from monitor.thinning import DEFAULT_BATCH_ROWS, DEFAULT_TIERS, WATERMARKS, Thinner, Tier

logger = logging.getLogger(__name__)

# The most points one read returns, for the series and for the per-epoch list each: ~150 bytes a point in JSON, so
# at most ~600 KB an answer; a client that wants more detail asks for a shorter span with since=.
MAX_POINTS = 2000
# A thinning pass starts at most this often; a pass goes on by one batch per recorded snapshot until it is done.
THIN_EVERY_S = 300.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    time REAL PRIMARY KEY, epoch INTEGER NOT NULL, loss REAL, samples_per_second REAL NOT NULL,
    alive_peers INTEGER NOT NULL, samples_total INTEGER NOT NULL, invalid_records INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS peers (
    peer_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, samples_per_second REAL NOT NULL, loss REAL,
    device TEXT NOT NULL, version TEXT NOT NULL, last_seen REAL NOT NULL, contribution INTEGER NOT NULL,
    counted_epoch INTEGER NOT NULL, counted_samples INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    epoch INTEGER PRIMARY KEY, name TEXT NOT NULL, archive_sha256 TEXT NOT NULL, archive_size INTEGER NOT NULL,
    created_at REAL NOT NULL, loss REAL, samples_total INTEGER NOT NULL
);
"""
# Per-epoch aggregates as sums and counts, so a thinned series still gives the exact mean of every epoch.
EPOCHS = """
CREATE TABLE epochs (
    epoch INTEGER PRIMARY KEY, loss_sum REAL NOT NULL, loss_count INTEGER NOT NULL, speed_sum REAL NOT NULL,
    rows INTEGER NOT NULL, alive_peers INTEGER NOT NULL, time REAL NOT NULL, samples_total INTEGER NOT NULL
)
"""
# Migration of a database written before the epochs table existed: built once, from the rows it has.
EPOCHS_FROM_SNAPSHOTS = """
INSERT INTO epochs SELECT epoch, COALESCE(SUM(loss), 0.0), COUNT(loss), SUM(samples_per_second), COUNT(*),
    MAX(alive_peers), MIN(time), MAX(samples_total) FROM snapshots GROUP BY epoch
"""
ADD_TO_EPOCH = """
INSERT INTO epochs VALUES (:epoch, COALESCE(:loss, 0.0), :loss IS NOT NULL, :speed, 1, :alive, :time, :samples)
ON CONFLICT (epoch) DO UPDATE SET loss_sum = loss_sum + excluded.loss_sum,
    loss_count = loss_count + excluded.loss_count, speed_sum = speed_sum + excluded.speed_sum, rows = rows + 1,
    alive_peers = MAX(alive_peers, excluded.alive_peers), time = MIN(time, excluded.time),
    samples_total = MAX(samples_total, excluded.samples_total)
"""
# A snapshot recorded again at the same time replaces the old row: its sums leave the epoch (its max/min cannot),
# and an epoch left without rows leaves the table.
REMOVE_FROM_EPOCH = """
UPDATE epochs SET loss_sum = loss_sum - COALESCE(:loss, 0.0), loss_count = loss_count - (:loss IS NOT NULL),
    speed_sum = speed_sum - :speed, rows = rows - 1 WHERE epoch = :epoch
"""
DROP_EMPTY_EPOCH = "DELETE FROM epochs WHERE epoch = :epoch AND rows <= 0"
EPOCH_COLUMNS = (
    "epoch, CASE WHEN loss_count > 0 THEN loss_sum / loss_count END AS loss, speed_sum / rows AS samples_per_second,"
    " alive_peers, time, samples_total"
)
# At most :n + 1 rows of `table` spread evenly over `key` in [:lo, :hi], the rows at :lo and :hi included: one
# index seek per point (the first row at or after each mark), so the cost depends on the points asked for, not on
# how many rows the table holds (a 90-day history that thinning has not yet caught up with answers as fast).
SAMPLE = """
WITH RECURSIVE marks(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM marks WHERE k + 1 < :n)
SELECT {columns} FROM {table} WHERE {key} IN (
    SELECT (SELECT {key} FROM {table} WHERE {key} >= :lo + k * :step ORDER BY {key} LIMIT 1) FROM marks
    UNION SELECT :hi
) ORDER BY {key}
"""


@dataclass(frozen=True)
class _View:
    """The queries of one capped read: the n-th key from `since`, the rows from `since`, the last key, a sample."""

    nth: str
    since: str
    last: str
    sample: str

    @classmethod
    def of(cls, columns: str, table: str, key: str) -> _View:
        return cls(
            nth=f"SELECT {key} FROM {table} WHERE {key} >= ? ORDER BY {key} LIMIT 1 OFFSET ?",
            since=f"SELECT {columns} FROM {table} WHERE {key} >= ? ORDER BY {key}",
            last=f"SELECT MAX({key}) FROM {table}",
            sample=SAMPLE.format(columns=columns, table=table, key=key),
        )


SERIES = _View.of("*", "snapshots", "time")
EPOCHS_VIEW = _View.of(EPOCH_COLUMNS, "epochs", "epoch")


@dataclass(frozen=True)
class CheckpointEntry:
    """A checkpoint in the index: directory `name` and archive `name`.tar under the checkpoint dir."""

    epoch: int
    name: str
    archive_sha256: str
    archive_size: int
    created_at: float
    loss: float | None
    samples_total: int


class History:
    """SQLite-backed history of one run.

    Args:
        path: database file; created with its tables on first use (an older file gains the epochs table on first
            open). ":memory:" works for tests (one connection then: a second would be another database).
        tiers: how the time series is thinned as it ages (monitor/thinning.py).
        thin_every: seconds between two thinning passes; 0 checks at every recorded snapshot.
        batch_rows: about how many rows one thinning batch looks at (what the refresh loop may wait for).
    """

    def __init__(
        self,
        path: str | Path,
        tiers: tuple[Tier, ...] = DEFAULT_TIERS,
        thin_every: float = THIN_EVERY_S,
        batch_rows: int = DEFAULT_BATCH_ROWS,
    ):
        in_memory = str(path) == ":memory:"
        if not in_memory:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = _connect(path)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
            self._db.executescript(SCHEMA + WATERMARKS)
            self._add_epochs_table()
        self._read_lock = self._lock if in_memory else threading.Lock()
        self._reader = self._db if in_memory else _connect(path)
        if not in_memory:
            self._reader.execute("PRAGMA query_only=1")  # reads only: every write goes through the lock above
        self._thinner = Thinner(tiers, batch_rows)
        self._thin_every = thin_every
        self._thin_due = 0.0  # time.monotonic() of the next pass; the first recorded snapshot starts one
        self._thinning = False  # a pass is under way: it goes on at the next recorded snapshot

    def _add_epochs_table(self) -> None:
        """Create the epochs table, filled from the existing rows in the same transaction (a crash redoes it)."""
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'epochs'").fetchone():
            return
        started = time.monotonic()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(EPOCHS)
            self._db.execute(EPOCHS_FROM_SNAPSHOTS)
        logger.info(f"History: per-epoch table built from the existing rows in {time.monotonic() - started:.1f} s")

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._reader is not self._db:
            with self._read_lock:
                self._reader.close()

    def record(self, snapshot: SwarmSnapshot) -> None:
        """Append the snapshot to the time series and its epoch's aggregates and upsert the peers ledger, in one
        transaction; then, if due, one batch of thinning (its own short transaction)."""
        # JSON has no inf and SQLite stores NaN as NULL (refused by NOT NULL, and poisoning the epoch's sums): a
        # non-finite loss is recorded as unknown and a non-finite speed as 0, never as a crash of the refresh loop.
        loss = snapshot.loss if snapshot.loss is not None and math.isfinite(snapshot.loss) else None
        speed = snapshot.samples_per_second if math.isfinite(snapshot.samples_per_second) else 0.0
        values = {
            "time": snapshot.time,
            "epoch": snapshot.epoch,
            "loss": loss,
            "speed": speed,
            "alive": snapshot.alive_peers,
            "samples": snapshot.samples_total,
        }
        with self._lock, self._db:
            self._db.execute("BEGIN")
            replaced = self._db.execute(
                "SELECT epoch, loss, samples_per_second AS speed FROM snapshots WHERE time = ?", (snapshot.time,)
            ).fetchone()
            if replaced is not None:
                self._db.execute(REMOVE_FROM_EPOCH, dict(replaced))
                self._db.execute(DROP_EMPTY_EPOCH, dict(replaced))
            self._db.execute(
                "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    snapshot.time,
                    snapshot.epoch,
                    loss,
                    speed,
                    snapshot.alive_peers,
                    snapshot.samples_total,
                    snapshot.invalid_records,
                ),
            )
            self._db.execute(ADD_TO_EPOCH, values)
            self._db.execute("DELETE FROM peers")
            for row in snapshot.peers:
                counted_epoch, counted_samples = snapshot.counted.get(row.peer_id, (-1, 0))
                self._db.execute(
                    "INSERT INTO peers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        row.peer_id,
                        row.epoch,
                        row.samples_per_second,
                        row.loss,
                        row.device,
                        row.version,
                        row.last_seen,
                        row.contribution,
                        counted_epoch,
                        counted_samples,
                    ),
                )
        self._thin_if_due()

    def _thin_if_due(self) -> None:
        """One thinning batch if a pass is under way or due: the refresh loop waits for one batch, never a pass."""
        now = time.monotonic()
        if not self._thinning and now < self._thin_due:
            return
        try:
            with self._lock:
                self._thinning = self._thinner.step(self._db)
        except sqlite3.Error as error:  # e.g. a full disk: the history still records; thinning tries again later
            logger.warning(f"History thinning failed, will retry: {error!r}")
            self._thinning = False
        if not self._thinning:
            self._thin_due = now + self._thin_every

    def last_snapshot(self) -> SwarmSnapshot:
        """The snapshot to continue from after a restart: the latest totals and the ledger, every peer not alive."""
        with self._read_lock:
            last = self._reader.execute("SELECT * FROM snapshots ORDER BY time DESC LIMIT 1").fetchone()
            peers = self._reader.execute("SELECT * FROM peers").fetchall()
        if last is None:
            return EMPTY_SNAPSHOT
        rows = tuple(
            PeerRow(
                peer_id=p["peer_id"],
                epoch=p["epoch"],
                samples_per_second=p["samples_per_second"],
                loss=p["loss"],
                device=p["device"],
                version=p["version"],
                last_seen=p["last_seen"],
                contribution=p["contribution"],
                alive=False,
                status="gone",
            )
            for p in peers
        )
        return SwarmSnapshot(
            time=last["time"],
            epoch=last["epoch"],
            loss=last["loss"],
            samples_per_second=0.0,
            alive_peers=0,
            samples_total=last["samples_total"],
            invalid_records=0,
            peers=rows,
            counted={p["peer_id"]: (p["counted_epoch"], p["counted_samples"]) for p in peers},
        )

    def series(self, since: float = 0.0, limit: int = MAX_POINTS) -> list[dict]:
        """Snapshots from `since` on (oldest first): all of them if they are at most `limit` (capped at MAX_POINTS),
        else `limit` evenly spread over time, the first and the last included, so a long run stays light and its
        chart still spans the whole run."""
        return self._capped(SERIES, since, limit)

    def by_epoch(self, since: int = 0, limit: int = MAX_POINTS) -> list[dict]:
        """One point per global epoch from `since` on: mean loss and samples/s, most peers seen, when the epoch was
        first seen, its largest sample total. Exact whatever thinning removed; all epochs if they are at most
        `limit` (capped at MAX_POINTS), else `limit` evenly spread, the first and the last included."""
        return self._capped(EPOCHS_VIEW, since, limit)

    def _capped(self, view: _View, since: float, limit: int) -> list[dict]:
        points = max(1, min(limit, MAX_POINTS))
        with self._read_lock, self._reader:
            self._reader.execute("BEGIN")  # one read transaction: the bounds and the rows come from the same commit
            beyond = self._reader.execute(view.nth, (since, points)).fetchone()
            if beyond is None:  # no more than `points` rows: all of them (one index range, at most `points` long)
                rows = self._reader.execute(view.since, (since,)).fetchall()
            else:
                first = self._reader.execute(view.nth, (since, 0)).fetchone()[0]
                last = self._reader.execute(view.last).fetchone()[0]
                rows = self._reader.execute(view.sample, _marks(first, last, points)).fetchall()
        return [_json_safe(row) for row in rows]

    def add_checkpoint(self, entry: CheckpointEntry) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.epoch,
                    entry.name,
                    entry.archive_sha256,
                    entry.archive_size,
                    entry.created_at,
                    entry.loss,
                    entry.samples_total,
                ),
            )

    def remove_checkpoint(self, epoch: int) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM checkpoints WHERE epoch = ?", (epoch,))

    def checkpoints(self) -> list[CheckpointEntry]:
        """Indexed checkpoints, newest first (the index alone; `CheckpointStore` verifies the files)."""
        with self._read_lock:
            rows = self._reader.execute("SELECT * FROM checkpoints ORDER BY epoch DESC").fetchall()
        return [CheckpointEntry(**dict(row)) for row in rows]


def _connect(path: str | Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA busy_timeout=5000")  # the two connections share the file: wait out the other's commit
    return db


def _json_safe(row: sqlite3.Row) -> dict:
    """The row as a dict, an inf (written by an older monitor) as None: JSON has no inf."""
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in zip(row.keys(), row)
    }


def _marks(lo: float, hi: float, limit: int) -> dict:
    """Parameters of SAMPLE: `limit` points from lo to hi (a single point, the last, if limit is 1)."""
    points = max(1, min(limit, MAX_POINTS))
    if points == 1:
        return {"lo": hi, "hi": hi, "step": 0.0, "n": 1}
    return {"lo": lo, "hi": hi, "step": (hi - lo) / (points - 1), "n": points - 1}
