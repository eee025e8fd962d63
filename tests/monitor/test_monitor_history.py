"""History in SQLite: snapshots, the peers ledger and the checkpoint index survive reopening the file."""

from monitor.aggregate import PeerReport, aggregate
from monitor.history import CheckpointEntry, History


def snapshot_at(t, epoch, previous=None):
    rep = PeerReport(
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
