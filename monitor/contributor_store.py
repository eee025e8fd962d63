"""The contributors table and each contributor's history, in the monitor's SQLite file (tables of their own).

A restarted monitor reloads the table (every row "gone" until its peer reports again), so names and totals survive
it. Growth is bounded: at most MAX_CONTRIBUTORS rows (monitor/contributors.py), and each contributor's history is
halved (every other point dropped, the newest kept) whenever it reaches 2 * MAX_POINTS_PER_PEER points, so a long
run keeps its whole span at a coarser grain. Like monitor/history.py, writes (the refresh loop) and reads (the HTTP
server) go through two connections, so a dashboard poll never waits for a write.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from dataclasses import asdict, fields
from pathlib import Path

from monitor.contributors import Contributor, ContributorsUpdate

MAX_POINTS_PER_PEER = 1000

SCHEMA = """
CREATE TABLE IF NOT EXISTS contributors (
    peer_id TEXT PRIMARY KEY, name TEXT NOT NULL, samples INTEGER NOT NULL, compute_seconds REAL NOT NULL,
    uptime_seconds REAL NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL, device TEXT NOT NULL,
    status TEXT NOT NULL, epoch INTEGER NOT NULL, loss REAL, samples_per_second REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS contributor_points (
    peer_id TEXT NOT NULL, time REAL NOT NULL, epoch INTEGER NOT NULL, loss REAL, samples_per_second REAL NOT NULL,
    samples INTEGER NOT NULL, PRIMARY KEY (peer_id, time)
);
"""
COLUMNS = [field.name for field in fields(Contributor)]
INSERT = f"INSERT INTO contributors VALUES ({', '.join('?' * len(COLUMNS))})"
# every other point of one peer, the newest kept: the history keeps its span at half the grain
HALVE = """
DELETE FROM contributor_points WHERE peer_id = :peer AND time IN (
    SELECT time FROM (SELECT time, ROW_NUMBER() OVER (ORDER BY time DESC) AS n FROM contributor_points
        WHERE peer_id = :peer) WHERE n % 2 = 0
)
"""


class ContributorStore:
    """The contributors table in SQLite.

    Args:
        path: the monitor's database file (shared with monitor/history.py; WAL mode is set there and here).
    """

    def __init__(self, path: str | Path):
        self._lock, self._read_lock = threading.Lock(), threading.Lock()
        self._db = _connect(path)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
        self._reader = _connect(path)
        self._reader.execute("PRAGMA query_only=1")

    def close(self) -> None:
        with self._lock:
            self._db.close()
        with self._read_lock:
            self._reader.close()

    def load(self) -> dict[str, Contributor]:
        """The saved table, every contributor "gone" (a restarted monitor has seen none of them alive yet)."""
        with self._read_lock:
            rows = self._reader.execute("SELECT * FROM contributors").fetchall()
        return {row["peer_id"]: Contributor(**{**dict(row), "status": "gone"}) for row in rows}

    def save(self, update: ContributorsUpdate) -> None:
        """Replace the table and add the new points, in one transaction; drop the history of rows no longer kept."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM contributors")
            self._db.executemany(INSERT, [_row(c) for c in update.contributors.values()])
            self._db.executemany(
                "INSERT OR REPLACE INTO contributor_points VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (p.peer_id, p.time, p.epoch, _finite(p.loss), p.samples_per_second, p.samples)
                    for p in update.points
                ],
            )
            self._db.execute("DELETE FROM contributor_points WHERE peer_id NOT IN (SELECT peer_id FROM contributors)")
            for peer in {p.peer_id for p in update.points}:
                count = self._db.execute("SELECT COUNT(*) FROM contributor_points WHERE peer_id = ?", (peer,))
                if count.fetchone()[0] >= 2 * MAX_POINTS_PER_PEER:
                    self._db.execute(HALVE, {"peer": peer})

    def contributors(self) -> list[dict]:
        """Every contributor, largest contribution first."""
        with self._read_lock:
            rows = self._reader.execute("SELECT * FROM contributors ORDER BY samples DESC, peer_id").fetchall()
        return [dict(row) for row in rows]

    def history(self, peer_id: str) -> dict | None:
        """One contributor's row and its points (oldest first), or None if unknown."""
        with self._read_lock, self._reader:
            self._reader.execute("BEGIN")
            row = self._reader.execute("SELECT * FROM contributors WHERE peer_id = ?", (peer_id,)).fetchone()
            points = self._reader.execute(
                "SELECT time, epoch, loss, samples_per_second, samples FROM contributor_points WHERE peer_id = ?"
                " ORDER BY time",
                (peer_id,),
            ).fetchall()
        if row is None:
            return None
        return {"contributor": dict(row), "points": [dict(point) for point in points]}


def _row(contributor: Contributor) -> tuple:
    values = asdict(contributor)
    values["loss"] = _finite(values["loss"])
    return tuple(values[name] for name in COLUMNS)


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or inf: an unknown loss is stored as NULL."""
    return value if value is not None and math.isfinite(value) else None


def _connect(path: str | Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA busy_timeout=5000")
    return db
