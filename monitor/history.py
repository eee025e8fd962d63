"""The monitor's memory in SQLite (WAL mode): snapshots over time, the per-peer ledger and the checkpoint index.

A restarted monitor reopens the same file and keeps its charts, its sample total and its list of checkpoints.
One connection guarded by a lock: the refresh loop writes and the HTTP server reads from different threads.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from monitor.aggregate import EMPTY_SNAPSHOT, PeerRow, SwarmSnapshot

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
        path: database file; created with its tables on first use. ":memory:" works for tests.
    """

    def __init__(self, path: str | Path):
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def record(self, snapshot: SwarmSnapshot) -> None:
        """Append the snapshot to the time series and upsert the peers ledger, in one transaction."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    snapshot.time,
                    snapshot.epoch,
                    snapshot.loss,
                    snapshot.samples_per_second,
                    snapshot.alive_peers,
                    snapshot.samples_total,
                    snapshot.invalid_records,
                ),
            )
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

    def last_snapshot(self) -> SwarmSnapshot:
        """The snapshot to continue from after a restart: the latest totals and the ledger, every peer not alive."""
        with self._lock:
            last = self._db.execute("SELECT * FROM snapshots ORDER BY time DESC LIMIT 1").fetchone()
            peers = self._db.execute("SELECT * FROM peers").fetchall()
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

    def series(self, since: float = 0.0, limit: int = 5000) -> list[dict]:
        """Snapshots over time (oldest first), thinned to at most `limit` points so a long run stays light."""
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM snapshots WHERE time >= ?", (since,)).fetchone()
            stride = max(1, -(-count // max(1, limit)))
            rows = self._db.execute(
                "SELECT * FROM (SELECT *, ROW_NUMBER() OVER (ORDER BY time) - 1 AS n FROM snapshots"
                " WHERE time >= ?) WHERE n % ? = 0 OR n = ? - 1 ORDER BY time",
                (since, stride, count),
            ).fetchall()
        return [{key: row[key] for key in row.keys() if key != "n"} for row in rows]

    def by_epoch(self) -> list[dict]:
        """One point per global epoch: mean loss and samples/s, most peers seen, when the epoch was first seen."""
        with self._lock:
            rows = self._db.execute(
                "SELECT epoch, AVG(loss) AS loss, AVG(samples_per_second) AS samples_per_second,"
                " MAX(alive_peers) AS alive_peers, MIN(time) AS time, MAX(samples_total) AS samples_total"
                " FROM snapshots GROUP BY epoch ORDER BY epoch"
            ).fetchall()
        return [dict(row) for row in rows]

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
        with self._lock:
            rows = self._db.execute("SELECT * FROM checkpoints ORDER BY epoch DESC").fetchall()
        return [CheckpointEntry(**dict(row)) for row in rows]
