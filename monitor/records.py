"""What the monitor reads from the DHT: the peers' progress records, with every refused record counted and logged,
and the robust reducers' score records (read_suspects).

Forged (bad signature), oversized, malformed (schema-violating), out-of-range and future-dated records are refused by
the validators of the monitor's own DHT node, whether a peer tries to store them there or another node serves them,
and again when read (the node that served it checked it against its own clock); each refusal is counted
by reason and surfaces as the monitor's invalid-record count (API, metrics, log). At most MAX_RECORDS_PER_READ
subkeys are parsed per read, known peers first, so a flood of keys costs bounded work. Records of another model or
protocol version are valid but refused, with the reason kept per peer (at most MAX_REFUSED_PEERS of them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from hivemind import DHT
from hivemind.dht.validation import RecordValidatorBase

from monitor.aggregate import MAX_PEER_ROWS, PeerProgress
from monitor.live import MAX_REFUSED_PEERS
from monitor.suspicion import Suspect, suspects
from peer.swarm.progress import (
    PROTOCOL_VERSION,
    ProgressRecord,
    RejectedRecords,
    counted,
    fetch_progress,
    peer_label,
)
from peer.swarm.run_record import run_validators
from peer.swarm.scores import ScoreRecord, fetch_scores

logger = logging.getLogger(__name__)
MAX_RECORDS_PER_READ = MAX_PEER_ROWS  # subkeys parsed per read; more would not fit the peers table anyway
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


@dataclass
class ProgressRead:
    """One read of the progress key: usable reports, records refused since the last read, refused peers with why.

    `refused_count` counts every refused peer; `refused` names at most MAX_REFUSED_PEERS of them.
    """

    reports: list[PeerProgress] = field(default_factory=list)
    invalid: int = 0
    invalid_by_reason: dict[str, int] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    refused_count: int = 0


def why_refused(progress: ProgressRecord, model_hash: str) -> str | None:
    """Why a valid record cannot be aggregated into this run (another protocol version or model), or None."""
    if progress.protocol != PROTOCOL_VERSION:
        return (
            f"protocol version {progress.protocol} differs from the run's {PROTOCOL_VERSION}"
            " (install the albert-swarm version the organiser names)"
        )
    if progress.model_hash != model_hash:
        return (
            f"model fingerprint {progress.model_hash} differs from the run's {model_hash}"
            " (wrong --model or --tokenizer)"
        )
    return None


def read_progress(dht: DHT, run_id: str, model_hash: str, known: Callable[[str], bool] | None = None) -> ProgressRead:
    """Read the peers' records; invalid ones are counted (and logged), foreign ones refused and explained.

    `known` tells which peer labels to read first when there are more than MAX_RECORDS_PER_READ subkeys.
    """
    result = ProgressRead()
    rejected = rejected_records(run_id)
    first = (lambda owner: known(peer_label(owner))) if known is not None else None
    records = fetch_progress(dht, run_id, rejected, limit=MAX_RECORDS_PER_READ, first=first)
    new = rejected.take_new()
    if new:
        result.invalid, result.invalid_by_reason = sum(new.values()), new
        reasons = ", ".join(f"{count} {reason}" for reason, count in new.items())
        logger.warning(f"Refused {result.invalid} invalid DHT records since the last refresh ({reasons})")
    for owner, progress in records.items():
        label = peer_label(owner)
        reason = why_refused(progress, model_hash)
        if reason is not None:
            result.refused_count += 1
            if len(result.refused) < MAX_REFUSED_PEERS:
                result.refused[label] = reason
            continue
        result.reports.append(
            PeerProgress(
                peer_id=label,
                epoch=progress.epoch,
                samples_per_second=progress.samples_per_second,
                samples_accumulated=progress.samples_accumulated,
                loss_sum=progress.loss_sum,
                mini_steps=progress.mini_steps,
                time=progress.time,
                device=progress.device,
                version=progress.version,
                name=progress.name,
                samples_total=progress.samples_total,
                compute_seconds_total=progress.compute_seconds_total,
            )
        )
    return result


def read_suspects(
    dht: DHT, run_id: str, known: Callable[[str], bool] | None = None
) -> tuple[tuple[Suspect, ...], dict[bytes, ScoreRecord]]:
    """The senders the run's robust reducers scored, most suspicious first, and the score records they come from
    (by reporter's key: a revocation's evidence); unparsable score records are counted with the refused records (at
    most MAX_RECORDS_PER_READ reporters read, those ``known`` labels first)."""
    first = (lambda owner: known(peer_label(owner))) if known is not None else None
    records = fetch_scores(dht, run_id, MAX_RECORDS_PER_READ, rejected_records(run_id), first)
    return tuple(suspects(records.values())), records
