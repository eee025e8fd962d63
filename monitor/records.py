"""What the monitor reads from the DHT: the peers' progress records, with every refused record counted and logged.

Forged (bad signature), oversized and malformed (schema-violating) records are refused by the validators of the
monitor's own DHT node, whether a peer tries to store them there or another node serves them; each refusal is
counted by reason and surfaces as the monitor's invalid-record count (API, metrics, log).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from hivemind import DHT
from hivemind.dht.validation import RecordValidatorBase

from monitor.aggregate import PeerReport
from peer.progress import PeerProgress, RejectedRecords, counted, fetch_progress
from peer.run_record import run_validators

logger = logging.getLogger(__name__)
# One counter per run in this process. The monitor's DHT process is forked from this one after its validators were
# built, so the counter the validators hold is the one read_progress reads.
_REJECTED: dict[str, RejectedRecords] = {}


def rejected_records(run_id: str) -> RejectedRecords:
    """The counter of records this process's DHT refused for `run_id`."""
    if run_id not in _REJECTED:
        _REJECTED[run_id] = RejectedRecords()
    return _REJECTED[run_id]


def monitor_validators(run_id: str) -> list[RecordValidatorBase]:
    """Every validator of the run's records (progress schema, size limit, signatures, run record), counting refusals."""
    return counted(run_validators(run_id), rejected_records(run_id))


def peer_label(owner: bytes, progress: PeerProgress | None = None) -> str:
    """A short stable name for a record's owner (its signing key), or the peer id if the record carries one."""
    peer_id = getattr(progress, "peer_id", None)
    return str(peer_id) if peer_id else "key-" + hashlib.sha256(owner).hexdigest()[:12]


@dataclass
class ProgressRead:
    """One read of the metrics key: usable reports, records refused since the last read, refused peers with why."""

    reports: list[PeerReport] = field(default_factory=list)
    invalid: int = 0
    refused: dict[str, str] = field(default_factory=dict)


def read_progress(dht: DHT, run_id: str, model_hash: str) -> ProgressRead:
    """Read every peer's record; invalid ones are counted (and logged), foreign-model ones refused and explained."""
    result = ProgressRead()
    rejected = rejected_records(run_id)
    records = fetch_progress(dht, run_id, rejected)
    new = rejected.take_new()
    if new:
        result.invalid = sum(new.values())
        reasons = ", ".join(f"{count} {reason}" for reason, count in new.items())
        logger.warning(f"Refused {result.invalid} invalid DHT records since the last refresh ({reasons})")
    for owner, progress in records.items():
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
