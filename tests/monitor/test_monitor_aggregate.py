"""Unit tests of the pure aggregation: empty swarm, invalid records, stale peers, cumulative contributions, an epoch
that never goes back (also across a monitor restart from its SQLite history)."""

import math

from monitor.aggregate import EMPTY_SNAPSHOT, PeerReport, aggregate
from monitor.history import History


def report(peer="A", epoch=3, sps=10.0, samples=64, loss_sum=8.0, steps=4, t=100.0, **kw):
    return PeerReport(
        peer_id=peer,
        epoch=epoch,
        samples_per_second=sps,
        samples_accumulated=samples,
        loss_sum=loss_sum,
        mini_steps=steps,
        time=t,
        **kw,
    )


def test_empty_swarm_keeps_previous_epoch_and_has_no_loss():
    snap = aggregate([], now=100.0)
    assert (snap.epoch, snap.alive_peers, snap.samples_per_second, snap.loss, snap.samples_total) == (
        0,
        0,
        0.0,
        None,
        0,
    )
    later = aggregate([], now=200.0, previous=aggregate([report(epoch=7)], now=100.0))
    assert later.epoch == 7 and later.alive_peers == 0 and later.loss is None


def test_swarm_loss_is_sum_of_losses_over_sum_of_mini_steps():
    snap = aggregate([report("A", loss_sum=8.0, steps=4), report("B", loss_sum=3.0, steps=1, epoch=4)], now=101.0)
    assert snap.loss == (8.0 + 3.0) / (4 + 1)  # not the mean of the per-peer losses (2.0 and 3.0)
    assert snap.epoch == 4 and snap.alive_peers == 2 and snap.samples_per_second == 20.0
    assert snap.samples_total == 128


def test_insane_records_are_counted_invalid_and_ignored():
    bad = [report("X", loss_sum=math.nan), report("Y", samples=-1), report("Z", sps=math.inf)]
    snap = aggregate([report("A"), *bad], now=100.0, invalid_records=2)
    assert snap.invalid_records == 5 and snap.alive_peers == 1 and snap.loss == 2.0
    assert [row.peer_id for row in snap.peers] == ["A"]


def test_stale_peer_is_not_alive_and_does_not_count_in_loss_or_throughput():
    snap = aggregate([report("A", t=100.0), report("B", t=10.0, loss_sum=100.0, epoch=9)], now=100.0, stale_after=30)
    assert snap.alive_peers == 1 and snap.epoch == 3 and snap.loss == 2.0 and snap.samples_per_second == 10.0
    rows = {row.peer_id: row for row in snap.peers}
    assert rows["A"].alive and rows["A"].status == "training"
    assert not rows["B"].alive and rows["B"].status == "gone"
    assert snap.samples_total == 128  # B's samples were really contributed, so they count


def test_contribution_counts_each_peer_epoch_once_and_growth_within_an_epoch():
    snap = aggregate([report("A", epoch=1, samples=10)], now=100.0)
    snap = aggregate([report("A", epoch=1, samples=10)], now=101.0, previous=snap)  # read twice
    assert snap.samples_total == 10
    snap = aggregate([report("A", epoch=1, samples=15, t=102.0)], now=102.0, previous=snap)  # re-reported, grown
    snap = aggregate([report("A", epoch=2, samples=7, t=103.0)], now=103.0, previous=snap)
    assert snap.samples_total == 22 and snap.peers[0].contribution == 22


def test_lagging_peer_is_recovering_and_departed_peer_is_kept_then_forgotten():
    snap = aggregate([report("A", epoch=10), report("B", epoch=7)], now=100.0)
    assert {row.peer_id: row.status for row in snap.peers} == {"A": "training", "B": "recovering"}
    snap = aggregate([report("A", epoch=11, t=150.0)], now=150.0, previous=snap, forget_after=1000)
    assert {row.peer_id: row.status for row in snap.peers} == {"A": "training", "B": "gone"}
    snap = aggregate([report("A", epoch=12, t=2000.0)], now=2000.0, previous=snap, forget_after=1000)
    assert [row.peer_id for row in snap.peers] == ["A"]


def test_newest_report_per_peer_wins():
    snap = aggregate([report("A", epoch=5, t=90.0), report("A", epoch=6, t=95.0)], now=100.0, previous=EMPTY_SNAPSHOT)
    assert snap.epoch == 6 and len(snap.peers) == 1


def test_epoch_never_goes_back_when_the_leading_peer_stops_counting_as_alive():
    snap = aggregate([report("A", epoch=75, t=100.0), report("B", epoch=74, t=100.0)], now=100.0)
    assert snap.epoch == 75
    snap = aggregate([report("A", epoch=75, t=100.0), report("B", epoch=74, t=190.0)], now=190.0, previous=snap)
    assert snap.alive_peers == 1 and snap.epoch == 75  # A went stale: the run is still at 75, not 74
    assert {row.peer_id: row.status for row in snap.peers} == {"A": "gone", "B": "training"}
    snap = aggregate([], now=400.0, previous=snap)  # nobody alive
    assert snap.epoch == 75
    snap = aggregate([report("B", epoch=76, t=410.0)], now=410.0, previous=snap)
    assert snap.epoch == 76


def test_a_restarted_monitor_goes_on_from_the_epoch_in_its_history(tmp_path):
    history = History(tmp_path / "history.sqlite")
    history.record(aggregate([report("A", epoch=75, t=100.0)], now=100.0))
    history.close()
    restarted = History(tmp_path / "history.sqlite")
    snap = aggregate([report("B", epoch=70, t=200.0)], now=200.0, previous=restarted.last_snapshot())
    restarted.close()
    assert snap.epoch == 75 and {row.peer_id: row.status for row in snap.peers}["B"] == "recovering"
