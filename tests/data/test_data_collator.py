"""WholeWordMaskCollator: whole words masked together, the 15% rate and 80/10/10 split, padding and bad input."""

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data import MLMDataset, WholeWordMaskCollator
from data.collator import IGNORE_INDEX
from data.inspection import MaskingStats

ALPHABET = "abcdefghijklmnopqrstuvwxyzабвгдежзийклмнопрстуфхцчшщъыьэюя0123456789.,!?-"


def example_from_text(tokenizer, text):
    encoding = tokenizer(text, verbose=False)
    return {"input_ids": encoding["input_ids"], "word_ids": [-1 if w is None else w for w in encoding.word_ids()]}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(
        st.lists(st.text(ALPHABET, min_size=1, max_size=15), min_size=1, max_size=40).map(" ".join),
        min_size=1,
        max_size=6,
    ),
    seed=st.integers(0, 2**31),
    probability=st.floats(0.05, 0.6),
)
def test_whole_words_are_always_masked_together(tokenizer, texts, seed, probability):
    examples = [example_from_text(tokenizer, text) for text in texts]
    collator = WholeWordMaskCollator(tokenizer, mlm_probability=probability, seed=seed)
    batch = collator(examples)
    original, word_ids, _ = collator.pad(examples)
    targets = batch["labels"] != IGNORE_INDEX
    assert not targets[word_ids < 0].any()  # never [CLS], [SEP] or padding
    for row in range(len(examples)):
        for word in set(word_ids[row].tolist()) - {-1}:
            chosen = targets[row][word_ids[row] == word]
            assert bool(chosen.all()) or not bool(chosen.any())
    assert torch.equal(batch["labels"][targets], original[targets])
    assert torch.equal(batch["input_ids"][~targets], original[~targets])


def test_mask_rate_and_80_10_10_split_over_many_batches(tokenizer):
    dataset = MLMDataset(None, tokenizer, max_length=128, peer_id="rate")
    collator = WholeWordMaskCollator(tokenizer, seed=0)
    stats = MaskingStats()
    examples = iter(dataset)
    for _ in range(60):
        chunk = list(itertools.islice(examples, 16))
        original, word_ids, _ = collator.pad(chunk)
        stats.add(collator(chunk), original, word_ids, tokenizer.mask_token_id)
    assert stats.real_tokens > 100_000
    assert abs(stats.targets / stats.real_tokens - 0.15) < 0.02
    assert abs(stats.masked / stats.targets - 0.8) < 0.015
    assert abs(stats.randomized / stats.targets - 0.1) < 0.01
    assert abs(stats.unchanged / stats.targets - 0.1) < 0.01
    assert stats.split_words == 0


def test_batch_shapes_padding_and_dtypes(tokenizer):
    examples = [example_from_text(tokenizer, "one two three"), example_from_text(tokenizer, "a much longer text " * 3)]
    batch = WholeWordMaskCollator(tokenizer, pad_to_multiple_of=8, seed=1)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= len(examples[1]["input_ids"])
    assert all(tensor.dtype == torch.long and tensor.shape == (2, width) for tensor in batch.values())
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(e["input_ids"]) for e in examples]
    padding = batch["attention_mask"] == 0
    assert (batch["input_ids"][padding] == tokenizer.pad_token_id).all()
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    assert not batch["token_type_ids"].any()


def test_random_replacements_are_never_special_tokens(tokenizer):
    examples = [example_from_text(tokenizer, "word " * 100)] * 32
    collator = WholeWordMaskCollator(tokenizer, mlm_probability=0.5, seed=3)
    batch = collator(examples)
    targets = batch["labels"] != IGNORE_INDEX
    replaced = batch["input_ids"][targets & (batch["input_ids"] != tokenizer.mask_token_id)]
    assert not set(replaced.tolist()) & (set(tokenizer.all_special_ids) - {tokenizer.mask_token_id})


def test_a_seeded_collator_is_reproducible(tokenizer):
    examples = [example_from_text(tokenizer, "reproducible masks for every run of the test " * 4)] * 4
    first = WholeWordMaskCollator(tokenizer, seed=7)(examples)
    second = WholeWordMaskCollator(tokenizer, seed=7)(examples)
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_examples_without_words_get_no_targets(tokenizer):
    batch = WholeWordMaskCollator(tokenizer, seed=0)([{"input_ids": [2, 3], "word_ids": [-1, -1]}])
    assert (batch["labels"] == IGNORE_INDEX).all()


def test_bad_input_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="mlm_probability"):
        WholeWordMaskCollator(tokenizer, mlm_probability=1.5)
    collator = WholeWordMaskCollator(tokenizer)
    with pytest.raises(ValueError, match="empty list"):
        collator([])
    with pytest.raises(ValueError, match="3 input_ids but 2 word_ids"):
        collator([{"input_ids": [2, 50, 3], "word_ids": [-1, 0]}])
