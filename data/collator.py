"""`WholeWordMaskCollator`: pads `MLMDataset` examples and masks whole words for masked-LM training.

Word boundaries come from the examples' `word_ids`, never from guessing by a "▁" prefix.
"""

import torch
from transformers import PreTrainedTokenizerFast

IGNORE_INDEX = -100  # what torch's cross-entropy skips


class WholeWordMaskCollator:
    """Collates `{"input_ids", "word_ids"}` examples into a masked-LM batch of LongTensors.

    Per sequence, words are drawn in random order until about `mlm_probability` of its real (non-special) tokens are
    covered; every token of a drawn word is a target. Of the targets 80% become [MASK], 10% a random non-special
    token and 10% stay unchanged. `labels` hold the original ids of targets and -100 elsewhere.

    Args:
        tokenizer: provides the [PAD] and [MASK] ids, the special ids and the vocabulary size.
        mlm_probability: the share of real tokens to predict.
        pad_to_multiple_of: the padded length is rounded up to a multiple of this (tensor-core friendly).
        seed: seeds a private generator for reproducible masks; None uses torch's global generator.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        mlm_probability: float = 0.15,
        pad_to_multiple_of: int | None = 8,
        seed: int | None = None,
    ) -> None:
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability={mlm_probability} must lie strictly between 0 and 1")
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no [MASK] or [PAD] token")
        self.mlm_probability = mlm_probability
        self.pad_to_multiple_of = pad_to_multiple_of or 1
        self.pad_id, self.mask_id = tokenizer.pad_token_id, tokenizer.mask_token_id
        special = set(tokenizer.all_special_ids)
        self.replacement_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        input_ids, word_ids, lengths = self.pad(examples)
        attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
        targets = self._select_whole_words(word_ids)
        labels = torch.where(targets, input_ids, IGNORE_INDEX)
        return {
            "input_ids": self._corrupt(input_ids, targets),
            "attention_mask": attention_mask,
            "token_type_ids": torch.zeros_like(input_ids),
            "labels": labels,
        }

    def pad(self, examples: list[dict[str, list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unmasked `input_ids` and `word_ids` padded to one width (with [PAD] and -1), and the true lengths."""
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        lengths = torch.tensor([len(example["input_ids"]) for example in examples], dtype=torch.long)
        width = -(-int(lengths.max()) // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        word_ids = torch.full((len(examples), width), -1, dtype=torch.long)
        for row, example in enumerate(examples):
            if len(example["word_ids"]) != len(example["input_ids"]):
                raise ValueError(
                    f"example {row} has {len(example['input_ids'])} input_ids but {len(example['word_ids'])} word_ids"
                )
            input_ids[row, : lengths[row]] = torch.tensor(example["input_ids"], dtype=torch.long)
            word_ids[row, : lengths[row]] = torch.tensor(example["word_ids"], dtype=torch.long)
        return input_ids, word_ids, lengths

    def _select_whole_words(self, word_ids: torch.Tensor) -> torch.Tensor:
        """A boolean (batch, length) mask of the tokens of randomly drawn whole words."""
        batch, _ = word_ids.shape
        real = word_ids >= 0
        num_words = int(word_ids.max()) + 1 if real.any() else 0
        if num_words == 0:
            return torch.zeros_like(real)
        # word_lengths[b, w]: tokens of word w in sequence b (0 where the sequence has fewer words).
        word_lengths = torch.zeros(batch, num_words, dtype=torch.float)
        word_lengths.scatter_add_(1, word_ids.clamp(min=0), real.float())
        # Draw a random order of each sequence's words; absent words sort last.
        keys = torch.rand(batch, num_words, generator=self.generator).masked_fill(word_lengths == 0, 2.0)
        order = keys.argsort(dim=1)
        ordered_lengths = word_lengths.gather(1, order)
        covered_before = ordered_lengths.cumsum(dim=1) - ordered_lengths
        budget = self.mlm_probability * real.sum(dim=1, keepdim=True)
        # Take a word while its midpoint stays inside the budget, so the expected coverage is the budget itself.
        take_ordered = (covered_before + ordered_lengths / 2 < budget) & (ordered_lengths > 0)
        chosen_words = torch.zeros_like(take_ordered).scatter_(1, order, take_ordered)
        return chosen_words.gather(1, word_ids.clamp(min=0)) & real

    def _corrupt(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Apply BERT's 80% [MASK] / 10% random token / 10% unchanged to the targets."""
        draw = torch.rand(input_ids.shape, generator=self.generator)
        corrupted = input_ids.masked_fill(targets & (draw < 0.8), self.mask_id)
        randomize = targets & (draw >= 0.8) & (draw < 0.9)
        picks = torch.randint(len(self.replacement_ids), input_ids.shape, generator=self.generator)
        return torch.where(randomize, self.replacement_ids[picks], corrupted)
