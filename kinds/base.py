"""What every prompt kind provides (`PromptKind`), and the two placements the kinds share.

A kind is one way PEFT feeds a learned prompt to the frozen model. It reads PEFT's saved adapter into bank tensors,
says which slots of the graph a task fills (core/layout.py), places a row there with PEFT's mask and position
rules, and exposes the task as an input-level prompt (retrieval) or as key/values (generation, seq2seq decoders).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from promptmux.core.adapter_checks import AdapterError, expect, expect_shape
from promptmux.core.archs import decoder_sizes
from promptmux.core.task import Task


@dataclass
class ReadContext:
    """One adapter folder being read: its config, its saved tensors and the base model's sizes."""

    name: str  # the task name the user gave
    adapter_dir: Path
    cfg: dict  # adapter_config.json
    spec: object  # core.archs.ArchSpec
    dims: object  # core.archs.Dims
    base_config: object
    weights: dict[str, np.ndarray]  # adapter_model.safetensors, float32 (head tensors removed)
    n: int  # num_virtual_tokens
    subs: int  # num_transformer_submodules

    def fail(self, message: str) -> AdapterError:
        return AdapterError(f"adapter {str(self.adapter_dir)!r}: {message}")

    def tensor(self, key: str) -> np.ndarray:
        if key not in self.weights:
            raise self.fail(f"has no {key!r} tensor; re-save it with PeftModel.save_pretrained")
        return self.weights[key]


class PromptKind:
    """Base of every kind. Subclasses set the class attributes and implement read, slots and place."""

    name: str = ""
    peft_types: tuple[str, ...] = ()
    families: tuple[str, ...] = ("encoder", "decoder", "seq2seq")  # what PEFT supports the method for
    in_sequence = True  # PEFT's outputs include a position per virtual token (causal-LM logits)
    tensor_keys: tuple[str, ...] = ("prompt_embeddings",)  # what the adapter's safetensors holds besides a head
    shared_roles: frozenset[str] = frozenset()  # tensor roles stored once per distinct value in the bank
    positions_from_mask = False  # in generate, positions follow the attention mask (PEFT's prefix rule)
    input_level = True  # the prompt lives in the token-embedding space (retrieval can rank it)
    factors = None  # MPT: task -> (shared, cols, rows), what an MPT target adapter starts from

    # ---- reading PEFT's adapter ----------------------------------------------------------------------
    def check_model(self, spec, base_config, adapter_dir, peft_type: str) -> None:
        """Refuse a model family this kind cannot be served on (checked before the adapter's sizes)."""

    def check_config(self, ctx: ReadContext) -> None:
        """Sizes in adapter_config.json that must agree with the base model (input-level prompts: the model's
        attention heads and the width of its token embeddings, the hidden size but where they are projected up)."""
        expect("number of attention heads", ctx.cfg.get("num_attention_heads"), ctx.dims.num_heads, ctx.adapter_dir)
        expect("token embedding width (token_dim)" if ctx.dims.embed_size else "hidden size", ctx.cfg.get("token_dim"),
               ctx.dims.prompt_width, ctx.adapter_dir)

    def read(self, ctx: ReadContext) -> list[Task]:
        raise NotImplementedError

    def task_names(self, name: str, cfg: dict) -> list[tuple[str, int | None]]:
        """(task name, PEFT task id to pass PEFT's forward or None) of each task an adapter named `name` becomes."""
        return [(name, None)]

    def task(self, ctx: ReadContext, tensors: dict[str, np.ndarray], name: str | None = None, **extra) -> Task:
        return Task(name or ctx.name, self.name, ctx.cfg["peft_type"], ctx.n,
                    {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, **extra)

    # ---- the graph ----------------------------------------------------------------------------------------
    def slots(self, task: Task, has_prefix: bool) -> tuple[str | None, int]:
        """(slot group, slots this row needs) in a layout; group None: the row adds no prompt slots."""
        raise NotImplementedError

    def prepare(self, tasks: list[Task], layout) -> None:
        """Feeds shared by this kind's rows of a batch (MPT's factor table), before the rows are placed."""

    def place(self, i: int, task: Task, layout) -> None:
        """Write row i's prompt, mask, order and positions into the LayoutBuilder layout."""
        raise NotImplementedError

    # ---- other views of a task ----------------------------------------------------------------------------
    def input_prompt(self, task: Task) -> np.ndarray | None:
        """The task's virtual tokens as input embeddings [T, d] (prompt retrieval), or None if it has none."""
        return None

    def kv_prefix(self, task: Task) -> np.ndarray | None:
        """The task's key/values [layers, 2, kv_heads, n, head_dim] if its prompt already is a cache, else None
        (the generator then computes them once per task)."""
        return None


class InputPromptKind(PromptKind):
    """Virtual tokens as input embeddings [T, d] in front of the token embeddings (prompt tuning, P-tuning, CPT)."""

    def read_prompt(self, ctx: ReadContext) -> np.ndarray:
        emb = ctx.tensor("prompt_embeddings")
        # Seq2seq adapters with num_transformer_submodules=2 hold 2n rows; PEFT's generate puts the first n in front
        # of the encoder input and never uses the rest (see export/seq2seq_export.py), so the bank keeps those n.
        expect_shape("prompt_embeddings", emb, (ctx.n * ctx.subs, ctx.dims.prompt_width), ctx.adapter_dir)
        return emb[: ctx.n]

    def read(self, ctx: ReadContext) -> list[Task]:
        return [self.task(ctx, {"prompt": self.read_prompt(ctx)})]

    def slots(self, task, has_prefix):
        return "input", task.num_virtual_tokens

    def place(self, i, task, layout):
        t = task.num_virtual_tokens
        layout.feeds["prompt_embeds"][i, :t] = task.tensors["prompt"]
        layout.virtual_in_front(i, layout.mpt_slots, t)

    def input_prompt(self, task):
        return task.tensors["prompt"]


class KVPrefixKind(PromptKind):
    """Per-layer key/value prefixes the tokens attend to as a cache (prefix tuning, CARTRIDGE): no virtual tokens
    in the sequence; positions start after the prefix."""

    in_sequence = False
    positions_from_mask = True
    input_level = False

    def check_model(self, spec, base_config, adapter_dir, peft_type: str) -> None:
        if not spec.supports_prefix:
            raise AdapterError(f"adapter {str(adapter_dir)!r} is {peft_type}, which {base_config.model_type} does not "
                               "support (its attention takes no past key/values); use prompt tuning or P-tuning for "
                               "this model")

    def check_config(self, ctx: ReadContext) -> None:
        if ctx.spec.family.encoder_decoder:  # the prefix spans the decoder's self and cross attention
            if ctx.subs != 2:
                raise ctx.fail(f"has num_transformer_submodules={ctx.subs}; PEFT builds seq2seq adapters with 2 "
                               f"({ctx.cfg['peft_type']} needs both). Recreate it with PEFT's default")
            expect("number of layers (decoder)", ctx.cfg.get("num_layers"), decoder_sizes(ctx.base_config)[0],
                   ctx.adapter_dir)
        # PEFT sizes prefixes by the key/value heads (grouped-query attention: d = head_dim * kv_heads).
        expect("number of key/value heads", ctx.cfg.get("num_attention_heads"), ctx.dims.num_kv_heads, ctx.adapter_dir)
        expect("prefix token dim (head_dim * kv_heads)", ctx.cfg.get("token_dim"), ctx.dims.kv_dim, ctx.adapter_dir)

    def read_prefix(self, ctx: ReadContext) -> np.ndarray:
        """PEFT's get_prompt for a [n, layers * 2 * kv_dim] embedding: [layers, 2, kv_heads, n, head_dim]."""
        d = ctx.dims
        emb = ctx.tensor("prompt_embeddings")
        expect_shape(f"{ctx.cfg['peft_type']} prompt_embeddings", emb, (ctx.n, d.num_layers * 2 * d.kv_dim),
                     ctx.adapter_dir)
        per_layer = emb.reshape(ctx.n, 2 * d.num_layers, d.num_kv_heads, d.head_dim)
        if ctx.spec.family.encoder_decoder:
            # get_prompt with 2 submodules: rows doubled [n, 4L, H, hd] -> [4L, H, n, hd], split in chunks of 4 per
            # decoder layer (self K, self V, cross K, cross V); the cross half is discarded.
            per_layer = np.concatenate([per_layer, per_layer], axis=1).transpose(1, 2, 0, 3)
            return per_layer.reshape(d.num_layers, 4, d.num_kv_heads, ctx.n, d.head_dim)[:, :2]
        # view [n, 2L, H, hd] -> permute [2L, H, n, hd]; layer l uses rows 2l (K), 2l+1 (V).
        return per_layer.transpose(1, 2, 0, 3).reshape(d.num_layers, 2, d.num_kv_heads, ctx.n, d.head_dim)

    def read(self, ctx: ReadContext) -> list[Task]:
        return [self.task(ctx, {"prefix": self.read_prefix(ctx)})]

    def slots(self, task, has_prefix):
        return ("prefix", task.num_virtual_tokens) if has_prefix else (None, 0)

    def place(self, i, task, layout):
        if not layout.has_prefix:  # a seq2seq encoder: the prefix goes to the decoder's cache
            layout.virtual_in_front(i, 0, 0)
            return
        n, seq = task.num_virtual_tokens, layout.seq
        if layout.spec.prefix_positions == "roberta":
            # PEFT passes input_ids: RobertaEmbeddings.create_position_ids_from_input_ids with past length n.
            nonpad = (layout.input_ids[i] != layout.pad_token_id).astype(np.int64)
            positions = (np.cumsum(nonpad) + n) * nonpad + layout.pad_token_id
        elif layout.spec.positions_follow_mask:  # OPT: positions from the mask, the prefix counted first
            positions = layout.offset + n + layout.mask_positions(i)
        else:
            positions = layout.offset + n + np.arange(seq)
        layout.cache_in_front(i, task.tensors["prefix"], positions)

    def kv_prefix(self, task):
        return task.tensors["prefix"]
