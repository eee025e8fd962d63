"""The signed progress record through real DHTs: valid records travel, forged, malformed or huge ones do not."""

from __future__ import annotations

import hivemind
import pytest
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from model import load_config
from peer.progress import (
    PeerProgress,
    fetch_progress,
    local_public_key,
    make_validators,
    metrics_key,
    model_fingerprint,
    publish_progress,
)

RUN_ID = "progress-test"


def record(epoch: int = 3, **changes) -> PeerProgress:
    values = dict(
        epoch=epoch,
        samples_per_second=12.5,
        samples_accumulated=64,
        loss_sum=18.0,
        mini_steps=2,
        device="cpu",
        version="dev",
        time=float(get_dht_time()),
        model_hash="0123456789abcdef",
    )
    return PeerProgress(**{**values, **changes})


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
        metrics_key(RUN_ID),
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
        metrics_key(RUN_ID), subkey=local_public_key(), value=bad_value, expiration_time=get_dht_time() + 30
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
