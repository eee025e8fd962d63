"""The signed score record each reducing peer publishes under ``{run_id}_scores``: how far each sender's gradient
parts lay from the robust centre (``--aggregation centered-clip``, peer/hivemind_gaps/robust_allreduce.py).

Like progress records (progress.py): one subkey per owner's public key, RSA-signed so only the owner writes it, a
size limit, a strict schema with a range on every number, and a date no further ahead than the clock skew. A score
is a sender's distance to the centre over the median distance (honest: about 1; a sign flipper x1000: about 1000),
averaged over the rounds of one epoch; at most MAX_SCORED_PEERS senders per record, the highest first. A record
only says what its owner claims: readers combine many owners' records (monitor/suspicion.py), never trust one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

import pydantic.v1 as pydantic
from hivemind import DHT
from hivemind.dht.schema import BytesWithPublicKey
from hivemind.utils import get_dht_time

from peer.hivemind_gaps.robust_allreduce import RoundScores
from peer.swarm.centered_clip import MAX_SCORE
from peer.swarm.progress import (
    MAX_COUNT,
    RejectedRecords,
    fetch_signed_records,
    local_public_key,
    not_ahead_of_this_clock,
)

SCORES_FIELD = "scores"
MAX_SCORED_PEERS = 32  # senders per record: ~60 bytes each keeps a record under MAX_SCORE_RECORD_BYTES
MAX_SCORE_RECORD_BYTES = 4096
PEER_ID_MAX_LENGTH = 64
# A record covers this peer's last rounds, not only the last epoch's: in one epoch an attacker may share no scored
# group with this reducer (a group of two is not scored), and the monitor reads only each reporter's latest record.
SCORE_WINDOW_ROUNDS = 10  # a base58 libp2p peer id is 46-52 characters

PeerIdText = pydantic.constr(
    min_length=1, max_length=PEER_ID_MAX_LENGTH, regex=r"^[1-9A-HJ-NP-Za-km-z]+$", strict=True
)


class ScoreRecord(pydantic.BaseModel):
    """One reducer's scores of the senders it reduced during one epoch (strict types, bounded sizes and values)."""

    epoch: pydantic.conint(ge=0, le=MAX_COUNT, strict=True)
    time: pydantic.confloat(ge=0.0, le=MAX_COUNT, strict=True)
    rounds: pydantic.conint(ge=1, le=MAX_COUNT, strict=True)
    scores: dict[PeerIdText, pydantic.confloat(ge=0.0, le=MAX_SCORE, strict=True)]

    not_from_the_future = pydantic.validator("time", allow_reuse=True)(not_ahead_of_this_clock)

    @pydantic.validator("scores")
    def bounded(cls, scores: dict) -> dict:
        if len(scores) > MAX_SCORED_PEERS:
            raise ValueError(f"{len(scores)} scored peers, at most {MAX_SCORED_PEERS}")
        return scores


class ScoresSchema(pydantic.BaseModel):
    """DHT schema: the key ``{run_id}_scores`` maps each owner's public key (the subkey) to its ScoreRecord."""

    scores: dict[BytesWithPublicKey, ScoreRecord]


def scores_key(run_id: str) -> str:
    """The DHT key holding every reducer's score record of a run."""
    return f"{run_id}_{SCORES_FIELD}"


class ScoreWindow:
    """The last SCORE_WINDOW_ROUNDS rounds this peer reduced and scored, and the record they make."""

    def __init__(self, size: int = SCORE_WINDOW_ROUNDS):
        self.rounds: deque[RoundScores] = deque(maxlen=size)

    def add(self, rounds: Iterable[RoundScores]) -> None:
        self.rounds.extend(round_scores for round_scores in rounds if round_scores.scores)

    def record(self, epoch: int) -> ScoreRecord | None:
        return epoch_record(epoch, self.rounds)


def epoch_record(epoch: int, rounds: Iterable[RoundScores]) -> ScoreRecord | None:
    """A record from the rounds this peer reduced: each sender's mean score over the rounds that scored it, the
    highest MAX_SCORED_PEERS kept; None if no round scored anyone."""
    rounds = list(rounds)
    totals: dict[str, list[float]] = {}
    for round_scores in rounds:
        for peer_id, score in round_scores.scores.items():
            totals.setdefault(peer_id, []).append(score)
    if not totals:
        return None
    rounds = [round_scores for round_scores in rounds if round_scores.scores]
    means = {peer_id: min(sum(values) / len(values), MAX_SCORE) for peer_id, values in totals.items()}
    highest = sorted(means.items(), key=lambda item: -item[1])[:MAX_SCORED_PEERS]
    return ScoreRecord(epoch=epoch, time=float(get_dht_time()), rounds=len(rounds), scores=dict(highest))


def publish_scores(dht: DHT, run_id: str, record: ScoreRecord, expiration: float, wait: bool = True):
    """Store this peer's score record, signed with this process's key; returns whether (or a future of whether) it
    was stored."""
    return dht.store(
        key=scores_key(run_id),
        subkey=local_public_key(),
        value=record.dict(),
        expiration_time=get_dht_time() + expiration,
        return_future=not wait,
    )


def fetch_scores(
    dht: DHT,
    run_id: str,
    limit: int,
    rejected: RejectedRecords | None = None,
    first: Callable[[bytes], bool] | None = None,
) -> dict[bytes, ScoreRecord]:
    """The run's unexpired, valid score records by owner's public key (progress.fetch_signed_records)."""
    return fetch_signed_records(dht, scores_key(run_id), ScoreRecord, rejected, limit, first)
