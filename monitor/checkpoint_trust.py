"""Is an unpacked checkpoint the one the run's monitor signed, and does it bring only this project's model code?

A downloader trusts one thing: the run key fingerprint the organiser handed out (the monitor prints it at start).
Everything else came from the server and is checked against it: the manifest's signature by that key, every file's
sha256, no file outside the manifest. The model code (`configuration.py`, `modeling.py`), which
`from_pretrained(..., trust_remote_code=True)` executes, must moreover be byte-identical to this project's own, and
`auto_map` may name only those two modules: a checkpoint can never bring code of its own, even one the monitor signed
(its disk may have been tampered with, or it runs another version). Nothing here imports or executes a checkpoint
file; JSON is the only thing parsed.
"""

from __future__ import annotations

import json
from pathlib import Path

from monitor.checkpoint import (
    CODE_FILES,
    MANIFEST,
    SIGNATURE,
    code_version,
    project_code_sha256,
    signature_problem,
    verify_directory,
)
from peer.swarm.run_key import PUBLIC_HEX_CHARS, fingerprint_of
from peer.swarm.run_record import PROTOCOL_VERSION

CODE_MODULES = {name.removesuffix(".py") for name in CODE_FILES}


class UntrustedCheckpoint(ValueError):
    """The checkpoint is not signed by the trusted run key, does not match its manifest, or brings foreign code."""


def verify_checkpoint(directory: Path, trusted_fingerprint: str) -> dict:
    """The manifest of `directory` if it passes every check below, else UntrustedCheckpoint naming the first failure."""
    manifest = _signed_manifest(directory, trusted_fingerprint)
    problem = verify_directory(directory)
    if problem:
        raise UntrustedCheckpoint(f"checkpoint failed verification: {problem}")
    listed = set(manifest["files"]) | {MANIFEST, SIGNATURE}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if path.is_file() and relative not in listed:
            raise UntrustedCheckpoint(f"the checkpoint holds {relative}, which its signed {MANIFEST} does not list")
    _check_code(directory, manifest)
    return manifest


def _signed_manifest(directory: Path, trusted_fingerprint: str) -> dict:
    try:
        manifest = json.loads((directory / MANIFEST).read_bytes())
    except (OSError, ValueError) as error:
        raise UntrustedCheckpoint(f"the checkpoint has no readable {MANIFEST}: {error}") from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise UntrustedCheckpoint(f"{MANIFEST} of the checkpoint lists no files")
    public_hex = manifest.get("run_key")
    if not isinstance(public_hex, str) or len(public_hex) != PUBLIC_HEX_CHARS or not (directory / SIGNATURE).is_file():
        raise UntrustedCheckpoint(f"the checkpoint is not signed (no run key or no {SIGNATURE}): refusing it")
    try:
        fingerprint = fingerprint_of(public_hex)
    except ValueError as error:
        raise UntrustedCheckpoint(f"the run key in {MANIFEST} is not hex: {error}") from error
    if fingerprint != trusted_fingerprint:
        raise UntrustedCheckpoint(
            f"the checkpoint is signed by run key {fingerprint}, not by the trusted {trusted_fingerprint}"
        )
    problem = signature_problem(directory, public_hex)
    if problem:
        raise UntrustedCheckpoint(problem)
    if manifest.get("protocol") != PROTOCOL_VERSION:
        raise UntrustedCheckpoint(
            f"the checkpoint is of protocol version {manifest.get('protocol')}, this albert-swarm speaks "
            f"{PROTOCOL_VERSION}: use the albert-swarm version of the run"
        )
    return manifest


def _check_code(directory: Path, manifest: dict) -> None:
    """Only this project's model code, byte for byte, and auto_maps that name nothing else."""
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if path.suffix in (".py", ".pyc", ".so") and relative not in CODE_FILES:
            raise UntrustedCheckpoint(f"the checkpoint holds the code file {relative}; only {CODE_FILES} may ship")
    ours = project_code_sha256()
    shipped = {name: manifest["files"][name]["sha256"] for name in CODE_FILES if name in manifest["files"]}
    if manifest.get("model_code") != shipped or any(ours[name] != sha for name, sha in shipped.items()):
        raise UntrustedCheckpoint(
            f"the checkpoint's model code (version {code_version(shipped)}: {', '.join(sorted(shipped)) or 'none'}) "
            f"is not this albert-swarm's (version {code_version(ours)}): a checkpoint may not bring code of its own"
        )
    for path in sorted(directory.rglob("*.json")):
        _check_auto_map(path, directory)


def _check_auto_map(path: Path, directory: Path) -> None:
    """Every class an `auto_map` names (transformers imports it) must come from configuration.py or modeling.py."""
    try:
        content = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:
        raise UntrustedCheckpoint(f"{path.relative_to(directory)} is not valid JSON: {error}") from error
    auto_map = content.get("auto_map") if isinstance(content, dict) else None
    if auto_map is None:
        return
    references = []
    for value in auto_map.values() if isinstance(auto_map, dict) else [auto_map]:
        references += value if isinstance(value, list) else [value]
    for reference in references:
        if reference is None:
            continue  # a tokenizer's auto_map leaves the slow or fast class out with null
        module = reference.rsplit(".", 1)[0] if isinstance(reference, str) else None
        if module not in CODE_MODULES:
            raise UntrustedCheckpoint(
                f"auto_map in {path.relative_to(directory)} names {reference!r}: only classes of "
                f"{' and '.join(CODE_FILES)} may be loaded"
            )
