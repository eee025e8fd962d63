"""Unpack a downloaded checkpoint archive that may have been crafted by an attacker.

Only an uncompressed tar of regular files and directories under one top-level directory is accepted: no links,
devices or FIFOs, no absolute path or `..`, no name twice, and no more bytes than the caller allows (a compressed
archive is refused by its magic bytes before anything is decompressed, so a gzip bomb never expands). Files are
written by this module, not by `tarfile.extract`, so no member can set modes, owners or times or follow a link.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path, PurePosixPath

CHUNK = 1 << 20
# Magic bytes of compressed formats tarfile could otherwise open transparently (or that a server might send).
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class UnsafeArchive(ValueError):
    """The archive is not a plain tar of one checkpoint directory within the size limit."""


def compression_of(path: Path) -> str | None:
    with open(path, "rb") as file:
        head = file.read(8)
    return next((name for magic, name in COMPRESSED.items() if head.startswith(magic)), None)


def extract_checkpoint(archive: Path, destination: Path, max_size: int) -> Path:
    """Unpack `archive` into the empty directory `destination`; the one top-level directory it held.

    Raises UnsafeArchive naming the first problem (the caller removes `destination`).
    """
    compression = compression_of(archive)
    if compression:
        raise UnsafeArchive(f"the archive is {compression}-compressed; only an uncompressed tar is accepted")
    try:
        with tarfile.open(archive, "r:") as tar:
            members = tar.getmembers()  # reads every header first: nothing is written before all are checked
            top = _check_members(members, max_size)
            for member in members:
                _write_member(tar, member, destination, max_size)
    except tarfile.TarError as error:
        raise UnsafeArchive(f"the archive is not a readable tar: {error}") from error
    return destination / top


def _check_members(members: list[tarfile.TarInfo], max_size: int) -> str:
    if not members:
        raise UnsafeArchive("the archive is empty")
    names, tops, total = set(), set(), 0
    for member in members:
        path = PurePosixPath(member.name)
        if not (member.isreg() or member.isdir()):
            raise UnsafeArchive(f"archive member {member.name!r} is a {_kind(member)}; only files and directories")
        if path.is_absolute() or ".." in path.parts or "\\" in member.name or "\0" in member.name:
            raise UnsafeArchive(f"archive member {member.name!r} points outside the checkpoint directory")
        if not path.parts or path.parts[0] in ("", "."):
            raise UnsafeArchive(f"archive member {member.name!r} is not inside a checkpoint directory")
        if path.as_posix() in names:
            raise UnsafeArchive(f"archive member {member.name!r} appears twice")
        names.add(path.as_posix())
        tops.add(path.parts[0])
        total += member.size if member.isreg() else 0
        if total > max_size:
            raise UnsafeArchive(f"the archive unpacks to more than {max_size} bytes (the size limit)")
    if len(tops) != 1:
        raise UnsafeArchive(f"the archive should hold one checkpoint directory, found {len(tops)}: {sorted(tops)[:5]}")
    return tops.pop()


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"hard link to {member.linkname!r}"
    return "device, FIFO or other special member"


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, destination: Path, max_size: int) -> None:
    target = destination.joinpath(*PurePosixPath(member.name).parts)
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    # O_EXCL | O_NOFOLLOW: a name created twice or a link planted in between cannot redirect the write
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    written = 0
    with os.fdopen(descriptor, "wb") as file:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > member.size or written > max_size:
                raise UnsafeArchive(f"archive member {member.name!r} holds more bytes than its header says")
            file.write(chunk)
