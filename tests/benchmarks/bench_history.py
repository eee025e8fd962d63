"""Figures of the monitor's history at 90 days: answer times and bytes of /api/history, bytes of one dashboard poll,
and what thinning costs the refresh loop, through a real uvicorn server on 127.0.0.1 and a real SQLite file.

Run by hand: `python tests/benchmarks/bench_history.py [--days 90] [--calls 15]`. Prints, never asserts (the
assertions are in tests/monitor/test_monitor_history_90_days.py); the load of the machine shows in every time, so
`uptime` is printed with them.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from monitor.aggregate import SwarmSnapshot
from monitor.history import MAX_POINTS, History
from tests.monitor.long_run import HISTORY_POINTS, ROWS_PER_EPOCH, SPACING, START, build, dashboard_poll, fetch, serve


def timed_get(url: str, calls: int) -> tuple[float, int]:
    """Median seconds and bytes of `calls` GETs."""
    results = [fetch(url) for _ in range(calls)]
    return statistics.median(seconds for seconds, _, _ in results), results[0][1]


def api_figures(url: str, calls: int, label: str) -> None:
    for query in (f"?limit={HISTORY_POINTS}", "", "?limit=1000", f"?limit={MAX_POINTS}"):
        seconds, size = timed_get(url + "/api/history" + query, calls)
        print(f"  {label}: GET /api/history{query or ' (default limit)'}: median {seconds * 1000:.1f} ms, {size} B")


def poll_figures(url: str, label: str) -> None:
    first, charted = dashboard_poll(url, None)
    steady, _ = dashboard_poll(url, charted)
    print(f"  {label}: one dashboard poll (status, history, peers, checkpoints): first {first} B, then {steady} B")


def thinning_figures(history: History, now: float, epoch: int) -> float:
    """Drive thinning the refresh loop's way (one batch per recorded snapshot) and time each record()."""
    history._thin_every = 3600.0
    times = []
    while True:
        now += SPACING
        started = time.perf_counter()
        history.record(SwarmSnapshot(now, epoch, 2.0, 400.0, 10, 4 * 10**9, 0))
        times.append(time.perf_counter() - started)
        if not history._thinning:
            break
    rows = history._reader.execute("SELECT COUNT(*) FROM snapshots").fetchone()[0]
    print(
        f"  thinning: {len(times)} record() calls with a batch, median {statistics.median(times) * 1000:.1f} ms,"
        f" max {max(times) * 1000:.1f} ms, sum {sum(times):.1f} s; rows left {rows}"
    )
    return now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=float, default=90.0)
    parser.add_argument("--calls", type=int, default=15)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        rows = build(root / "history.sqlite", days=args.days)
        size = (root / "history.sqlite").stat().st_size
        print(
            f"built {rows} rows ({args.days:g} days at {SPACING:g} s) in {time.perf_counter() - started:.1f} s, {size} B"
        )
        started = time.perf_counter()
        history = History(root / "history.sqlite")
        print(f"first open (per-epoch table built from every row): {time.perf_counter() - started:.2f} s")
        last_time, last_epoch = START + (rows - 1) * SPACING, (rows - 1) // ROWS_PER_EPOCH
        server = serve(history, root, last_time, last_epoch)
        try:
            api_figures(server.url, args.calls, "unthinned")
            poll_figures(server.url, "unthinned")
            thinning_figures(history, last_time, last_epoch + 1)
            api_figures(server.url, args.calls, "thinned")
            poll_figures(server.url, "thinned")
        finally:
            server.stop()
            history.close()
        print(f"file after thinning: {(root / 'history.sqlite').stat().st_size} B (pages are reused, not returned)")
        fresh = History(root / "fresh.sqlite")
        for i in range(12):
            fresh.record(SwarmSnapshot(START + i * SPACING, i // 4, 9.0, 400.0, 10, i * 2000, 0))
        server = serve(fresh, root / "fresh", START + 11 * SPACING, 2)
        try:
            poll_figures(server.url, "fresh run (its first minute)")
        finally:
            server.stop()
            fresh.close()


if __name__ == "__main__":
    main()
