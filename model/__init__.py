"""LeanAlbert, the encoder the swarm trains, as a transformers model registered with the Auto* classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration import PRESETS, LeanAlbertConfig, load_config
from .modeling import (
    LeanAlbertForMaskedLM,
    LeanAlbertForSequenceClassification,
    LeanAlbertForTokenClassification,
    LeanAlbertModel,
    LeanAlbertPreTrainedModel,
)

# With the project importable, AutoModel*.from_pretrained(dir) needs no trust_remote_code. exist_ok: a checkpoint
# loaded with trust_remote_code registers its own copy of these classes under the same model type.
AutoConfig.register(LeanAlbertConfig.model_type, LeanAlbertConfig, exist_ok=True)
AutoModel.register(LeanAlbertConfig, LeanAlbertModel, exist_ok=True)
AutoModelForMaskedLM.register(LeanAlbertConfig, LeanAlbertForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(LeanAlbertConfig, LeanAlbertForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(LeanAlbertConfig, LeanAlbertForTokenClassification, exist_ok=True)

__all__ = [
    "PRESETS",
    "LeanAlbertConfig",
    "LeanAlbertForMaskedLM",
    "LeanAlbertForSequenceClassification",
    "LeanAlbertForTokenClassification",
    "LeanAlbertModel",
    "LeanAlbertPreTrainedModel",
    "load_config",
]
