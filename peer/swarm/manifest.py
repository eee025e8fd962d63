"""The run manifest: everything a run agrees on, signed by the run key, which a peer given `--join` adopts.

The monitor builds it (model, tokenizer files by sha256, corpus spec, every OptimConfig field, training mode,
protocol) and serves it over hivemind's p2p (peer/swarm/manifest_protocol.py); a peer verifies the signature against
the fingerprint in its join string before trusting a byte of it. OptimConfig is serialized field by field from the
dataclass, so a field added to it is carried without editing this module; each setting says its scope:

- ``run-wide``: every peer must use the run's value; a local flag or variable that differs is refused;
- ``per-peer``: the peer's own choice (bandwidth, host memory offload, batch size, device, ...);
- ``run-default``: the run's value unless the peer points at its own copy (the corpus).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from peer.swarm.config import OptimConfig
from peer.swarm.flags import field_scope
from peer.swarm.progress import PROTOCOL_VERSION
from peer.swarm.run_key import RunKey, fingerprint_of, verify_signature

FORMAT = 1
TRAINING_MODES = ("synchronous", "local-steps")  # the modes this peer can train in (OptimConfig.training_mode)
MAX_MANIFEST_BYTES = 256 * 1024
MAX_TOKENIZER_FILES = 32
MAX_TOKENIZER_FILE_BYTES = 64 * 1024 * 1024


class ManifestError(ValueError):
    """A manifest that must not be used: unsigned, signed by another key, of another run, or malformed."""


def canonical(value) -> bytes:
    """The bytes a signature covers: JSON with sorted keys and no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in blocks (tokenizer files here, checkpoint files in monitor/checkpoint.py)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_listing(directory: str | Path) -> dict[str, dict]:
    """{file name: {"sha256", "size"}} of a tokenizer directory's plain files (hidden ones skipped)."""
    files = sorted(path for path in Path(directory).iterdir() if path.is_file() and not path.name.startswith("."))
    if len(files) > MAX_TOKENIZER_FILES:
        raise ValueError(f"tokenizer directory {directory} holds {len(files)} files, at most {MAX_TOKENIZER_FILES}")
    listing = {}
    for path in files:
        size = path.stat().st_size
        if size > MAX_TOKENIZER_FILE_BYTES:
            raise ValueError(f"tokenizer file {path} is {size} bytes, at most {MAX_TOKENIZER_FILE_BYTES}")
        listing[path.name] = {"sha256": sha256_file(path), "size": size}
    return listing


def optim_settings(optim: OptimConfig) -> dict:
    """Every OptimConfig field with its value and scope, straight from the dataclass."""
    return {
        item.name: {"value": getattr(optim, item.name), "scope": field_scope(OptimConfig, item.name)}
        for item in dataclasses.fields(OptimConfig)
    }


def build_manifest(
    run_id: str,
    optim: OptimConfig,
    model_name: str,
    model_config: dict | None,
    model_hash: str,
    tokenizer_dir: str | Path,
    corpus: str | None,
) -> dict:
    """The manifest of a run. `model_config` is the config.json content of a model that is not a preset."""
    return {
        "format": FORMAT,
        "run_id": run_id,
        "protocol": PROTOCOL_VERSION,
        "training_mode": optim.training_mode,
        "model": {"name": model_name, "config": model_config, "hash": model_hash, "scope": "run-wide"},
        "tokenizer": {"files": tokenizer_listing(tokenizer_dir), "scope": "run-wide"},
        "corpus": {"spec": corpus, "scope": "run-default"},
        "optim": optim_settings(optim),
    }


def sign_manifest(manifest: dict, key: RunKey) -> bytes:
    """The signed document served to peers: the manifest, the run key's public half and its signature."""
    return canonical({"manifest": manifest, "run_key": key.public_hex, "signature": key.sign(canonical(manifest))})


def verify_manifest(document: bytes, run_key_fingerprint: str, run_id: str) -> dict:
    """The manifest in `document` if signed by the run key of that fingerprint for that run; else ManifestError."""
    if len(document) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"the run manifest is {len(document)} bytes, at most {MAX_MANIFEST_BYTES}")
    try:
        signed = json.loads(document)
        manifest, public_hex, signature = signed["manifest"], signed["run_key"], signed["signature"]
        owner = fingerprint_of(public_hex)
    except (ValueError, TypeError, KeyError, RecursionError) as error:
        raise ManifestError(f"the run manifest is malformed ({error!r})") from error
    if owner != run_key_fingerprint:
        raise ManifestError(
            f"the run manifest is signed by run key {owner[:16]}..., not by {run_key_fingerprint[:16]}... of the join "
            "string: the initial peer is not this run's monitor"
        )
    if not isinstance(manifest, dict) or not verify_signature(public_hex, canonical(manifest), signature):
        raise ManifestError("the run manifest's signature is not valid: it was altered after the monitor signed it")
    check_manifest(manifest, run_id)
    return manifest


def check_manifest(manifest: dict, run_id: str) -> None:
    """A signed manifest this peer can follow: its format, run, protocol and the shape of what it reads."""
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"the run manifest is of format {manifest.get('format')!r}, this peer reads {FORMAT}")
    if manifest.get("run_id") != run_id:
        raise ManifestError(f"the run manifest is of run {manifest.get('run_id')!r}, the join string names {run_id!r}")
    if manifest.get("protocol") != PROTOCOL_VERSION:
        raise ManifestError(
            f"the run speaks protocol version {manifest.get('protocol')!r}, this peer speaks {PROTOCOL_VERSION}: "
            "install the albert-swarm version the organiser names"
        )
    if manifest.get("training_mode") not in TRAINING_MODES:
        raise ManifestError(
            f"the run trains in mode {manifest.get('training_mode')!r}, this peer knows {', '.join(TRAINING_MODES)}: "
            "install the albert-swarm version the organiser names"
        )
    try:
        files = manifest["tokenizer"]["files"]
        shapes_ok = isinstance(manifest["model"]["name"], str) and isinstance(manifest["optim"], dict)
        shapes_ok = shapes_ok and all(_plain_name(name) and _file_entry(entry) for name, entry in files.items())
    except (KeyError, TypeError, AttributeError):
        shapes_ok = False
    if not shapes_ok:
        raise ManifestError("the run manifest lacks a model, a tokenizer listing or optimizer settings")


def _plain_name(name: str) -> bool:
    # a file name of the monitor's listing becomes a path in this peer's cache: no directories, no "..", no hidden
    return isinstance(name, str) and 0 < len(name) <= 128 and "/" not in name and "\\" not in name and name[0] != "."


def _file_entry(entry) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and len(entry["sha256"]) == 64
        and isinstance(entry.get("size"), int)
        and 0 <= entry["size"] <= MAX_TOKENIZER_FILE_BYTES
    )
