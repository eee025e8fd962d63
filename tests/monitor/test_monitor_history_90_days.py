"""A simulated 90-day run through the real HTTP server: 1.55 M snapshots at 5 s, bulk-inserted the way a monitor
without thinning left them, opened by today's History (which migrates it) and served by uvicorn on 127.0.0.1.

/api/history answers in well under 100 ms with bounded lists and index-only plans, one dashboard poll stays under
100 KB, and thinning (in batches short enough for the refresh loop) keeps the first and last rows, the last day at
full resolution and the per-epoch view unchanged; a reopened database keeps everything.
"""

import hashlib
import itertools
import json
import shutil
import sqlite3
import statistics
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from monitor.aggregate import SwarmSnapshot
from monitor.history import EPOCHS_VIEW, MAX_POINTS, SERIES, History, _marks
from monitor.thinning import DELETE_BATCH
from tests.monitor.long_run import (
    DAY,
    HISTORY_POINTS,
    ROWS_PER_EPOCH,
    SPACING,
    START,
    build,
    dashboard_poll,
    fetch,
    serve,
    thin_pass,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DAYS = 90
ROWS = int(DAYS * DAY / SPACING)  # 1 555 200
LAST_TIME = START + (ROWS - 1) * SPACING
LAST_EPOCH = (ROWS - 1) // ROWS_PER_EPOCH  # 388 799


@pytest.fixture(scope="module")
def raw_file(tmp_path_factory):
    """The 90-day file as an old monitor left it; each test works on its own copy."""
    path = tmp_path_factory.mktemp("ninety-days") / "raw.sqlite"
    started = time.perf_counter()
    assert build(path, days=DAYS) == ROWS
    print(f"\n90-day history: {ROWS} rows built in {time.perf_counter() - started:.1f} s, {path.stat().st_size} B")
    return path


def opened_copy(raw_file: Path, directory: Path) -> History:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(raw_file, directory / "history.sqlite")
    started = time.perf_counter()
    history = History(directory / "history.sqlite")
    print(f"first open (builds the per-epoch table): {time.perf_counter() - started:.2f} s")
    return history


@pytest.fixture(scope="module")
def served(raw_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    history = opened_copy(raw_file, root)
    thread = serve(history, root, LAST_TIME, LAST_EPOCH)
    thread.history, thread.root = history, root
    yield thread
    thread.stop()
    history.close()


def test_api_history_answers_fast_bounded_and_from_the_index(served):
    url = served.url + "/api/history"
    times, sizes = [], []
    for _ in range(9):
        seconds, size, body = fetch(url)
        times.append(seconds)
        sizes.append(size)
    answer = json.loads(body)
    median = statistics.median(times)
    print(f"GET /api/history (default limit) on 1.55 M rows: median {median * 1000:.1f} ms, {sizes[0]} B")
    assert median < 0.1
    series, epochs = answer["series"], answer["epochs"]
    assert len(series) == 500 and len(epochs) == 500  # the default cap, for both lists
    assert series[0]["time"] == START and series[-1]["time"] == LAST_TIME  # the whole run, first and last kept
    assert epochs[0]["epoch"] == 0 and epochs[-1]["epoch"] == LAST_EPOCH
    assert all(a["time"] < b["time"] for a, b in itertools.pairwise(series))
    assert sizes[0] < 500 * 2 * 200  # ~200 B a point at most

    seconds, size, body = fetch(url + f"?limit={MAX_POINTS}")
    answer = json.loads(body)
    print(f"GET /api/history?limit={MAX_POINTS}: {seconds * 1000:.1f} ms, {size} B")
    assert len(answer["series"]) == MAX_POINTS and len(answer["epochs"]) == MAX_POINTS and size < MAX_POINTS * 400
    with pytest.raises(urllib.error.HTTPError, match="422"):
        fetch(url + f"?limit={MAX_POINTS + 1}")

    db = served.history._reader
    for view, table in ((SERIES, "snapshots"), (EPOCHS_VIEW, "epochs")):
        for sql, values in ((view.sample, _marks(START, LAST_TIME, 1000)), (view.nth, (0, 1000)), (view.since, (0,))):
            plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, values)]
            assert any(step.startswith(f"SEARCH {table} USING") for step in plan), plan
            assert not any(step.startswith(f"SCAN {table}") for step in plan), plan


def test_one_dashboard_poll_stays_under_100_kb_at_90_days_and_when_fresh(served, tmp_path):
    first_bytes, charted = dashboard_poll(served.url, None, HISTORY_POINTS)
    assert len(charted["series"]) == HISTORY_POINTS and charted["series"][-1]["time"] == LAST_TIME
    served.history.record(SwarmSnapshot(LAST_TIME + SPACING, LAST_EPOCH + 1, 2.0, 400.0, 10, 4 * 10**9, 0))
    next_bytes, increment = dashboard_poll(served.url, charted, HISTORY_POINTS)
    assert [row["time"] for row in increment["series"]] == [LAST_TIME, LAST_TIME + SPACING]
    assert [row["epoch"] for row in increment["epochs"]] == [LAST_EPOCH, LAST_EPOCH + 1]

    fresh = History(tmp_path / "history.sqlite")
    for i in range(12):  # the first minute of a run
        fresh.record(SwarmSnapshot(START + i * SPACING, i // 4, 9.0, 400.0, 10, i * 2000, 0))
    thread = serve(fresh, tmp_path, START + 11 * SPACING, 2)
    try:
        fresh_first, fresh_charted = dashboard_poll(thread.url, None, HISTORY_POINTS)
        fresh_next, _ = dashboard_poll(thread.url, fresh_charted, HISTORY_POINTS)
    finally:
        thread.stop()
        fresh.close()
    print(
        f"bytes of one dashboard poll (status, history, peers, checkpoints): 90 days first {first_bytes},"
        f" then {next_bytes}; fresh run first {fresh_first}, then {fresh_next}"
    )
    assert first_bytes < 100_000 and next_bytes < 10_000
    assert fresh_first < 100_000 and fresh_next < 10_000


def epochs_digest(db: sqlite3.Connection) -> str:
    """A digest of the simulated run's epochs, streamed (388 800 rows would be a lot of Python objects)."""
    digest = hashlib.sha256()
    for row in db.execute("SELECT * FROM epochs WHERE epoch <= ? ORDER BY epoch", (LAST_EPOCH,)):
        digest.update(repr(tuple(row)).encode())
    return digest.hexdigest()


def test_migration_gives_the_per_epoch_view_of_every_row(served, raw_file):
    """Checked against the untouched file: the served copy may have been thinned since (records run thinning)."""
    db = sqlite3.connect(str(served.root / "history.sqlite"))
    db.execute("ATTACH DATABASE ? AS raw", (str(raw_file),))
    (mismatches,) = db.execute(
        "SELECT COUNT(*) FROM (SELECT epoch, AVG(loss) AS loss, AVG(samples_per_second) AS speed,"
        " MAX(alive_peers) AS alive, MIN(time) AS time, MAX(samples_total) AS samples FROM raw.snapshots"
        " WHERE time <= ? GROUP BY epoch) AS g JOIN epochs AS e USING (epoch)"
        " WHERE abs(COALESCE(e.loss_sum / NULLIF(e.loss_count, 0), -1) - COALESCE(g.loss, -1)) > 1e-9"
        " OR abs(e.speed_sum / e.rows - g.speed) > 1e-9 OR e.alive_peers != g.alive OR e.time != g.time"
        " OR e.samples_total != g.samples",
        (LAST_TIME,),
    ).fetchone()
    assert mismatches == 0
    assert db.execute("SELECT COUNT(*) FROM epochs WHERE epoch <= ?", (LAST_EPOCH,)).fetchone()[0] == LAST_EPOCH + 1
    db.close()


def test_thinning_in_short_batches_keeps_ends_last_day_and_epochs(raw_file, tmp_path):
    history = opened_copy(raw_file, tmp_path)
    db = history._reader
    plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + DELETE_BATCH, {"start": 0, "end": 1, "every": 60})]
    assert all("USING" in step for step in plan if step.startswith(("SEARCH", "SCAN"))), plan
    before_digest, before_view = epochs_digest(db), history.by_epoch(since=LAST_EPOCH - 99)
    history._thin_every = 3600.0
    batch_times, now = [], LAST_TIME
    while True:  # the refresh loop's way: each recorded snapshot runs at most one batch while a pass goes on
        now += SPACING
        started = time.perf_counter()
        history.record(SwarmSnapshot(now, LAST_EPOCH + 1, 2.0, 400.0, 10, 4 * 10**9, 0))
        batch_times.append(time.perf_counter() - started)
        if not history._thinning:
            break
    rows = db.execute("SELECT COUNT(*) FROM snapshots").fetchone()[0]
    print(
        f"thinning 90 days: {len(batch_times)} records, record()+batch median"
        f" {statistics.median(batch_times) * 1000:.1f} ms, max {max(batch_times) * 1000:.1f} ms; {ROWS} -> {rows} rows"
    )
    # one batch alone is ~20 ms on an idle core; the bound is generous for a loaded, shared 2-core machine
    assert statistics.median(batch_times) < 0.1 and max(batch_times) < 1.0
    assert 55_000 < rows < 65_000  # ~17.3 k for the last day, 41.8 k a minute for 29 days, 1.4 k an hour before

    times = [row[0] for row in db.execute("SELECT time FROM snapshots ORDER BY time")]
    assert times[0] == START and times[-1] == now
    last_day = [t for t in times if t > now - DAY]
    assert len(last_day) == int(DAY / SPACING) and all(b - a == SPACING for a, b in itertools.pairwise(last_day))
    minute_cut, hour_cut = (now - DAY) // 60 * 60, (now - 30 * DAY) // 3600 * 3600
    per_minute = [t for t in times if hour_cut <= t < minute_cut]
    assert len({t // 60 for t in per_minute}) == len(per_minute) > 29 * 1440 - 2  # one row a minute
    per_hour = [t for t in times if t < hour_cut]
    assert len({t // 3600 for t in per_hour}) == len(per_hour) > 59 * 24  # one row an hour
    after_view = history.by_epoch(since=LAST_EPOCH - 99)[:-1]  # the last is the new epoch these records opened
    assert epochs_digest(db) == before_digest and after_view == before_view  # stayed exact

    series = history.series(limit=HISTORY_POINTS)
    history.close()
    reopened = History(tmp_path / "history.sqlite")
    # the watermarks survived: nothing left to do, nothing rescanned
    assert thin_pass(tmp_path / "history.sqlite") == 0
    assert reopened._reader.execute("SELECT COUNT(*) FROM snapshots").fetchone()[0] == rows
    assert reopened.series(limit=HISTORY_POINTS) == series
    assert reopened.by_epoch(since=LAST_EPOCH - 99)[:-1] == before_view
    assert epochs_digest(reopened._reader) == before_digest
    reopened.close()


def test_the_checkpoint_listing_is_capped_too(served):
    """--keep-every keeps checkpoints for the life of a run; the listing the dashboard polls gives the newest only."""
    newest = [entry["epoch"] for entry in json.loads(fetch(served.url + "/api/checkpoints")[2])]
    assert newest == sorted(newest, reverse=True) and len(newest) == 3
    assert [entry["epoch"] for entry in json.loads(fetch(served.url + "/api/checkpoints?limit=2")[2])] == newest[:2]
    with pytest.raises(urllib.error.HTTPError, match="422"):
        fetch(served.url + "/api/checkpoints?limit=1001")
