"""What the monitor reads from and writes to the DHT: the peers' progress records and the run record.

The run record (key `{run_id}_run`, one signed subkey per monitor) tells every peer which model the run trains, by
the same fingerprint peers put in their progress records; a peer whose fingerprint differs is refused on both sides.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import pydantic.v1 as pydantic
from hivemind import DHT
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import RecordValidatorBase
from hivemind.utils import ValueWithExpiration, get_dht_time

from monitor.aggregate import PeerReport
from peer.progress import PeerProgress, local_public_key, make_validators, metrics_key

logger = logging.getLogger(__name__)
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


def monitor_validators(run_id: str) -> list[RecordValidatorBase]:
    """The peers' validators (progress schema, size limit, signatures) plus the run record's schema."""
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
    """For peers and `albert-checkpoint pull`: None if the run accepts this model (or announces none), else why not."""
    records = fetch_run_records(dht, run_id)
    if not records or any(record.model_hash == model_hash for record in records):
        return None
    run = records[0]
    return (
        f"this model (fingerprint {model_hash}) does not match run {run_id!r}, which trains model {run.model!r} "
        f"with tokenizer {run.tokenizer!r} (fingerprint {run.model_hash}): use the same --model and --tokenizer"
    )


def peer_label(owner: bytes, progress: PeerProgress | None = None) -> str:
    """A short stable name for a record's owner (its signing key), or the peer id if the record carries one."""
    peer_id = getattr(progress, "peer_id", None)
    return str(peer_id) if peer_id else "key-" + hashlib.sha256(owner).hexdigest()[:12]


@dataclass
class ProgressRead:
    """One read of the metrics key: usable reports, the number of invalid records, and refused peers with why."""

    reports: list[PeerReport] = field(default_factory=list)
    invalid: int = 0
    refused: dict[str, str] = field(default_factory=dict)


def read_progress(dht: DHT, run_id: str, model_hash: str) -> ProgressRead:
    """Read every peer's record; schema-invalid ones are counted, foreign-model ones refused (and explained)."""
    result = ProgressRead()
    found = dht.get(metrics_key(run_id), latest=True)
    if not isinstance(found, ValueWithExpiration) or not isinstance(found.value, dict):
        return result
    for owner, entry in found.value.items():
        try:
            progress = PeerProgress.parse_obj(entry.value)
        except (pydantic.ValidationError, AttributeError, TypeError):
            result.invalid += 1
            continue
        label = peer_label(owner, progress)
        if progress.model_hash != model_hash:
            result.refused[label] = (
                f"model fingerprint {progress.model_hash} differs from the run's {model_hash}"
                " (wrong --model or --tokenizer)"
            )
            continue
        result.reports.append(
            PeerReport(
                peer_id=label,
                epoch=progress.epoch,
                samples_per_second=progress.samples_per_second,
                samples_accumulated=progress.samples_accumulated,
                loss_sum=progress.loss_sum,
                mini_steps=progress.mini_steps,
                time=progress.time,
                device=progress.device,
                version=progress.version,
            )
        )
    return result
