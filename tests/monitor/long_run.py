"""A simulated long run's history, bulk-inserted the way an old monitor would have left it (every 5 s snapshot).

Shared by tests/monitor/test_monitor_history_90_days.py and tests/benchmarks/bench_history.py, with a real HTTP
server in front of such a history and the requests one dashboard poll makes. Values are shaped
like a real run's: a loss falling from ~10 to ~2 with noise (and now and then a refresh without a loss), a
fluctuating number of peers, speed proportional to them, a growing sample total, an epoch every 20 s (388 800 epochs
in 90 days: the per-epoch list must be thinned too).
"""

from __future__ import annotations

import json
import math
import random
import re
import sqlite3
import time
import urllib.request
from pathlib import Path

from monitor.aggregate import PeerProgress, aggregate
from monitor.checkpoint import CheckpointStore
from monitor.history import SCHEMA, History
from monitor.live import LiveState
from monitor.metrics import make_registry
from monitor.server import ServerThread, create_app
from monitor.thinning import DEFAULT_BATCH_ROWS, DEFAULT_TIERS, Thinner, Tier


def thin_pass(path: Path, tiers: tuple[Tier, ...] = DEFAULT_TIERS, batch_rows: int = DEFAULT_BATCH_ROWS) -> int:
    """A whole thinning pass over a history file now, batch after batch (each its own transaction): how many batches.

    The monitor runs the same batches one per recorded snapshot (History._thin_if_due); a test wants the whole pass.
    """
    db = sqlite3.connect(str(path), isolation_level=None)  # the Thinner opens its own transactions
    db.execute("PRAGMA busy_timeout=5000")  # the History under test may hold the file for a moment
    try:
        thinner, batches = Thinner(tiers, batch_rows), 0
        while thinner.step(db):
            batches += 1
        return batches
    finally:
        db.close()


DAY = 86400.0
START = 1_760_000_000.0
SPACING = 5.0
ROWS_PER_EPOCH = 4
DASHBOARD_JS = Path(__file__).resolve().parents[2] / "monitor" / "static" / "dashboard.js"
# What the dashboard asks for, read from the page itself so the measured polls follow it.
HISTORY_POINTS = int(re.search(r"const HISTORY_POINTS = (\d+);", DASHBOARD_JS.read_text()).group(1))


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


def fill(directory):
    (directory / "model.safetensors").write_bytes(b"\x00" * 2048)
    (directory / "config.json").write_text('{"model_type": "lean_albert"}')


def serve(history: History, root: Path, now: float, epoch: int) -> ServerThread:
    """A monitor's HTTP side as a dashboard viewer meets it: ten alive peers, three checkpoints."""
    reports = [
        PeerProgress(f"12D3KooWPeer{i:040d}", epoch, 40.0 + i, 32, 64.0, 16, now, "cuda:NVIDIA A100")
        for i in range(10)
    ]
    live = LiveState(run_id="ninety-days", initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmTest"], model={"name": "base"})
    live.update(aggregate(reports, now=now), invalid=0, refused={})
    store = CheckpointStore(root / "checkpoints", history, keep=3)
    for saved in sorted({max(0, epoch - 2000), max(0, epoch - 1000), epoch}):
        store.write(saved, fill, loss=2.0, samples_total=saved * 64)
    thread = ServerThread(create_app(live, history, store, make_registry(live, store)), "127.0.0.1", 0)
    thread.start()
    thread.url = f"http://127.0.0.1:{thread.port}"
    return thread


def fetch(url: str) -> tuple[float, int, bytes]:
    """Seconds, bytes on the wire (status line, headers and body) and the body of one GET."""
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
        headers = bytes(response.headers)
    return time.perf_counter() - started, len(headers) + len(body) + len("HTTP/1.1 200 OK\r\n"), body


def dashboard_poll(url: str, charted: dict | None, points: int = HISTORY_POINTS) -> tuple[int, dict]:
    """Every request the dashboard makes in one poll period, as dashboard.js makes them; (bytes, history answer)."""
    path = f"/api/history?limit={points}"
    if charted:
        path += f"&since={charted['series'][-1]['time']!r}&epochs_since={charted['epochs'][-1]['epoch']}"
    total, history = 0, None
    for page_path in ("/api/status", path, "/api/peers", "/api/checkpoints"):
        _, size, body = fetch(url + page_path)
        total += size
        history = json.loads(body) if page_path == path else history
    return total, history
