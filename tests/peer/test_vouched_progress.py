"""Gap 19: progress entries anyone can sign. A real hostile DHT node stores entries in hivemind's progress key: an
epoch far ahead, and an absurd sample count. hivemind's own tracker believes both; ``VouchedProgressTracker`` drops
the count and, once told no donor vouched for the epoch, the epoch. In a real swarm of two peers, an entry 500 epochs
ahead (refreshed as hivemind's own are) no longer stalls the training: the peers download once, distrust it, and train
on.
"""

from __future__ import annotations

import threading

import hivemind
import pytest
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils import get_dht_time

from peer.hivemind_gaps.vouched_progress import VouchedProgressTracker
from tests.harness import wait_until
from tests.peer.conftest import RUN_ID
from tests.peer.hostile_progress import HostileProgress
from tests.peer.test_access import LOOPBACK

TARGET = 32


@pytest.fixture
def bootstrap():
    dht = hivemind.DHT(start=True, host_maddrs=LOOPBACK)
    hostile = HostileProgress([str(maddr) for maddr in dht.get_visible_maddrs()])
    yield dht, hostile
    hostile.shutdown()
    dht.shutdown()


def tracker(cls, bootstrap_dht: hivemind.DHT, prefix: str) -> ProgressTracker:
    dht = hivemind.DHT(
        initial_peers=[str(m) for m in bootstrap_dht.get_visible_maddrs()], start=True, host_maddrs=LOOPBACK
    )
    made = cls(dht, prefix=prefix, target_batch_size=TARGET, start=True, min_refresh_period=0.2, max_refresh_period=1)
    made.test_dht = dht
    return made


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cls", [ProgressTracker, VouchedProgressTracker], ids=["hivemind", "vouched"])
def test_an_absurd_count_and_an_unvouched_epoch(bootstrap, cls):
    dht, hostile = bootstrap
    prefix = f"vouched-{cls.__name__}"
    hostile.store(prefix, epoch=0, samples=2**40)  # at the swarm's epoch: hivemind sums the counts of that epoch
    progress = tracker(cls, dht, prefix)
    try:
        wait_until(lambda: progress.global_progress.num_peers + getattr(progress, "left_out_entries", 0), 30, "a read")
        if cls is ProgressTracker:  # the gap, on plain hivemind: the batch is full at once
            assert progress.global_progress.samples_accumulated >= 2**40 and progress.ready_to_update_epoch
        else:
            assert progress.global_progress.samples_accumulated < TARGET and not progress.ready_to_update_epoch
        hostile.store(prefix, epoch=1000)
        # believed until a download finds no donor of it
        wait_until(lambda: progress.global_epoch == 1000, 30, "the tracker to read the entry 1000 epochs ahead")
        if cls is ProgressTracker:
            return
        progress.distrust_epochs_ahead(seconds=20.0)
        assert progress.global_epoch == 0 and not progress.ready_to_update_epoch  # at once, not at the next fetch
        # the bound moves with this peer: its own next epoch and a peer one ahead of it still count, samples too
        progress.report_local_progress(local_epoch=5, samples_accumulated=0)
        hostile.store(prefix, epoch=6, samples=TARGET // 2)  # as an honest peer that stepped first would
        wait_until(lambda: progress.global_epoch == 6, 20, "the entry one epoch ahead to count")
        assert progress.global_progress.samples_accumulated == TARGET // 2
        wait_until(lambda: progress.global_epoch == 1000, 30, "the distrust to end and the entry to count again")
    finally:
        progress.shutdown()
        progress.test_dht.shutdown()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cls", [ProgressTracker, VouchedProgressTracker], ids=["hivemind", "vouched"])
def test_an_entry_stamped_long_ago_cannot_extrapolate_the_batch_full(bootstrap, cls):
    """hivemind adds rate x age to an entry's count: at 0.1 samples/s, an entry dated 1970 (the DHT time's 0) counts
    ~1.8e8 samples and the swarm steps at once. Read as at most metadata_expiration (60 s) old, it counts ~6 of 32."""
    dht, hostile = bootstrap
    prefix = f"stamped-{cls.__name__}"
    hostile.store(prefix, epoch=0, samples=0, rate=0.1, when=1.0)
    progress = tracker(cls, dht, prefix)
    try:
        wait_until(lambda: progress.global_progress.num_peers >= 1, 30, "the tracker to read the entry")
        eta = progress.global_progress.eta_next_epoch - get_dht_time()
        if cls is ProgressTracker:  # the gap, on plain hivemind: the next step is due now
            assert progress.ready_to_update_epoch and eta <= 0, eta
        else:
            assert not progress.ready_to_update_epoch and eta > 60, eta
    finally:
        progress.shutdown()
        progress.test_dht.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_entry_500_epochs_ahead_does_not_stall_a_real_swarm(make_swarm):
    swarm = make_swarm()
    for name in ("a", "b"):
        swarm.start_peer(name)
    swarm.wait_for_epoch(3, peers=2, timeout=240)
    hostile, stop = HostileProgress(swarm.initial_peers), threading.Event()

    def claim_ahead():  # refreshed like hivemind's own entries, always 500 epochs ahead of the swarm
        while not stop.is_set():
            hostile.store(RUN_ID, epoch=max(swarm.epochs()) + 500)
            stop.wait(10.0)

    thread = threading.Thread(target=claim_ahead, daemon=True)
    thread.start()
    try:
        attacked_at = max(swarm.epochs())
        swarm.wait_for_epoch(attacked_at + 6, peers=2, timeout=300)
    finally:
        stop.set()
        thread.join(timeout=60)
        hostile.shutdown()
    for name in ("a", "b"):
        log = swarm.peers[name].log_text()
        assert "is vouched for by no donor" in log, log[-3000:]
    assert max(swarm.epochs()) < attacked_at + 100  # trained on at the real epoch, not the claimed one
