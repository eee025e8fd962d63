"""`albert-checkpoint eval`: deterministic held-out MLM figures, a trained model beats a random one, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from data import MLMDataset, WholeWordMaskCollator, load_tokenizer, model_overrides_from_tokenizer
from data.sources import DocumentStats, iter_documents, load_stream, resolve_corpus
from model import LeanAlbertForMaskedLM, load_config
from monitor.checkpoint import write_manifest
from monitor.checkpoint_cli import main
from monitor.evaluation import EvaluationError, HeldOutSet, evaluate_checkpoint, load_checkpoint

SEQUENCES = 24
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def tiny_model(tokenizer, **overrides) -> LeanAlbertForMaskedLM:
    torch.manual_seed(0)
    fields = {"hidden_size": 64, "embedding_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    fields["intermediate_size"] = 128
    config = load_config("tiny", **{**model_overrides_from_tokenizer(tokenizer), **fields, **overrides})
    return LeanAlbertForMaskedLM(config)


def save(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def random_checkpoint(tokenizer, tmp_path_factory) -> Path:
    return save(tiny_model(tokenizer), tokenizer, tmp_path_factory.mktemp("random"))


@pytest.fixture(scope="module")
def trained_checkpoint(tokenizer, tmp_path_factory) -> Path:
    """The same initial model after 60 AdamW steps on the training split (seeded: the same every run)."""
    torch.set_num_threads(1)
    model = tiny_model(tokenizer)
    batches = torch.utils.data.DataLoader(
        MLMDataset(None, tokenizer, max_length=MAX_LENGTH, seed=0, peer_id="trainer", split="train"),
        batch_size=8,
        collate_fn=WholeWordMaskCollator(tokenizer, seed=0),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _, batch in zip(range(60), batches):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return save(model, tokenizer, tmp_path_factory.mktemp("trained"))


def evaluate(directory, **kwargs):
    return evaluate_checkpoint(directory, None, max_sequences=SEQUENCES, max_length=MAX_LENGTH, **kwargs)


def test_held_out_slice_is_disjoint_from_training_and_covers_the_rest():
    source = resolve_corpus(None)

    def documents(split):
        return set(iter_documents(source, load_stream(source, seed=0), DocumentStats(), split))

    train, held_out, every = documents("train"), documents("held_out"), documents("all")
    assert held_out and not train & held_out
    assert train | held_out == every
    assert 0.002 < len(held_out) / len(every) < 0.05  # about one document in a hundred


def test_the_same_checkpoint_gives_the_same_figures(random_checkpoint):
    first, again = evaluate(random_checkpoint), evaluate(random_checkpoint)
    assert first == again
    assert first.sequences == SEQUENCES and first.targets > SEQUENCES * 3
    reseeded = evaluate(random_checkpoint, seed=1)
    assert reseeded.targets != first.targets or reseeded.loss != first.loss  # the seed picks other masks


def test_a_briefly_trained_model_scores_better_than_a_random_one(random_checkpoint, trained_checkpoint, tokenizer):
    held_out = HeldOutSet(None, tokenizer, max_sequences=SEQUENCES, max_length=MAX_LENGTH)
    random = held_out.score(load_checkpoint(random_checkpoint))
    trained = held_out.score(load_checkpoint(trained_checkpoint))
    assert random.targets == trained.targets  # scored on exactly the same masked tokens
    assert random.loss > 9.0  # about ln(vocab): a random model knows nothing
    assert trained.loss < random.loss - 1.0
    assert trained.accuracy > random.accuracy + 0.02


def test_cli_prints_loss_and_accuracy(trained_checkpoint, capsys):
    argv = ["eval", str(trained_checkpoint), "--max-sequences", str(SEQUENCES), "--max-length", str(MAX_LENGTH)]
    assert main(argv) == 0
    expected = evaluate(trained_checkpoint)
    out = capsys.readouterr().out
    assert f"loss {expected.loss:.4f}" in out and f"accuracy {expected.accuracy:.4f}" in out


def test_missing_or_incomplete_checkpoint_is_named(tmp_path):
    with pytest.raises(EvaluationError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(EvaluationError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_corrupted_checkpoint_is_refused(random_checkpoint, tmp_path, caplog):
    damaged = tmp_path / "damaged"
    shutil.copytree(random_checkpoint, damaged)
    write_manifest(damaged, epoch=1)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100] + bytes(100))
    with pytest.raises(EvaluationError, match="corrupted.*sha256"):
        load_checkpoint(damaged)
    (damaged / "manifest.json").unlink()  # no manifest to check against: the loader itself must fail clearly
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(EvaluationError, match="cannot load the model"):
        load_checkpoint(damaged)
    assert main(["eval", str(damaged)]) == 1
    assert "cannot load the model" in caplog.text


def test_tokenizer_that_does_not_match_the_vocabulary_is_refused(tokenizer, tmp_path):
    wider = save(tiny_model(tokenizer, vocab_size=len(tokenizer) + 64), None, tmp_path / "wider")
    with pytest.raises(EvaluationError, match="vocab_size"):
        evaluate(wider)


def test_corpus_without_held_out_text_is_named(random_checkpoint, tmp_path, caplog):
    small = tmp_path / "small.txt"
    small.write_text("one short line\nanother line\n")
    assert main(["eval", str(random_checkpoint), "--corpus", str(small)]) == 1
    assert "no held-out text" in caplog.text
    assert json.loads((random_checkpoint / "config.json").read_text())["model_type"] == "lean_albert"
