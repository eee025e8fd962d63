"""What `albert-data inspect` shows: masked sequences with their targets, and the measured masking statistics.

Lets a person check the data before spending GPU hours, instead of decoding batches by hand.
"""

import itertools
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerFast

from .collator import IGNORE_INDEX, WholeWordMaskCollator
from .dataset import MLMDataset

LEGEND = "targets: [MASK=orig] masked, [~shown=orig] random token, [=orig] unchanged"


@dataclass
class MaskingStats:
    """Token counts over the inspected batches."""

    real_tokens: int = 0
    targets: int = 0
    masked: int = 0
    randomized: int = 0
    unchanged: int = 0
    split_words: int = 0  # words whose tokens were not all targets or all non-targets (must stay 0)

    def add(
        self, batch: dict[str, torch.Tensor], original: torch.Tensor, word_ids: torch.Tensor, mask_id: int
    ) -> None:
        targets = batch["labels"] != IGNORE_INDEX
        self.real_tokens += int((word_ids >= 0).sum())
        self.targets += int(targets.sum())
        self.masked += int((targets & (batch["input_ids"] == mask_id)).sum())
        self.unchanged += int((targets & (batch["input_ids"] == original)).sum())
        self.randomized += int((targets & (batch["input_ids"] != mask_id) & (batch["input_ids"] != original)).sum())
        self.split_words += _count_split_words(targets, word_ids)

    def report(self) -> str:
        share = lambda part: 100.0 * part / max(self.targets, 1)
        return (
            f"real tokens {self.real_tokens}, targets {self.targets} "
            f"({100.0 * self.targets / max(self.real_tokens, 1):.2f}%, aim 15%)\n"
            f"of the targets: [MASK] {share(self.masked):.1f}%, random {share(self.randomized):.1f}%, "
            f"unchanged {share(self.unchanged):.1f}% (aim 80/10/10; a random pick equal to the original "
            f"counts as unchanged)\nwords split between target and non-target: {self.split_words}"
        )


def _count_split_words(targets: torch.Tensor, word_ids: torch.Tensor) -> int:
    real = word_ids >= 0
    if not real.any():
        return 0
    index = word_ids.clamp(min=0)
    width = int(word_ids.max()) + 1
    tokens = torch.zeros(word_ids.shape[0], width).scatter_add_(1, index, real.float())
    chosen = torch.zeros(word_ids.shape[0], width).scatter_add_(1, index, (targets & real).float())
    return int(((chosen > 0) & (chosen < tokens)).sum())


def render_sequence(
    tokenizer: PreTrainedTokenizerFast, input_ids: list[int], labels: list[int], original: list[int]
) -> str:
    """The sequence as the model sees it, with each target shown next to its original token."""
    pieces = []
    for shown, label, orig in zip(input_ids, labels, original):
        if shown == tokenizer.pad_token_id and label == IGNORE_INDEX and orig == tokenizer.pad_token_id:
            continue
        text = tokenizer.convert_ids_to_tokens(shown)
        if label != IGNORE_INDEX:
            target = tokenizer.convert_ids_to_tokens(label)
            if shown == tokenizer.mask_token_id:
                text = f"[MASK={target}]"
            elif shown == label:
                text = f"[={target}]"
            else:
                text = f"[~{text}={target}]"
        pieces.append(text)
    return "".join(pieces).replace("▁", " ").strip()


def inspect(
    dataset: MLMDataset, collator: WholeWordMaskCollator, show: int = 3, batches: int = 50, batch_size: int = 16
) -> tuple[list[str], MaskingStats]:
    """Collate `batches` batches; render the first `show` sequences and count what the masking did."""
    tokenizer, stats, shown = dataset.tokenizer, MaskingStats(), []
    examples = iter(dataset)
    for _ in range(batches):
        chunk = list(itertools.islice(examples, batch_size))
        batch = collator(chunk)
        original, word_ids, _ = collator.pad(chunk)
        stats.add(batch, original, word_ids, tokenizer.mask_token_id)
        for row in range(len(chunk)):
            if len(shown) < show:
                shown.append(
                    render_sequence(
                        tokenizer,
                        batch["input_ids"][row].tolist(),
                        batch["labels"][row].tolist(),
                        original[row].tolist(),
                    )
                )
    return shown, stats
