"""The graphs' inputs, declared once: name, dtype, named axes, example size, and whether the value depends on the
prompt bank only (never on the text). The exporter (names, dynamic axes, example inputs), the sessions (which
inputs a device keeps resident), the layout and the generator (feeds, empty decode-step feeds) and the TensorRT
optimisation profiles all read this table.

Axis names that are sums of others: length = mpt_tokens + prompt_tokens + tokens,
prefix_plus_length = prefix_tokens (or past_length) + length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .archs import ArchSpec

# Axes that are the model's own sizes: fixed in every graph.
MODEL_AXES = ("hidden", "layers", "kv_heads", "head_dim")

# Example sizes for the export: pairwise different, so the exporter keeps every axis symbolic.
EXAMPLE = {"batch": 2, "tokens": 9, "mpt_tasks": 6, "mpt_shared_prompts": 7, "mpt_rank": 8, "mpt_tokens": 5,
           "prompt_tokens": 3, "prefix_tokens": 4, "past_length": 4}


@dataclass(frozen=True)
class GraphInput:
    name: str
    dtype: str  # "int64" or "float32"
    axes: tuple[str, ...]
    bank: bool = False  # depends only on the batch's tasks: a device session may keep it resident
    group: str | None = None  # the prompt slot group it carries: "input", "mpt" or "prefix"


INPUTS = {i.name: i for i in (
    GraphInput("input_ids", "int64", ("batch", "tokens")),
    GraphInput("token_type_ids", "int64", ("batch", "length")),
    GraphInput("attention_mask", "int64", ("batch", "prefix_plus_length")),
    GraphInput("position_ids", "int64", ("batch", "length")),
    GraphInput("order", "int64", ("batch", "length")),
    GraphInput("prompt_embeds", "float32", ("batch", "prompt_tokens", "hidden"), bank=True, group="input"),
    GraphInput("mpt_task_ids", "int64", ("batch",), bank=True, group="mpt"),
    GraphInput("mpt_shared_ids", "int64", ("mpt_tasks",), bank=True, group="mpt"),
    GraphInput("mpt_shared", "float32", ("mpt_shared_prompts", "mpt_tokens", "hidden"), bank=True, group="mpt"),
    GraphInput("mpt_cols", "float32", ("mpt_tasks", "mpt_tokens", "mpt_rank"), bank=True, group="mpt"),
    GraphInput("mpt_rows", "float32", ("mpt_tasks", "mpt_rank", "hidden"), bank=True, group="mpt"),
    GraphInput("prefix_keys", "float32", ("layers", "batch", "kv_heads", "prefix_tokens", "head_dim"), bank=True,
               group="prefix"),
    GraphInput("prefix_values", "float32", ("layers", "batch", "kv_heads", "prefix_tokens", "head_dim"), bank=True,
               group="prefix"),
    # the cached decoder (causal LMs): which position's next-token logits each row needs
    GraphInput("logits_index", "int64", ("batch",)),
)}
PAST_AXES = ("batch", "kv_heads", "past_length", "head_dim")  # every past_key_values.{i}.key/value

PROMPT_INPUTS = tuple(n for n, i in INPUTS.items() if i.group)
BANK_INPUTS = frozenset(n for n, i in INPUTS.items() if i.bank)
PREFIX_INPUTS = tuple(n for n, i in INPUTS.items() if i.group == "prefix")
MPT_INPUTS = tuple(n for n, i in INPUTS.items() if i.group == "mpt")  # mpt_prompt_concat's arguments, in order
LAYOUT_INPUTS = ("attention_mask", "position_ids", "order")
# A seq2seq model's encoder graph: no position ids (relative position bias) and no prefix inputs (prefixes are
# the decoder's cache; see export/seq2seq_export.py).
SEQ2SEQ_ENCODER_INPUTS = ("input_ids", "attention_mask", "order", *(n for n in PROMPT_INPUTS if n not in PREFIX_INPUTS))
# The cached decoder graph: every layout and prompt input but the prefixes (the past replaces them), then
# logits_index and the past.
DECODER_INPUTS = ("input_ids", *LAYOUT_INPUTS, *(n for n in PROMPT_INPUTS if n not in PREFIX_INPUTS), "logits_index")


def prompt_inputs(spec: ArchSpec) -> list[str]:
    """Prompt inputs of this family's graph: no prefix key/values where attention takes no cache."""
    if spec.supports_prefix:
        return list(PROMPT_INPUTS)
    return [n for n in PROMPT_INPUTS if n not in PREFIX_INPUTS]


def input_names(spec: ArchSpec) -> list[str]:
    """The full-sequence graph's inputs, in PromptedBackbone.forward order."""
    if spec.family.encoder_decoder:
        return list(SEQ2SEQ_ENCODER_INPUTS)
    names = ["input_ids"]
    if spec.token_types:
        names.append("token_type_ids")
    return names + list(LAYOUT_INPUTS) + prompt_inputs(spec)


def layout_inputs(spec: ArchSpec) -> list[str]:
    """The inputs a batch layout feeds: those of the full-sequence graph, for the layout's prefix setting."""
    names = ["input_ids"] + (["token_type_ids"] if spec.token_types else []) + list(LAYOUT_INPUTS)
    return names + [n for n in PROMPT_INPUTS if spec.supports_prefix or n not in PREFIX_INPUTS]


def output_name(spec: ArchSpec) -> str:
    return "features" if spec.family.classifies else "logits"


def past_names(num_layers: int) -> list[str]:
    """Optimum's cache input names."""
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def dynamic_axes(name: str) -> dict[int, str]:
    """axis -> name for every axis of this input that varies between calls."""
    axes = PAST_AXES if name.startswith("past_key_values.") else INPUTS[name].axes
    return {a: n for a, n in enumerate(axes) if n not in MODEL_AXES}


def input_shape(name: str, dims, sizes: dict[str, int]) -> tuple[int, ...]:
    """The shape of an input with its named axes at `sizes` (the model's own axes from dims)."""
    model = {"hidden": dims.prompt_width, "layers": dims.num_layers, "kv_heads": dims.num_kv_heads,
             "head_dim": dims.head_dim}
    axes = PAST_AXES if name.startswith("past_key_values.") else INPUTS[name].axes
    return tuple(model[a] if a in model else sizes[a] for a in axes)


def zeros(names, dims, sizes: dict[str, int], float_dtype=np.float32) -> dict[str, np.ndarray]:
    """Zero-filled inputs, each allocated as the table declares it (its dtype, float ones as float_dtype, and its
    axes at `sizes`): the layout and the decode step fill them in."""
    return {n: np.zeros(input_shape(n, dims, sizes), float_dtype if INPUTS[n].dtype == "float32" else np.int64)
            for n in names}


def example_sizes(tm: int, p: int, n: int, past: int = 0) -> dict[str, int]:
    """Every named axis at export: the given prompt sizes (a folded export passes its task's), the rest EXAMPLE."""
    s = dict(EXAMPLE, mpt_tokens=tm, prompt_tokens=p, prefix_tokens=n, past_length=past)
    s["length"] = tm + p + s["tokens"]
    s["prefix_plus_length"] = (n or past) + s["length"]
    return s


# The MPT factor table when no row of a batch uses it: one zero entry (rank 1).
EMPTY_MPT = {"mpt_tasks": 1, "mpt_shared_prompts": 1, "mpt_rank": 1}


def decode_step_feeds(batch: int, dims) -> dict[str, np.ndarray]:
    """The cached decoder's non-cache inputs for one new token per row with no prompt in the sequence (every
    prompt is in the past by then): zero-length prompt axes."""
    names = ("order", *(n for n in PROMPT_INPUTS if n not in PREFIX_INPUTS), "logits_index")
    return zeros(names, dims, {"batch": batch, "length": 1, "prompt_tokens": 0, "mpt_tokens": 0, **EMPTY_MPT})
