"""The signed progress record each peer publishes once per epoch under the DHT key ``{run_id}_metrics``.

Records are checked by a schema validator, a size limit and an RSA signature validator: only a record's owner can
write it. Trainer peers publish them; the monitor reads them back with the same validators, counting what they refuse.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import multiprocessing
from collections.abc import Iterable

import pydantic.v1 as pydantic
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import ValueWithExpiration, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

MAX_RECORD_BYTES = 4096  # a record is ~300 bytes; anything far larger is abuse
METRICS_FIELD = "metrics"
# config entries that change nothing about the trained weights, left out of the fingerprint
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "architectures",
        "torch_dtype",
        "dtype",
        "use_cache",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "_attn_implementation_autoset",
        "auto_map",
    }
)


class PeerProgress(pydantic.BaseModel):
    """One peer's report for one epoch (strict types: the DHT's schema validator refuses any conversion)."""

    epoch: pydantic.conint(ge=0, strict=True)
    samples_per_second: pydantic.confloat(ge=0.0, strict=True)
    samples_accumulated: pydantic.conint(ge=0, strict=True)
    loss_sum: pydantic.confloat(ge=0.0, strict=True)
    mini_steps: pydantic.conint(ge=0, strict=True)
    device: pydantic.constr(max_length=64, strict=True)
    version: pydantic.constr(max_length=32, strict=True)
    time: pydantic.StrictFloat
    model_hash: pydantic.constr(max_length=64, strict=True)

    @property
    def mean_loss(self) -> float | None:
        return self.loss_sum / self.mini_steps if self.mini_steps else None


class MetricsSchema(pydantic.BaseModel):
    """DHT schema: the key ``{run_id}_metrics`` maps each owner's public key (the subkey) to its PeerProgress."""

    metrics: dict[BytesWithPublicKey, PeerProgress]


class RecordSizeValidator(RecordValidatorBase):
    """Refuses records above ``max_bytes`` under the given DHT keys, so a peer cannot flood the metrics key.

    Args:
        keys: raw DHT keys to guard.
        max_bytes: largest accepted serialized value (signature stripped).
    """

    def __init__(self, keys: list[str], max_bytes: int = MAX_RECORD_BYTES):
        self.key_ids = frozenset(DHTID.generate(source=key).to_bytes() for key in keys)
        self.max_bytes = max_bytes

    def validate(self, record: DHTRecord) -> bool:
        return record.key not in self.key_ids or len(record.value) <= self.max_bytes

    @property
    def priority(self) -> int:
        # after the signature check (10), before the schema (0): a huge value is refused before it is parsed
        return 5


class RejectedRecords:
    """Counts the DHT records a node refused, by reason (signature, size, schema).

    The counts live in shared memory: create this before the DHT starts, and the DHT's own process (a fork of this
    one) counts into it while this process reads it.
    """

    REASONS = ("signature", "size", "schema", "other")

    def __init__(self):
        self._counts = multiprocessing.Array("q", len(self.REASONS))
        self._taken = [0] * len(self.REASONS)

    def add(self, reason: str) -> None:
        with self._counts.get_lock():
            self._counts[self.REASONS.index(reason)] += 1

    def counts(self) -> dict[str, int]:
        """Records refused since this counter was created, by reason."""
        with self._counts.get_lock():
            return dict(zip(self.REASONS, self._counts[:]))

    def take_new(self) -> dict[str, int]:
        """Records refused since the previous call, by reason (reasons with none left out)."""
        now = list(self.counts().values())
        new = {
            reason: current - taken
            for reason, current, taken in zip(self.REASONS, now, self._taken)
            if current > taken
        }
        self._taken = now
        return new


class CountingValidator(RecordValidatorBase):
    """Wraps one validator and counts the records it refuses under `reason`; otherwise behaves exactly like it.

    Args:
        inner: the validator doing the work.
        rejected: where refusals are counted.
        reason: the name they are counted under (one of RejectedRecords.REASONS).
    """

    def __init__(self, inner: RecordValidatorBase, rejected: RejectedRecords, reason: str):
        self.inner, self.rejected, self.reason = inner, rejected, reason

    def validate(self, record: DHTRecord) -> bool:
        valid = self.inner.validate(record)
        if not valid:
            self.rejected.add(self.reason)
        return valid

    def sign_value(self, record: DHTRecord) -> bytes:
        return self.inner.sign_value(record)

    def strip_value(self, record: DHTRecord) -> bytes:
        return self.inner.strip_value(record)

    @property
    def priority(self) -> int:
        return self.inner.priority

    def merge_with(self, other: RecordValidatorBase) -> bool:
        # hivemind merges the schema validators of one DHT into one (and keeps a single signature validator)
        return self.inner.merge_with(other.inner if isinstance(other, CountingValidator) else other)


def counted(validators: Iterable[RecordValidatorBase], rejected: RejectedRecords) -> list[RecordValidatorBase]:
    """The same validators, each counting the records it refuses into `rejected`."""
    reasons = {RSASignatureValidator: "signature", RecordSizeValidator: "size", SchemaValidator: "schema"}
    return [CountingValidator(validator, rejected, reasons.get(type(validator), "other")) for validator in validators]


def metrics_key(run_id: str) -> str:
    """The DHT key holding every peer's progress record of a run."""
    return f"{run_id}_{METRICS_FIELD}"


def make_validators(run_id: str, private_key: RSAPrivateKey | None = None) -> list[RecordValidatorBase]:
    """Validators for the run's metrics key: schema, size limit and signatures.

    Records are signed with ``private_key``, by default this process's RSA key (the one hivemind's ProgressTracker
    signs with too: a DHT keeps a single signature validator, the first one given).
    """
    return [
        SchemaValidator(MetricsSchema, prefix=run_id),
        RecordSizeValidator([metrics_key(run_id)]),
        RSASignatureValidator(private_key),
    ]


def local_public_key(private_key: RSAPrivateKey | None = None) -> bytes:
    """The subkey a record signed by ``private_key`` (default: this process's key) is stored under."""
    return RSASignatureValidator(private_key).local_public_key


def publish_progress(
    dht: DHT,
    run_id: str,
    progress: PeerProgress,
    expiration: float,
    wait: bool = True,
    private_key: RSAPrivateKey | None = None,
):
    """Store this peer's record, signed, expiring ``expiration`` seconds from now.

    Returns whether it was stored, or (``wait=False``) a future of that.
    """
    return dht.store(
        key=metrics_key(run_id),
        subkey=local_public_key(private_key),
        value=progress.dict(),
        expiration_time=get_dht_time() + expiration,
        return_future=not wait,
    )


def fetch_progress(dht: DHT, run_id: str, rejected: RejectedRecords | None = None) -> dict[bytes, PeerProgress]:
    """All unexpired, valid records of the run, keyed by their owner's public key.

    A record that reaches this reader but does not parse (it passed another peer's older schema) is skipped and
    counted in `rejected` as a schema refusal, like the records the DHT's validators refused.
    """
    found = dht.get(metrics_key(run_id), latest=True)
    if not isinstance(found, ValueWithExpiration) or not isinstance(found.value, dict):
        return {}
    records = {}
    for owner, entry in found.value.items():
        try:
            records[owner] = PeerProgress.parse_obj(entry.value)
        except (pydantic.ValidationError, AttributeError, TypeError):
            if rejected is not None:
                rejected.add("schema")
    return records


def model_fingerprint(config, tokenizer=None) -> str:
    """Short hash of the architecture (and vocabulary) so peers and the monitor can refuse a mismatching peer."""
    architecture = {key: value for key, value in config.to_dict().items() if key not in VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(architecture, sort_keys=True, default=str).encode())
    if tokenizer is not None:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()[:16]


def software_version() -> str:
    """The installed albert-swarm version, or 'dev' when run from a source tree."""
    try:
        return importlib.metadata.version("albert-swarm")
    except importlib.metadata.PackageNotFoundError:
        return "dev"
