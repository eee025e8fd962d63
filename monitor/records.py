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
from hivemind.utils import ValueWithExpiration

from monitor.aggregate import PeerReport
from peer.progress import PeerProgress, metrics_key
from peer.run_record import (  # noqa: F401  (re-exported: the monitor's view of the run record)
    RunRecord,
    check_model_matches,
    fetch_run_records,
    publish_run_record,
    run_key,
    run_validators as monitor_validators,
)

logger = logging.getLogger(__name__)


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
