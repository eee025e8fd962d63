"""The contributors table: the pure fold (monitor/contributors.py), its SQLite file and its HTTP API, for real."""

from __future__ import annotations

import json
import sqlite3
import urllib.error
import urllib.request

import pytest

from monitor.aggregate import PeerProgress, aggregate
from monitor.checkpoint import CheckpointStore
from monitor.contributor_store import MAX_POINTS_PER_PEER, ContributorStore
from monitor.contributors import update_contributors
from monitor.history import History
from monitor.live import LiveState
from monitor.metrics import make_registry
from monitor.records import peer_label
from monitor.server import ServerThread, create_app


def report(peer: str, time: float, total: int, epoch: int = 1, name: str = "", compute: float = 0.0) -> PeerProgress:
    return PeerProgress(
        peer,
        epoch=epoch,
        samples_per_second=4.0,
        samples_accumulated=8,
        loss_sum=5.0,
        mini_steps=1,
        time=time,
        device="cpu",
        name=name,
        samples_total=total,
        compute_seconds_total=compute,
    )


class Run:
    """Aggregation and the contributors fold, refresh after refresh, as the monitor's loop does them."""

    def __init__(self):
        self.snapshot = aggregate([], now=0.0)
        self.table = {}

    def refresh(self, now: float, *reports: PeerProgress):
        previous_time = self.snapshot.time
        self.snapshot = aggregate(reports, now=now, previous=self.snapshot, stale_after=10.0)
        update = update_contributors(self.table, self.snapshot, previous_time)
        self.table = update.contributors
        return update


def test_the_largest_total_read_is_kept_and_missed_records_lose_nothing():
    run = Run()
    run.refresh(100.0, report("a", 100.0, total=8, name="Ann", compute=1.0))
    # the records of totals 16..40 expired unread; the next one read says 48: nothing is lost
    run.refresh(101.0, report("a", 101.0, total=48, name="Ann", compute=6.0))
    assert run.table["a"].samples == 48 and run.table["a"].compute_seconds == 6.0
    # a late, older record (another node served it) never lowers the total
    run.refresh(102.0, report("a", 100.5, total=16, name="Old name", epoch=0))
    assert run.table["a"].samples == 48 and run.table["a"].name == "Ann" and run.table["a"].epoch == 1
    assert run.table["a"].last_seen == 101.0


def test_uptime_counts_only_refreshes_that_found_the_peer_alive_twice():
    run = Run()
    run.refresh(100.0, report("a", 100.0, total=8))
    run.refresh(105.0, report("a", 104.0, total=16))
    assert run.table["a"].uptime_seconds == 5.0 and run.table["a"].status == "training"
    run.refresh(200.0)  # its record is 96 s old: gone, and the time it was away is not uptime
    assert run.table["a"].status == "gone" and run.table["a"].uptime_seconds == 5.0
    run.refresh(300.0, report("a", 300.0, total=24))
    run.refresh(302.0, report("a", 301.0, total=32))
    assert run.table["a"].uptime_seconds == 7.0
    assert run.table["a"].first_seen == 100.0 and run.table["a"].last_seen == 301.0


def test_points_are_added_once_per_record_read():
    run = Run()
    assert len(run.refresh(100.0, report("a", 100.0, total=8)).points) == 1
    assert run.refresh(101.0, report("a", 100.0, total=8)).points == []  # the same record read again
    assert [p.samples for p in run.refresh(102.0, report("a", 102.0, total=16)).points] == [16]


def test_a_flood_of_keys_keeps_the_table_bounded_and_the_alive_and_largest_first():
    run = Run()
    run.refresh(100.0, report("honest", 100.0, total=10**6))
    flood = [report(f"sybil-{i}", 150.0, total=i) for i in range(50)]
    previous_time = run.snapshot.time
    run.snapshot = aggregate(flood, now=150.0, previous=run.snapshot, stale_after=10.0)
    table = update_contributors(run.table, run.snapshot, previous_time, max_rows=20).contributors
    assert len(table) == 20 and "honest" not in table  # gone rows go first when the cap bites...
    run.snapshot = aggregate([report("honest", 151.0, total=10**6)], now=151.0, previous=run.snapshot)
    table = update_contributors(table, run.snapshot, 150.0, max_rows=20).contributors
    assert len(table) == 20 and "honest" in table  # ...and an alive one comes back in


def test_the_table_survives_a_restart_and_each_history_stays_bounded(tmp_path):
    path = tmp_path / "history.sqlite"
    History(path).close()  # the monitor opens its history first: it creates the file
    store = ContributorStore(path)
    run = Run()
    for step in range(2 * MAX_POINTS_PER_PEER + 5):
        store.save(run.refresh(100.0 + step, report("a", 100.0 + step, total=8 * (step + 1), name="Ann")))
    points = store.history("a")["points"]
    assert MAX_POINTS_PER_PEER <= len(points) < 2 * MAX_POINTS_PER_PEER
    assert points[-1]["samples"] == 8 * (2 * MAX_POINTS_PER_PEER + 5)  # the newest is always kept
    assert points[0]["time"] <= 101.0  # and the span still reaches back to the start
    store.close()

    reopened = ContributorStore(path)
    loaded = reopened.load()
    assert loaded["a"].name == "Ann" and loaded["a"].samples == 8 * (2 * MAX_POINTS_PER_PEER + 5)
    assert loaded["a"].status == "gone"  # until its peer reports to this monitor again
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name, samples FROM contributors").fetchall() == [("Ann", loaded["a"].samples)]
    reopened.close()


@pytest.fixture
def server(tmp_path):
    history = History(tmp_path / "history.sqlite")
    contributors = ContributorStore(tmp_path / "history.sqlite")
    run = Run()
    label = peer_label(b"some public key")
    contributors.save(run.refresh(100.0, report(label, 100.0, total=8, name="<img src=x onerror=alert(1)>")))
    live = LiveState(run_id="unit-run")
    store = CheckpointStore(tmp_path / "checkpoints", history)
    app = create_app(live, history, store, make_registry(live, store), contributors=contributors)
    thread = ServerThread(app, "127.0.0.1", 0)
    thread.start()
    thread.url, thread.label = f"http://127.0.0.1:{thread.port}", label
    yield thread
    thread.stop()
    contributors.close()
    history.close()


def get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_api_serves_the_table_and_one_contributors_history(server):
    status, rows = get(server.url + "/api/contributors")
    assert status == 200 and [row["name"] for row in rows] == ["<img src=x onerror=alert(1)>"]  # data, as sent
    status, one = get(f"{server.url}/api/contributors/{server.label}")
    assert status == 200 and one["contributor"]["samples"] == 8 and [p["samples"] for p in one["points"]] == [8]
    assert get(server.url + "/api/contributors/key-000000000000")[0] == 404
    for bad in ("key-XYZ", "key-" + "0" * 200, "%3Cscript%3E", "key-00000000000%00"):  # not an id: refused by shape
        status, body = get(f"{server.url}/api/contributors/{bad}")
        assert status == 422 and "pattern" in json.dumps(body), (bad, status, body)
    assert get(server.url + "/api/contributors/..%2F..%2Fetc")[0] == 404  # a path of another route: no such route
