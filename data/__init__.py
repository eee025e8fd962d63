"""Corpus, tokenizer and whole-word masked-LM batches for albert-swarm (imports nothing from the project)."""

from .collator import WholeWordMaskCollator
from .dataset import MLMDataset, held_out_sequences
from .sources import BUNDLED_CORPUS, CorpusError
from .tokenization import (
    BUNDLED_TOKENIZER,
    TokenizerError,
    check_tokenizer_matches,
    load_tokenizer,
    model_overrides_from_tokenizer,
    train_tokenizer,
)

__all__ = [
    "BUNDLED_CORPUS",
    "BUNDLED_TOKENIZER",
    "CorpusError",
    "MLMDataset",
    "TokenizerError",
    "WholeWordMaskCollator",
    "check_tokenizer_matches",
    "held_out_sequences",
    "load_tokenizer",
    "model_overrides_from_tokenizer",
    "train_tokenizer",
]
