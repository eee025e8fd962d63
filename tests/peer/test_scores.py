"""Score records (peer/swarm/scores.py) and the monitor's suspicion reader (monitor/suspicion.py): the bounds of a
record, hostile records a stranger signs and stores on a real node refused there, and a sender's suspicion that one
lying reporter cannot set."""

from __future__ import annotations

import math
from functools import partial

import hivemind
import pydantic.v1 as pydantic
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.utils import get_dht_time

from monitor.suspicion import MAX_SUSPECTS, SUSPICION_THRESHOLD, suspects
from peer.hivemind_gaps.robust_allreduce import RoundScores
from peer.swarm.centered_clip import MAX_SCORE
from peer.swarm.progress import progress_key
from peer.swarm.run_record import run_validators
from peer.swarm.scores import (
    MAX_SCORED_PEERS,
    ScoreRecord,
    ScoreWindow,
    epoch_record,
    fetch_scores,
    publish_scores,
    scores_key,
)

RUN = "scores-run"
HONEST_ID = "12D3KooWNij6fPTbCX4pNDvvw1JSkjP7W1i7RKj2pkLTmEbzWbaN"
ATTACKER_ID = "12D3KooWD6w6FdD3XkD6zhRBv7ALQeKsiVZUBTQJSkW1Y4dfA3ZC"


def fake_id(number: int) -> str:
    """A distinct base58 peer id for each number (digits mapped to letters: base58 has no 0)."""
    return "Qm" + "".join("ABCDEFGHJK"[int(digit)] for digit in str(number))


def record(**changes) -> dict:
    values = {"epoch": 3, "time": float(get_dht_time()), "rounds": 1, "scores": {HONEST_ID: 1.0, ATTACKER_ID: 950.0}}
    return {**values, **changes}


def test_our_keys_are_not_hiveminds():
    """hivemind's ProgressTracker and averagers own {run}_progress, _grad_averager, _state_averager: a record of ours
    under one of them would overwrite (same signing key, same subkey) or be refused as the other's."""
    hiveminds = {f"{RUN}_progress", f"{RUN}_grad_averager", f"{RUN}_state_averager"}
    assert not {progress_key(RUN), scores_key(RUN)} & hiveminds


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"scores": {HONEST_ID: math.nan}}, "NaN score"),
        ({"scores": {HONEST_ID: math.inf}}, "infinite score"),
        ({"scores": {HONEST_ID: -1.0}}, "negative score"),
        ({"scores": {HONEST_ID: MAX_SCORE * 10}}, "score above the maximum"),
        ({"scores": {HONEST_ID: 1}}, "an int where a float belongs"),
        ({"scores": {"not a peer id!": 1.0}}, "a peer id outside base58"),
        ({"scores": {"1" * 65: 1.0}}, "a peer id too long"),
        ({"scores": {fake_id(index): 1.0 for index in range(MAX_SCORED_PEERS + 1)}}, "too many"),
        ({"time": lambda: get_dht_time() + 3600}, "from the future"),  # read when the test runs, not at collection
        ({"rounds": 0}, "no round"),
        ({"epoch": -1}, "negative epoch"),
    ],
)
def test_a_record_out_of_bounds_is_refused(changes, why):
    changes = {key: value() if callable(value) else value for key, value in changes.items()}
    with pytest.raises(pydantic.ValidationError):
        ScoreRecord.parse_obj(record(**changes))


def test_an_epoch_record_keeps_the_highest_scores_averaged_over_rounds():
    rounds = [
        RoundScores({HONEST_ID: 1.0, ATTACKER_ID: 900.0}, 3, 0.01, 0.0),
        RoundScores({ATTACKER_ID: 1100.0}, 3, 0.01, 0.0),
    ]
    made = epoch_record(7, rounds)
    assert made.scores == {ATTACKER_ID: 1000.0, HONEST_ID: 1.0} and made.rounds == 2 and made.epoch == 7
    assert epoch_record(7, []) is None
    many = [RoundScores({fake_id(index): float(index) for index in range(1, 60)}, 1, 0.0, 0.0)]
    assert len(epoch_record(1, many).scores) == MAX_SCORED_PEERS and min(epoch_record(1, many).scores.values()) > 20


def test_a_window_keeps_the_last_rounds_that_scored_anyone():
    window = ScoreWindow(size=3)
    window.add([RoundScores({ATTACKER_ID: 1000.0, HONEST_ID: 1.0}, 2, 0.0, 0.0)])
    window.add([RoundScores({}, 2, 0.0, 0.0)] * 5)  # groups of two: averaged, not scored, not kept
    window.add([RoundScores({HONEST_ID: 1.0}, 2, 0.0, 0.0)] * 2)
    assert window.record(9).scores == {ATTACKER_ID: 1000.0, HONEST_ID: 1.0} and window.record(9).rounds == 3
    window.add([RoundScores({HONEST_ID: 1.0}, 2, 0.0, 0.0)])
    assert window.record(10).scores == {HONEST_ID: 1.0}  # the attacker's round left the window


def test_one_lying_reporter_neither_frames_nor_clears():
    honest = [ScoreRecord.parse_obj(record()) for _ in range(3)]
    liar = ScoreRecord.parse_obj(record(scores={HONEST_ID: MAX_SCORE, ATTACKER_ID: 0.0}))
    ranked = suspects([*honest, liar])
    assert [row.peer_id for row in ranked] == [ATTACKER_ID, HONEST_ID]
    assert ranked[0].suspicious and ranked[0].reporters == 4 and not ranked[1].suspicious
    assert ranked[1].suspicion < SUSPICION_THRESHOLD


def test_the_suspects_table_is_bounded():
    floods = [
        ScoreRecord.parse_obj(
            record(scores={fake_id(reporter * 100 + index): 1.0 for index in range(MAX_SCORED_PEERS)})
        )
        for reporter in range(1, 9)
    ]
    assert len(suspects(floods)) == MAX_SUSPECTS


@pytest.fixture
def nodes():
    """A node of the run (the run's validators) and a stranger's node with a signature validator only: it signs
    whatever it stores, so what reaches the run's node is a well-signed hostile record."""
    honest = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=run_validators(RUN))
    stranger = hivemind.DHT(
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        initial_peers=[str(maddr) for maddr in honest.get_visible_maddrs()],
        record_validators=[RSASignatureValidator()],
    )
    yield honest, stranger
    stranger.shutdown()
    honest.shutdown()


def stranger_stores(stranger, value) -> None:
    stranger.store(
        scores_key(RUN),
        subkey=RSASignatureValidator().local_public_key,
        value=value,
        expiration_time=get_dht_time() + 60,
    )


async def _subkeys_held(_dht, node, key: str) -> int:
    """How many subkeys of ``key`` this node's own storage holds (no lookup elsewhere: the stranger holds its own)."""
    held = node.protocol.storage.get(DHTID.generate(source=key))
    return len(held.value) if held is not None and isinstance(held.value, DictionaryDHTValue) else 0


def test_hostile_records_are_refused_by_the_runs_node_and_a_valid_one_read(nodes):
    honest, stranger = nodes
    for hostile in (record(scores={ATTACKER_ID: math.nan}), record(rounds=-5), {"scores": "x" * 10_000}, b"junk"):
        stranger_stores(stranger, hostile)
    assert honest.run_coroutine(partial(_subkeys_held, key=scores_key(RUN))) == 0  # its validators refused them all
    assert fetch_scores(honest, RUN, limit=16) == {}  # and a reader re-checks what other nodes serve
    stranger_stores(stranger, record())
    assert honest.run_coroutine(partial(_subkeys_held, key=scores_key(RUN))) == 1
    found = fetch_scores(honest, RUN, limit=16)
    assert [item.scores for item in found.values()] == [record()["scores"]]


def test_a_peer_publishes_its_own_record(nodes):
    honest, _ = nodes
    published = ScoreRecord.parse_obj(record())
    assert publish_scores(honest, RUN, published, expiration=60)
    assert list(fetch_scores(honest, RUN, limit=16).values()) == [published]
