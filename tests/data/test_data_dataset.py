"""MLMDataset and its packer: no token lost, no word split, per-peer deterministic streams, warm-up, bad input."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data import CorpusError, MLMDataset
from data.dataset import SequencePacker

CLS, SEP = 2, 3


def take(dataset, count):
    return list(itertools.islice(iter(dataset), count))


def check_sequence(sequence, max_length):
    ids, words = sequence["input_ids"], sequence["word_ids"]
    assert len(ids) == len(words) <= max_length
    assert ids[0] == CLS and ids[-1] == SEP and words[0] == words[-1] == -1
    real = [w for w in words if w >= 0]
    # Words are numbered 0, 1, 2... in order, each one contiguous.
    assert [w for w, _ in itertools.groupby(real)] == list(range(len(set(real))))


# A document is a list of words; a word is a list of token ids (>= 10, clear of the special ids).
word_strategy = st.lists(st.integers(10, 99), min_size=1, max_size=12)
documents_strategy = st.lists(st.lists(word_strategy, max_size=40), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(documents_strategy, st.integers(4, 40))
def test_packing_loses_no_token_and_never_splits_a_word(documents, max_length):
    packer = SequencePacker(CLS, SEP, max_length)
    sequences = []
    for document in documents:
        ids = [token for word in document for token in word]
        word_ids = [index for index, word in enumerate(document) for _ in word]
        sequences.extend(packer.add_document(ids, word_ids))
    if not packer.is_empty:
        sequences.append(packer._emit())
    packed_words = []
    for sequence in sequences:
        check_sequence(sequence, max_length)
        tokens = dict(enumerate(sequence["input_ids"]))
        for _, positions in itertools.groupby(
            (p for p, w in enumerate(sequence["word_ids"]) if w >= 0), key=lambda p: sequence["word_ids"][p]
        ):
            packed_words.append([tokens[p] for p in positions])
    fitting = [word for document in documents for word in document if len(word) <= max_length - 2]
    assert packed_words == fitting
    assert packer.skipped_words == sum(len(doc) for doc in documents) - len(fitting)


def test_a_document_longer_than_a_sequence_is_split_at_word_boundaries(tokenizer, write_text):
    words = [f"слово{i} word{i}" for i in range(400)]
    path = write_text("long.txt", " ".join(words) + "\n")
    sequences = take(MLMDataset(str(path), tokenizer, max_length=32), 100)
    for sequence in sequences:
        check_sequence(sequence, 32)
    body = [i for s in sequences for i in s["input_ids"] if i not in (CLS, SEP)]
    expected = tokenizer(" ".join(words), add_special_tokens=False, verbose=False)["input_ids"]
    assert body[: len(expected)] == expected  # one document, in order, nothing dropped


def test_stream_is_deterministic_per_peer_and_differs_between_peers(tokenizer):
    first = take(MLMDataset(None, tokenizer, max_length=64, seed=1, peer_id="QmPeerA"), 60)
    again = take(MLMDataset(None, tokenizer, max_length=64, seed=1, peer_id="QmPeerA"), 60)
    other = take(MLMDataset(None, tokenizer, max_length=64, seed=1, peer_id="QmPeerB"), 60)
    reseeded = take(MLMDataset(None, tokenizer, max_length=64, seed=2, peer_id="QmPeerA"), 60)
    assert first == again
    as_set = lambda sequences: {tuple(s["input_ids"]) for s in sequences}
    assert len(as_set(first) & as_set(other)) <= 3
    assert len(as_set(first) & as_set(reseeded)) <= 3
    for sequence in first:
        check_sequence(sequence, 64)


def test_a_peer_restarting_at_a_later_epoch_gets_a_fresh_deterministic_order(tokenizer):
    def stream(start_epoch):
        return take(MLMDataset(None, tokenizer, max_length=64, peer_id="QmPeerA", start_epoch=start_epoch), 30)

    first, restarted = stream(0), stream(120)
    assert restarted == stream(120)
    assert len({tuple(s["input_ids"]) for s in first} & {tuple(s["input_ids"]) for s in restarted}) <= 3


def test_sequences_are_nearly_full(tokenizer):
    lengths = [len(s["input_ids"]) for s in take(MLMDataset(None, tokenizer, max_length=128), 100)]
    assert sum(lengths) / len(lengths) > 110


def test_length_warmup_starts_short_and_reaches_max_length(tokenizer):
    dataset = MLMDataset(None, tokenizer, max_length=128, warmup_sequences=50, min_length=32)
    lengths = [len(s["input_ids"]) for s in take(dataset, 80)]
    assert max(lengths[:5]) <= 40
    assert all(a <= dataset.length_at(i) for i, a in enumerate(lengths))
    assert max(lengths[60:]) > 100


def words_of(tokenizer, sequences):
    """The decoded words of the stream, in order, grouped by word_ids."""
    words = []
    for sequence in sequences:
        pairs = [(t, w) for t, w in zip(sequence["input_ids"], sequence["word_ids"]) if w >= 0]
        for _, group in itertools.groupby(pairs, key=lambda pair: pair[1]):
            words.append(tokenizer.decode([t for t, _ in group]).strip())
    return words


def test_documents_are_reshuffled_each_pass(tokenizer, write_text):
    path = write_text("small.txt", "".join(f"document number {i}\n" for i in range(30)))
    words = words_of(tokenizer, take(MLMDataset(str(path), tokenizer, max_length=8, seed=0), 100))
    numbers = [w for w in words if w not in ("document", "number")]
    first_pass, second_pass = numbers[:30], numbers[30:60]
    assert sorted(first_pass) == sorted(second_pass) == sorted(str(i) for i in range(30))
    assert first_pass != second_pass
    assert words[: 3 * 60] == [w for n in numbers[:60] for w in ("document", "number", n)]


def test_over_long_words_are_skipped_and_counted(tokenizer, write_text):
    path = write_text("long-word.txt", "short words here " + "x" * 300 + "qz" * 200 + " and more\n")
    dataset = MLMDataset(str(path), tokenizer, max_length=16)
    words = words_of(tokenizer, take(dataset, 3))
    assert words[:10] == ["short", "words", "here", "and", "more"] * 2
    assert dataset.skipped_words >= 1


def test_a_corpus_of_only_over_long_words_is_an_error(tokenizer, write_text):
    path = write_text("words.txt", "".join("zq" * 40 + "\n" for _ in range(3)).replace("\n", f"{'y' * 50}\n"))
    with pytest.raises(CorpusError, match="every word is longer than max_length=8"):
        take(MLMDataset(str(path), tokenizer, max_length=8), 1)


def test_a_corpus_of_empty_documents_is_an_error(tokenizer, write_text):
    with pytest.raises(CorpusError, match="no non-empty documents"):
        take(MLMDataset(str(write_text("blank.txt", "\n  \n\n")), tokenizer), 1)


def test_a_missing_corpus_fails_at_construction(tokenizer):
    with pytest.raises(CorpusError, match="does not exist"):
        MLMDataset("/no/such/file.txt", tokenizer)


def test_invalid_lengths_are_errors(tokenizer):
    with pytest.raises(ValueError, match="max_length=3"):
        MLMDataset(None, tokenizer, max_length=3)
    with pytest.raises(ValueError, match="warm-up"):
        MLMDataset(None, tokenizer, max_length=64, warmup_sequences=10, min_length=100)


def test_dataloader_workers_read_different_shards(tokenizer):
    dataset = MLMDataset(None, tokenizer, max_length=32, peer_id="workers")
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    sequences = [tuple(s["input_ids"]) for s in itertools.islice(loader, 80)]
    assert len(set(sequences)) == len(sequences)


def test_too_many_workers_for_the_files_is_an_error(tokenizer, write_text):
    dataset = MLMDataset(str(write_text("one.txt", "a single file\n")), tokenizer, max_length=32)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    with pytest.raises(CorpusError, match="use at most 1 workers"):
        next(iter(loader))


def test_bundled_corpus_word_ids_mark_whitespace_words(tokenizer):
    for sequence in take(MLMDataset(None, tokenizer, max_length=64, peer_id="x"), 20):
        check_sequence(sequence, 64)
        for word in set(sequence["word_ids"]) - {-1}:
            tokens = [t for t, w in zip(sequence["input_ids"], sequence["word_ids"]) if w == word]
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            # Metaspace marks the start of each whitespace-separated word with "▁", and only the start.
            assert pieces[0].startswith("▁") and not any(p.startswith("▁") for p in pieces[1:])
