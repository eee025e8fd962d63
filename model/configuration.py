"""LeanAlbert configuration: the architecture hyper-parameters, the named presets and `load_config`.

This file is copied next to every saved checkpoint (trust_remote_code), so it imports nothing from the project.
"""

import json
import math
import os
from typing import Any

from transformers import PretrainedConfig

# Fields by kind, checked by LeanAlbertConfig.validate_architecture.
_POSITIVE_INTS = (
    "vocab_size",
    "embedding_size",
    "hidden_size",
    "num_hidden_layers",
    "num_hidden_groups",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)
_PROBABILITIES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout_prob")
_POSITIVE_FLOATS = ("rotary_embedding_base", "layer_norm_eps")
_OPTIONAL_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id")
_KNOWN_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish")
_POOLINGS = ("mean", "cls")


class LeanAlbertConfig(PretrainedConfig):
    r"""Configuration of a LeanAlbert encoder: ALBERT-style shared layer groups, pre-LayerNorm, rotary attention,
    GEGLU feed-forward and a factorised embedding.

    Args:
        vocab_size (`int`): number of tokens; take it from the tokenizer (`len(tokenizer)`).
        embedding_size (`int`): width E of the factorised token embedding, projected to `hidden_size`.
        hidden_size (`int`): width H of the residual stream.
        num_hidden_layers (`int`): depth of compute: how many transformer blocks are applied.
        num_hidden_groups (`int`): number of distinct parameter sets; layer i uses group `i * groups // layers`,
            so groups cover contiguous blocks of layers (ALBERT style). 1 means every layer shares one set.
        num_attention_heads (`int`): attention heads; `hidden_size / num_attention_heads` must be even (rotary).
        intermediate_size (`int`): feed-forward width I. With `gated_ffn` the input projection is H -> 2I.
        hidden_act (`str`): activation of the feed-forward (on the gate when gated) and of the MLM head transform.
        gated_ffn (`bool`): GEGLU-style gated feed-forward (`act(gate) * value`) instead of `act(x W1) W2`.
        hidden_dropout_prob (`float`): dropout on the residual branches and embeddings.
        attention_probs_dropout_prob (`float`): dropout on the attention probabilities.
        classifier_dropout_prob (`float`): dropout before the classification heads.
        sparse_prediction (`bool`): when the masked-LM head gets labels, decode only the labelled positions (logits
            become [num_labelled, vocab]). Same loss and gradients; it saves the decoder's forward pass over the ~85%
            of positions that carry no label (the loss never needs them). For training.
        classifier_pooling (`str`): how sequence classification pools tokens: "mean" (over the attention mask)
            or "cls" (the first token). Mean suits a model pre-trained by masked LM alone.
        rotary_embedding_base (`float`): base of the rotary frequencies.
        max_position_embeddings (`int`): longest accepted sequence. There is no position table: a length limit only.
        layer_norm_eps (`float`): epsilon of every LayerNorm.
        type_vocab_size (`int`): number of token types (segments); 0 disables token type embeddings.
        pad_token_id, bos_token_id, eos_token_id, mask_token_id (`int` or `None`): special token ids; take them
            from the tokenizer.
    """

    model_type = "lean_albert"
    _auto_class = "AutoConfig"  # makes save_pretrained copy this file next to config.json (trust_remote_code)

    def __init__(
        self,
        vocab_size: int = 32000,
        embedding_size: int = 128,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_hidden_groups: int = 1,
        num_attention_heads: int = 12,
        intermediate_size: int = 2048,
        hidden_act: str = "gelu",
        gated_ffn: bool = True,
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        classifier_dropout_prob: float = 0.1,
        classifier_pooling: str = "mean",
        sparse_prediction: bool = False,
        rotary_embedding_base: float = 10000.0,
        max_position_embeddings: int = 512,
        layer_norm_eps: float = 1e-12,
        type_vocab_size: int = 2,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 2,
        eos_token_id: int | None = 3,
        mask_token_id: int | None = 4,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_hidden_groups = num_hidden_groups
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.gated_ffn = gated_ffn
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.classifier_dropout_prob = classifier_dropout_prob
        self.classifier_pooling = classifier_pooling
        self.sparse_prediction = sparse_prediction
        self.rotary_embedding_base = rotary_embedding_base
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_eps = layer_norm_eps
        self.type_vocab_size = type_vocab_size
        self.mask_token_id = mask_token_id
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_architecture()

    def validate_architecture(self) -> None:
        """Raise ValueError naming the first field whose type or value cannot build a model."""
        for name in _POSITIVE_INTS:
            _check_number(name, getattr(self, name), int, low=0 if name == "type_vocab_size" else 1)
        for name in _PROBABILITIES:
            _check_number(name, getattr(self, name), float, low=0.0, high=1.0)
        for name in _POSITIVE_FLOATS:
            _check_number(name, getattr(self, name), float, low=math.ulp(0.0))
        for name in _OPTIONAL_TOKEN_IDS:
            value = getattr(self, name)
            if value is not None:
                _check_number(name, value, int, low=0, high=self.vocab_size - 1)
        for name in ("gated_ffn", "sparse_prediction"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")  # noqa: TRY004 -- a bad config value is a ValueError, the one error callers turn into a message
        if self.hidden_act not in _KNOWN_ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {', '.join(_KNOWN_ACTIVATIONS)}; got {self.hidden_act!r}")
        if self.classifier_pooling not in _POOLINGS:
            raise ValueError(f"classifier_pooling must be one of {_POOLINGS}, got {self.classifier_pooling!r}")
        if self.num_hidden_groups > self.num_hidden_layers:
            raise ValueError(
                f"num_hidden_groups ({self.num_hidden_groups}) cannot exceed "
                f"num_hidden_layers ({self.num_hidden_layers})"
            )
        head_size, remainder = divmod(self.hidden_size, self.num_attention_heads)
        if remainder or head_size % 2:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must split into num_attention_heads ({self.num_attention_heads}) "
                f"heads of an even size (rotary rotates pairs of channels)"
            )


def _check_number(name: str, value: Any, kind: type, low: float, high: float | None = None) -> None:
    # bool is an int subclass: `"hidden_size": true` in a JSON file is a mistake, not 1.
    accepted = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise ValueError(f"{name} must be {'an int' if kind is int else 'a number'}, got {value!r}")  # noqa: TRY004 -- a bad config value is a ValueError, the one error callers turn into a message
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")


# Named architectures, applied on top of LeanAlbertConfig's defaults (a name wins over a directory of the same name).
# intermediate_size is the gated width: a GEGLU of width I has the parameters of a plain feed-forward of width 1.5 I.
PRESETS: dict[str, dict[str, Any]] = {
    # Tests and the local CPU demo: a forward+backward of 8 x 128 tokens well under a second on one core.
    "tiny": {
        "vocab_size": 16000,
        "embedding_size": 64,
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_hidden_groups": 1,
        "num_attention_heads": 4,
        "intermediate_size": 704,
    },
    # ALBERT-base / -large shapes with GEGLU at 2/3 of ALBERT's intermediate width (equal parameters).
    "base": {
        "embedding_size": 128,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 2048,
    },
    "large": {
        "embedding_size": 128,
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 2752,
    },
    # The collaborative sahajBERT run (Bengali, 2021).
    "sahajbert": {
        "embedding_size": 128,
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 8192,
    },
    # The RuLeanALBERT run (Russian, 2022): all 32 layers share one group.
    "ruleanalbert": {
        "embedding_size": 128,
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 64,
        "intermediate_size": 16384,
    },
}


def load_config(name_or_path: str | os.PathLike, **overrides: Any) -> LeanAlbertConfig:
    """Build a LeanAlbertConfig from a preset name, a config.json, or a directory holding one; apply `overrides`.

    Raises ValueError naming the problem (unknown preset, missing file, malformed JSON, wrong type or value).
    """
    hint = f"give a preset name ({', '.join(PRESETS)}), a config.json or a directory holding one"
    name = os.fspath(name_or_path)
    if name in PRESETS:
        values = dict(PRESETS[name])
    elif os.path.exists(name):
        values = _read_config_json(name, hint)
    else:
        raise ValueError(f"unknown model config {name!r}: no such preset or file; {hint}")
    unknown = sorted(set(overrides) - _known_fields())
    if unknown:
        raise ValueError(f"unknown model config field(s) {', '.join(unknown)} for {name!r}; {hint}")
    try:
        return LeanAlbertConfig(**{**values, **overrides})
    except (TypeError, ValueError) as error:
        raise ValueError(f"invalid model config {name!r}: {error}; {hint}") from error


def _read_config_json(path: str, hint: str) -> dict[str, Any]:
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"model config directory {path!r} holds no config.json; {hint}")
    try:
        with open(file, encoding="utf-8") as handle:
            values = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read model config {file!r}: {error}; {hint}") from error
    if not isinstance(values, dict):
        raise ValueError(  # noqa: TRY004 -- a malformed config file is a ValueError, like every other load_config error
            f"model config {file!r} must hold a JSON object, got {type(values).__name__}; {hint}"
        )
    model_type = values.get("model_type", LeanAlbertConfig.model_type)
    if model_type != LeanAlbertConfig.model_type:
        raise ValueError(f"model config {file!r} is for model_type {model_type!r}, not 'lean_albert'; {hint}")
    return values


def _known_fields() -> set[str]:
    # A misspelt override would otherwise become a silent extra attribute of the config.
    return set(LeanAlbertConfig().to_dict()) | {"num_labels", "id2label", "label2id", "problem_type"}
