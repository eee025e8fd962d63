"""Unit tests of the pure aggregation: empty swarm, invalid records, stale peers, cumulative contributions, an epoch
that never goes back (also across a monitor restart from its SQLite history); and crafted hostile reports: out of
range, from the future, at an epoch nobody vouches for, a flood of keys."""

import math
from dataclasses import replace

from monitor.aggregate import (
    EMPTY_SNAPSHOT,
    MAX_EPOCH_LEAD,
    MAX_PEER_ROWS,
    MAX_TOTAL,
    PeerProgress,
    aggregate,
)
from monitor.history import History
from peer.swarm.clock import MAX_CLOCK_SKEW
from peer.swarm.progress import MAX_COUNT, MAX_SAMPLES_PER_SECOND


def report(peer="A", epoch=3, sps=10.0, samples=64, loss_sum=8.0, steps=4, t=100.0, **kw):
    return PeerProgress(
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


# --- hostile reports: a stranger signs whatever numbers it likes ---


def test_out_of_range_reports_are_refused_by_reason_and_sums_stay_finite(tmp_path):
    hostile = [
        report("S", samples=2**64 - 1),
        report("L", loss_sum=1e308),
        report("V", sps=1e308),
        report("E", epoch=2**62),
        report("M", loss_sum=5000.0, steps=1),  # more than MAX_MINI_STEP_LOSS per mini-step
    ]
    snap = aggregate([report("A"), *hostile], now=100.0, held_epoch=-1)
    assert snap.refused == {"range": 5} and snap.invalid_records == 5
    assert snap.alive_peers == 1 and snap.loss == 2.0 and snap.samples_per_second == 10.0 and snap.samples_total == 64
    assert [row.peer_id for row in snap.peers] == ["A"]
    history = History(tmp_path / "history.sqlite")  # what crashed the monitor: the snapshot must be storable
    history.record(snap)
    assert history.last_snapshot().samples_total == 64
    history.close()


def test_the_largest_accepted_values_still_sum_to_finite_storable_numbers(tmp_path):
    biggest = [
        report(
            f"P{i}",
            epoch=0,
            samples=MAX_COUNT,
            sps=MAX_SAMPLES_PER_SECOND,
            loss_sum=1000.0 * MAX_COUNT,
            steps=MAX_COUNT,
        )
        for i in range(MAX_PEER_ROWS)
    ]
    snap = aggregate(biggest, now=100.0, held_epoch=-1)
    assert snap.alive_peers == MAX_PEER_ROWS and not snap.refused
    assert math.isfinite(snap.loss) and math.isfinite(snap.samples_per_second)
    assert snap.samples_total == MAX_TOTAL  # saturated, not past SQLite's INTEGER
    for epoch in range(1, 4):  # the same peers again and again: the ledger and the totals stay saturated
        snap = aggregate([replace(r, epoch=epoch) for r in biggest], now=100.0 + epoch, previous=snap, held_epoch=-1)
    assert snap.samples_total == MAX_TOTAL and max(row.contribution for row in snap.peers) <= MAX_TOTAL
    history = History(tmp_path / "history.sqlite")
    history.record(snap)
    assert history.last_snapshot().samples_total == MAX_TOTAL
    history.close()


def test_a_future_dated_report_is_refused_and_never_alive():
    ghost = report("G", t=100.0 + 3600.0)
    snap = aggregate([report("A", t=100.0), ghost], now=100.0, stale_after=5, held_epoch=-1)
    assert snap.refused == {"future": 1} and snap.alive_peers == 1
    assert "G" not in {row.peer_id for row in snap.peers}
    snap = aggregate([ghost], now=112.0, previous=snap, stale_after=5, held_epoch=-1)  # 12 s later: A is stale
    assert snap.alive_peers == 0 and snap.refused == {"future": 1}


def test_a_report_within_the_clock_skew_is_alive_but_not_past_the_skew_plus_stale_after():
    ahead = report("A", t=100.0 + MAX_CLOCK_SKEW / 2)
    assert aggregate([ahead], now=100.0, stale_after=5, held_epoch=-1).alive_peers == 1
    late = 100.0 + MAX_CLOCK_SKEW / 2 + 6
    assert aggregate([ahead], now=late, stale_after=5, held_epoch=-1).alive_peers == 0


def test_one_hostile_peer_among_honest_ones_cannot_move_the_run_epoch():
    honest = [report("A", epoch=100), report("B", epoch=101)]
    snap = aggregate([*honest, report("H", epoch=10**6)], now=100.0, held_epoch=90, held_lead=14)
    assert snap.epoch == 101 and snap.refused == {"epoch": 1} and snap.alive_peers == 2
    assert "H" not in {row.peer_id for row in snap.peers} and snap.samples_total == 128
    # within MAX_EPOCH_LEAD of the honest peers it is believed, and no further, refresh after refresh
    for _ in range(3):
        snap = aggregate(
            [*honest, report("H", epoch=101 + MAX_EPOCH_LEAD + 1)], now=100.0, previous=snap, held_epoch=90
        )
        assert snap.epoch == 101 and snap.refused == {"epoch": 1}


def test_a_fresh_monitor_follows_an_honest_swarm_far_ahead():
    # two honest peers vouch for each other: followed at once, though the monitor holds nothing
    snap = aggregate([report("A", epoch=5000), report("B", epoch=4999)], now=100.0, held_epoch=-1)
    assert snap.epoch == 5000 and snap.alive_peers == 2 and not snap.refused
    # a lone peer far ahead is unconfirmed until the monitor downloads the state (which _keep_state does when it
    # holds none); the downloaded state's epoch then vouches for it
    lone = [report("A", epoch=5000)]
    snap = aggregate(lone, now=100.0, held_epoch=-1)
    assert snap.epoch == 0 and snap.unconfirmed_peers == 1 and snap.alive_peers == 0
    snap = aggregate(lone, now=101.0, previous=snap, held_epoch=5000)
    assert snap.epoch == 5000 and snap.alive_peers == 1 and snap.unconfirmed_peers == 0


def test_a_lone_peer_is_followed_up_to_the_held_state_plus_its_lead():
    snap = aggregate([report("A", epoch=3)], now=100.0, held_epoch=-1, held_lead=14)  # a new run, no state yet
    assert snap.epoch == 3 and snap.alive_peers == 1
    snap = aggregate([report("A", epoch=114)], now=101.0, previous=snap, held_epoch=100, held_lead=14)
    assert snap.epoch == 114
    snap = aggregate([report("A", epoch=115)], now=102.0, previous=snap, held_epoch=100, held_lead=14)
    assert snap.epoch == 114 and snap.refused == {"epoch": 1} and snap.unconfirmed_peers == 1


def test_a_flood_of_keys_keeps_the_peers_table_bounded_alive_and_big_contributors_first():
    snap = aggregate([report("big", samples=10**6, t=50.0)], now=50.0, held_epoch=-1)  # then goes stale
    flood = [report(f"k{i:05d}", samples=1, t=100.0) for i in range(3000)]
    snap = aggregate(flood, now=100.0, previous=snap, stale_after=10, held_epoch=-1, max_rows=100)
    assert len(snap.peers) == 100 and len(snap.counted) <= 100
    assert all(row.alive for row in snap.peers)  # alive ones first: the departed big contributor went out
    snap = aggregate([report("A", samples=10**6, t=200.0)], now=200.0, previous=snap, stale_after=10, max_rows=100)
    assert snap.peers[0].peer_id == "A" and len(snap.peers) == 100
