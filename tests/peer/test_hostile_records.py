"""A hostile process writes forged, oversized and malformed progress records into a real DHT: each is refused,
counted by reason, and the honest records stay readable."""

from __future__ import annotations

import hivemind
import pytest
from hivemind.utils import get_dht_time

from peer.swarm.progress import (
    RejectedRecords,
    counted,
    fetch_progress,
    local_public_key,
    make_validators,
    publish_progress,
)
from tests.peer.hostile_peer import run_hostile_peer
from tests.peer.records import record

RUN_ID = "hostile-test"


@pytest.mark.timeout(180)
def test_forged_oversized_and_malformed_records_are_refused_and_counted(tmp_path):
    rejected = RejectedRecords()
    reader = hivemind.DHT(
        start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=counted(make_validators(RUN_ID), rejected)
    )
    try:
        assert publish_progress(reader, RUN_ID, record(epoch=4), expiration=60)
        assert rejected.counts() == dict.fromkeys(RejectedRecords.REASONS, 0)  # an honest record is never counted
        maddrs = [str(maddr) for maddr in reader.get_visible_maddrs()]

        stored = run_hostile_peer(maddrs, RUN_ID, local_public_key(), tmp_path, flood=3)

        assert stored == dict.fromkeys(["forged", "oversized-0", "oversized-1", "oversized-2", "malformed"], False)
        counts = rejected.counts()
        assert counts["signature"] >= 1 and counts["size"] >= 3 and counts["schema"] >= 1, counts
        records = fetch_progress(reader, RUN_ID, rejected)
        assert list(records) == [local_public_key()] and records[local_public_key()].epoch == 4
        # the reader keeps working: its own next record is stored and read back
        assert publish_progress(reader, RUN_ID, record(epoch=5, time=float(get_dht_time())), expiration=60)
        assert fetch_progress(reader, RUN_ID)[local_public_key()].epoch == 5
    finally:
        reader.shutdown()


def test_take_new_reports_only_what_came_since_the_last_call():
    rejected = RejectedRecords()
    rejected.add("size")
    rejected.add("size")
    rejected.add("signature")
    assert rejected.take_new() == {"signature": 1, "size": 2}
    assert rejected.take_new() == {}
    rejected.add("schema")
    assert rejected.take_new() == {"schema": 1} and rejected.counts()["size"] == 2
