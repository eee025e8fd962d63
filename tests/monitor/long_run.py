"""A simulated long run's history, bulk-inserted the way an old monitor would have left it (every 5 s snapshot).

Shared by tests/monitor/test_monitor_history_90_days.py and tests/benchmarks/bench_history.py. Values are shaped
like a real run's: a loss falling from ~10 to ~2 with noise (and now and then a refresh without a loss), a
fluctuating number of peers, speed proportional to them, a growing sample total, an epoch every 20 s (388 800 epochs
in 90 days: the per-epoch list must be thinned too).
"""

from __future__ import annotations

import math
import random
import sqlite3
from pathlib import Path

from monitor.history import SCHEMA

DAY = 86400.0
START = 1_760_000_000.0
SPACING = 5.0
ROWS_PER_EPOCH = 4


def rows(days: float, spacing: float = SPACING, start: float = START):
    """(time, epoch, loss, samples_per_second, alive_peers, samples_total, invalid_records) tuples, oldest first."""
    count = int(days * DAY / spacing)
    rng = random.Random(0)
    samples_total = 0
    for i in range(count):
        alive = 8 + int(6 * math.sin(i / 5000.0)) + rng.randint(0, 2)
        speed = alive * (40.0 + 10.0 * rng.random())
        samples_total += int(speed * spacing)
        loss = None if i % 997 == 13 else 2.0 + 8.0 * math.exp(-5.0 * i / count) + rng.gauss(0.0, 0.05)
        yield start + i * spacing, i // ROWS_PER_EPOCH, loss, speed, alive, samples_total, int(i % 5000 == 0)


def build(path: Path, days: float, spacing: float = SPACING) -> int:
    """Write a history file as the monitor before per-epoch aggregates left it; returns the number of rows."""
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    db.execute("BEGIN")
    db.executemany("INSERT INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?)", rows(days, spacing))
    db.execute("COMMIT")
    (count,) = db.execute("SELECT COUNT(*) FROM snapshots").fetchone()
    db.close()
    return count
