"""Versioned checkpoints on disk: atomic writes, a manifest of sha256 sums, one archive per checkpoint, retention.

Layout under the checkpoint dir: `epoch-000012/` (a save_pretrained model, the tokenizer, `training_state.pt`,
`manifest.json`, `manifest.sig`) and `epoch-000012.tar`, the same directory as one archive for download. Both are
written under a temporary name and renamed into place; nothing is listed or served unless every file matches its
recorded sum and the manifest carries the run key's signature.

The manifest names the run key (public hex), the protocol version and the sha256 of the model code shipped with the
weights (`configuration.py`, `modeling.py`, which `from_pretrained(trust_remote_code=True)` executes); `manifest.sig`
is the hex Ed25519 signature of the exact bytes of `manifest.json`. A downloader that trusts the run key's
fingerprint can thus check every byte it received, whoever served it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from monitor.history import CheckpointEntry, History
from peer.swarm.config import OptimConfig
from peer.swarm.manifest import sha256_file
from peer.swarm.run_key import RunKey, verify_signature
from peer.swarm.run_record import PROTOCOL_VERSION

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
TRAINING_STATE = "training_state.pt"
# The model code save_pretrained copies byte for byte next to the weights (modeling.py and its relative import).
CODE_FILES = ("configuration.py", "modeling.py")


class CheckpointNotFound(LookupError):
    """No verified checkpoint matches the request."""


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:06d}"


def epochs_to_keep(epochs: Iterable[int], keep: int, keep_every: int, newest_good: int | None = None) -> set[int]:
    """Retention: the newest `keep` epochs plus every epoch divisible by `keep_every` (0 disables the latter), and
    always `newest_good` (the newest verified checkpoint), whatever is damaged or newer."""
    epochs = sorted(set(epochs), reverse=True)
    kept = set(epochs[: max(keep, 0)])
    if keep_every > 0:
        kept |= {epoch for epoch in epochs if epoch % keep_every == 0}
    if newest_good is not None:
        kept.add(newest_good)
    return kept


def project_code_sha256() -> dict[str, str]:
    """The sha256 of this project's model code files, as save_pretrained writes them into a checkpoint."""
    package = Path(importlib.util.find_spec("model").origin).parent  # found, not imported: torch is slow to load
    return {name: sha256_file(package / name) for name in CODE_FILES}


def code_version(code: dict[str, str]) -> str:
    """A short name for one version of the model code (its files' sums), for messages that compare two."""
    return hashlib.sha256(json.dumps(code, sort_keys=True).encode()).hexdigest()[:12]


def checkpoint_mode(optim: OptimConfig, epoch: int) -> dict:
    """What a checkpoint's manifest says of the mode: its name, and in local-steps mode H and the outer step."""
    if optim.local_steps:
        return {"training_mode": optim.training_mode, "local_steps": optim.local_steps, "outer_step": epoch}
    return {"training_mode": optim.training_mode}


def write_manifest(directory: Path, run_key: RunKey | None = None, **fields) -> dict:
    """Record the size and sha256 of every file under `directory` (manifest and signature excluded); sign it."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (MANIFEST, SIGNATURE)):
        files[path.relative_to(directory).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    code = {name: files[name]["sha256"] for name in CODE_FILES if name in files}
    signer = {} if run_key is None else {"run_key": run_key.public_hex}  # named before signing: written once
    manifest = {"format": 1, "protocol": PROTOCOL_VERSION, **fields, **signer, "model_code": code, "files": files}
    (directory / SIGNATURE).unlink(missing_ok=True)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    if run_key is not None:
        sign_manifest(directory, run_key)
    return manifest


def sign_manifest(directory: Path, run_key: RunKey) -> None:
    """Name the run key in the manifest (rewriting it if it names none or another) and write `manifest.sig`."""
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest.get("run_key") != run_key.public_hex:
        manifest["run_key"] = run_key.public_hex
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    (directory / SIGNATURE).write_text(run_key.sign((directory / MANIFEST).read_bytes()) + "\n")


def signature_problem(directory: Path, public_hex: str) -> str | None:
    """None if `manifest.sig` is the signature of `manifest.json` by the run key `public_hex`, else the problem."""
    try:
        manifest_bytes, signature = (directory / MANIFEST).read_bytes(), (directory / SIGNATURE).read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        return f"{directory} holds no readable {SIGNATURE}: {error}"
    if not verify_signature(public_hex, manifest_bytes, signature):
        return f"{SIGNATURE} in {directory} is not a valid signature of {MANIFEST} by the run key"
    return None


def verify_directory(directory: Path) -> str | None:
    """None if every file listed in the manifest is present with its recorded size and sha256, else the problem."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable {MANIFEST} in {directory}: {error}"
    try:
        for relative, expected in files.items():
            path = directory / relative
            if ".." in Path(relative).parts or Path(relative).is_absolute():
                return f"{MANIFEST} in {directory} lists {relative!r}, outside the checkpoint"
            if not path.is_file() or path.stat().st_size != expected["size"]:
                return f"{path} is missing or has the wrong size"
            if sha256_file(path) != expected["sha256"]:
                return f"{path} does not match its sha256 in {MANIFEST}"
    except (AttributeError, KeyError, TypeError) as error:
        return f"malformed {MANIFEST} in {directory}: {error!r}"
    return None


def write_archive(directory: Path, archive: Path) -> str:
    """Tar `directory` (files sorted, fixed owners and times, so equal contents give an equal archive); sha256."""
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(directory.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=f"{directory.name}/{path.relative_to(directory).as_posix()}")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if path.is_file():
                with open(path, "rb") as file:
                    tar.addfile(info, file)
            else:
                tar.addfile(info)
    _fsync(archive)
    return sha256_file(archive)


def _fsync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


class CheckpointStore:
    """Writes, verifies, lists and prunes the checkpoints of one run.

    Args:
        root: the checkpoint directory (created if missing).
        history: the SQLite index that remembers each checkpoint's archive sum across restarts.
        keep: how many of the newest checkpoints to keep.
        keep_every: additionally keep every checkpoint whose epoch is a multiple of this (0: none).
        run_key: the run key that signs every manifest; without one, checkpoints are unsigned (and downloaders,
            which require a signature, refuse them).
    """

    def __init__(
        self, root: str | Path, history: History, keep: int = 3, keep_every: int = 0, run_key: RunKey | None = None
    ):
        self.root, self.history, self.keep, self.keep_every = Path(root), history, keep, keep_every
        self.run_key = run_key
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._verified: dict[int, tuple | None] = {}  # epoch -> signature that last verified, None if damaged
        self.corrupted = 0  # checkpoints found damaged since start (exported as a metric)

    def write(self, epoch: int, fill: Callable[[Path], None], **manifest_fields) -> CheckpointEntry:
        """Create checkpoint `epoch`: `fill(tmpdir)` writes the files, then manifest, rename, archive, index."""
        with self._write_lock:
            name = checkpoint_name(epoch)
            tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
            try:
                fill(tmp_dir)
                created_at = time.time()
                write_manifest(tmp_dir, self.run_key, epoch=epoch, created_at=created_at, **manifest_fields)
                for path in tmp_dir.rglob("*"):
                    if path.is_file():
                        _fsync(path)
                final_dir = self.root / name
                self._discard(epoch)
                os.rename(tmp_dir, final_dir)
            except BaseException:
                shutil.rmtree(tmp_dir, ignore_errors=True)
                raise
            entry = self._archive_and_index(final_dir, epoch, created_at, manifest_fields)
            self._prune()
            return entry

    def _archive_and_index(self, directory: Path, epoch: int, created_at: float, fields: dict) -> CheckpointEntry:
        tmp_archive = self.root / f".tmp-{directory.name}.tar"
        sha256 = write_archive(directory, tmp_archive)
        archive = self.root / f"{directory.name}.tar"
        os.replace(tmp_archive, archive)
        entry = CheckpointEntry(
            epoch=epoch,
            name=directory.name,
            archive_sha256=sha256,
            archive_size=archive.stat().st_size,
            created_at=created_at,
            loss=fields.get("loss"),
            samples_total=int(fields.get("samples_total") or 0),
        )
        self.history.add_checkpoint(entry)
        self._verified[epoch] = self._signature(entry)
        logger.info(f"Checkpoint of epoch {epoch} written to {directory} (archive sha256 {sha256})")
        return entry

    def _discard(self, epoch: int) -> None:
        self.history.remove_checkpoint(epoch)
        self._verified.pop(epoch, None)
        name = checkpoint_name(epoch)
        (self.root / f"{name}.tar").unlink(missing_ok=True)
        shutil.rmtree(self.root / name, ignore_errors=True)

    def _prune(self) -> None:
        entries = self.history.checkpoints()
        indexed = [entry.epoch for entry in entries]
        # damaged checkpoints still count as the newest `keep`: without this, they (or newer epochs of a restarted
        # run) could push out the last checkpoint anyone can resume from
        newest_good = next((entry.epoch for entry in entries if self.is_valid(entry)), None)
        for epoch in set(indexed) - epochs_to_keep(indexed, self.keep, self.keep_every, newest_good):
            logger.info(f"Removing checkpoint of epoch {epoch} (retention: keep {self.keep}, every {self.keep_every})")
            self._discard(epoch)

    def reconcile(self) -> None:
        """On start, drop leftovers of interrupted writes, forget vanished checkpoints, index complete new ones.

        Complete checkpoints that are unsigned, or signed by another key, are signed with the run key (and their
        archive rebuilt): the monitor trusts its own disk, as it does when it resumes from it. They are checkpoints
        of an older version without signatures, or of a run dir whose key was replaced.
        """
        with self._write_lock:
            for leftover in self.root.glob(".tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
            indexed = {entry.epoch: entry for entry in self.history.checkpoints()}
            for epoch, entry in list(indexed.items()):
                if not (self.root / entry.name).is_dir():
                    self.history.remove_checkpoint(epoch)
                elif self._signed_anew(self.root / entry.name):
                    indexed.pop(epoch)  # its archive no longer matches the index: rebuilt below
            for directory in sorted(self.root.glob("epoch-*")):
                if not directory.is_dir() or not directory.name[6:].isdigit() or int(directory.name[6:]) in indexed:
                    continue
                problem = verify_directory(directory)
                if problem:  # a rename that happened but whose manifest is damaged: leave it for a human
                    logger.warning(f"Not indexing {directory}: {problem}")
                    continue
                self._signed_anew(directory)
                manifest = json.loads((directory / MANIFEST).read_text())
                self._archive_and_index(directory, int(directory.name[6:]), manifest.get("created_at", 0.0), manifest)

    def _signed_anew(self, directory: Path) -> bool:
        """Sign an intact checkpoint whose manifest lacks a valid signature by the run key; True if it was signed."""
        if self.run_key is None or signature_problem(directory, self.run_key.public_hex) is None:
            return False
        if verify_directory(directory) is not None:  # damaged: never vouch for it, leave it for a human
            return False
        sign_manifest(directory, self.run_key)
        logger.info(f"Signed the manifest of {directory} with the run key {self.run_key.fingerprint[:16]}...")
        return True

    def _signature(self, entry: CheckpointEntry) -> tuple:
        """Sizes and modification times of every file: re-hashing happens only when this changes."""
        paths = [self.root / f"{entry.name}.tar", *sorted((self.root / entry.name).rglob("*"))]
        return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.exists())

    def is_valid(self, entry: CheckpointEntry) -> bool:
        """Full verification (archive sum and every file's sum), cached until a file changes."""
        try:
            signature = self._signature(entry)
            if self._verified.get(entry.epoch) == signature:
                return True
            problem = self._find_problem(entry)
        except OSError as error:  # pruned or replaced while being checked
            problem = str(error)
        if problem:
            if self._verified.get(entry.epoch, ()) is not None:  # count each damaged checkpoint once
                self.corrupted += 1
                logger.error(f"Checkpoint of epoch {entry.epoch} is corrupted and will not be served: {problem}")
            self._verified[entry.epoch] = None
            return False
        self._verified[entry.epoch] = signature
        return True

    def _find_problem(self, entry: CheckpointEntry) -> str | None:
        problem = verify_directory(self.root / entry.name)
        if problem is None and self.run_key is not None:
            problem = signature_problem(self.root / entry.name, self.run_key.public_hex)
        archive = self.root / f"{entry.name}.tar"
        if problem is None and not archive.is_file():
            problem = f"{archive} is missing"
        if problem is None and (
            archive.stat().st_size != entry.archive_size or sha256_file(archive) != entry.archive_sha256
        ):
            problem = f"{archive} does not match its recorded size and sha256"
        return problem

    def list(self) -> list[CheckpointEntry]:
        """Verified checkpoints, newest first."""
        return [entry for entry in self.history.checkpoints() if self.is_valid(entry)]

    def get(self, epoch: int | None = None) -> tuple[CheckpointEntry, Path]:
        """The verified checkpoint of `epoch` (newest if None) and its archive path, or CheckpointNotFound."""
        for entry in self.list():
            if epoch is None or entry.epoch == epoch:
                return entry, self.root / f"{entry.name}.tar"
        raise CheckpointNotFound(
            f"no verified checkpoint for epoch {epoch}" if epoch is not None else "no checkpoint yet"
        )

    def directory(self, entry: CheckpointEntry) -> Path:
        return self.root / entry.name
