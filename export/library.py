"""The prompt bank as a prompt library: SPoT-style retrieval and initialisation of new task prompts.

A deployment's bank holds every task's trained prompt. Two published uses of such a collection:

* **SPoT** (Vu et al., 2022, "SPoT: Better Frozen Model Adaptation through Soft Prompt Transfer"): a
  task's prompt is a *task embedding*. For a new target task, rank the source prompts by similarity
  to the target's prompt and initialise the target's prompt from the best one ("best of top-k": try
  each of the top k) or from a similarity-weighted average of the top k.
* **Multitask Prompt Tuning** (Wang et al., 2023): a target task starts from the source's shared
  prompt with the source tasks' rank-r factors averaged (PEFT's `AVERAGE_SOURCE_TASKS`).

`similar_tasks` ranks the bank's tasks for a query (a bank task or a PEFT adapter folder);
`init_adapter` writes a PEFT adapter folder initialised from chosen source task(s), with the files PEFT's
`save_pretrained` writes: `PeftModel.from_pretrained(base, folder)` loads it, and PEFT trains it as any saved
prompt adapter (`trainable_peft_model` below spells out the PEFT calls).

This lives in `promptmux.export` (not the runtime) because it is training-time tooling: it reads and
writes PEFT adapter folders and needs PEFT and the base model's weights, as export does; the serving
runtime stays free of PEFT. The bank is read with the runtime's `PromptBank`, as export writes it.

Which prompts are task embeddings
---------------------------------
Input-level prompts live in the model's token-embedding space and are comparable with each other:
prompt tuning and P-tuning (the bank holds P-tuning's encoder *output*, [T, d]) and MPT tasks (their
composed prompt shared * (cols @ rows), [T, d]). Prefix tuning's prompts are per-layer attention
keys/values, another space altogether, so prefix tasks are left out of the ranking (listed as
skipped) and a prefix query or source is refused with a message saying so.

Similarity of prompts of different lengths
------------------------------------------
* ``avg-cosine`` (SPoT's "average cosine"): cosine of the two prompts' mean tokens. The mean removes
  the length, so prompts of any lengths compare directly.
* ``per-token-cosine`` (SPoT's "per-token average cosine"): the mean cosine over *all* token pairs
  (i of the query, j of the source), (1 / (T_q T_s)) sum_ij cos(q_i, s_j). Every pair counts once, so
  this too is defined for any two lengths without aligning or resampling tokens.

Combining prompts of different lengths (``weighted``)
------------------------------------------------------
A weighted top-k initialisation is sum_i w_i * P_i with w_i = max(score_i, 0) / sum_j max(score_j, 0)
(uniform when no score is positive). Sources whose length differs from the target's number of
virtual tokens (default: the best source's length) are first resampled to it along the token axis
by linear interpolation (token j of the target sits at position j (T_s - 1) / (T - 1) of the source);
a source of the target length is used as it is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from promptmux.core.adapters import AdapterError, load_adapter, read_adapter_config
from promptmux.core.task import Task

METHODS = ("avg-cosine", "per-token-cosine")
INIT_KINDS = ("prompt-tuning", "mpt-target")
PROVENANCE_FILE = "promptmux_init.json"
COMPARABLE_KINDS = ("prompt", "mpt")


class LibraryError(ValueError):
    """A retrieval or initialisation request cannot be carried out; the message says why."""


# ---- task embeddings ------------------------------------------------------------------------------


def task_prompt(view) -> np.ndarray:
    """The input-level prompt [T, d] of a bank task (Task) or Task; MPT tasks composed.

    Raises LibraryError for prefix-tuning tasks, whose prompts are per-layer key/values.
    """
    kind = view.kind
    tensors = view.tensors if isinstance(view, Task) else {
        k: getattr(view, k) for k in ("prompt", "shared", "cols", "rows") if getattr(view, k) is not None}
    if kind == "prompt":
        return np.asarray(tensors["prompt"], dtype=np.float32)
    if kind == "mpt":
        # PEFT's own composition (MultitaskPromptEmbedding.forward): float32 shared * (cols @ rows).
        import torch

        shared, cols, rows = (torch.from_numpy(np.ascontiguousarray(tensors[k], dtype=np.float32))
                              for k in ("shared", "cols", "rows"))
        # Batched [1, T, r] @ [1, r, d] as PEFT runs it: a plain 2-D matmul can round differently.
        return (shared * torch.matmul(cols[None], rows[None])[0]).numpy()
    raise LibraryError(
        f"task {view.name!r} is prefix tuning: its prompt is per-layer attention keys/values, not input-level "
        "virtual tokens, so it cannot be compared with (or initialise) prompt-tuning, P-tuning or MPT prompts")


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n == 0, 1.0, n)


def prompt_similarity(a: np.ndarray, b: np.ndarray, method: str = "avg-cosine") -> float:
    """Similarity of two input-level prompts [Ta, d] and [Tb, d] (any lengths; see the module doc)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise LibraryError(f"prompts of shapes {a.shape} and {b.shape} cannot be compared: need [T, d] with one d")
    if method == "avg-cosine":
        return float(_unit(a.mean(0)) @ _unit(b.mean(0)))
    if method == "per-token-cosine":
        return float((_unit(a) @ _unit(b).T).mean())
    raise LibraryError(f"unknown similarity method {method!r}; use one of {', '.join(METHODS)}")


def resample_tokens(prompt: np.ndarray, length: int) -> np.ndarray:
    """Resample a prompt [T, d] to `length` tokens by linear interpolation along the token axis.

    The same length returns the prompt unchanged (bit for bit); one source token is repeated.
    """
    prompt = np.asarray(prompt)
    t = prompt.shape[0]
    if length < 1:
        raise LibraryError(f"number of virtual tokens must be at least 1, got {length}")
    if t == length:
        return prompt
    if t == 1:
        return np.repeat(prompt, length, axis=0)
    pos = np.linspace(0.0, t - 1, length) if length > 1 else np.zeros(1)
    lo = np.floor(pos).astype(int).clip(0, t - 1)
    hi = np.minimum(lo + 1, t - 1)
    frac = (pos - lo)[:, None]
    p = prompt.astype(np.float64)
    return ((1.0 - frac) * p[lo] + frac * p[hi]).astype(prompt.dtype)


# ---- the bank -------------------------------------------------------------------------------------


def _load(deploy_dir_or_bank):
    """(bank, base config or None, deploy dir or None) for a deployment folder or a PromptBank."""
    from promptmux.core.bank import PromptBank

    if isinstance(deploy_dir_or_bank, PromptBank):
        return deploy_dir_or_bank, None, None
    from promptmux.core.archs import arch_for
    from promptmux.core.folder import load_base_config

    folder = Path(deploy_dir_or_bank)
    config = load_base_config(folder)
    return PromptBank.load(folder, arch_for(config.model_type)), config, folder


def _comparable(bank) -> tuple[list[str], list[str]]:
    names, skipped = [], []
    for name in bank.names():
        (names if bank.index[name]["kind"] in COMPARABLE_KINDS else skipped).append(name)
    return names, skipped


def _query_prompt(query, bank, config) -> tuple[np.ndarray, str | None, str]:
    """(prompt [T, d], the bank task it is or None, a label) for a bank task name, adapter folder or array."""
    if isinstance(query, np.ndarray):
        return query, None, f"array{list(query.shape)}"
    if isinstance(query, Task):
        return task_prompt(query), None, query.name
    q = str(query)
    if q in bank:
        return task_prompt(bank.view(q)), q, q
    path = Path(q)
    if path.is_dir():
        if config is None:
            raise LibraryError("an adapter folder query needs the deployment folder (its config.json), not a bank")
        cfg = read_adapter_config(path)
        tasks = load_adapter("query", path, config)
        if len(tasks) != 1:
            raise LibraryError(
                f"query adapter {q!r} is a Multitask Prompt Tuning adapter with {len(tasks)} tasks; add it to the "
                "bank (promptmux tasks DIR add NAME=ADAPTER) and query one of its tasks by name, NAME/k")
        if tasks[0].kind == "prefix":
            raise LibraryError(
                f"query adapter {q!r} is {cfg.get('peft_type')}: prefix prompts are per-layer attention keys/values "
                "and are not comparable with input-level prompts; promptmux ranks prompt-tuning, P-tuning and MPT "
                "prompts only")
        return task_prompt(tasks[0]), None, q
    known = ", ".join(bank.names()) or "none"
    raise LibraryError(f"query {q!r} is neither a task of this bank ({known}) nor an adapter folder")


def similar_tasks(deploy_dir_or_bank, query, top_k: int | None = 5, method: str = "avg-cosine") -> list[dict]:
    """Rank the bank's input-level tasks by similarity to `query`, most similar first.

    deploy_dir_or_bank: a deployment folder (or a loaded PromptBank).
    query: a task of the bank (left out of the ranking), a PEFT adapter folder (prompt tuning, P-tuning,
        one-task MPT; checked against the deployment's base model), a Task or a [T, d] array.
    top_k: how many to return (None: all). method: "avg-cosine" or "per-token-cosine".
    Returns [{"rank", "task", "score", "kind", "peft_type", "num_virtual_tokens"}, ...]. Prefix-tuning tasks
    are not ranked (see `skipped_tasks`).
    """
    if method not in METHODS:
        raise LibraryError(f"unknown similarity method {method!r}; use one of {', '.join(METHODS)}")
    if top_k is not None and top_k < 1:
        raise LibraryError(f"top_k must be at least 1, got {top_k}")
    bank, config, _ = _load(deploy_dir_or_bank)
    rows = _rank(bank, config, query, method)
    return rows[:top_k] if top_k is not None else rows


def _rank(bank, config, query, method: str) -> list[dict]:
    q, q_task, _ = _query_prompt(query, bank, config)
    names, _ = _comparable(bank)
    rows = []
    for name in names:
        if name == q_task:
            continue
        view = bank.view(name)
        p = task_prompt(view)
        if p.shape[1] != q.shape[1]:
            raise LibraryError(f"query prompt has width {q.shape[1]} but task {name!r} has {p.shape[1]}")
        rows.append({"task": name, "score": prompt_similarity(q, p, method), "kind": view.kind,
                     "peft_type": view.peft_type, "num_virtual_tokens": int(p.shape[0])})
    rows.sort(key=lambda r: (-r["score"], r["task"]))
    return [{"rank": i + 1, **r} for i, r in enumerate(rows)]


def skipped_tasks(deploy_dir_or_bank) -> list[str]:
    """The bank's tasks that `similar_tasks` does not rank (prefix tuning)."""
    bank, _, _ = _load(deploy_dir_or_bank)
    return _comparable(bank)[1]


# ---- initialisation -------------------------------------------------------------------------------


@dataclass
class _Source:
    task: str
    score: float | None
    weight: float


def _weights(scores: list[float]) -> list[float]:
    pos = [max(s, 0.0) for s in scores]
    total = sum(pos)
    return [p / total for p in pos] if total > 0 else [1.0 / len(scores)] * len(scores)


def combine_prompts(prompts: list[np.ndarray], weights: list[float], length: int) -> np.ndarray:
    """sum_i w_i * resample(P_i, length), accumulated in float64, returned as float32."""
    acc = np.zeros((length, prompts[0].shape[1]), dtype=np.float64)
    for p, w in zip(prompts, weights):
        acc += w * resample_tokens(p, length).astype(np.float64)
    return acc.astype(np.float32)


def _mpt_parts(bank, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    view = bank.view(name)
    if view.kind != "mpt":
        raise LibraryError(f"--kind mpt-target needs Multitask Prompt Tuning source tasks; {name!r} is {view.peft_type}")
    return view.shared, view.cols, view.rows, bank.index[name]["tensors"]["shared"]


def _check_base(config, deploy_dir: Path | None, base_dir: Path) -> object:
    from promptmux.core.folder import MANIFEST, config_hash, load_base_config

    base_config = load_base_config(base_dir)
    if config is None:
        return base_config
    if base_config.model_type != config.model_type:
        raise LibraryError(f"--base {str(base_dir)!r} is a {base_config.model_type} model but the deployment's base is "
                           f"{config.model_type}")
    manifest = (deploy_dir / MANIFEST) if deploy_dir else None
    if manifest is not None and manifest.is_file():
        recorded = json.loads(manifest.read_text()).get("base", {}).get("config_sha256")
        if recorded and recorded != config_hash(base_config):
            raise LibraryError(f"--base {str(base_dir)!r} is not the model this deployment was exported from (its config "
                               "differs); the prompts only mean something with that base model")
    return base_config


def _task_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def init_adapter(deploy_dir, base_dir, out_dir, from_task: str | None = None, top_k: int | None = None,
                 weighted: bool = False, kind: str = "prompt-tuning", query=None, method: str = "avg-cosine",
                 num_virtual_tokens: int | None = None, num_labels: int | None = None, seed: int = 0,
                 overwrite: bool = False) -> list[dict]:
    """Write PEFT adapter folder(s) whose prompt is initialised from the bank; PEFT loads and trains them as usual.

    Sources (exactly one of):
      from_task: one bank task (prompt-tuning: its prompt; MPT tasks give their composed prompt). For
          kind="mpt-target", an MPT task NAME/k (its factors, PEFT's EXACT_SOURCE_TASK) or an MPT adapter
          name NAME (all of NAME/0..K-1 averaged, PEFT's AVERAGE_SOURCE_TASKS).
      top_k (+ query, + method): the k tasks most similar to `query` (see `similar_tasks`).
          weighted=False: SPoT's "best of top-k" -- one adapter per source in out_dir/<rank>-<task>
          (top_k=1: the adapter is out_dir itself); train each and keep the best.
          weighted=True: one adapter, the score-weighted average of the k sources (module doc).
    kind: "prompt-tuning" writes a PROMPT_TUNING adapter with num_virtual_tokens tokens (default: the best
        source's length; other lengths resample). "mpt-target" writes a MULTITASK_PROMPT_TUNING adapter with
        num_tasks=1: the source's shared prompt and the source tasks' cols and rows averaged (weighted: with
        the weights above; the sources must share that shared prompt and rank).
    num_labels: classification models: outputs of the (freshly initialised, trainable) head; default the
        base config's. seed: seeds that head's initialisation.
    Returns one dict per adapter written: {"path", "kind", "num_virtual_tokens", "sources": [{"task", "score",
    "weight"}], ...}; the same record is written into each folder as promptmux_init.json.
    """
    if kind not in INIT_KINDS:
        raise LibraryError(f"unknown --kind {kind!r}; use one of {', '.join(INIT_KINDS)}")
    if (from_task is None) == (top_k is None):
        raise LibraryError("give exactly one source: from_task (--from TASK) or top_k (--top-k K with --query)")
    if top_k is not None and top_k < 1:
        raise LibraryError(f"top_k must be at least 1, got {top_k}")
    if top_k is not None and query is None:
        raise LibraryError("--top-k ranks the bank against a query: pass --query TASK_OR_ADAPTER_DIR (SPoT uses a "
                           "prompt briefly trained on the target task)")
    if from_task is not None and (weighted or query is not None):
        raise LibraryError("--weighted and --query go with --top-k, not with --from")
    if num_virtual_tokens is not None and num_virtual_tokens < 1:
        raise LibraryError(f"number of virtual tokens must be at least 1, got {num_virtual_tokens}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite")

    bank, config, deploy_path = _load(deploy_dir)
    base_config = _check_base(config, deploy_path, Path(base_dir))

    # ---- choose the sources: a list of plans, one per adapter to write ------------------------------
    scores: dict[str, float] = {}
    if top_k is not None:
        if method not in METHODS:
            raise LibraryError(f"unknown similarity method {method!r}; use one of {', '.join(METHODS)}")
        ranked = _rank(bank, config or base_config, query, method)
        if kind == "mpt-target":
            ranked = [r for r in ranked if r["kind"] == "mpt"]
        if not ranked:
            what = "Multitask Prompt Tuning tasks" if kind == "mpt-target" else "prompt-tuning, P-tuning or MPT tasks"
            raise LibraryError(f"the bank holds no {what} to initialise from")
        ranked = ranked[:top_k]
        scores = {r["task"]: r["score"] for r in ranked}
        names = [r["task"] for r in ranked]
        if weighted:
            plans = [[_Source(n, scores[n], w) for n, w in zip(names, _weights([scores[n] for n in names]))]]
        else:
            plans = [[_Source(n, scores[n], 1.0)] for n in names]
    else:
        if from_task in bank:
            names = [from_task]
        elif kind == "mpt-target" and any(n.startswith(from_task + "/") for n in bank.names()):
            names = [n for n in bank.names() if n.startswith(from_task + "/")]
        else:
            raise LibraryError(f"--from {from_task!r} names no task of this bank ({', '.join(bank.names()) or 'none'})")
        plans = [[_Source(n, None, 1.0 / len(names)) for n in names]]

    # ---- build each initialisation --------------------------------------------------------------------
    written: list[dict] = []
    multi = len(plans) > 1
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        results = []
        for rank, plan in enumerate(plans, start=1):
            record = {"kind": kind, "method": method if top_k is not None else None,
                      "strategy": ("from-task" if top_k is None else "top-k-weighted" if weighted else "best-of-top-k"),
                      "query": None if query is None or isinstance(query, (np.ndarray, Task)) else str(query),
                      "sources": [{"task": s.task, "score": s.score, "weight": s.weight} for s in plan]}
            if kind == "prompt-tuning":
                prompts = [task_prompt(bank.view(s.task)) for s in plan]
                length = num_virtual_tokens or prompts[0].shape[0]
                if len(plan) == 1 and plan[0].weight == 1.0:
                    init = resample_tokens(prompts[0], length).astype(np.float32)
                else:
                    init = combine_prompts(prompts, [s.weight for s in plan], length)
                record["resampled"] = [s.task for s, p in zip(plan, prompts) if p.shape[0] != length]
                tensors = {"prompt": init}
            else:
                parts = [_mpt_parts(bank, s.task) for s in plan]
                shared, cols0, _, key0 = parts[0]
                keep = [i for i, p in enumerate(parts) if p[3] == key0 and p[1].shape == cols0.shape]
                if len(keep) < len(plan):
                    record["dropped"] = {"tasks": [plan[i].task for i in range(len(plan)) if i not in keep],
                                         "why": "another shared prompt or rank than the best source"}
                    plan, parts = [plan[i] for i in keep], [parts[i] for i in keep]
                    ws = _weights([s.score for s in plan]) if weighted else [1.0 / len(plan)] * len(plan)
                    for s, w in zip(plan, ws):
                        s.weight = w
                    record["sources"] = [{"task": s.task, "score": s.score, "weight": s.weight} for s in plan]
                if num_virtual_tokens is not None and num_virtual_tokens != shared.shape[0]:
                    raise LibraryError(f"an mpt-target keeps the source's {shared.shape[0]} virtual tokens (its factors "
                                       f"are per token); --num-virtual-tokens {num_virtual_tokens} does not fit")
                cols = _weighted_mean([p[1] for p in parts], [s.weight for s in plan])
                rows = _weighted_mean([p[2] for p in parts], [s.weight for s in plan])
                tensors = {"shared": np.asarray(shared, dtype=np.float32), "cols": cols, "rows": rows}
                record["num_ranks"] = int(cols.shape[1])
            record["num_virtual_tokens"] = int(next(iter(tensors.values())).shape[0])
            folder = tmp_root / (f"{rank}-{_task_slug(plan[0].task)}" if multi else "adapter")
            _write_adapter(base_dir, base_config, folder, kind, tensors, num_labels, seed, record)
            rel = folder.name if multi else None
            results.append((rel, record))
        # move into place
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        if multi:
            os.replace(tmp_root, out_dir)
            for rel, record in results:
                record["path"] = str(out_dir / rel)
                written.append(record)
        else:
            os.replace(tmp_root / "adapter", out_dir)
            results[0][1]["path"] = str(out_dir)
            written.append(results[0][1])
    finally:
        if tmp_root.exists():
            shutil.rmtree(tmp_root, ignore_errors=True)
    for record in written:  # the record's path is final only now
        Path(record["path"], PROVENANCE_FILE).write_text(json.dumps(record, indent=2))
    return written


def _weighted_mean(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    if len(arrays) == 1 and weights[0] == 1.0:
        return np.asarray(arrays[0], dtype=np.float32)
    if len(set(weights)) == 1:  # uniform: the plain mean, as PEFT's AVERAGE_SOURCE_TASKS computes it
        import torch

        return torch.from_numpy(np.stack(arrays).astype(np.float32)).mean(0).numpy()
    acc = np.zeros_like(arrays[0], dtype=np.float64)
    for a, w in zip(arrays, weights):
        acc += w * a.astype(np.float64)
    return acc.astype(np.float32)


def _load_base(base_dir, family: str, num_labels: int | None):
    """The base model as PEFT trains it (fp32); a classifier head of another size is freshly initialised."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    cls = {"encoder": AutoModelForSequenceClassification, "decoder": AutoModelForCausalLM,
           "seq2seq": AutoModelForSeq2SeqLM}[family]
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels is not None else {}
    return cls.from_pretrained(str(base_dir), dtype=torch.float32, **kwargs)


def _write_adapter(base_dir, base_config, folder: Path, kind: str, tensors: dict[str, np.ndarray],
                   num_labels: int | None, seed: int, record: dict) -> None:
    """get_peft_model on the base, set the prompt parameters, save_pretrained: the files PEFT itself writes."""
    import torch
    from peft import MultitaskPromptTuningConfig, PromptTuningConfig, get_peft_model

    from promptmux.core.archs import TASK_TYPE_FOR_FAMILY, arch_for, dims_of

    spec, dims = arch_for(base_config.model_type), dims_of(base_config)
    length = int(next(iter(tensors.values())).shape[0])
    common = dict(task_type=TASK_TYPE_FOR_FAMILY[spec.family], num_virtual_tokens=length, token_dim=dims.hidden_size,
                  num_layers=dims.num_layers, num_attention_heads=dims.num_heads, num_transformer_submodules=1)
    if kind == "prompt-tuning":
        peft_config = PromptTuningConfig(prompt_tuning_init="RANDOM", **common)
    else:
        peft_config = MultitaskPromptTuningConfig(prompt_tuning_init="RANDOM", num_tasks=1,
                                                  num_ranks=int(tensors["cols"].shape[1]), **common)
    torch.manual_seed(seed)
    labels = num_labels if spec.family == "encoder" else None
    model = get_peft_model(_load_base(base_dir, spec.family, labels), peft_config)
    encoder = model.prompt_encoder["default"]
    with torch.no_grad():
        if kind == "prompt-tuning":
            encoder.embedding.weight.copy_(torch.from_numpy(tensors["prompt"]))
        else:
            encoder.embedding.weight.copy_(torch.from_numpy(tensors["shared"]))
            encoder.prefix_task_cols.copy_(torch.from_numpy(tensors["cols"])[None])
            encoder.prefix_task_rows.copy_(torch.from_numpy(tensors["rows"])[None])
    model.save_pretrained(str(folder))
    if spec.family == "encoder":
        record["num_labels"] = int(model.base_model.config.num_labels)
    record["peft_type"] = "PROMPT_TUNING" if kind == "prompt-tuning" else "MULTITASK_PROMPT_TUNING"


def trainable_peft_model(base_model, adapter_dir):
    """Plain PEFT, for training an adapter folder further (here: one `init_adapter` wrote).

    PEFT's `PeftModel.from_pretrained(..., is_trainable=True)` refuses prompt-learning adapters, so resuming
    training is: the saved config with inference_mode off, `get_peft_model`, then the saved weights (prompt,
    MPT factors, head) loaded into it. Equivalent to these lines of user code.
    """
    from peft import PeftConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict

    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = False
    model = get_peft_model(base_model, config)
    set_peft_model_state_dict(model, load_peft_weights(str(adapter_dir), device="cpu"))
    return model


__all__ = ["AdapterError", "LibraryError", "METHODS", "INIT_KINDS", "combine_prompts", "init_adapter",
           "prompt_similarity", "resample_tokens", "similar_tasks", "skipped_tasks", "task_prompt",
           "trainable_peft_model"]
