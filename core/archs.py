"""What promptmux needs to know about each model family: only what really differs between them.

The table holds PEFT's position rules (RoBERTa-style padding offsets, OPT's positions that follow the attention
mask), token types, the classification head's layout and which families PEFT cannot prefix-tune. A causal LM of
any other family transformers knows gets the generic rules (GENERIC_DECODER) and is verified against PEFT eager
when it is exported (export/deploy.py): a family the generic rules do not fit is refused with the measured
difference, not served wrongly. A causal LM trained as a sequence classifier (PEFT task type SEQ_CLS; its config's
architectures name the *ForSequenceClassification class) gets its row's rules with transformers' classifier head
(`score`, on the last token), also verified at export. Sizes come from the transformers config's standard attributes
(its attribute_map maps each family's own names), which every family has.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

from .families import Family
from .families.decoder import FAMILY as DECODER
from .families.encoder import FAMILY as ENCODER
from .families.seq2seq import FAMILY as SEQ2SEQ


class UnsupportedModelError(ValueError):
    """The base model is of a family or task promptmux cannot export."""


@dataclass(frozen=True)
class HeadLayer:
    """One layer of a classification head, applied per task outside the backbone (runtime/batch.py apply_head)."""

    module: str  # path inside the *ForSequenceClassification model, e.g. "classifier.dense"
    activation: str | None  # applied after the layer: None, "tanh", "relu" or "gelu" (exact, erf)
    op: str = "linear"  # "linear", or "layer_norm" (ModernBERT's head: weight and optional bias, eps below)
    eps: float = 1e-5


@dataclass(frozen=True)
class ArchSpec:
    family: Family  # encoder (sequence classification), decoder (causal LM) or seq2seq (T5-style LM): core/families
    # Added to every position id. RoBERTa counts positions from padding_idx + 1.
    position_offset_from_pad: bool = False
    # How PEFT's prefix-tuning forward positions real tokens (it passes input_ids, not embeddings):
    # "arange" -> n + j for every slot j; "roberta" -> derived from non-pad input ids.
    prefix_positions: str = "arange"
    token_types: bool = False
    supports_prefix: bool = True
    # Sequence classification: the backbone's output that feeds the head ("pooler", the "first" token's hidden
    # state, or the "last" real token's: a causal LM's classifier) and the head's layers in order.
    feature: str = "first"
    head: tuple[HeadLayer, ...] = ()
    # OPT derives position ids from the attention mask (a cumulative sum: padding takes no position), also in
    # PEFT's forward; most decoders count positions through the padding there.
    positions_follow_mask: bool = False
    # Not a row of this table (tested by promptmux's suite) but the generic rules: the export compares the
    # deployment with PEFT eager and refuses it if they differ.
    verify_at_export: bool = False
    # Config settings the row's rules assume (attribute, value); another value is refused (check_config).
    requires: tuple[tuple[str, object], ...] = ()
    # Seq2seq: the cached decoder step (core/seq2seq_graph.py): "t5" or "bart" (BART and the families derived from
    # it; the step reads pre- or post-LayerNorm, scales and position tables from the modules). embed_norm: where
    # the decoder's embedding LayerNorm sits, "after_positions" (BART) or "before_positions" (BlenderbotSmall).
    decoder_step: str = "t5"
    embed_norm: str = "after_positions"


ARCHS: dict[str, ArchSpec] = {
    "bert": ArchSpec(
        family=ENCODER, token_types=True, feature="pooler", head=(HeadLayer("classifier", None),)
    ),
    "roberta": ArchSpec(
        family=ENCODER,
        position_offset_from_pad=True,
        prefix_positions="roberta",
        feature="first",
        head=(HeadLayer("classifier.dense", "tanh"), HeadLayer("classifier.out_proj", None)),
    ),
    "distilbert": ArchSpec(
        family=ENCODER,
        supports_prefix=False,  # DistilBERT's attention takes no past key/values, so PEFT cannot prefix-tune it
        feature="first",
        head=(HeadLayer("pre_classifier", "relu"), HeadLayer("classifier", None)),
    ),
    # ELECTRA: BERT's embeddings and positions; a two-layer head with GELU on the first token.
    "electra": ArchSpec(
        family=ENCODER, token_types=True, feature="first",
        head=(HeadLayer("classifier.dense", "gelu"), HeadLayer("classifier.out_proj", None)),
    ),
    # MPNet: RoBERTa's positions and head; its attention takes no past key/values (PEFT refuses prefix tuning).
    "mpnet": ArchSpec(
        family=ENCODER, position_offset_from_pad=True, supports_prefix=False, feature="first",
        head=(HeadLayer("classifier.dense", "tanh"), HeadLayer("classifier.out_proj", None)),
    ),
    # DeBERTa-v2/v3: relative positions only, no token types by default; the ContextPooler (first token, dense,
    # GELU) is part of the head but frozen (PEFT saves only the classifier). No past key/values.
    "deberta-v2": ArchSpec(
        family=ENCODER, supports_prefix=False, feature="first",
        head=(HeadLayer("pooler.dense", "gelu"), HeadLayer("classifier", None)),
        requires=(("pooler_hidden_act", "gelu"),),
    ),
    # ModernBERT ("cls" pooling): head = dense, GELU, LayerNorm, then the classifier. No past key/values.
    "modernbert": ArchSpec(
        family=ENCODER, supports_prefix=False, feature="first",
        head=(HeadLayer("head.dense", "gelu"), HeadLayer("head.norm", None, op="layer_norm"),
              HeadLayer("classifier", None)),
        requires=(("classifier_pooling", "cls"), ("classifier_activation", "gelu"), ("norm_eps", 1e-5)),
    ),
    "gpt2": ArchSpec(family=DECODER),
    "llama": ArchSpec(family=DECODER),
    "opt": ArchSpec(family=DECODER, positions_follow_mask=True),
    # Relative position bias, no position ids; prefixes go to the decoder (see export/seq2seq_export.py).
    "t5": ArchSpec(family=SEQ2SEQ),
    # Learned positions (the encoder counts through the virtual tokens, as PEFT's concatenation does), scaled
    # attention, post-LayerNorm blocks; its own decoder start token (the config's). No token types.
    # The generation config's forced first / last tokens are applied as transformers' generate does.
    "bart": ArchSpec(family=SEQ2SEQ, decoder_step="bart"),
    "mbart": ArchSpec(family=SEQ2SEQ, decoder_step="bart"),  # pre-LayerNorm and a final LayerNorm
    # BART's code with sinusoidal positions (M2M100's from padding_idx + 1), pre- or post-LayerNorm, the embedding
    # scale in the encoder's forward (Marian, Pegasus, BlenderbotSmall: PEFT's prompt rows are not scaled there).
    "marian": ArchSpec(family=SEQ2SEQ, decoder_step="bart"),
    "pegasus": ArchSpec(family=SEQ2SEQ, decoder_step="bart"),
    "m2m_100": ArchSpec(family=SEQ2SEQ, decoder_step="bart"),
    "blenderbot": ArchSpec(family=SEQ2SEQ, decoder_step="bart"),
    "blenderbot-small": ArchSpec(family=SEQ2SEQ, decoder_step="bart", embed_norm="before_positions"),
}
ARCHS["xlm-roberta"] = ARCHS["roberta"]  # RoBERTa's code under another name (transformers copies it)
ARCHS["mt5"] = ARCHS["t5"]  # T5's code with another vocabulary

GENERIC_DECODER = ArchSpec(family=DECODER, verify_at_export=True)


def arch_for(model) -> ArchSpec:
    """The rules for a model: a transformers config, or a model type (then a causal LM is taken as a language
    model). The table's row, the generic rules for a causal LM of another family, the classifier rules for a causal
    LM whose config is a sequence classifier's, or a refusal naming what is served."""
    config = None if isinstance(model, str) else model
    model_type = model if config is None else config.model_type
    spec = ARCHS.get(model_type)
    if spec is None and is_causal_lm(model_type):
        spec = GENERIC_DECODER
    if spec is None and config is not None and is_encoder_classifier(model_type):
        spec = generic_encoder(config)
    if spec is None and config is not None and is_seq2seq_lm(model_type):
        spec = generic_seq2seq(config)
    if spec is None:
        rows = {f: ", ".join(sorted(t for t, r in ARCHS.items() if r.family is f)) for f in (ENCODER, SEQ2SEQ)}
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported: promptmux exports causal LMs of any family transformers "
            f"knows, sequence classifiers of {rows[ENCODER]} and of other families whose head it can read, and "
            f"seq2seq models of {rows[SEQ2SEQ]} and of other families whose decoder is BART's or T5's. Please report it, or add a row to core/archs.py (ARCHITECTURE.md: "
            "'A model family')")
    if config is not None and spec.family.generation == "causal" and is_sequence_classifier(config):
        return causal_classifier(spec)
    return spec


def causal_classifier(spec: ArchSpec) -> ArchSpec:
    """A causal LM's row as a sequence classifier, as transformers' *ForSequenceClassification computes it: the
    `score` layer (no bias) on the last token. Rows are pooled at their last attended token and positions follow
    the mask, so a row's result does not depend on the padding of its batch: PEFT's result for the row alone (PEFT
    pools the last position of prompt-tuning rows, a pad where a batch is right-padded). The head and pooling are
    the generic rules for every family, so the export verifies them against PEFT."""
    return replace(spec, family=ENCODER, feature="last", head=(HeadLayer("score", None),),
                   positions_follow_mask=True, verify_at_export=True)


def is_encoder_classifier(model_type: str) -> bool:
    """transformers has a sequence classifier for it, and it is neither a causal LM nor an encoder-decoder model."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    return (model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and not is_causal_lm(model_type)
            and model_type not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)


_GENERIC_ENCODERS: dict[tuple, ArchSpec | None] = {}
_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "tanh": "tanh"}  # what runtime/batch.py applies


def generic_encoder(config) -> ArchSpec | None:
    """The rules of an encoder classifier without a row, read from its *ForSequenceClassification class (built on
    the meta device: no weights): a linear head on the pooler's output (BERT-like) or on the first token, or a
    dense + activation + out_proj head on the first token (RoBERTa-like; the activation read from its forward);
    RoBERTa's positions where its embeddings derive them from the padding; prefix tuning where its attention takes
    past key/values. None where the head is none of these. The export verifies the result against PEFT."""
    key = (config.model_type, getattr(config, "hidden_act", None), getattr(config, "type_vocab_size", None))
    if key not in _GENERIC_ENCODERS:
        _GENERIC_ENCODERS[key] = _read_encoder(config)
    return _GENERIC_ENCODERS[key]


def is_seq2seq_lm(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES


def generic_seq2seq(config) -> ArchSpec | None:
    """An encoder-decoder LM without a row whose decoder is BART's (what transformers derives most of them from:
    attention with q/k/v/out projections, cross-attention, fc1/fc2, a position table; the BART step reads the rest
    from the modules) or T5's (blocks of self-attention with a relative position bias, cross-attention and a
    feed-forward layer: the T5 step). The export verifies the tokens against PEFT's generate. None otherwise."""
    if config.model_type not in _GENERIC_SEQ2SEQ:
        _GENERIC_SEQ2SEQ[config.model_type] = _read_seq2seq(config)
    return _GENERIC_SEQ2SEQ[config.model_type]


def _read_seq2seq(config) -> ArchSpec | None:
    import torch
    from transformers import AutoModelForSeq2SeqLM

    try:
        with torch.device("meta"):
            model = AutoModelForSeq2SeqLM.from_config(config)
    except (TypeError, ValueError):
        return None
    readers = {
        "bart": lambda: (lambda d, layer: (layer.self_attn.k_proj, layer.self_attn.q_proj, layer.self_attn.out_proj,
                                           layer.encoder_attn.k_proj, layer.fc1, layer.fc2, layer.self_attn_layer_norm,
                                           d.embed_positions, d.embed_tokens))(model.model.decoder,
                                                                               model.model.decoder.layers[0]),
        "t5": lambda: (lambda b: (b.layer[0].SelfAttention.compute_bias, b.layer[0].SelfAttention.q,
                                  b.layer[0].layer_norm, b.layer[1].EncDecAttention.k, b.layer[2],
                                  model.decoder.final_layer_norm, model.lm_head))(model.decoder.block[0]),
    }
    for step, read in readers.items():
        try:
            if all(p is not None for p in read()):
                return ArchSpec(family=SEQ2SEQ, decoder_step=step, verify_at_export=True)
        except (AttributeError, IndexError, TypeError):
            continue
    return None


_GENERIC_SEQ2SEQ: dict[str, ArchSpec | None] = {}


def _read_encoder(config) -> ArchSpec | None:
    import inspect

    import torch
    from torch import nn
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    name = next((n for n in ("classifier", "score") if isinstance(getattr(model, n, None), nn.Module)), None)
    if name is None:
        return None
    head, base = getattr(model, name), model.base_model
    if isinstance(head, nn.Linear):
        layers = (HeadLayer(name, None),)
        feature = "pooler" if getattr(base, "pooler", None) is not None else "first"
    else:
        parts = dict(head.named_children())
        if not (isinstance(parts.get("dense"), nn.Linear) and isinstance(parts.get("out_proj"), nn.Linear)):
            return None
        source = inspect.getsource(type(head).forward)
        if "[:, 0" not in source:
            return None
        activation = "tanh" if "tanh" in source else (
            _ACTIVATIONS.get(getattr(config, "hidden_act", None)) if "ACT2FN" in source else None)
        if activation is None:
            return None
        layers, feature = (HeadLayer(f"{name}.dense", activation), HeadLayer(f"{name}.out_proj", None)), "first"
    embeddings = getattr(base, "embeddings", None)
    roberta = embeddings is not None and "create_position_ids_from" in inspect.getsource(type(embeddings).forward)
    return ArchSpec(family=ENCODER, token_types=(getattr(config, "type_vocab_size", 0) or 0) > 1,
                    position_offset_from_pad=roberta, prefix_positions="roberta" if roberta else "arange",
                    supports_prefix="past_key_values" in inspect.signature(base.forward).parameters,
                    feature=feature, head=layers, verify_at_export=True)


def is_sequence_classifier(config) -> bool:
    return any(str(a).endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or ()))


def for_task_type(config, task_type: str | None):
    """The config of the model PEFT trains for `task_type` on this base: a causal LM's checkpoint (architectures
    *ForCausalLM) with SEQ_CLS adapters is a sequence classifier, and the other way round. Other task types and
    families are left as they are (load_adapter refuses a mismatch)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    if not is_causal_lm(config.model_type) or task_type not in ("SEQ_CLS", "CAUSAL_LM"):
        return config
    if (task_type == "SEQ_CLS") == is_sequence_classifier(config):
        return config
    names = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES if task_type == "SEQ_CLS" else \
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if config.model_type not in names:
        raise UnsupportedModelError(f"the adapters are {task_type} but transformers has no "
                                    f"{'sequence classifier' if task_type == 'SEQ_CLS' else 'causal LM'} for "
                                    f"{config.model_type}; promptmux serves what transformers computes")
    config = copy.deepcopy(config)
    config.architectures = [names[config.model_type]]
    return config


def check_config(config) -> ArchSpec:
    """The config's row, refusing settings the row's rules do not cover."""
    spec = arch_for(config)
    for attribute, value in spec.requires:
        if getattr(config, attribute, value) != value:
            raise UnsupportedModelError(
                f"{config.model_type} with {attribute}={getattr(config, attribute)!r} is not supported: promptmux "
                f"computes this family with {attribute}={value!r}. Please report it")
    return spec


def is_causal_lm(model_type: str) -> bool:
    """A decoder-only language model: transformers has a causal-LM class for it, and it is neither an encoder with
    a causal-LM variant (BERT, RoBERTa, ELECTRA: masked LMs) nor an encoder-decoder model (BART)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    return (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and model_type not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)


@dataclass(frozen=True)
class Dims:
    """The sizes an adapter must agree with."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    embed_size: int | None = None  # token embeddings narrower than hidden_size, projected up inside the model
    feature_size: int | None = None  # the features a head reads, where projected back down (OPT-350m)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def prompt_width(self) -> int:
        """The width of input-level prompts: they join the token embeddings, before any projection."""
        return self.embed_size or self.hidden_size

    @property
    def head_input(self) -> int:
        return self.feature_size or self.hidden_size


# Token embeddings narrower than the hidden size, projected up inside the model (OPT-350m's project_in, ELECTRA-small's
# embeddings_project): input-level prompts join them before the projection, at their width (PEFT's token_dim).
EMBEDDING_WIDTHS = ("word_embed_proj_dim", "embedding_size")
# ... and projected back down after the last layer (OPT's project_out): what a classification head reads.
FEATURE_WIDTHS = ("word_embed_proj_dim",)
# Key/value heads of the cache where a config names them otherwise than num_key_value_heads, as the attention's
# forward makes them (Falcon: the new architecture broadcasts its groups to every head; the old one's multi-query
# attention keeps 1).
KV_HEADS = {"falcon": lambda c: c.num_attention_heads if c.new_decoder_architecture else
            1 if c.multi_query else c.num_kv_heads}


def dims_of(config) -> Dims:
    """The sizes, from the config's standard attributes (hidden_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim, vocab_size; attribute_map translates n_embd, d_model, n_head, ...)."""
    c = config.get_text_config()  # a multimodal config's language model
    heads = c.num_attention_heads
    kv_heads = KV_HEADS[c.model_type](c) if c.model_type in KV_HEADS else getattr(c, "num_key_value_heads", None)

    def width(attributes) -> int | None:  # where it differs from the hidden size
        w = next((getattr(c, a) for a in attributes if getattr(c, a, None)), None)
        return w if w and w != c.hidden_size else None
    return Dims(
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads or heads,
        head_dim=getattr(c, "head_dim", None) or getattr(c, "d_kv", None) or c.hidden_size // heads,
        vocab_size=c.vocab_size,
        embed_size=width(EMBEDDING_WIDTHS),
        feature_size=width(FEATURE_WIDTHS),
    )


def decoder_sizes(config) -> tuple[int, int, int]:
    """A seq2seq model's decoder: (layers, attention heads, head dim); T5 and BART name them differently."""
    c = config
    layers = getattr(c, "num_decoder_layers", None) or getattr(c, "decoder_layers", None) or c.num_hidden_layers
    heads = getattr(c, "decoder_attention_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "d_kv", None) or c.hidden_size // heads
    return layers, heads, head_dim


def pad_id(config) -> int:
    """The id that padded positions hold: the config's pad token, else 0. Padded positions are masked out, so any id
    of the vocabulary does; one rule everywhere keeps the graphs' inputs the same across code paths."""
    return config.pad_token_id if config.pad_token_id is not None else 0


def position_offset(config) -> int:
    spec = arch_for(config)
    return config.pad_token_id + 1 if spec.position_offset_from_pad else 0


def sliding_window(config) -> int | None:
    """The attention window of a family with sliding-window layers (Mistral, Gemma2, Phi-3; GPT-Neo's "local"
    layers, which name it window_size), else None."""
    window = getattr(config, "sliding_window", None)
    layers = getattr(config, "layer_types", None)
    if not window and "local" in (getattr(config, "attention_layers", None) or ()):
        window, layers = getattr(config, "window_size", None), None
    if not window or (layers is not None and "sliding_attention" not in layers):
        return None
    return window if getattr(config, "use_sliding_window", True) is not False else None


def windows_off(config):
    """A copy of a causal LM's config whose sliding-window layers attend to every earlier slot, or config itself where
    nothing slides (or an encoder's local attention, which its graph keeps).

    Rows stay within the window (usable_positions), where a window changes nothing. transformers counts a window in
    cache slots, though, and a batch's left padding (or a merged continuous batch's) adds slots that are no positions
    of the row: a windowed graph pushed a fitting row's first tokens out of its window, or failed outright."""
    import copy

    spec = arch_for(config)
    if not sliding_window(config) or (spec.family.classifies and spec.feature != "last"):
        return config
    config = copy.deepcopy(config)
    if getattr(config, "layer_types", None):  # Gemma2/3, Qwen2, Phi-3...: each layer's type (a sliding layer's mask)
        config.layer_types = ["full_attention" if t == "sliding_attention" else t for t in config.layer_types]
    elif "local" in (getattr(config, "attention_layers", None) or ()):  # GPT-Neo
        config.attention_layers = ["global" if t == "local" else t for t in config.attention_layers]
    else:  # Mistral: one window for every layer
        config.sliding_window = None
    return config


def usable_positions(config) -> int | None:
    """The positions a row may use, virtual and real tokens together (and, generating, its new tokens).

    T5 configs carry n_positions (the context it was trained with) though its positions are relative; RoBERTa-style
    models count from after the padding index, so their first positions are not usable. Where a causal LM's
    attention slides, rows stay within the window: its cached decoder graph attends over every position, which is
    what the model computes only while a row fits its window (tests/test_families.py checks tokens against PEFT
    there), and a classifier's sequence holds unused prompt slots the window would count. An encoder's graph is the
    model's whole forward, its local-attention masks included (ModernBERT: checked against PEFT on rows longer than
    the window)."""
    table = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    limit = table - position_offset(config) if table else None
    spec = arch_for(config)
    window = sliding_window(config) if not spec.family.classifies or spec.feature == "last" else None
    return min(limit, window) if window and limit else (window or limit)

