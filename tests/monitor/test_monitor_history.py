"""History in SQLite: snapshots, the peers ledger and the checkpoint index survive reopening the file; the series is
thinned as it ages while the per-epoch view stays exact; reads are capped and never wait for the writer."""

import sqlite3
import threading

import pytest

from monitor.aggregate import PeerProgress, SwarmSnapshot, aggregate
from monitor.history import MAX_POINTS, CheckpointEntry, History
from monitor.thinning import Tier
from tests.monitor.long_run import DAY, START, build, thin_pass


def snapshot_at(t, epoch, previous=None):
    rep = PeerProgress(
        peer_id="A",
        epoch=epoch,
        samples_per_second=5.0,
        samples_accumulated=32,
        loss_sum=4.0,
        mini_steps=2,
        time=t,
        device="cpu",
    )
    return aggregate([rep], now=t, **({"previous": previous} if previous else {}))


def test_history_survives_reopen_with_ledger_and_checkpoints(tmp_path):
    db = tmp_path / "sub" / "history.sqlite"
    history = History(db)
    snap = None
    for i in range(5):
        snap = snapshot_at(100.0 + i, epoch=i // 2, previous=snap)
        history.record(snap)
    history.add_checkpoint(CheckpointEntry(2, "epoch-000002", "ab" * 32, 123, 104.0, 2.0, 96))
    history.close()

    reopened = History(db)
    assert reopened._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [row["time"] for row in reopened.series()] == [100.0, 101.0, 102.0, 103.0, 104.0]
    assert [row["epoch"] for row in reopened.by_epoch()] == [0, 1, 2]
    resumed = reopened.last_snapshot()
    assert resumed.samples_total == snap.samples_total == 96 and resumed.epoch == 2
    assert resumed.peers[0].contribution == 96 and not resumed.peers[0].alive
    # the ledger carries over: re-reading epoch 2's record after the restart adds nothing
    assert aggregate([], now=105.0, previous=resumed).samples_total == 96
    again = snapshot_at(105.0, epoch=2, previous=resumed)
    assert again.samples_total == 96
    assert [c.epoch for c in reopened.checkpoints()] == [2]
    reopened.remove_checkpoint(2)
    assert reopened.checkpoints() == []


def test_series_is_thinned_but_keeps_first_and_last(tmp_path):
    history = History(tmp_path / "h.sqlite")
    snap = None
    for i in range(101):
        snap = snapshot_at(float(i), epoch=i, previous=snap)
        history.record(snap)
    points = history.series(limit=10)
    assert len(points) <= 12 and points[0]["time"] == 0.0 and points[-1]["time"] == 100.0
    assert history.series(since=95.0)[0]["time"] == 95.0


def plain(t, epoch, loss=2.0, speed=10.0, alive=3, samples=0):
    return SwarmSnapshot(t, epoch, loss, speed, alive, samples, 0)


def epochs_from_rows(db_path):
    """The per-epoch view computed the old way, from every row: what the epochs table must keep exactly."""
    db = sqlite3.connect(str(db_path))
    db.row_factory = sqlite3.Row
    rows = db.execute(
        "SELECT epoch, AVG(loss) AS loss, AVG(samples_per_second) AS samples_per_second,"
        " MAX(alive_peers) AS alive_peers, MIN(time) AS time, MAX(samples_total) AS samples_total"
        " FROM snapshots GROUP BY epoch ORDER BY epoch"
    ).fetchall()
    db.close()
    return [dict(row) for row in rows]


def assert_same_epochs(got, expected):
    assert [row["epoch"] for row in got] == [row["epoch"] for row in expected]
    for mine, theirs in zip(got, expected, strict=True):
        assert mine == pytest.approx(theirs, rel=1e-12), (mine, theirs)


def test_old_database_gains_exact_epochs_table_on_open(tmp_path):
    db = tmp_path / "old.sqlite"
    assert build(db, days=0.2) == 3456  # written by the old schema: no epochs table
    expected = epochs_from_rows(db)
    history = History(db)
    assert_same_epochs(history.by_epoch(), expected)
    history.record(plain(START + 0.2 * DAY + 1.0, epoch=expected[-1]["epoch"], loss=None, samples=10**10))
    history.close()
    assert_same_epochs(History(db).by_epoch(), epochs_from_rows(db))  # reopened: migrated once, then incremental


def test_record_keeps_epochs_exact_also_when_a_time_is_recorded_again(tmp_path):
    history = History(tmp_path / "h.sqlite")
    for i in range(40):
        history.record(
            plain(float(i), epoch=i // 7, loss=None if i % 5 == 0 else 1.0 + i, speed=float(i), alive=i % 4)
        )
    history.record(plain(20.0, epoch=2, loss=100.0, speed=50.0))  # the same instant again replaces the row
    history.record(plain(21.0, epoch=3, loss=None, speed=0.0))
    history.record(plain(41.0, epoch=9, loss=1.0))
    history.record(plain(41.0, epoch=5, loss=1.0))  # epoch 9 had only this row: it leaves the per-epoch view
    got = history.by_epoch()
    expected = epochs_from_rows(tmp_path / "h.sqlite")
    # a replaced row's max/min stay (alive_peers), its sums leave: loss and speed means are those of the rows kept
    for row in expected:
        row.pop("alive_peers")
    assert_same_epochs([{k: v for k, v in row.items() if k != "alive_peers"} for row in got], expected)


def test_thinning_keeps_first_last_recent_and_epochs(tmp_path):
    """Small tiers, same rules as the defaults: 1 s rows; after 100 s one per 10 s; after 300 s one per 60 s."""
    db = tmp_path / "h.sqlite"
    tiers = (Tier(after=100.0, every=10.0), Tier(after=300.0, every=60.0))
    history = History(db, tiers=tiers, batch_rows=37)
    for i in range(1000):
        history.record(plain(5000.0 + i, epoch=i // 9, loss=3.0 - i / 1000, speed=float(i % 13), alive=i % 5))
    before = history.by_epoch()
    assert before == history.by_epoch(limit=MAX_POINTS) and len(before) == 112
    assert thin_pass(db, tiers, batch_rows=37) > 0
    times = [row["time"] for row in history.series(limit=MAX_POINTS)]
    assert times[0] == 5000.0 and times[-1] == 5999.0
    # buckets are aligned to multiples of their width; a tier's cutoff is the bucket edge below newest - after
    assert [t for t in times if t >= 5890.0] == [5890.0 + k for k in range(110)]  # the last 100 s and more: all
    assert [t for t in times if 5640.0 <= t < 5890.0] == [5640.0 + 10 * k for k in range(25)]  # one a 10 s bucket
    assert [t for t in times if t < 5640.0] == [5000.0] + [5040.0 + 60 * k for k in range(10)]  # one a minute
    assert history.by_epoch() == before
    assert thin_pass(db, tiers, batch_rows=37) == 0  # done: a second pass finds nothing
    history.close()
    reopened = History(db, tiers=tiers)
    assert [row["time"] for row in reopened.series(limit=MAX_POINTS)] == times
    assert reopened.by_epoch() == before and thin_pass(db, tiers) == 0  # the watermarks survived the restart


def test_record_thins_by_itself_in_bounded_batches(tmp_path):
    db = tmp_path / "h.sqlite"
    history = History(db, tiers=(Tier(after=60.0, every=10.0),), thin_every=0.0, batch_rows=20)
    for i in range(600):
        history.record(plain(float(i), epoch=i // 30))
    count = history._reader.execute("SELECT COUNT(*) FROM snapshots").fetchone()[0]
    # ~54 buckets of 10 s plus the last minute at full resolution; one batch of 20 rows a record keeps up
    assert count <= 54 + 60 + 10
    assert history.series(limit=MAX_POINTS)[0]["time"] == 0.0


def test_thinning_waits_for_its_period_once_done(tmp_path):
    history = History(tmp_path / "h.sqlite", tiers=(Tier(after=10.0, every=5.0),), thin_every=3600.0)
    for i in range(100):
        history.record(plain(float(i), epoch=0))
    # the first record ran a pass (nothing to do yet); the next one is an hour away: nothing is thinned
    assert len(history.series(limit=MAX_POINTS)) == 100


def test_reads_never_wait_for_the_writer_lock(tmp_path):
    history = History(tmp_path / "h.sqlite")
    for i in range(10):
        history.record(plain(float(i), epoch=i))
    answers = []
    with history._lock:  # what the refresh loop holds while it records or thins a batch
        reader = threading.Thread(target=lambda: answers.append((history.series(), history.by_epoch())))
        reader.start()
        reader.join(5.0)
        assert not reader.is_alive(), "a read waited for the writer's lock"
    assert len(answers[0][0]) == 10 and len(answers[0][1]) == 10


def test_every_answer_is_capped_and_keeps_first_and_last(tmp_path):
    db = tmp_path / "h.sqlite"
    rows = build(db, days=0.7)
    last_epoch = (rows - 1) // 4
    assert rows > 2 * MAX_POINTS and last_epoch > 3000
    history = History(db)
    series = history.series(limit=10**9)
    assert len(series) == MAX_POINTS and series[0]["time"] == START and series[-1]["time"] == START + (rows - 1) * 5
    epochs = history.by_epoch(limit=100)
    assert len(epochs) == 100 and epochs[0]["epoch"] == 0 and epochs[-1]["epoch"] == last_epoch
    assert [row["epoch"] for row in history.by_epoch(since=last_epoch - 2)] == [last_epoch - k for k in (2, 1, 0)]
    assert history.series(limit=1) == [series[-1]] and history.series(since=START + 10**6) == []


def test_non_finite_values_are_recorded_as_unknown_not_a_crash(tmp_path):
    db = tmp_path / "h.sqlite"
    history = History(db)
    history.record(plain(1.0, epoch=0, loss=2.0, speed=5.0))
    history.record(plain(2.0, epoch=0, loss=float("inf"), speed=float("nan")))
    history.record(plain(3.0, epoch=0, loss=float("nan"), speed=float("-inf")))
    history.record(plain(3.0, epoch=0, loss=float("-inf"), speed=float("inf")))  # replaces the row at 3.0
    expected = [(2.0, 5.0), (None, 0.0), (None, 0.0)]
    assert [(row["loss"], row["samples_per_second"]) for row in history.series()] == expected
    assert history.by_epoch() == [
        {"epoch": 0, "loss": 2.0, "samples_per_second": 5.0 / 3, "alive_peers": 3, "time": 1.0, "samples_total": 0}
    ]
    history.close()
    old = sqlite3.connect(str(db))  # an inf written by an older monitor is served as null: JSON has no inf
    old.execute("UPDATE snapshots SET loss = 1e999 WHERE time = 1.0")
    old.commit()
    old.close()
    assert History(db).series()[0]["loss"] is None


def test_no_more_rows_than_the_limit_come_back_all_however_uneven(tmp_path):
    history = History(tmp_path / "h.sqlite")
    times = [float(i) for i in range(40)] + [1e6 + i for i in range(10)]  # a month-long gap: 40 rows, then 10
    for t in times:
        history.record(plain(t, epoch=int(t) // 5))
    assert [row["time"] for row in history.series(limit=50)] == times
    assert len(history.series(limit=49)) <= 49
    assert len(history.by_epoch(limit=10)) == 10 and len(history.by_epoch(limit=9)) <= 9  # epochs 0-7, 200000-1
