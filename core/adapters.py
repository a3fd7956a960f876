"""Read what `PeftModel.save_pretrained` writes for prompt-learning adapters: the folder's files, checked safely
(safetensors only, links confined to an adapter root, sizes bounded), the checks every method shares, and the
classification head and labels. What the method's tensors mean is its kind's business (promptmux.kinds): each
adapter becomes one task, or several for Multitask Prompt Tuning.

Only safetensors is read: pickled `.bin` adapters are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from promptmux.kinds import BY_PEFT_TYPE
from promptmux.kinds.base import ReadContext

from .adapter_checks import AdapterError, config_int, expect  # AdapterError: also public here (promptmux.AdapterError)
from .archs import ArchSpec, Dims, arch_for, dims_of, usable_positions
from .families import FAMILIES
from .task import MAX_NAME, Task, task_name

LABELS_FILE = "labels.json"  # optional promptmux convention: {"id2label": {"0": "neg", ...}}


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
    expect("model type", other.get("model_type"), base_config.model_type, adapter_dir)
    if other.get("vocab_size") is not None:
        expect("vocab size", other["vocab_size"], base_config.vocab_size, adapter_dir)


def _head_tensors(
    weights: dict[str, np.ndarray], spec: ArchSpec, dims: Dims, adapter_dir: Path
) -> dict[str, np.ndarray]:
    """The per-task head modules PEFT saved (modules_to_save), keyed like 'classifier.weight'."""
    head_modules = {layer.module for layer in spec.head}
    head: dict[str, np.ndarray] = {}
    for key, value in weights.items():
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
        if first in head and head[first].shape[1] != dims.head_input:
            expect("classification head input size", head[first].shape[1], dims.head_input, adapter_dir)
        size = None  # each layer's bias, and the next layer's input, fit its outputs (else every request failed)
        for layer in spec.head:
            w, b = head.get(layer.module + ".weight"), head.get(layer.module + ".bias")
            if w is not None and size is not None:
                expect(f"{layer.module} input size", w.shape[1], size, adapter_dir, "the head layer before it")
            if w is not None and b is not None:
                expect(f"{layer.module}.bias size", b.shape[0], w.shape[0], adapter_dir, f"{layer.module}.weight")
            if w is not None and (w.ndim != 2 or 0 in w.shape):
                raise AdapterError(f"adapter {str(adapter_dir)!r}: {layer.module}.weight has shape {list(w.shape)}; a "
                                   "head layer has at least one output and one input (a classifier, one label)")
            size = w.shape[0] if w is not None else None
    return head


def load_adapter(name: str, adapter_dir: str | Path, base_config, root: str | Path | None = None) -> list[Task]:
    """Read one PEFT adapter folder and check it against the base model's config. root: every file read must
    resolve inside this folder (the server's --adapter-root), and nothing the adapter names outside it is read."""
    if not isinstance(name, str):
        raise AdapterError(f"task name {name!r} is not allowed: a task name is a string")
    name = task_name(name)  # a numpy string becomes the plain name the bank stores and messages print (NFC)
    if not name or "/" in name or name.strip() != name or not name.isprintable():
        raise AdapterError(f"task name {name!r} is not allowed: use a non-empty name without '/', control characters "
                           "(line breaks, tabs) or surrounding spaces")
    if len(name) > MAX_NAME:
        raise AdapterError(f"task name {name[:40]!r}... has {len(name)} characters; use at most {MAX_NAME}")
    adapter_dir, root = _adapter_dir(adapter_dir, root)
    cfg = read_adapter_config(adapter_dir, root)
    peft_type = cfg.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in BY_PEFT_TYPE:
        raise AdapterError(
            f"adapter {str(adapter_dir)!r} is {str(peft_type)[:40]}, not a prompt-learning method; promptmux serves "
            f"{', '.join(BY_PEFT_TYPE)}"
        )
    kind = BY_PEFT_TYPE[peft_type]
    spec = arch_for(base_config)
    dims = dims_of(base_config)

    family = spec.family
    expected_task = family.task_type
    if cfg.get("task_type") != expected_task:
        raise AdapterError(
            f"adapter {str(adapter_dir)!r} has task type {cfg.get('task_type')} but the base model "
            f"({base_config.model_type}) is exported for {expected_task}"
        )
    if family.name not in kind.families:
        raise AdapterError(f"adapter {str(adapter_dir)!r} is {peft_type}, which PEFT supports for "
                           f"{', '.join(FAMILIES[f].task_type for f in kind.families)} only, not {expected_task}")
    kind.check_model(spec, base_config, adapter_dir, peft_type)
    n = config_int(cfg, "num_virtual_tokens", adapter_dir, required=True)
    subs = config_int(cfg, "num_transformer_submodules", adapter_dir) or 1
    refused = family.submodules_message(subs)
    if refused:
        raise AdapterError(f"adapter {str(adapter_dir)!r} {refused}")
    _check_recorded_base(cfg, base_config, adapter_dir, root)
    expect("number of layers", cfg.get("num_layers"), dims.num_layers, adapter_dir)
    ctx = ReadContext(name, adapter_dir, cfg, spec, dims, base_config, {}, n, subs)
    kind.check_config(ctx)

    positions = usable_positions(base_config)
    if positions and n >= positions:  # no input could follow it
        raise AdapterError(f"adapter {str(adapter_dir)!r} has {n} virtual tokens, but the base model has {positions} "
                           "positions for them and the input together; retrain with fewer virtual tokens")
    weights = _load_safetensors(_weights_path(adapter_dir, root), f"{adapter_dir / 'adapter_model.safetensors'}")
    if "prompt_embeddings" not in weights:
        raise AdapterError(f"adapter {str(adapter_dir)!r} has no 'prompt_embeddings' tensor")
    broken = [k for k, v in weights.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
    if broken:  # served, it answered NaN (and its similarity scores broke rankings)
        raise AdapterError(f"adapter {str(adapter_dir)!r} has NaN or infinite values in {', '.join(broken[:5])}; "
                           "the training diverged: retrain it, or save a checkpoint from before")
    ctx.weights = {k: v for k, v in weights.items() if k in kind.tensor_keys}
    others = {k: v for k, v in weights.items() if k not in kind.tensor_keys}
    head = _head_tensors(others, spec, dims, adapter_dir) if family.classifies else {}
    if not family.classifies and others:
        raise AdapterError(
            f"adapter {str(adapter_dir)!r} saves {sorted(others)} (modules_to_save); promptmux serves one frozen "
            "backbone for every language-model task, so retrain without modules_to_save"
        )
    # labels.json names a classification head's outputs; a language-model adapter folder may hold any other file.
    labels = _read_labels(adapter_dir, head, spec, base_config, root) if family.classifies else None
    tasks = kind.read(ctx)
    for t in tasks:
        # Absolute: the manifest records it, and a deployment is used from other folders than the export's.
        t.head, t.labels, t.source = head, labels, str(Path(adapter_dir).resolve())
    return tasks


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
    outputs = head[last].shape[0] if last in head else base_config.num_labels if spec.head else len(labels)
    if outputs != len(labels):
        whose = "the adapter's head" if last in head else "the base model's head (the adapter saves none)"
        raise AdapterError(f"{shown} names {len(labels)} labels but {whose} has {outputs} outputs")
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
