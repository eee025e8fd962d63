"""Train, save and load the SentencePiece-style Unigram tokenizer, and keep model configs consistent with it.

Special tokens follow ALBERT: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
"""

import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

BUNDLED_TOKENIZER = str(Path(__file__).resolve().parent / "tokenizer")
SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
VOCAB_MULTIPLE = 64  # embedding and output matmuls are fastest when the vocabulary is a multiple of 64
TOKENIZER_FILE = "tokenizer.json"
# Always in the vocabulary, even when the training corpus lacks them, so no Latin or Cyrillic text becomes [UNK].
INITIAL_ALPHABET = sorted(
    set(map(chr, range(0x21, 0x7F)))  # printable ASCII
    | set("абвгдеёжзийклмнопрстуфхцчшщъыьэюя" + "абвгдеёжзийклмнопрстуфхцчшщъыьэюя".upper())
    | set("«»„“”‘’—–…№°§€")
)
MIN_VOCAB_SIZE = 256  # the initial alphabet (~180 characters), the specials and a few pieces


class TokenizerError(ValueError):
    """A tokenizer directory that is missing or incomplete, or one that does not match a model config."""


def round_vocab_size(size: int) -> int:
    """`size` rounded up to a multiple of 64."""
    return -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Train a Unigram tokenizer with a Metaspace ("▁") pre-tokenizer on `texts`; save it when `out_dir` is given.

    The requested `vocab_size` is rounded up to a multiple of 64; a small corpus may yield fewer pieces.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"vocab size {vocab_size} is too small: the alphabet alone needs {MIN_VOCAB_SIZE}")
    texts = iter(texts)
    first = next(texts, None)
    if first is None:
        raise TokenizerError("cannot train a tokenizer on an empty corpus")
    specials = list(SPECIAL_TOKENS.values())
    tokenizer = Tokenizer(models.Unigram())
    # NFKC as in ALBERT's SentencePiece models; case is kept (Russian and English names matter).
    # Newlines and tabs become spaces, so they split words and no piece contains them (SentencePiece's nmt_nfkc).
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=round_vocab_size(vocab_size),
        special_tokens=specials,
        unk_token=SPECIAL_TOKENS["unk_token"],
        initial_alphabet=INITIAL_ALPHABET,
        show_progress=False,
    )
    counter = _CountingIterator(itertools.chain([first], texts))
    try:
        tokenizer.train_from_iterator(counter, trainer=trainer)
    except Exception as error:  # the Rust trainer raises a bare Exception, e.g. when the alphabet outgrows the vocab
        raise TokenizerError(f"tokenizer training failed with vocab size {vocab_size}: {error}") from error
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length, **SPECIAL_TOKENS)
    logger.info("trained a Unigram tokenizer with %d tokens on %d documents", len(fast), counter.count)
    if out_dir is not None:
        save_tokenizer(fast, out_dir)
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """Save as a directory that `AutoTokenizer.from_pretrained` loads in transformers 4 and 5 alike."""
    tokenizer.save_pretrained(str(out_dir))
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # transformers 5 writes its new class name, which transformers 4 does not know; both load this one.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class _CountingIterator:
    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = iter(texts)
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            self.count += 1
            yield text


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory saved by `train_tokenizer` (None: the bundled one), checking it is complete."""
    directory = Path(BUNDLED_TOKENIZER if path is None else path).expanduser()
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer directory {directory} does not exist")
    if not (directory / TOKENIZER_FILE).is_file():
        present = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise TokenizerError(
            f"tokenizer directory {directory} has no {TOKENIZER_FILE} (it holds {present}); "
            f"train one with `albert-data tokenizer --out {directory}`"
        )
    try:
        json.loads((directory / TOKENIZER_FILE).read_text(encoding="utf-8"))
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as error:  # a truncated json, a bad config: transformers raises many types
        raise TokenizerError(f"cannot load the tokenizer in {directory}: {type(error).__name__}: {error}") from error
    missing = [name for name, token in SPECIAL_TOKENS.items() if getattr(tokenizer, name, None) != token]
    if missing or tokenizer.convert_tokens_to_ids("[PAD]") != 0:
        raise TokenizerError(
            f"tokenizer in {directory} lacks ALBERT's special tokens "
            f"({', '.join(missing) or '[PAD] is not id 0'}); retrain it with `albert-data tokenizer`"
        )
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The special ids under the names an ALBERT-style transformers config uses ([CLS] is bos, [SEP] is eos)."""
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "mask_token_id": tokenizer.mask_token_id,
    }


def model_overrides_from_tokenizer(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Config fields taken from the tokenizer: `vocab_size` (rounded up to a multiple of 64) and the special ids."""
    return {"vocab_size": round_vocab_size(len(tokenizer)), **special_token_ids(tokenizer)}


def check_tokenizer_matches(config: Any, tokenizer: PreTrainedTokenizerFast) -> None:
    """Raise TokenizerError (a ValueError) naming both numbers when `config` was not built for `tokenizer`."""
    expected = model_overrides_from_tokenizer(tokenizer)
    if config.vocab_size != expected["vocab_size"]:
        raise TokenizerError(
            f"the model has vocab_size={config.vocab_size} but the tokenizer has {len(tokenizer)} tokens "
            f"(vocab_size={expected['vocab_size']} once rounded to a multiple of {VOCAB_MULTIPLE}): "
            "use the tokenizer the checkpoint was trained with"
        )
    for name, value in expected.items():
        configured = getattr(config, name, None)
        if configured is not None and configured != value:
            raise TokenizerError(f"the model has {name}={configured} but the tokenizer has {name}={value}")
