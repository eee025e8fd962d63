"""The run record a monitor publishes under ``{run_id}_run``: which model the run trains, checked by every peer.

One signed subkey per monitor (so nobody else can overwrite it). A peer whose model fingerprint differs from the
run's refuses to join, and announces itself once so that the monitor can tell its organiser why (both sides log it).
"""

from __future__ import annotations

import pydantic.v1 as pydantic
from hivemind import DHT
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.utils import ValueWithExpiration, get_dht_time

from hivemind.dht.validation import RecordValidatorBase

from peer.progress import local_public_key, make_validators

RUN_FIELD = "run"


class RunRecord(pydantic.BaseModel):
    """What a monitor announces about its run: the model every peer must train and the state it can share."""

    model_hash: pydantic.constr(max_length=64, strict=True)
    model: pydantic.constr(max_length=256, strict=True)
    tokenizer: pydantic.constr(max_length=256, strict=True)
    state_epoch: pydantic.conint(ge=-1, strict=True)
    dashboard: pydantic.constr(max_length=256, strict=True)
    time: pydantic.StrictFloat


class RunSchema(pydantic.BaseModel):
    run: dict[BytesWithPublicKey, RunRecord]


def run_key(run_id: str) -> str:
    return f"{run_id}_{RUN_FIELD}"


def run_validators(run_id: str) -> list[RecordValidatorBase]:
    """Every validator of the run's DHT records: progress schema, size limit, signatures, and the run record's schema."""
    return [*make_validators(run_id), SchemaValidator(RunSchema, prefix=run_id)]


def publish_run_record(dht: DHT, run_id: str, record: RunRecord, expiration: float) -> bool:
    """Store this monitor's run record, signed with its key, so no one else can overwrite it."""
    stored = dht.store(
        run_key(run_id), subkey=local_public_key(), value=record.dict(), expiration_time=get_dht_time() + expiration
    )
    return bool(stored)


def fetch_run_records(dht: DHT, run_id: str) -> list[RunRecord]:
    """Every monitor's valid run record (empty if no monitor serves this run)."""
    found = dht.get(run_key(run_id), latest=True)
    if not isinstance(found, ValueWithExpiration) or not isinstance(found.value, dict):
        return []
    records = []
    for entry in found.value.values():
        try:
            records.append(RunRecord.parse_obj(entry.value))
        except (pydantic.ValidationError, AttributeError, TypeError):
            continue
    return records


def check_model_matches(dht: DHT, run_id: str, model_hash: str) -> str | None:
    """None if the run accepts this model (or no monitor announces one), else why not."""
    records = fetch_run_records(dht, run_id)
    if not records or any(record.model_hash == model_hash for record in records):
        return None
    run = records[0]
    return (
        f"this model (fingerprint {model_hash}) does not match run {run_id!r}, which trains model {run.model!r} "
        f"with tokenizer {run.tokenizer!r} (fingerprint {run.model_hash}): use the same --model and --tokenizer"
    )
