"""Turn a corpus name (file, directory, glob or hub dataset) into a deterministic stream of unique documents.

Everything is read through `datasets` in streaming mode, so nothing is cached on disk and a 300 GB corpus works.
"""

import glob
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets

logger = logging.getLogger(__name__)

BUNDLED_CORPUS = str(Path(__file__).resolve().parent / "corpus")

_BUILDER_BY_SUFFIX = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst", ".lz4"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SHUFFLE_BUFFER = 10_000  # documents; holds the whole bundled corpus, so its per-peer order is a full permutation
HELD_OUT_EVERY = 100  # one document in this many (chosen by a hash of its text) is reserved for evaluation
SPLITS = ("all", "train", "held_out")


class CorpusError(ValueError):
    """A corpus that cannot be read: missing, empty, mixed formats, not UTF-8, or without the text column."""


@dataclass(frozen=True)
class CorpusSource:
    """Where documents come from: a `datasets` builder over local files, or a hub dataset name.

    Args:
        spec: the corpus as the user named it (for messages).
        builder: `datasets` builder name ("text", "json", "parquet", "csv") or the hub dataset name.
        data_files: the local files, empty for a hub dataset.
        text_column: the column that holds document text ("text" for plain-text files).
    """

    spec: str
    builder: str
    data_files: tuple[str, ...]
    text_column: str = "text"

    @property
    def is_local(self) -> bool:
        return bool(self.data_files)


def resolve_corpus(spec: str | None, text_column: str = "text") -> CorpusSource:
    """Find the files behind `spec` (None means the bundled corpus) and the builder that reads them."""
    spec = str(spec) if spec else BUNDLED_CORPUS  # "" from an unset config field means the default too
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _builder_for(p) and not _is_hidden(p, path))
        if not files:
            raise CorpusError(f"corpus directory {spec} holds no readable files ({_supported_suffixes()})")
        files = _dominant_format(spec, files)
    elif glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise CorpusError(f"corpus pattern {spec} matches no file")
    elif _HUB_NAME.match(spec) and not _builder_for(path):
        return CorpusSource(spec, builder=spec, data_files=(), text_column=text_column)
    else:
        raise CorpusError(f"corpus {spec} does not exist (expected a file, a directory, a glob or a dataset name)")
    return _local_source(spec, files, text_column)


def _local_source(spec: str, files: list[Path], text_column: str) -> CorpusSource:
    builders = {_builder_for(p) for p in files}
    if None in builders:
        unknown = next(p for p in files if _builder_for(p) is None)
        raise CorpusError(f"cannot tell the format of {unknown}: use one of {_supported_suffixes()}")
    if len(builders) > 1:
        raise CorpusError(f"corpus {spec} mixes formats {sorted(builders)}; point at files of one format")
    if all(p.stat().st_size == 0 for p in files):
        raise CorpusError(f"corpus {spec} is empty ({len(files)} empty file(s))")
    builder = builders.pop()
    return CorpusSource(spec, builder, tuple(str(p) for p in files), "text" if builder == "text" else text_column)


def _dominant_format(spec: str, files: list[Path]) -> list[Path]:
    """In a directory that mixes formats (texts beside an info.csv), keep the format holding the most bytes."""
    size_by_builder: dict[str, int] = {}
    for path in files:
        size_by_builder[_builder_for(path)] = size_by_builder.get(_builder_for(path), 0) + path.stat().st_size
    chosen = max(size_by_builder, key=size_by_builder.get)
    kept = [p for p in files if _builder_for(p) == chosen]
    if len(kept) < len(files):
        ignored = [p for p in files if _builder_for(p) != chosen]
        logger.warning(
            "corpus directory %s: reading its %d %s file(s), ignoring %d other file(s) such as %s",
            spec,
            len(kept),
            chosen,
            len(ignored),
            ignored[0],
        )
    return kept


def _builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    return _BUILDER_BY_SUFFIX.get(suffixes[-1]) if suffixes else None


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _supported_suffixes() -> str:
    return " ".join(sorted(_BUILDER_BY_SUFFIX)) + ", optionally compressed"


def load_stream(source: CorpusSource, seed: int) -> datasets.IterableDataset:
    """A streaming dataset of the source, its file order and a buffer of documents shuffled by `seed`."""
    try:
        if source.is_local:
            stream = datasets.load_dataset(
                source.builder, data_files=list(source.data_files), split="train", streaming=True
            )
        else:
            stream = datasets.load_dataset(source.builder, split="train", streaming=True)
    except Exception as error:  # datasets raises many types (FileNotFound, ConnectionError, DatasetNotFound...)
        raise CorpusError(f"cannot open corpus {source.spec}: {error}") from error
    if stream.column_names is not None and source.text_column not in stream.column_names:
        raise CorpusError(
            f"corpus {source.spec} has no column {source.text_column!r} "
            f"(columns: {', '.join(stream.column_names)}); pass text_column=/--text-column"
        )
    return stream.shuffle(seed=seed, buffer_size=_SHUFFLE_BUFFER)


class DocumentStats:
    """Counts of what the document stream skipped, for the log and for tests."""

    def __init__(self) -> None:
        self.documents = 0
        self.empty = 0
        self.duplicates = 0
        self.other_split = 0


def is_held_out(digest: bytes) -> bool:
    """Whether a document (by the blake2b digest of its text) belongs to the held-out evaluation slice.

    A pure function of the text, so every peer, every pass and every evaluation agree on the slice.
    """
    return int.from_bytes(digest[:4], "little") % HELD_OUT_EVERY == 0


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")


def iter_documents(
    source: CorpusSource, stream: datasets.IterableDataset, stats: DocumentStats, split: str = "all"
) -> Iterator[str]:
    """One pass over `stream`: stripped, non-empty documents, each distinct text yielded once.

    `split` keeps every document ("all"), all but the held-out slice ("train"), or only that slice ("held_out").
    """
    check_split(split)
    seen: set[bytes] = set()
    rows = iter(stream)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except UnicodeDecodeError as error:
            raise CorpusError(_describe_bad_utf8(source, error)) from error
        except Exception as error:  # a broken json/parquet file surfaces here as a pyarrow or datasets error
            raise CorpusError(f"cannot read corpus {source.spec}: {type(error).__name__}: {error}") from error
        if source.text_column not in row:
            raise CorpusError(
                f"corpus {source.spec} has no column {source.text_column!r} "
                f"(columns: {', '.join(row)}); pass text_column=/--text-column"
            )
        text = row[source.text_column]
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            stats.empty += 1
            continue
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in seen:
            stats.duplicates += 1
            continue
        seen.add(digest)
        if split != "all" and is_held_out(digest) != (split == "held_out"):
            stats.other_split += 1
            continue
        stats.documents += 1
        yield text


def _describe_bad_utf8(source: CorpusSource, error: UnicodeDecodeError) -> str:
    """Name the first local file that is not UTF-8 and the byte offset where decoding fails."""
    for name in source.data_files:
        offset = first_invalid_utf8_offset(Path(name))
        if offset is not None:
            return f"{name} is not UTF-8 text: invalid byte at offset {offset}; convert it (e.g. with iconv)"
    return f"corpus {source.spec} is not UTF-8 text: {error}"


def first_invalid_utf8_offset(path: Path, chunk_size: int = 1 << 20) -> int | None:
    """Byte offset of the first invalid UTF-8 sequence in an uncompressed file, or None when it all decodes."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed = 0
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_size)
            pending = decoder.getstate()[0]  # an incomplete sequence carried over from the previous chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                return consumed - len(pending) + error.start
            if not chunk:
                return None
            consumed += len(chunk)
