"""`MLMDataset`: an endless, per-peer deterministic stream of [CLS] ... [SEP] sequences packed from whole words.

Each example is `{"input_ids": [...], "word_ids": [...]}`, word ids counting words from 0 and -1 on special tokens.
"""

import bisect
import hashlib
import logging
from collections.abc import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from .sources import CorpusError, DocumentStats, check_split, iter_documents, load_stream, resolve_corpus

logger = logging.getLogger(__name__)

_TOKENIZE_BATCH = 64  # documents per call to the Rust tokenizer, which parallelises within a batch


def stream_seed(seed: int, peer_id: str, start_epoch: int = 0) -> int:
    """A 32-bit seed mixing the run seed, the peer identity and the joining epoch, stable across processes."""
    digest = hashlib.blake2b(f"{seed}:{peer_id}:{start_epoch}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class SequencePacker:
    """Packs tokenized documents into sequences of at most `max_length` tokens, never splitting a word.

    Documents are separated by [SEP] inside a sequence. A single word longer than a whole sequence is skipped and
    counted in `skipped_words`.

    Args:
        cls_id: id of [CLS], which opens every sequence.
        sep_id: id of [SEP], which closes every sequence and separates documents.
        max_length: the longest sequence, special tokens included; may be changed between documents (warm-up).
    """

    def __init__(self, cls_id: int, sep_id: int, max_length: int) -> None:
        self.cls_id, self.sep_id, self.max_length = cls_id, sep_id, max_length
        self.skipped_words = 0
        self._ids: list[int] = [cls_id]
        self._words: list[int] = [-1]
        self._next_word = 0

    def add_document(self, ids: list[int], word_ids: list[int | None]) -> Iterator[dict[str, list[int]]]:
        """Append one document; yields every sequence that it fills."""
        word_index, starts = _word_layout(word_ids)
        starts.append(len(ids))  # word k spans ids[starts[k]:starts[k + 1]]
        first = 0  # the first word not packed yet
        while first < len(starts) - 1:
            room = self.max_length - 1 - len(self._ids)  # keep one slot for the closing [SEP]
            last = bisect.bisect_right(starts, starts[first] + room) - 1  # words first..last-1 fit
            if last > first:
                begin, end = starts[first], starts[last]
                self._ids.extend(ids[begin:end])
                self._words.extend((word_index[begin:end] - word_index[begin] + self._next_word).tolist())
                self._next_word += last - first
                first = last
            elif len(self._ids) == 1:
                self.skipped_words += 1  # longer than any sequence: it can never be packed whole
                first += 1
            else:
                yield self._emit()
        if len(self._ids) > 1 and self._ids[-1] != self.sep_id:
            if len(self._ids) >= self.max_length - 1:
                yield self._emit()
            else:
                self._ids.append(self.sep_id)  # document boundary inside the sequence
                self._words.append(-1)

    @property
    def is_empty(self) -> bool:
        return len(self._ids) == 1

    def _emit(self) -> dict[str, list[int]]:
        ids, words = self._ids, self._words
        if ids[-1] != self.sep_id:
            ids.append(self.sep_id)
            words.append(-1)
        self._ids, self._words, self._next_word = [self.cls_id], [-1], 0
        return {"input_ids": ids, "word_ids": words}


def _word_layout(word_ids: list[int | None]) -> tuple[np.ndarray, list[int]]:
    """Per-token word index as an array, and the token position where each word starts."""
    index = np.fromiter((-1 if w is None else w for w in word_ids), dtype=np.int64, count=len(word_ids))
    if len(index) == 0:
        return index, []
    starts = np.flatnonzero(np.diff(index, prepend=index[0] - 1)).tolist()
    return index, starts


class MLMDataset(torch.utils.data.IterableDataset):
    """An endless stream of packed whole-word sequences from a corpus, shuffled per peer.

    The order is a pure function of (`seed`, `peer_id`, `start_epoch`): the same peer identity sees the same stream,
    another one sees a different file order and document order, and a peer that restarts at a later swarm epoch
    continues in a fresh order instead of replaying its first batches. Each pass over the corpus reshuffles.
    Give large corpora as many files: the file order is what differs most between peers.

    Args:
        corpus: file, directory, glob or `datasets` hub name; None for the bundled English + Russian corpus.
        tokenizer: a fast tokenizer with [CLS] and [SEP] (see `load_tokenizer`).
        max_length: tokens per sequence, [CLS] and [SEP] included.
        seed: the run seed.
        peer_id: this peer's identity; mixed into the shuffle seed.
        start_epoch: the swarm epoch at which the peer (re)joins; mixed into the shuffle seed.
        text_column: the column holding text in json/parquet/csv/hub corpora.
        warmup_sequences: over this many sequences the length grows linearly from `min_length` to `max_length`
            (short sequences first, as RuLeanALBERT trained); 0 disables the warm-up.
        min_length: the sequence length at the start of the warm-up.
        split: "all" documents, "train" (all but the held-out slice, what peers train on) or "held_out" (only the
            slice reserved for evaluation, one document in `sources.HELD_OUT_EVERY` chosen by a hash of its text).
    """

    def __init__(
        self,
        corpus: str | None,
        tokenizer: PreTrainedTokenizerFast,
        max_length: int = 128,
        seed: int = 0,
        peer_id: str = "",
        start_epoch: int = 0,
        text_column: str = "text",
        warmup_sequences: int = 0,
        min_length: int = 32,
        split: str = "all",
    ) -> None:
        super().__init__()
        check_split(split)
        if max_length < 4:
            raise ValueError(f"max_length={max_length} leaves no room for words between [CLS] and [SEP]")
        if warmup_sequences < 0 or (warmup_sequences > 0 and not 4 <= min_length <= max_length):
            raise ValueError(
                f"invalid warm-up: warmup_sequences={warmup_sequences}, min_length={min_length} "
                f"(must lie in [4, max_length={max_length}])"
            )
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ValueError("the tokenizer has no [CLS] or [SEP] token")
        self.source = resolve_corpus(corpus, text_column)
        self.tokenizer, self.max_length, self.seed, self.peer_id = tokenizer, max_length, seed, peer_id
        self.start_epoch = start_epoch
        self.warmup_sequences, self.min_length = warmup_sequences, min_length
        self.split = split
        self.stats = DocumentStats()
        self.skipped_words = 0

    def length_at(self, sequence_index: int) -> int:
        """The packing length for the `sequence_index`-th sequence of this iterator (warm-up schedule)."""
        if sequence_index >= self.warmup_sequences:
            return self.max_length
        grown = self.min_length + (self.max_length - self.min_length) * sequence_index / self.warmup_sequences
        return min(self.max_length, int(grown) // 8 * 8 or self.min_length)

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        stream = load_stream(self.source, stream_seed(self.seed, self.peer_id, self.start_epoch))
        self._check_workers(stream)
        encoder = _plain_encoder(self.tokenizer)
        packer = SequencePacker(self.tokenizer.cls_token_id, self.tokenizer.sep_token_id, self.length_at(0))
        emitted, corpus_pass = 0, 0
        while True:
            stream.set_epoch(corpus_pass)  # datasets' name for the pass number, which reseeds its shuffle
            self.stats = DocumentStats()
            for batch in _batched(iter_documents(self.source, stream, self.stats, self.split), _TOKENIZE_BATCH):
                for encoding in encoder.encode_batch(batch, add_special_tokens=False):
                    for example in packer.add_document(encoding.ids, encoding.word_ids):
                        yield example
                        emitted += 1
                        packer.max_length = self.length_at(emitted)
                self.skipped_words = packer.skipped_words
            self._end_of_pass(corpus_pass, emitted, packer)
            corpus_pass += 1

    def _end_of_pass(self, corpus_pass: int, emitted: int, packer: SequencePacker) -> None:
        stats = self.stats
        logger.info(
            "corpus %s pass %d: %d documents, %d empty and %d duplicate skipped, %d over-long words skipped",
            self.source.spec,
            corpus_pass,
            stats.documents,
            stats.empty,
            stats.duplicates,
            self.skipped_words,
        )
        if stats.documents == 0:
            raise CorpusError(
                f"corpus {self.source.spec} has no non-empty documents in split {self.split!r} "
                f"({stats.empty} empty, {stats.duplicates} duplicate, {stats.other_split} in the other split)"
            )
        if emitted == 0 and packer.is_empty:
            raise CorpusError(
                f"corpus {self.source.spec} yields no sequence: every word is longer than "
                f"max_length={self.max_length} tokens ({self.skipped_words} skipped)"
            )

    def _check_workers(self, stream) -> None:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.num_workers > stream.num_shards:
            # datasets gives each DataLoader worker whole files; a worker without one would wait forever.
            raise CorpusError(
                f"corpus {self.source.spec} has {stream.num_shards} file(s) but the DataLoader has "
                f"{worker.num_workers} workers: use at most {stream.num_shards} workers"
            )


EVALUATION_STREAM_SEED = 0  # the held-out order is fixed, so every evaluation scores the same token set


def held_out_sequences(
    corpus: str | None,
    tokenizer: PreTrainedTokenizerFast,
    max_length: int = 128,
    max_sequences: int = 256,
    text_column: str = "text",
) -> list[dict[str, list[int]]]:
    """The first `max_sequences` packed sequences of one pass over the corpus's held-out slice, in a fixed order.

    Fewer come back when the slice is smaller; a corpus whose slice yields none is a CorpusError.
    """
    source = resolve_corpus(corpus, text_column)
    stream = load_stream(source, EVALUATION_STREAM_SEED)
    packer = SequencePacker(tokenizer.cls_token_id, tokenizer.sep_token_id, max_length)
    stats, sequences = DocumentStats(), []
    encoder = _plain_encoder(tokenizer)
    for batch in _batched(iter_documents(source, stream, stats, "held_out"), _TOKENIZE_BATCH):
        for encoding in encoder.encode_batch(batch, add_special_tokens=False):
            sequences.extend(packer.add_document(encoding.ids, encoding.word_ids))
            if len(sequences) >= max_sequences:
                return sequences[:max_sequences]
    if not packer.is_empty:
        sequences.append(packer._emit())  # the last, partly filled one
    if not sequences:
        raise CorpusError(
            f"corpus {source.spec} has no held-out text ({stats.documents} held-out of "
            f"{stats.documents + stats.other_split} documents): give a larger corpus"
        )
    return sequences


def _plain_encoder(tokenizer: PreTrainedTokenizerFast) -> Tokenizer:
    """A copy of the Rust tokenizer without truncation or padding, so no token of a document is dropped."""
    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    encoder.no_truncation()
    encoder.no_padding()
    return encoder


def _batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
