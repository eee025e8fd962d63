"""The run record a monitor publishes under ``{run_id}_run``: which model and protocol the run uses, checked by peers.

One signed subkey per monitor (so nobody else can overwrite it), and the record is also signed by the monitor's run
key (peer/swarm/run_key.py): any peer can publish a record under its own subkey, but only the organiser's monitor can sign
one with the run key whose fingerprint the organiser hands out. A peer whose model fingerprint or protocol version
differs from the run's refuses to join, and announces itself once so that the monitor can tell its organiser why
(both sides log it).
"""

from __future__ import annotations

import json

import pydantic.v1 as pydantic
from hivemind import DHT
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import RecordValidatorBase
from hivemind.utils import ValueWithExpiration, get_dht_time

from peer.swarm.progress import PROTOCOL_VERSION, RecordSizeValidator, local_public_key, make_validators
from peer.swarm.run_key import PUBLIC_HEX_CHARS, SIGNATURE_HEX_CHARS, RunKey, fingerprint_of, verify_signature
from peer.swarm.scores import MAX_SCORE_RECORD_BYTES, ScoresSchema, scores_key

RUN_FIELD = "run"


__all__ = ["PROTOCOL_VERSION", "RunRecord", "check_model_matches", "fetch_run_records", "publish_run_record"]


class RunRecord(pydantic.BaseModel):
    """What a monitor announces about its run: the model every peer must train and the state it can share."""

    model_hash: pydantic.constr(max_length=64, strict=True)
    model: pydantic.constr(max_length=256, strict=True)
    tokenizer: pydantic.constr(max_length=256, strict=True)
    state_epoch: pydantic.conint(ge=-1, strict=True)
    dashboard: pydantic.constr(max_length=256, strict=True)
    time: pydantic.StrictFloat
    protocol: pydantic.conint(ge=0, le=2**31, strict=True)
    run_key: pydantic.constr(min_length=PUBLIC_HEX_CHARS, max_length=PUBLIC_HEX_CHARS, strict=True)
    signature: pydantic.constr(max_length=SIGNATURE_HEX_CHARS, strict=True) = ""

    def signed_bytes(self) -> bytes:
        """What the run key signs: every field but the signature, as canonical JSON."""
        return json.dumps(self.dict(exclude={"signature"}), sort_keys=True, separators=(",", ":")).encode()

    def signed_with(self, key: RunKey) -> RunRecord:
        return self.copy(update={"signature": key.sign(self.signed_bytes())})

    @property
    def signature_valid(self) -> bool:
        return verify_signature(self.run_key, self.signed_bytes(), self.signature)

    @property
    def key_fingerprint(self) -> str:
        return fingerprint_of(self.run_key)


class RunSchema(pydantic.BaseModel):
    run: dict[BytesWithPublicKey, RunRecord]


def run_key(run_id: str) -> str:
    return f"{run_id}_{RUN_FIELD}"


def run_validators(run_id: str) -> list[RecordValidatorBase]:
    """Every validator of the run's DHT records: progress schema, size limit, signatures, the run record's schema, and
    the score records' schema and size limit (scores.py)."""
    return [
        *make_validators(run_id),
        SchemaValidator(RunSchema, prefix=run_id),
        SchemaValidator(ScoresSchema, prefix=run_id),
        RecordSizeValidator([scores_key(run_id)], MAX_SCORE_RECORD_BYTES),
    ]


def publish_run_record(dht: DHT, run_id: str, record: RunRecord, expiration: float) -> bool:
    """Store this monitor's run record, signed with its key, so no one else can overwrite it."""
    stored = dht.store(
        run_key(run_id), subkey=local_public_key(), value=record.dict(), expiration_time=get_dht_time() + expiration
    )
    return bool(stored)


def fetch_run_records(dht: DHT, run_id: str, trusted_key: str | None = None) -> list[RunRecord]:
    """Every monitor's valid run record signed by its run key (empty if no monitor serves this run).

    With `trusted_key` (a run key fingerprint), only the records signed by that key.
    """
    found = dht.get(run_key(run_id), latest=True)
    if not isinstance(found, ValueWithExpiration) or not isinstance(found.value, dict):
        return []
    records = []
    for entry in found.value.values():
        try:
            record = RunRecord.parse_obj(entry.value)
        except (pydantic.ValidationError, AttributeError, TypeError):
            continue
        if record.signature_valid and (trusted_key is None or record.key_fingerprint == trusted_key):
            records.append(record)
    return records


def check_model_matches(dht: DHT, run_id: str, model_hash: str, trusted_key: str | None = None) -> str | None:
    """None if the run accepts this model and protocol (or no monitor announces one), else why not.

    With `trusted_key`, a run whose monitor (signing with that key) cannot be found is refused too.
    """
    records = fetch_run_records(dht, run_id, trusted_key)
    if not records:
        if trusted_key is None:
            return None
        return (
            f"no monitor of run {run_id!r} signs with run key {trusted_key[:16]}...: is the run key fingerprint"
            " right, and is the run's monitor up?"
        )
    if not any(record.protocol == PROTOCOL_VERSION for record in records):
        return (
            f"run {run_id!r} speaks protocol version {records[0].protocol}, this peer speaks {PROTOCOL_VERSION}:"
            " install the albert-swarm version the organiser names"
        )
    if any(record.model_hash == model_hash for record in records):
        return None
    run = records[0]
    return (
        f"this model (fingerprint {model_hash}) does not match run {run_id!r}, which trains model {run.model!r} "
        f"with tokenizer {run.tokenizer!r} (fingerprint {run.model_hash}): use the same --model and --tokenizer"
    )
