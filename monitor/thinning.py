"""Thinning of the monitor's time series as it ages, in bounded batches, so the history stops growing without bound.

The policy is a list of tiers: rows older than `after` seconds (measured back from the newest row, not from the
wall clock, so a monitor that was down for a week does not lose its last day) keep one row per `every` seconds: the
first row of each bucket of `every` seconds. Buckets are aligned to multiples of `every`, so the coarser tiers keep
rows that the finer ones kept too, the run's first row is always kept (it is the first of its bucket) and its newest
rows are never touched. With the defaults a 90-day run keeps ~17 k rows for its last day (5 s refresh), ~42 k for
the month before and one row per hour (~1.4 k) before that: ~60 k rows instead of 1.55 M.

Each call of `Thinner.step` deletes from at most `batch_rows` rows (plus the rest of one bucket) in one transaction;
a watermark per tier, stored in the database, says how far that tier is done, so a step never rescans thinned rows
and a reopened database goes on where it stopped.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass

DAY = 86400.0


@dataclass(frozen=True)
class Tier:
    """Rows older than `after` seconds behind the newest row keep one row per `every` seconds."""

    after: float
    every: float


# Full resolution for a day, one row a minute up to a month, one an hour beyond (documented in docs/operating.md).
DEFAULT_TIERS = (Tier(after=DAY, every=60.0), Tier(after=30 * DAY, every=3600.0))
# ~20 ms of SQLite work on one core (measured, tests/benchmarks/bench_history.py): the refresh loop waits that long.
DEFAULT_BATCH_ROWS = 5000

WATERMARKS = "CREATE TABLE IF NOT EXISTS thinning (every REAL PRIMARY KEY, done_until REAL NOT NULL)"
DELETE_BATCH = (
    "DELETE FROM snapshots WHERE time >= :start AND time < :end AND time NOT IN ("
    " SELECT MIN(time) FROM snapshots WHERE time >= :start AND time < :end GROUP BY CAST(time / :every AS INTEGER))"
)


def _floor(value: float, every: float) -> float:
    return math.floor(value / every) * every


class Thinner:
    """Thins the `snapshots` table of a History connection, one bounded batch per `step`.

    Args:
        tiers: the policy, any order.
        batch_rows: about how many rows one step looks at (a step never splits a bucket, so it may take more).
    """

    def __init__(self, tiers: tuple[Tier, ...] = DEFAULT_TIERS, batch_rows: int = DEFAULT_BATCH_ROWS):
        # Coarse tiers first: on a large unthinned history they delete the most rows per row read.
        self.tiers = tuple(sorted(tiers, key=lambda tier: -tier.every))
        self.batch_rows = batch_rows

    def step(self, db: sqlite3.Connection) -> bool:
        """One batch of one tier in one transaction; True if it did some work (so more may be left)."""
        with db:
            db.execute("BEGIN IMMEDIATE")
            (newest,) = db.execute("SELECT MAX(time) FROM snapshots").fetchone()
            if newest is None:
                return False
            return any(self._tier_step(db, tier, newest) for tier in self.tiers)

    def _tier_step(self, db: sqlite3.Connection, tier: Tier, newest: float) -> bool:
        cutoff = _floor(newest - tier.after, tier.every)  # a whole bucket or nothing: never split one
        start = self._watermark(db, tier)
        if start is None or start >= cutoff:
            return False
        nth = db.execute(
            "SELECT time FROM snapshots WHERE time >= ? ORDER BY time LIMIT 1 OFFSET ?", (start, self.batch_rows)
        ).fetchone()
        end = cutoff if nth is None else min(cutoff, _floor(nth[0], tier.every))
        if end <= start:  # one bucket holds more than a batch: take that bucket whole
            end = min(cutoff, start + tier.every)
        db.execute(DELETE_BATCH, {"start": start, "end": end, "every": tier.every})
        db.execute("INSERT OR REPLACE INTO thinning VALUES (?, ?)", (tier.every, end))
        return True

    @staticmethod
    def _watermark(db: sqlite3.Connection, tier: Tier) -> float | None:
        """Where this tier goes on from: its saved watermark, else the bucket of the oldest row (None if empty)."""
        row = db.execute("SELECT done_until FROM thinning WHERE every = ?", (tier.every,)).fetchone()
        if row is not None:
            return row[0]
        (oldest,) = db.execute("SELECT MIN(time) FROM snapshots").fetchone()
        return None if oldest is None else _floor(oldest, tier.every)
