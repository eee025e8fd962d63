"""Score a checkpoint: masked-LM loss and accuracy on whole-word masks over the corpus's held-out slice.

The token set (the held-out slice in a fixed order) and the masks (a seeded generator, fixed batches) are fixed, so
the same checkpoint always gives the same figures and two checkpoints are compared on exactly the same targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM, PreTrainedModel, PreTrainedTokenizerFast

from data import WholeWordMaskCollator, check_tokenizer_matches, held_out_sequences, load_tokenizer
from data.collator import IGNORE_INDEX
from monitor.checkpoint import MANIFEST, verify_directory

EVAL_BATCH = 16  # part of the definition of the masks: the collator draws per batch


class EvaluationError(ValueError):
    """The checkpoint, tokenizer or corpus cannot be evaluated; the message names the problem."""


@dataclass(frozen=True)
class EvalResult:
    """Held-out masked-LM figures.

    Args:
        loss: mean cross-entropy (nats) over every masked target token.
        accuracy: share of masked target tokens predicted exactly.
        targets: how many target tokens were scored.
        sequences: how many held-out sequences they came from.
    """

    loss: float
    accuracy: float
    targets: int
    sequences: int


class HeldOutSet:
    """The masked held-out batches of a corpus, built once and reused to score many models.

    Args:
        corpus: file, directory or glob (None: the bundled corpus).
        tokenizer: the tokenizer the models were trained with.
        max_sequences: at most this many held-out sequences.
        seed: seeds the whole-word masks.
        max_length: tokens per sequence.
    """

    def __init__(
        self,
        corpus: str | None,
        tokenizer: PreTrainedTokenizerFast,
        max_sequences: int = 256,
        seed: int = 0,
        max_length: int = 128,
    ) -> None:
        if max_sequences < 1:
            raise EvaluationError(f"max_sequences={max_sequences} must be at least 1")
        self.tokenizer = tokenizer
        sequences = held_out_sequences(corpus, tokenizer, max_length=max_length, max_sequences=max_sequences)
        collate = WholeWordMaskCollator(tokenizer, seed=seed)
        self.batches = [collate(sequences[i : i + EVAL_BATCH]) for i in range(0, len(sequences), EVAL_BATCH)]
        self.sequences = len(sequences)

    @torch.no_grad()
    def score(self, model: PreTrainedModel) -> EvalResult:
        """Loss and accuracy of `model` (a masked-LM model built for this tokenizer) on every masked target."""
        try:
            check_tokenizer_matches(model.config, self.tokenizer)
        except ValueError as error:
            raise EvaluationError(str(error)) from error
        was_training = model.training
        model.eval()
        loss_sum, correct, targets = 0.0, 0, 0
        try:
            for batch in self.batches:
                # No labels passed: a sparse_prediction head would otherwise return only the labelled rows.
                logits = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"],
                ).logits
                picked = batch["labels"] != IGNORE_INDEX
                labels, logits = batch["labels"][picked], logits[picked].float()
                loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
                correct += int((logits.argmax(dim=-1) == labels).sum())
                targets += int(labels.numel())
        finally:
            model.train(was_training)
        if targets == 0:
            raise EvaluationError("the held-out sequences hold no masked target (is the corpus empty?)")
        return EvalResult(loss_sum / targets, correct / targets, targets, self.sequences)


def load_checkpoint(directory: str | Path) -> PreTrainedModel:
    """A masked-LM model from a save_pretrained directory; clear errors for a missing, partial or damaged one."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EvaluationError(f"checkpoint directory {directory} does not exist")
    if not (directory / "config.json").is_file():
        raise EvaluationError(f"{directory} is not a checkpoint: it has no config.json")
    if (directory / MANIFEST).is_file():  # a monitor checkpoint: check every file against its recorded sum
        problem = verify_directory(directory)
        if problem:
            raise EvaluationError(f"checkpoint {directory} is corrupted: {problem}")
    try:
        return AutoModelForMaskedLM.from_pretrained(str(directory), trust_remote_code=True)
    except Exception as error:  # transformers / safetensors raise many types for broken files
        raise EvaluationError(f"cannot load the model in {directory}: {type(error).__name__}: {error}") from error


def checkpoint_tokenizer(directory: str | Path, tokenizer: str | None = None) -> PreTrainedTokenizerFast:
    """The tokenizer named by --tokenizer, else the one saved in the checkpoint, else the bundled one."""
    if tokenizer is None and (Path(directory) / "tokenizer.json").is_file():
        tokenizer = str(directory)
    try:
        return load_tokenizer(tokenizer)
    except ValueError as error:
        raise EvaluationError(str(error)) from error


def evaluate_checkpoint(
    directory: str | Path,
    corpus: str | None,
    tokenizer: str | None = None,
    max_sequences: int = 256,
    seed: int = 0,
    max_length: int = 128,
) -> EvalResult:
    """Load the checkpoint in `directory` and score it on the held-out slice of `corpus`."""
    model = load_checkpoint(directory)
    held_out = HeldOutSet(corpus, checkpoint_tokenizer(directory, tokenizer), max_sequences, seed, max_length)
    return held_out.score(model)
