"""LeanAlbert: an ALBERT-style encoder with shared layer groups, pre-LayerNorm, rotary attention and GEGLU.

Forward code in reading order: embeddings -> rotary -> attention -> feed-forward -> layer -> encoder -> heads.
This file and configuration.py are copied next to every saved checkpoint (trust_remote_code), so the only project
import is the relative one below.
"""

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from .configuration import LeanAlbertConfig

# Every head a checkpoint can be loaded as with trust_remote_code. `register_for_auto_class` records only the class
# that was saved, so save_pretrained writes this whole map (see LeanAlbertPreTrainedModel.save_pretrained).
AUTO_MAP = {
    "AutoConfig": "configuration.LeanAlbertConfig",
    "AutoModel": "modeling.LeanAlbertModel",
    "AutoModelForMaskedLM": "modeling.LeanAlbertForMaskedLM",
    "AutoModelForSequenceClassification": "modeling.LeanAlbertForSequenceClassification",
    "AutoModelForTokenClassification": "modeling.LeanAlbertForTokenClassification",
}


class LeanAlbertEmbeddings(nn.Module):
    """Factorised embedding: tokens (+ token types) in E dimensions, LayerNorm, then a linear map E -> H."""

    def __init__(self, config: LeanAlbertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.embedding_size)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.embedding_size) if config.type_vocab_size > 0 else None
        )
        self.layer_norm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.projection = nn.Linear(config.embedding_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        embeddings = self.word_embeddings(input_ids)  # [batch, seq, E]
        if self.token_type_embeddings is not None and token_type_ids is None:
            embeddings = embeddings + self.token_type_embeddings.weight[0]  # all type 0: one row, no gather
        elif self.token_type_embeddings is not None:
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        return self.projection(self.dropout(self.layer_norm(embeddings)))  # [batch, seq, H]


class LeanAlbertRotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), as unit complex numbers in float32, computed per forward (no buffer).

    Channels 2i and 2i+1 of a head form a pair, read as the complex number x_2i + j x_2i+1, that is rotated by the
    angle position * base^(-2i / head_size).
    """

    def __init__(self, head_size: int, base: float):
        super().__init__()
        self.head_size = head_size
        self.base = base

    def forward(self, seq_len: int, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_size, 2, device=device, dtype=torch.float32) / self.head_size
        angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), self.base**-exponents)
        return torch.polar(torch.ones_like(angles), angles)  # [seq, head_size / 2], complex64


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [batch, seq, heads, head_size] by position, in float32; `rotation` [seq, head_size / 2].

    One complex multiplication: measured on CPU about as cheap as no rotation, unlike the cat-based rotate_half.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [batch, seq, heads, head_size / 2]
    return torch.view_as_real(pairs * rotation[:, None]).flatten(-2)


class LeanAlbertAttention(nn.Module):
    """Multi-head self-attention: one fused qkv projection, rotary on q and k, torch's scaled_dot_product_attention."""

    def __init__(self, config: LeanAlbertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.dropout_prob = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.out.is_residual_output = True  # selects the depth-scaled initialisation

    def forward(self, hidden: torch.Tensor, rotation: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq, width = hidden.shape
        # split (not slicing a 5-D view): its backward is one cat instead of zero-filling and copying into a buffer.
        query, key, value = (
            part.view(batch, seq, self.num_heads, self.head_size) for part in self.qkv(hidden).split(width, dim=-1)
        )
        query = apply_rotary(query, rotation).to(value.dtype).transpose(1, 2)  # [batch, heads, seq, head_size]
        key = apply_rotary(key, rotation).to(value.dtype).transpose(1, 2)
        context = F.scaled_dot_product_attention(
            query, key, value.transpose(1, 2), attn_mask=mask, dropout_p=self.dropout_prob if self.training else 0.0
        )  # [batch, heads, seq, head_size]
        return self.out(context.transpose(1, 2).reshape(batch, seq, width))


class LeanAlbertFeedForward(nn.Module):
    """GEGLU feed-forward: one H -> 2I projection split into value and gate, `value * act(gate)`, then I -> H.

    With `gated_ffn=False` it is the plain `act(x W1) W2` of ALBERT.
    """

    def __init__(self, config: LeanAlbertConfig):
        super().__init__()
        self.gated = config.gated_ffn
        self.wi = nn.Linear(config.hidden_size, config.intermediate_size * (2 if self.gated else 1))
        self.act = ACT2FN[config.hidden_act]
        self.wo = nn.Linear(config.intermediate_size, config.hidden_size)
        self.wo.is_residual_output = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        projected = self.wi(hidden)
        if self.gated:
            value, gate = projected.chunk(2, dim=-1)
            return self.wo(value * self.act(gate))
        return self.wo(self.act(projected))


class LeanAlbertLayer(nn.Module):
    """Pre-LayerNorm residual block: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, config: LeanAlbertConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = LeanAlbertAttention(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = LeanAlbertFeedForward(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, rotation: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden + self.dropout(self.attention(self.attention_norm(hidden), rotation, mask))
        return hidden + self.dropout(self.ffn(self.ffn_norm(hidden)))


class LeanAlbertEncoder(nn.Module):
    """Applies `num_hidden_layers` blocks drawn from `num_hidden_groups` shared layers, then a final LayerNorm.

    Layer i uses group `i * groups // layers`: groups cover contiguous runs of layers, as in ALBERT.
    """

    gradient_checkpointing = False  # switched by PreTrainedModel.gradient_checkpointing_enable()

    def __init__(self, config: LeanAlbertConfig):
        super().__init__()
        self.num_layers = config.num_hidden_layers
        self.groups = nn.ModuleList(LeanAlbertLayer(config) for _ in range(config.num_hidden_groups))
        self.rotary = LeanAlbertRotaryEmbedding(
            config.hidden_size // config.num_attention_heads, config.rotary_embedding_base
        )
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        rotation = self.rotary(hidden.shape[1], hidden.device)
        for index in range(self.num_layers):
            layer = self.groups[index * len(self.groups) // self.num_layers]
            if self.gradient_checkpointing and self.training:
                hidden = self._gradient_checkpointing_func(layer.__call__, hidden, rotation, mask)
            else:
                hidden = layer(hidden, rotation, mask)
        return self.final_norm(hidden)


class LeanAlbertPreTrainedModel(PreTrainedModel):
    """Weight initialisation (SmallInit), checkpoint saving with the model code, shared by every head."""

    config_class = LeanAlbertConfig
    base_model_prefix = "lean_albert"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules: ClassVar[list[str]] = ["LeanAlbertLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # SmallInit (Nguyen & Salazar 2019, "Transformers without Tears"): embeddings and every input projection get
        # std sqrt(2 / (5 H)). Output projections of the residual branches get Wang's 2 / (L sqrt(H)), as in GPT-J /
        # GPT-NeoX: L blocks add 2L branch outputs to the residual stream, and scaling them by 1/L keeps its variance
        # from growing with depth. L is the depth of compute: a shared group is applied many times.
        # transformers skips modules without parameters of their own when initialising custom code, so this
        # dispatches on leaf modules; output projections are marked by `is_residual_output`.
        config = self.config
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if getattr(module, "is_residual_output", False):
                std = 2.0 / (config.num_hidden_layers * math.sqrt(config.hidden_size))
            else:
                std = math.sqrt(2.0 / (5.0 * config.hidden_size))
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_unrolled_parameters(self) -> int:
        """Parameter count as if each of the num_hidden_layers layers had its own weights (ALBERT's "unshared")."""
        groups = self.base_model.encoder.groups
        per_group = sum(p.numel() for p in groups.parameters()) // len(groups)
        return self.num_parameters() + per_group * (self.config.num_hidden_layers - len(groups))

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Save weights (safetensors), config.json and the model code, with an auto_map naming every head."""
        # transformers copies modeling.py and its relative imports (configuration.py) because the classes carry an
        # `_auto_class`, but records only the saved class in auto_map; we list every head so that a masked-LM
        # checkpoint also loads with AutoModelForSequenceClassification / ...TokenClassification.
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)


def _attention_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[batch, seq] of 1 (token) / 0 (padding) -> boolean [batch, 1, 1, seq] for SDPA; None if nothing is masked."""
    if attention_mask is None or bool(attention_mask.all()):
        return None  # lets SDPA pick its fastest kernel
    keep = attention_mask.bool()
    # A row of padding only would make softmax divide by zero (NaN); let such a row attend to everything instead.
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    return keep[:, None, None, :]


class LeanAlbertModel(LeanAlbertPreTrainedModel):
    """The bare encoder: token ids -> final hidden states [batch, seq, hidden_size].

    Args:
        config (`LeanAlbertConfig`): the architecture.
    """

    _auto_class = "AutoModel"

    def __init__(self, config: LeanAlbertConfig):
        super().__init__(config)
        self.embeddings = LeanAlbertEmbeddings(config)
        self.encoder = LeanAlbertEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        """input_ids, attention_mask, token_type_ids: [batch, seq]. Other keyword arguments are ignored."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"({self.config.max_position_embeddings})"
            )
        hidden = self.embeddings(input_ids, token_type_ids)
        hidden = self.encoder(hidden, _attention_mask(attention_mask))
        return BaseModelOutput(last_hidden_state=hidden)


class LeanAlbertMLMHead(nn.Module):
    """H -> E transform with activation and LayerNorm, then a decoder tied to the word embeddings (own bias)."""

    def __init__(self, config: LeanAlbertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)
        self.act = ACT2FN[config.hidden_act]
        self.layer_norm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.embedding_size, config.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(self.act(self.dense(hidden))))


class LeanAlbertForMaskedLM(LeanAlbertPreTrainedModel):
    """LeanAlbert with the masked language modelling head; the training objective of the swarm.

    Args:
        config (`LeanAlbertConfig`): the architecture.
    """

    _auto_class = "AutoModelForMaskedLM"
    _tied_weights_keys: ClassVar[dict[str, str]] = {
        "mlm_head.decoder.weight": "lean_albert.embeddings.word_embeddings.weight"
    }

    def __init__(self, config: LeanAlbertConfig):
        super().__init__(config)
        self.lean_albert = LeanAlbertModel(config)
        self.mlm_head = LeanAlbertMLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.mlm_head.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.mlm_head.decoder = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        """labels [batch, seq]: target ids at masked positions, -100 elsewhere (ignored by the loss).

        logits are [batch, seq, vocab]; with labels and `config.sparse_prediction` only the labelled positions are
        decoded and logits are [num_labelled, vocab], in row-major order of the positions. Other keyword arguments go
        to the loss (e.g. `num_items_in_batch` from the transformers Trainer).
        """
        hidden = self.lean_albert(input_ids, attention_mask, token_type_ids).last_hidden_state
        sparse = labels is not None and self.config.sparse_prediction
        logits = None if sparse else self.mlm_head(hidden)  # [batch, seq, vocab]
        if labels is None:
            return MaskedLMOutput(logits=logits)
        # The loss decodes the labelled rows (~15%) again instead of indexing `logits`: the backward pass then runs
        # only those rows through the vocabulary-wide decoder, not a mostly-zero [batch, seq, vocab] gradient, and a
        # log-softmax over every position is never computed. Same loss, same gradients, `logits` untouched.
        labelled = labels != -100  # [batch, seq]
        labelled_logits = self.mlm_head(hidden[labelled])  # [num_labelled, vocab]
        loss = self.loss_function(labelled_logits, labels[labelled], vocab_size=self.config.vocab_size, **kwargs)
        return MaskedLMOutput(loss=loss, logits=labelled_logits if sparse else logits)


class LeanAlbertForSequenceClassification(LeanAlbertPreTrainedModel):
    """LeanAlbert pooled (mean over the attention mask, or the first token) then a linear classifier.

    `config.problem_type` selects the loss as in transformers: regression, single- or multi-label classification.

    Args:
        config (`LeanAlbertConfig`): the architecture, with `num_labels`.
    """

    _auto_class = "AutoModelForSequenceClassification"
    # fine-tuning starts from a masked-LM checkpoint
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"^mlm_head\."]

    def __init__(self, config: LeanAlbertConfig):
        super().__init__(config)
        self.lean_albert = LeanAlbertModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        hidden = self.lean_albert(input_ids, attention_mask, token_type_ids).last_hidden_state
        if self.config.classifier_pooling == "cls":
            pooled = hidden[:, 0]
        elif attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [batch, seq, 1]
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))  # [batch, num_labels]
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config, **kwargs)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class LeanAlbertForTokenClassification(LeanAlbertPreTrainedModel):
    """LeanAlbert with a linear classifier on every token (e.g. named entities); labels -100 are ignored.

    Args:
        config (`LeanAlbertConfig`): the architecture, with `num_labels`.
    """

    _auto_class = "AutoModelForTokenClassification"
    # fine-tuning starts from a masked-LM checkpoint
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"^mlm_head\."]

    def __init__(self, config: LeanAlbertConfig):
        super().__init__(config)
        self.lean_albert = LeanAlbertModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> TokenClassifierOutput:
        hidden = self.lean_albert(input_ids, attention_mask, token_type_ids).last_hidden_state
        logits = self.classifier(self.dropout(hidden))  # [batch, seq, num_labels]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, config=self.config, **kwargs)
        return TokenClassifierOutput(loss=loss, logits=logits)
