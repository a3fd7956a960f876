"""What promptmux needs to know about each supported architecture.

Everything that differs between model families lives here, so the graph builder and the batch
layout stay generic: how PEFT's forward positions tokens after the virtual tokens, whether the
family takes token type ids, and (for sequence classification) which modules form the head.
Sizes come from optimum's normalized configs so no per-family attribute names leak elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedModelError(ValueError):
    """The base model is of a family or task promptmux cannot export."""


@dataclass(frozen=True)
class HeadLayer:
    """One linear layer of a classification head, applied per task outside the backbone."""

    module: str  # path inside the *ForSequenceClassification model, e.g. "classifier.dense"
    activation: str | None  # applied after the linear layer: None, "tanh" or "relu"


@dataclass(frozen=True)
class ArchSpec:
    family: str  # "encoder" (sequence classification), "decoder" (causal LM) or "seq2seq" (T5-style LM)
    # Added to every position id. RoBERTa counts positions from padding_idx + 1.
    position_offset_from_pad: bool = False
    # How PEFT's prefix-tuning forward positions real tokens (it passes input_ids, not embeddings):
    # "arange" -> n + j for every slot j; "roberta" -> derived from non-pad input ids.
    prefix_positions: str = "arange"
    token_types: bool = False
    supports_prefix: bool = True
    # Sequence classification: the backbone's output that feeds the head ("pooler" or "first"
    # token hidden state) and the head's layers in order.
    feature: str = "first"
    head: tuple[HeadLayer, ...] = ()


ARCHS: dict[str, ArchSpec] = {
    "bert": ArchSpec(
        family="encoder", token_types=True, feature="pooler", head=(HeadLayer("classifier", None),)
    ),
    "roberta": ArchSpec(
        family="encoder",
        position_offset_from_pad=True,
        prefix_positions="roberta",
        feature="first",
        head=(HeadLayer("classifier.dense", "tanh"), HeadLayer("classifier.out_proj", None)),
    ),
    "distilbert": ArchSpec(
        family="encoder",
        supports_prefix=False,  # DistilBERT's attention takes no past key/values, so PEFT cannot prefix-tune it
        feature="first",
        head=(HeadLayer("pre_classifier", "relu"), HeadLayer("classifier", None)),
    ),
    "gpt2": ArchSpec(family="decoder"),
    "llama": ArchSpec(family="decoder"),
    # Relative position bias, no position ids; prefixes go to the decoder (see export/seq2seq.py).
    "t5": ArchSpec(family="seq2seq"),
}

TASK_TYPE_FOR_FAMILY = {"encoder": "SEQ_CLS", "decoder": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}


def arch_for(model_type: str) -> ArchSpec:
    try:
        return ARCHS[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; promptmux exports {', '.join(sorted(ARCHS))}"
        ) from None


@dataclass(frozen=True)
class Dims:
    """The sizes an adapter must agree with."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def dims_of(config) -> Dims:
    from optimum.utils import (
        NormalizedConfigManager,  # imports transformers: not needed to list a bank
    )

    norm = NormalizedConfigManager.get_normalized_config_class(config.model_type)(config)
    heads = norm.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or norm.hidden_size // heads
    return Dims(
        hidden_size=norm.hidden_size,
        num_layers=norm.num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=norm.vocab_size,
    )


def position_offset(config) -> int:
    spec = arch_for(config.model_type)
    return config.pad_token_id + 1 if spec.position_offset_from_pad else 0
