"""The signed progress record through real DHTs: valid records travel, forged, malformed or huge ones do not, and
neither do out-of-bounds or future-dated ones (refused on store, and again by a reader whatever node served them)."""

from __future__ import annotations

import math

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from model import load_config
from peer.swarm.progress import (
    MAX_MINI_STEP_LOSS,
    PROTOCOL_VERSION,
    RejectedRecords,
    counted,
    fetch_progress,
    local_public_key,
    make_validators,
    model_fingerprint,
    progress_key,
    publish_progress,
)
from tests.peer.hostile_peer import MultiKeySigner
from tests.peer.records import record

RUN_ID = "progress-test"


@pytest.fixture(scope="module")
def dhts():
    """Two peers with different signing keys: an honest one and one trying to write over the honest one's record."""
    honest = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=make_validators(RUN_ID))
    attacker_key = RSAPrivateKey()
    attacker = hivemind.DHT(
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        initial_peers=[str(maddr) for maddr in honest.get_visible_maddrs()],
        record_validators=make_validators(RUN_ID, attacker_key),
    )
    yield honest, attacker, attacker_key
    attacker.shutdown()
    honest.shutdown()


def test_records_are_signed_and_readable_by_other_peers(dhts):
    honest, attacker, attacker_key = dhts
    assert publish_progress(honest, RUN_ID, record(epoch=3), expiration=30)
    assert publish_progress(attacker, RUN_ID, record(epoch=7), expiration=30, private_key=attacker_key)
    seen = fetch_progress(attacker, RUN_ID)
    assert seen[local_public_key()].epoch == 3
    assert seen[local_public_key(attacker_key)].epoch == 7
    assert seen[local_public_key()].mean_loss == 9.0


def test_nobody_overwrites_another_peers_record(dhts):
    honest, attacker, _ = dhts
    assert publish_progress(honest, RUN_ID, record(epoch=4), expiration=30)
    forged = attacker.store(
        progress_key(RUN_ID),
        subkey=local_public_key(),
        value=record(epoch=99).dict(),
        expiration_time=get_dht_time() + 60,
    )
    assert not forged
    assert fetch_progress(honest, RUN_ID)[local_public_key()].epoch == 4


@pytest.mark.parametrize(
    "bad_value",
    [
        dict(record().dict(), epoch=1.5),  # strict types: no conversion accepted
        dict(record().dict(), extra_field=1),
        dict(record().dict(), device="x" * 5000),  # over the size limit
    ],
)
def test_malformed_or_oversized_records_are_refused(dhts, bad_value):
    honest, _, _ = dhts
    assert not honest.store(
        progress_key(RUN_ID), subkey=local_public_key(), value=bad_value, expiration_time=get_dht_time() + 30
    )


def test_records_expire(dhts):
    honest, _, _ = dhts
    other_run = "progress-expiry-test"  # a key with no record yet: a record expiring sooner never replaces a later one
    assert publish_progress(honest, other_run, record(epoch=8), expiration=1.0)
    assert local_public_key() in fetch_progress(honest, other_run)
    deadline = get_dht_time() + 10
    while local_public_key() in fetch_progress(honest, other_run):
        assert get_dht_time() < deadline, "the record did not expire"


def test_fingerprint_tells_architectures_apart():
    tiny = load_config("tiny")
    assert model_fingerprint(tiny) == model_fingerprint(load_config("tiny"))
    assert model_fingerprint(tiny) != model_fingerprint(load_config("tiny", num_hidden_layers=6))
    assert model_fingerprint(tiny) != model_fingerprint(load_config("tiny", vocab_size=8000))


HOSTILE_NUMBERS = {
    "samples": ({"samples_accumulated": 2**64 - 1}, "range"),
    "loss": ({"loss_sum": 1e308}, "range"),
    "speed": ({"samples_per_second": 1e308}, "range"),
    "epoch": ({"epoch": 2**62}, "range"),
    "loss-per-step": ({"loss_sum": MAX_MINI_STEP_LOSS * 2 + 1.0, "mini_steps": 2}, "range"),
    "nan": ({"loss_sum": math.nan}, "range"),
    "future": ({"time_ahead": 3600.0}, "future"),
}


def hostile_value(changes: dict) -> dict:
    """A record's dict with out-of-bounds numbers, as a stranger skipping validation would send it."""
    changes = dict(changes)
    ahead = changes.pop("time_ahead", 0.0)
    return dict(record().dict(), protocol=PROTOCOL_VERSION, time=float(get_dht_time()) + ahead, **changes)


@pytest.mark.parametrize("name", sorted(HOSTILE_NUMBERS))
def test_out_of_bounds_records_are_refused_on_store_and_counted_by_reason(name):
    changes, reason = HOSTILE_NUMBERS[name]
    rejected = RejectedRecords()
    node = hivemind.DHT(
        start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=counted(make_validators(RUN_ID), rejected)
    )
    try:
        value = hostile_value(changes)
        assert not node.store(
            progress_key(RUN_ID), subkey=local_public_key(), value=value, expiration_time=get_dht_time() + 30
        )
        assert rejected.counts()[reason] >= 1, rejected.counts()
    finally:
        node.shutdown()


def test_a_reader_re_checks_what_another_node_accepted(tmp_path):
    """A node without the schema (the writer's own node) keeps bad records; a reader still refuses them by reason."""
    keys = {name: RSAPrivateKey() for name in ("samples", "future", "honest")}
    writer = hivemind.DHT(
        start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[MultiKeySigner(list(keys.values()))]
    )
    maddrs = [str(maddr) for maddr in writer.get_visible_maddrs()]
    # checks signatures only, like a tool that reads records without the run's schema
    reader = hivemind.DHT(
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        initial_peers=maddrs,
        record_validators=[RSASignatureValidator(RSAPrivateKey())],
    )
    try:
        values = {
            "samples": hostile_value(HOSTILE_NUMBERS["samples"][0]),
            "future": hostile_value(HOSTILE_NUMBERS["future"][0]),
            "honest": dict(record().dict(), protocol=PROTOCOL_VERSION),
        }
        for name, value in values.items():
            subkey = local_public_key(keys[name])
            assert writer.store(progress_key(RUN_ID), subkey=subkey, value=value, expiration_time=get_dht_time() + 30)
        rejected = RejectedRecords()
        records = fetch_progress(reader, RUN_ID, rejected)
        assert list(records) == [local_public_key(keys["honest"])]
        assert records[local_public_key(keys["honest"])].protocol == PROTOCOL_VERSION
        assert rejected.take_new() == {"range": 1, "future": 1}
        # at most `limit` subkeys are parsed, the ones `first` picks before the others; the rest are counted
        honest_key = local_public_key(keys["honest"])
        records = fetch_progress(reader, RUN_ID, rejected, limit=1, first=lambda owner: owner == honest_key)
        assert list(records) == [honest_key] and rejected.take_new() == {"too_many": 2}
    finally:
        reader.shutdown()
        writer.shutdown()


def test_an_older_peers_record_without_protocol_travels_and_reads_as_protocol_0(dhts):
    honest, attacker, _ = dhts
    old = {key: value for key, value in record(epoch=6).dict().items() if key != "protocol"}
    assert "protocol" not in old
    assert honest.store(
        progress_key(RUN_ID), subkey=local_public_key(), value=old, expiration_time=get_dht_time() + 30
    )
    assert fetch_progress(attacker, RUN_ID)[local_public_key()].protocol == 0
    # a current peer's record carries its version
    assert publish_progress(honest, RUN_ID, record(epoch=7, protocol=PROTOCOL_VERSION), expiration=30)
    assert fetch_progress(attacker, RUN_ID)[local_public_key()].protocol == PROTOCOL_VERSION
