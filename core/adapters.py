"""Read what `PeftModel.save_pretrained` writes for prompt-learning adapters.

An adapter directory holds adapter_config.json and adapter_model.safetensors. Each adapter
becomes one task (or, for Multitask Prompt Tuning, one task per trained task id), in the
layout the prompt bank stores:

- "prompt" (PROMPT_TUNING, P_TUNING): the input-level virtual tokens [T, d]. For P-tuning PEFT
  saves the prompt encoder's *output*, so both reparameterizations arrive as plain embeddings.
- "prefix" (PREFIX_TUNING): per-layer key/value prefixes [L, 2, kv_heads, n, head_dim], the
  view/permute of PEFT's `get_prompt`.
- "mpt" (MULTITASK_PROMPT_TUNING): the shared prompt [T, d] and the task's rank-r factors
  cols [T, r], rows [r, d]; prompt = shared * (cols @ rows).

Only safetensors is read: pickled `.bin` adapters are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .archs import TASK_TYPE_FOR_FAMILY, ArchSpec, Dims, arch_for, dims_of

KIND_OF_PEFT_TYPE = {
    "PROMPT_TUNING": "prompt",
    "P_TUNING": "prompt",
    "PREFIX_TUNING": "prefix",
    "MULTITASK_PROMPT_TUNING": "mpt",
}

LABELS_FILE = "labels.json"  # optional promptmux convention: {"id2label": {"0": "neg", ...}}


class AdapterError(ValueError):
    """An adapter directory cannot be served with this base model; the message says why and what to do."""


@dataclass
class TaskPrompt:
    """One servable task, in the bank's layout (float32 numpy arrays)."""

    name: str
    kind: str  # "prompt" | "prefix" | "mpt"
    peft_type: str
    num_virtual_tokens: int
    tensors: dict[str, np.ndarray]  # prompt | prefix | shared, cols, rows
    head: dict[str, np.ndarray] = field(default_factory=dict)  # "classifier.weight" -> array
    labels: list[str] | None = None
    source: str = ""


MAX_JSON_BYTES = 1 << 20  # adapter_config.json, labels.json: a few hundred bytes in practice


def _file(adapter_dir: Path, name: str, root: Path | None) -> Path | None:
    """The adapter's file `name` resolved (symlinks followed), or None if there is none. With a root, a file
    that resolves outside it is refused before anything is opened."""
    path = adapter_dir / name
    try:
        real = path.resolve(strict=True)
        if not real.is_file():
            return None
    except FileNotFoundError:
        return None
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13), a name too long
        raise AdapterError(f"{name} of adapter {str(adapter_dir)!r} cannot be resolved "
                           f"({getattr(e, 'strerror', None) or 'symlink loop'}); replace it with a plain file") from None
    if root is not None and not real.is_relative_to(root):
        raise AdapterError(f"{name} of adapter {str(adapter_dir)!r} is a link that leads outside the adapter root; "
                           "adapter files must lie under the adapter root")
    return real


def _read_json(path: Path, shown: str):
    """A small JSON file; anything unreadable is an AdapterError naming the file (never its contents)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise AdapterError(f"{shown} is over {MAX_JSON_BYTES} bytes; it is not a PEFT file")
        return json.loads(data.decode("utf-8"))
    except OSError as e:
        raise AdapterError(f"{shown} cannot be read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterError(f"{shown} is not valid JSON: {str(e)[:200]}") from None


def _load_safetensors(path: Path, shown: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file  # torch reader: handles bf16/fp16 files

    try:
        return {k: v.float().numpy() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as e:
        raise AdapterError(f"{shown} is not a readable safetensors file ({str(e)[:200]}); re-save the adapter "
                           "with PeftModel.save_pretrained") from None


def _adapter_dir(adapter_dir: str | Path, root: str | Path | None) -> tuple[Path, Path | None]:
    adapter_dir = Path(adapter_dir)
    if root is not None:
        root = Path(root).resolve()
        try:
            inside = adapter_dir.resolve(strict=True).is_relative_to(root)
        except (OSError, RuntimeError):
            inside = False
        if not inside:
            raise AdapterError(f"adapter directory {str(adapter_dir)!r} is not a folder under the adapter root")
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter directory {str(adapter_dir)!r} does not exist")
    return adapter_dir, root


def read_adapter_config(adapter_dir: str | Path, root: str | Path | None = None) -> dict:
    """adapter_config.json as a dict. root: every file read must resolve inside this folder."""
    adapter_dir, root = _adapter_dir(adapter_dir, root)
    cfg_path = _file(adapter_dir, "adapter_config.json", root)
    if cfg_path is None:
        raise AdapterError(
            f"{str(adapter_dir)!r} has no adapter_config.json; pass the folder that PeftModel.save_pretrained wrote"
        )
    cfg = _read_json(cfg_path, f"{adapter_dir / 'adapter_config.json'}")
    if not isinstance(cfg, dict):
        raise AdapterError(f"{adapter_dir / 'adapter_config.json'} must hold a JSON object, as PEFT writes it")
    return cfg


def _config_int(cfg: dict, key: str, adapter_dir: Path, required: bool = False) -> int | None:
    """A size from adapter_config.json: a positive integer (absent or null: None, unless required)."""
    value = cfg.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 31:
        got = "missing" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
        raise AdapterError(f"adapter_config.json of {str(adapter_dir)!r}: {key} must be a positive integer, got "
                           f"{got}; re-save the adapter with PEFT")
    return value


def _weights_path(adapter_dir: Path, root: Path | None) -> Path:
    st = _file(adapter_dir, "adapter_model.safetensors", root)
    if st is not None:
        return st
    if (adapter_dir / "adapter_model.bin").is_file():
        raise AdapterError(
            f"{str(adapter_dir)!r} holds adapter_model.bin, a pickle; promptmux loads safetensors only and never "
            "unpickles files. Re-save the adapter with PeftModel.save_pretrained(dir, safe_serialization=True)."
        )
    raise AdapterError(f"{str(adapter_dir)!r} has no adapter_model.safetensors")


def _expect(what: str, adapter_value, base_value, adapter_dir: Path, expected_from: str = "the base model") -> None:
    if adapter_value is not None and adapter_value != base_value:
        raise AdapterError(
            f"adapter {str(adapter_dir)!r} does not fit the base model: {what} is {adapter_value} in the adapter "
            f"but {base_value} in {expected_from}"
        )


def _expect_shape(what: str, tensor: np.ndarray, shape: tuple, adapter_dir: Path) -> None:
    _expect(f"{what} shape", tuple(tensor.shape), shape, adapter_dir,
            expected_from="what adapter_config.json and the base model's sizes imply")


def _check_recorded_base(cfg: dict, base_config, adapter_dir: Path, root: Path | None) -> None:
    """If the adapter names a base model folder that exists here, its config must agree with ours. Not under
    an adapter root: the adapter must not make the server open (or quote) files outside it."""
    recorded = cfg.get("base_model_name_or_path")
    if recorded is None:
        return
    if not isinstance(recorded, str) or len(recorded) > 4096 or "\x00" in recorded:
        raise AdapterError(f"adapter_config.json of {str(adapter_dir)!r}: base_model_name_or_path must be a "
                           "folder name or a hub id (a string of at most 4096 characters)")
    if root is not None or not recorded:
        return
    try:
        rec_cfg = Path(recorded) / "config.json"
        if not rec_cfg.is_file():
            return  # a hub id or a folder from another machine: nothing to compare against
    except (OSError, ValueError):
        return
    other = _read_json(rec_cfg, str(rec_cfg))
    if not isinstance(other, dict):
        return
    _expect("model type", other.get("model_type"), base_config.model_type, adapter_dir)
    if other.get("vocab_size") is not None:
        _expect("vocab size", other["vocab_size"], base_config.vocab_size, adapter_dir)


def _head_tensors(
    weights: dict[str, np.ndarray], spec: ArchSpec, dims: Dims, adapter_dir: Path
) -> dict[str, np.ndarray]:
    """The per-task head modules PEFT saved (modules_to_save), keyed like 'classifier.weight'."""
    head_modules = {layer.module for layer in spec.head}
    head: dict[str, np.ndarray] = {}
    for key, value in weights.items():
        if key in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows"):
            continue
        name = key
        for prefix in ("base_model.model.", "base_model."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        module, _, param = name.rpartition(".")
        if module not in head_modules or param not in ("weight", "bias"):
            raise AdapterError(
                f"adapter {str(adapter_dir)!r} saves {key!r} (modules_to_save), which is not part of this model's "
                f"classification head ({', '.join(sorted(head_modules)) or 'none'}); promptmux serves one frozen "
                "backbone for every task, so only the head can differ per task. Retrain without that module in "
                "modules_to_save."
            )
        head[name] = value
    if head:
        first = spec.head[0].module + ".weight"
        if first in head and head[first].shape[1] != dims.hidden_size:
            _expect("classification head input size", head[first].shape[1], dims.hidden_size, adapter_dir)
    return head


def load_adapter(name: str, adapter_dir: str | Path, base_config, root: str | Path | None = None) -> list[TaskPrompt]:
    """Read one PEFT adapter folder and check it against the base model's config. root: every file read must
    resolve inside this folder (the server's --adapter-root), and nothing the adapter names outside it is read."""
    if not name or "/" in name or name.strip() != name:
        raise AdapterError(f"task name {name!r} is not allowed: use a non-empty name without '/' or surrounding spaces")
    adapter_dir, root = _adapter_dir(adapter_dir, root)
    cfg = read_adapter_config(adapter_dir, root)
    peft_type = cfg.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in KIND_OF_PEFT_TYPE:
        raise AdapterError(
            f"adapter {str(adapter_dir)!r} is {str(peft_type)[:40]}, not a prompt-learning method; promptmux serves "
            f"{', '.join(KIND_OF_PEFT_TYPE)}"
        )
    kind = KIND_OF_PEFT_TYPE[peft_type]
    spec = arch_for(base_config.model_type)
    dims = dims_of(base_config)

    expected_task = TASK_TYPE_FOR_FAMILY[spec.family]
    if cfg.get("task_type") != expected_task:
        raise AdapterError(
            f"adapter {str(adapter_dir)!r} has task type {cfg.get('task_type')} but the base model "
            f"({base_config.model_type}) is exported for {expected_task}"
        )
    if kind == "prefix" and not spec.supports_prefix:
        raise AdapterError(
            f"adapter {str(adapter_dir)!r} is PREFIX_TUNING, which {base_config.model_type} does not support "
            "(its attention takes no past key/values); use prompt tuning or P-tuning for this model"
        )
    n = _config_int(cfg, "num_virtual_tokens", adapter_dir, required=True)
    subs = _config_int(cfg, "num_transformer_submodules", adapter_dir) or 1
    if spec.family != "seq2seq" and subs != 1:
        raise AdapterError(
            f"adapter {str(adapter_dir)!r} has num_transformer_submodules={subs}; "
            "encoder-only and decoder-only models use 1"
        )
    if spec.family == "seq2seq" and (subs not in (1, 2) or (kind == "prefix" and subs != 2)):
        raise AdapterError(
            f"adapter {str(adapter_dir)!r} has num_transformer_submodules={subs}; PEFT builds seq2seq adapters with 2 "
            "(1 is also accepted for prompt tuning, P-tuning and MPT). Recreate it with PEFT's default"
        )
    if spec.family == "seq2seq" and kind == "prefix":
        _expect("number of layers (decoder)", cfg.get("num_layers"), getattr(base_config, "num_decoder_layers", None),
                adapter_dir)
    _check_recorded_base(cfg, base_config, adapter_dir, root)
    _expect("number of layers", cfg.get("num_layers"), dims.num_layers, adapter_dir)
    if kind == "prefix":
        # PEFT sizes prefixes by the key/value heads (grouped-query attention: d = head_dim * kv_heads).
        _expect("number of key/value heads", cfg.get("num_attention_heads"), dims.num_kv_heads, adapter_dir)
        _expect("prefix token dim (head_dim * kv_heads)", cfg.get("token_dim"), dims.kv_dim, adapter_dir)
    else:
        _expect("number of attention heads", cfg.get("num_attention_heads"), dims.num_heads, adapter_dir)
        _expect("hidden size", cfg.get("token_dim"), dims.hidden_size, adapter_dir)

    weights = _load_safetensors(_weights_path(adapter_dir, root), f"{adapter_dir / 'adapter_model.safetensors'}")
    if "prompt_embeddings" not in weights:
        raise AdapterError(f"adapter {str(adapter_dir)!r} has no 'prompt_embeddings' tensor")
    emb = weights["prompt_embeddings"]
    head = _head_tensors(weights, spec, dims, adapter_dir) if spec.family == "encoder" else {}
    if spec.family != "encoder" and len(weights) > (3 if kind == "mpt" else 1):
        extra = sorted(set(weights) - {"prompt_embeddings", "prefix_task_cols", "prefix_task_rows"})
        raise AdapterError(
            f"adapter {str(adapter_dir)!r} saves {extra} (modules_to_save); promptmux serves one frozen backbone "
            "for every language-model task, so retrain without modules_to_save"
        )
    # labels.json names a classification head's outputs; a language-model adapter folder may hold any other file.
    labels = _read_labels(adapter_dir, head, spec, base_config, root) if spec.family == "encoder" else None
    # Absolute: the manifest records it, and a deployment is used from other folders than the export's.
    common = dict(peft_type=peft_type, num_virtual_tokens=n, head=head, labels=labels,
                  source=str(Path(adapter_dir).resolve()))

    # Seq2seq adapters with num_transformer_submodules=2 hold 2n prompt rows; PEFT's generate puts the first n in
    # front of the encoder input and never uses the rest (see export/seq2seq.py), so the bank keeps those n.
    rows_saved = n * subs if kind != "prefix" else n
    if kind == "prompt":
        _expect_shape("prompt_embeddings", emb, (rows_saved, dims.hidden_size), adapter_dir)
        return [TaskPrompt(name, kind, tensors={"prompt": np.ascontiguousarray(emb[:n])}, **common)]
    if kind == "prefix":
        width = dims.num_layers * 2 * dims.kv_dim
        _expect_shape("prefix prompt_embeddings", emb, (n, width), adapter_dir)
        per_layer = emb.reshape(n, 2 * dims.num_layers, dims.num_kv_heads, dims.head_dim)
        if spec.family == "seq2seq":
            # PEFT get_prompt with 2 submodules: rows doubled [n, 4L, H, hd] -> [4L, H, n, hd], split in chunks of
            # 4 per decoder layer (self K, self V, cross K, cross V); the cross half is discarded.
            per_layer = np.concatenate([per_layer, per_layer], axis=1).transpose(1, 2, 0, 3)
            kv = per_layer.reshape(dims.num_layers, 4, dims.num_kv_heads, n, dims.head_dim)[:, :2]
        else:
            # PEFT get_prompt: view [n, 2L, H, hd] -> permute [2L, H, n, hd]; layer l uses rows 2l (K), 2l+1 (V).
            kv = per_layer.transpose(1, 2, 0, 3).reshape(dims.num_layers, 2, dims.num_kv_heads, n, dims.head_dim)
        return [TaskPrompt(name, kind, tensors={"prefix": np.ascontiguousarray(kv)}, **common)]

    # Multitask prompt tuning: one task per task id, sharing one prompt.
    cols, rows = weights.get("prefix_task_cols"), weights.get("prefix_task_rows")
    if cols is None or rows is None:
        raise AdapterError(f"MPT adapter {str(adapter_dir)!r} lacks prefix_task_cols / prefix_task_rows")
    if cols.ndim != 3:
        raise AdapterError(f"MPT adapter {str(adapter_dir)!r}: prefix_task_cols has shape {tuple(cols.shape)}, "
                           "not [tasks, tokens, ranks]")
    k = _config_int(cfg, "num_tasks", adapter_dir) or cols.shape[0]
    r = _config_int(cfg, "num_ranks", adapter_dir) or cols.shape[2]
    _expect_shape("MPT shared prompt", emb, (rows_saved, dims.hidden_size), adapter_dir)
    _expect_shape("MPT prefix_task_cols", cols, (k, rows_saved, r), adapter_dir)
    emb, cols = np.ascontiguousarray(emb[:n]), cols[:, :n]
    _expect_shape("MPT prefix_task_rows", rows, (k, r, dims.hidden_size), adapter_dir)
    return [
        TaskPrompt(
            f"{name}/{t}",
            kind,
            tensors={"shared": emb, "cols": np.ascontiguousarray(cols[t]), "rows": np.ascontiguousarray(rows[t])},
            **common,
        )
        for t in range(k)
    ]


def _read_labels(adapter_dir: Path, head: dict[str, np.ndarray], spec: ArchSpec, base_config,
                 root: Path | None) -> list[str] | None:
    """Label names from the adapter's labels.json, else from the base config's id2label where it names them."""
    path = _file(adapter_dir, LABELS_FILE, root)
    if path is None:
        return _base_labels(base_config, head, spec)
    shown = str(adapter_dir / LABELS_FILE)
    try:
        id2label = _read_json(path, shown)["id2label"]
        labels = [str(id2label[str(i)]) for i in range(len(id2label))]
    except (KeyError, TypeError) as e:
        raise AdapterError(f"{shown} must be JSON like {{\"id2label\": {{\"0\": \"neg\", \"1\": \"pos\"}}}}: "
                           f"{str(e)[:80]}") from None
    last = spec.head[-1].module + ".weight" if spec.head else None
    if last in head and head[last].shape[0] != len(labels):
        raise AdapterError(f"{shown} names {len(labels)} labels but the adapter's head has {head[last].shape[0]} outputs")
    return labels


def _base_labels(config, head: dict[str, np.ndarray], spec: ArchSpec) -> list[str] | None:
    """The base config's id2label, unless it is transformers' placeholder (LABEL_0, ...) or does not fit the head
    the task uses (the adapter's own, else the base model's: config.num_labels outputs)."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    labels = [id2label.get(i) for i in range(len(id2label))]
    if not labels or None in labels or labels == [f"LABEL_{i}" for i in range(len(labels))]:
        return None
    last = spec.head[-1].module + ".weight" if spec.head else None
    outputs = head[last].shape[0] if last in head else config.num_labels
    return labels if outputs == len(labels) else None
