"""The signed progress record each peer publishes once per epoch under the DHT key ``{run_id}_progress_records``.

Records are checked by a schema validator, a size limit and an RSA signature validator: only a record's owner can
write it. Every number has a range (a stranger's record can sign any value), and a record dated in the future beyond
the clock skew is refused by whoever validates it, against its own clock. Trainer peers publish them; the monitor
reads them back with the same validators, counting what they refuse by reason.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import multiprocessing
from collections.abc import Callable, Iterable
from typing import TypeVar

import pydantic.v1 as pydantic
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, ValueWithExpiration, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

# A record dated further ahead of the reader's clock than MAX_CLOCK_SKEW is refused (it would stay "alive" until its
# date); one within the skew stays alive at most MAX_CLOCK_SKEW + --stale-after seconds.
from peer.swarm.clock import MAX_CLOCK_SKEW
from peer.swarm.names import MAX_NAME_CHARS, why_unprintable

RecordT = TypeVar("RecordT", bound=pydantic.BaseModel)

MAX_RECORD_BYTES = 4096  # a record is ~300 bytes; anything far larger is abuse
# The version of what peers and monitors say to each other (records, averaging, state layout). Bump it whenever a
# change makes an older peer unable to train with a newer one; peers and monitors of other versions refuse each other.
# It lives here, not in run_record (which re-exports it), because run_record imports this module.
# 3: the progress records moved from the key {run_id}_metrics to {run_id}_progress_records, and carry the peer's
# display name and cumulative contribution
# 4: local-steps reducers reply with the mean, not the difference (peer/hivemind_gaps/mean_replies.py), and outer
# rounds gather {"epoch", "fingerprint"}: a peer of version 3 would misread every reply
PROTOCOL_VERSION = 4
# Largest count a record may carry: every integer of a record stays exact as a float (2**53), and sums of a capped
# number of them stay far below SQLite's INTEGER limit (2**63 - 1).
MAX_COUNT = 2**53
# Fastest plausible peer: an H100 trains ALBERT-base at a few thousand samples/s; 1e6 leaves 100x headroom for
# smaller models and faster devices while keeping the swarm's sum of speeds finite and meaningful.
MAX_SAMPLES_PER_SECOND = 1e6
# Largest plausible mean loss of one mini-step. An untrained MLM starts near ln(vocab) (about 10 for 30k tokens);
# 1000 is ~100x that, so a diverging peer's record still shows on the dashboard, while 1e308 cannot reach the sums.
MAX_MINI_STEP_LOSS = 1000.0
# Not "progress": hivemind's ProgressTracker stores its own records under {run_id}_progress, subkeyed by the same
# process-wide RSA key, so the two records would overwrite each other (and each reader would refuse the other's).
PROGRESS_FIELD = "progress_records"
# Fields a record leaves out when they hold their default, so that a record without them (an older peer's, or a
# peer with no name) passes hivemind's "no conversion" check; see ProgressRecord.dict.
OMITTED_AT_DEFAULT = ("protocol", "name", "samples_total", "compute_seconds_total")
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


class FromTheFuture(pydantic.PydanticValueError):
    code = "future"
    msg_template = "the record's time is {ahead:.0f} s ahead of this node's clock (at most {skew:.0f} s allowed)"


class LossOutOfRange(pydantic.PydanticValueError):
    code = "number.loss"
    msg_template = "loss_sum {loss_sum} is above {limit} per mini-step over {mini_steps} mini-steps"


class UnprintableName(pydantic.PydanticValueError):
    code = "name"
    msg_template = "the name {reason}"


def not_ahead_of_this_clock(time: float) -> float:
    """A signed record's time, unless it is further ahead of this node's clock than MAX_CLOCK_SKEW (FromTheFuture)."""
    ahead = time - get_dht_time()
    if ahead > MAX_CLOCK_SKEW:
        raise FromTheFuture(ahead=ahead, skew=MAX_CLOCK_SKEW)
    return time


class ProgressRecord(pydantic.BaseModel):
    """One peer's report for one epoch (strict types: the DHT's schema validator refuses any conversion).

    Bounds (NaN and infinities fail them too) keep any sum of records finite and storable; `time` is checked
    against the clock of whoever validates, so the same record can pass on a node whose clock is ahead and be
    refused on one whose clock is right.
    """

    epoch: pydantic.conint(ge=0, le=MAX_COUNT, strict=True)
    samples_per_second: pydantic.confloat(ge=0.0, le=MAX_SAMPLES_PER_SECOND, strict=True)
    samples_accumulated: pydantic.conint(ge=0, le=MAX_COUNT, strict=True)
    loss_sum: pydantic.confloat(ge=0.0, le=MAX_MINI_STEP_LOSS * MAX_COUNT, strict=True)
    mini_steps: pydantic.conint(ge=0, le=MAX_COUNT, strict=True)
    device: pydantic.constr(max_length=64, strict=True)
    version: pydantic.constr(max_length=32, strict=True)
    time: pydantic.confloat(ge=0.0, le=MAX_COUNT, strict=True)
    model_hash: pydantic.constr(max_length=64, strict=True)
    # 0: a peer older than the protocol field (its record has none), so that it still parses and is refused by name
    protocol: pydantic.conint(ge=0, le=2**31, strict=True) = 0
    # display only (peer/swarm/names.py); "" when the peer gave no --name
    name: pydantic.constr(max_length=MAX_NAME_CHARS, strict=True) = ""
    # what the peer contributed over its whole life under this signing key, across restarts (peer/contribution.py):
    # the monitor keeps the largest total it has read, so a record it missed loses nothing
    samples_total: pydantic.conint(ge=0, le=MAX_COUNT, strict=True) = 0
    compute_seconds_total: pydantic.confloat(ge=0.0, le=MAX_COUNT, strict=True) = 0.0

    @pydantic.validator("name")
    def printable_name(cls, name: str) -> str:
        reason = why_unprintable(name)
        if reason is not None:
            raise UnprintableName(reason=reason)
        return name

    not_from_the_future = pydantic.validator("time", allow_reuse=True)(not_ahead_of_this_clock)

    @pydantic.root_validator(skip_on_failure=True)
    def plausible_loss(cls, values: dict) -> dict:
        if values["loss_sum"] > MAX_MINI_STEP_LOSS * values["mini_steps"]:
            raise LossOutOfRange(
                loss_sum=values["loss_sum"], limit=MAX_MINI_STEP_LOSS, mini_steps=values["mini_steps"]
            )
        return values

    def dict(self, **kwargs) -> dict:
        # hivemind's SchemaValidator refuses a record whose parsed form differs from what was sent ("no conversion").
        # An older peer sends no `protocol`: leaving the default 0 out lets its record through the DHT, so the
        # monitor can refuse it by name (another protocol version) instead of as a malformed record. The same holds
        # for every field of OMITTED_AT_DEFAULT.
        values = super().dict(**kwargs)
        for name in OMITTED_AT_DEFAULT:
            if name in values and values[name] == self.__fields__[name].default:
                del values[name]
        return values

    @property
    def mean_loss(self) -> float | None:
        return self.loss_sum / self.mini_steps if self.mini_steps else None


class ProgressSchema(pydantic.BaseModel):
    """DHT schema: the key ``{run_id}_progress_records`` maps each owner's public key (the subkey) to its ProgressRecord."""

    progress_records: dict[BytesWithPublicKey, ProgressRecord]  # the field name makes the key: PROGRESS_FIELD


class RecordSizeValidator(RecordValidatorBase):
    """Refuses records above ``max_bytes`` under the given DHT keys, so a peer cannot flood the progress key.

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


def refusal_reason(error: pydantic.ValidationError) -> str:
    """Why a record failed ProgressRecord: "schema" (shape or types), "future" (time ahead) or "range" (a number)."""
    kinds = [item["type"] for item in error.errors()]
    if not all(kind.startswith("value_error.") for kind in kinds):
        return "schema"
    if "value_error.future" in kinds:
        return "future"
    return "range" if all(kind.startswith("value_error.number.") for kind in kinds) else "schema"


def schema_refusal_reason(record: DHTRecord) -> str:
    """Why the schema validator refused a DHT record: "range", "future", or "schema" for anything else."""
    try:
        value = MSGPackSerializer.loads(record.value)
    except Exception:  # noqa: BLE001 (msgpack raises many kinds): not even msgpack, nothing more to tell
        return "schema"
    if not isinstance(value, dict):
        return "schema"
    try:
        ProgressRecord.parse_obj(value)
    except pydantic.ValidationError as error:
        return refusal_reason(error)
    return "schema"  # it parses alone, so the validator refused a type conversion or another key's record


class RejectedRecords:
    """Counts the records a node refused, by reason.

    The DHT's validators count signature, size and schema refusals (schema ones split into "range" and "future"
    when a number or the time is out of bounds); the monitor's reader adds "too_many" (subkeys over the per-read
    cap). (Records refused while aggregating, e.g. an "epoch" nobody vouches for, are counted by the aggregation.)
    The counts live in shared memory: create this before the DHT starts, and the DHT's own process (a fork of this
    one) counts into it while this process reads it.
    """

    REASONS = ("signature", "size", "schema", "range", "future", "too_many", "other")

    def __init__(self):
        self._counts = multiprocessing.Array("q", len(self.REASONS))
        self._taken = [0] * len(self.REASONS)

    def add(self, reason: str, count: int = 1) -> None:
        with self._counts.get_lock():
            self._counts[self.REASONS.index(reason)] += count

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
            self.rejected.add(schema_refusal_reason(record) if self.reason == "schema" else self.reason)
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


def progress_key(run_id: str) -> str:
    """The DHT key holding every peer's progress record of a run."""
    return f"{run_id}_{PROGRESS_FIELD}"


def make_validators(run_id: str, private_key: RSAPrivateKey | None = None) -> list[RecordValidatorBase]:
    """Validators for the run's progress key: schema, size limit and signatures.

    Records are signed with ``private_key``, by default this process's RSA key (the one hivemind's ProgressTracker
    signs with too: a DHT keeps a single signature validator, the first one given).
    """
    return [
        SchemaValidator(ProgressSchema, prefix=run_id),
        RecordSizeValidator([progress_key(run_id)]),
        RSASignatureValidator(private_key),
    ]


def peer_label(owner: bytes) -> str:
    """A short stable name for a record's owner (its subkey, the signing public key): how every node names a peer."""
    return "key-" + hashlib.sha256(owner).hexdigest()[:12]


def local_public_key(private_key: RSAPrivateKey | None = None) -> bytes:
    """The subkey a record signed by ``private_key`` (default: this process's key) is stored under."""
    return RSASignatureValidator(private_key).local_public_key


def publish_progress(
    dht: DHT,
    run_id: str,
    progress: ProgressRecord,
    expiration: float,
    wait: bool = True,
    private_key: RSAPrivateKey | None = None,
    elsewhere: bool = False,
):
    """Store this peer's record, signed, expiring ``expiration`` seconds from now.

    Returns whether it was stored, or (``wait=False``) a future of that. With ``elsewhere``, "stored" means stored
    on another node: the last record of a leaving peer is lost with it if only its own node holds it (hivemind
    counts a store on the storing node itself as a success).
    """
    return dht.store(
        key=progress_key(run_id),
        subkey=local_public_key(private_key),
        value=progress.dict(),
        expiration_time=get_dht_time() + expiration,
        return_future=not wait,
        exclude_self=elsewhere,
    )


def fetch_progress(
    dht: DHT,
    run_id: str,
    rejected: RejectedRecords | None = None,
    limit: int | None = None,
    first: Callable[[bytes], bool] | None = None,
) -> dict[bytes, ProgressRecord]:
    """All unexpired, valid progress records of the run, keyed by their owner's public key (fetch_signed_records)."""
    return fetch_signed_records(dht, progress_key(run_id), ProgressRecord, rejected, limit, first)


def fetch_signed_records(
    dht: DHT,
    key: str,
    schema: type[RecordT],
    rejected: RejectedRecords | None = None,
    limit: int | None = None,
    first: Callable[[bytes], bool] | None = None,
) -> dict[bytes, RecordT]:
    """All unexpired records under ``key`` (one subkey per owner's public key) that parse as ``schema``.

    A record that reaches this reader but does not parse is skipped and counted in `rejected` by reason, like the
    records the DHT's validators refused. That happens when the node that served it validated it against another
    schema or clock (a record stored on its author's own node is checked by nobody else; one dated within the skew
    of the storing node's clock can be beyond the skew of ours), so every record is re-checked here.
    With `limit`, at most that many subkeys are parsed (the owners `first` picks, e.g. known peers, before others);
    the rest are counted as "too_many", so a flood of keys costs a bounded amount of work per read.
    """
    found = dht.get(key, latest=True)
    if not isinstance(found, ValueWithExpiration) or not isinstance(found.value, dict):
        return {}
    entries = list(found.value.items())
    if first is not None:
        entries.sort(key=lambda item: not first(item[0]))
    if limit is not None and len(entries) > limit:
        if rejected is not None:
            rejected.add("too_many", len(entries) - limit)
        entries = entries[:limit]
    records = {}
    for owner, entry in entries:
        try:
            records[owner] = schema.parse_obj(entry.value)
        except pydantic.ValidationError as error:
            if rejected is not None:
                rejected.add(refusal_reason(error))
        except (AttributeError, TypeError):
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
