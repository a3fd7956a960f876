"""Task-count scaling: 1, 10, 100, 1,000 ... tasks on one engine.

For each kind and task count, a synthetic prompt bank is built with the bank API (no training: random prompts
at the scale of a trained one) and saved beside the deployment's own graph files (linked, not copied), so
every configuration runs the same exported engine:

- prompt:       prompt tuning, P virtual tokens per task (P = 20: a realistic prompt-tuning length);
- mpt-factors:  Multitask Prompt Tuning as the bank stores it: one shared prompt [P, d] per MPT adapter of 10
                tasks, each task its rank-r factors cols [P, r] and rows [r, d], composed inside the graph;
- mpt-composed: the same MPT tasks with each prompt composed ahead of time (shared * cols @ rows) and stored
                as a plain prompt [P, d].

The banks of each kind are built by prompt_kinds.synthetic_tasks.

Classification deployments give every task its own head (modules_to_save, 2 labels), as trained adapters do.
Measured: bank size (file bytes and tensor bytes), the time to load the bank and the whole Runtime (bank +
ONNX Runtime session), the time to first touch every task's view, and throughput with uniform traffic over all
the tasks (batch size --scaling-batch-size, sequence length --scaling-seq-len), rounds interleaved across every
kind and count so that machine load hits all alike.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from promptmux.core.archs import pad_id as graph_pad_id
from promptmux.runtime.text import too_long

from .baseline import PromptmuxSystem
from .measure import MB, measure_jobs, progress, rss, summarize, warm_up
from .prompt_kinds import MPT_TASKS_PER_ADAPTER, check_scaling_kinds, synthetic_tasks
from .workload import assign_tasks, make_workload

if TYPE_CHECKING:  # the annotations only: the runtime is imported where it runs
    from promptmux.runtime.runtime import Runtime


def deployment_with_bank(src: Path, dest: Path, rt: Runtime, tasks: list) -> dict:
    """dest: src's graphs (linked) and files, with a bank of exactly `tasks`. Returns the bank's sizes."""
    from promptmux.core.bank import LEGACY_FILE, STORE_FILE, PromptBank
    from promptmux.core.folder import MANIFEST

    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.name in (STORE_FILE, LEGACY_FILE) or f.name.startswith(STORE_FILE) or f.name.startswith("."):
            continue
        if f.suffix in (".onnx", ".data", ".engine") or f.name.endswith(".onnx.data"):
            (dest / f.name).symlink_to(f.resolve())
        elif f.is_file():
            shutil.copy2(f, dest / f.name)
    bank = PromptBank(rt.spec, rt.bank.base_head)
    bank.add(tasks)
    bank.save(dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest["folded"] = None  # the folded graph, if any, is of a task this bank does not hold
    manifest.pop("tasks", None)
    manifest["bank"] = {"store": STORE_FILE, "engine": "sqlite-wal", "tasks_at_export": len(tasks)}
    (dest / MANIFEST).write_text(json.dumps(manifest))
    arrays = {id(v): v for t in tasks for v in (*t.tensors.values(), *t.head.values())}  # shared prompts once
    task_bytes = sum(v.nbytes for v in arrays.values())
    head_bytes = sum(v.nbytes for t in tasks for v in t.head.values())
    return {"bank_file_bytes": (dest / STORE_FILE).stat().st_size, "bank_tensor_bytes": task_bytes,
            "bank_head_bytes": head_bytes, "bank_prompt_bytes": task_bytes - head_bytes}


def scaling(s, rt: Runtime) -> dict:
    """The scaling benchmark on rt's deployment and backend (settings s: BenchSettings)."""
    from promptmux.core.bank import PromptBank
    from promptmux.runtime.runtime import Runtime

    check_scaling_kinds(s.scaling_kinds)
    seq = s.scaling_seq_len or rt.spec.family.bench_seq_len
    if not rt.spec.family.forward_rows:
        raise ValueError("the scaling benchmark runs full-sequence forwards: encoder or causal LM deployments")
    refused = too_long(seq, s.scaling_virtual_tokens, "synthetic", rt.max_positions)
    if refused:
        raise ValueError(f"scaling: {refused}; pass a smaller --scaling-seq-len")
    cfg = rt.config
    pad_id = graph_pad_id(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="promptmux-scaling-"))
    entries = []
    try:
        bar = progress(len(s.scaling_kinds) * len(s.scaling), s.quiet, desc="scaling: load")
        for kind in s.scaling_kinds:
            for n in s.scaling:
                tasks = synthetic_tasks(kind, n, rt, s.scaling_virtual_tokens, s.scaling_mpt_rank, seed=s.seed + n)
                folder = tmp / f"{kind}-{n}"
                sizes = deployment_with_bank(Path(rt.dir), folder, rt, tasks)
                t = time.perf_counter()
                PromptBank.load(folder, rt.spec)
                bank_load = time.perf_counter() - t
                before = rss()
                t = time.perf_counter()
                runtime = Runtime(folder, backend=rt.backend, threads=s.threads, base=s.base)
                load = time.perf_counter() - t
                t = time.perf_counter()
                for name in runtime.tasks:
                    runtime.bank.view(name)
                views = time.perf_counter() - t
                names = assign_tasks("uniform", runtime.tasks, s.scaling_requests, s.seed + 7, 1.0)
                w = make_workload(rt.dims.vocab_size, pad_id, s.scaling_requests, seq, names, s.scaling_batch_size,
                                  0, s.seed + 11)
                system = PromptmuxSystem(runtime, label=f"{kind}/{n}")
                warm_up(system, w)
                entries.append({"kind": kind, "tasks": n, **sizes, "bank_load_s": round(bank_load, 4),
                                "runtime_load_s": round(load, 6), "first_touch_views_s": round(views, 4),
                                "load_rss_mb": round((rss() - before) / MB, 1),
                                "distinct_tasks_in_traffic": len(set(names)), "_system": system, "_w": w})
                bar.update(1)
        bar.close()
        bar = progress(s.repeats * len(entries), s.quiet, desc="scaling: measure")
        measured = measure_jobs([(e["_system"], e["_w"]) for e in entries], s.repeats, None, bar)
        bar.close()
        rows = []
        for e in entries:
            stats = summarize(measured[entries.index(e)])
            stats.pop("per_task")  # one entry per task at 1,000 tasks: not useful here
            rows.append({k: v for k, v in e.items() if not k.startswith("_")} | stats)
    finally:
        for e in entries:
            e.pop("_system", None)
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = []
    for kind in s.scaling_kinds:
        mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["tasks"])
        if len(mine) >= 2:
            lo, hi = mine[0], mine[-1]
            ratios.append({"kind": kind, "from_tasks": lo["tasks"], "to_tasks": hi["tasks"],
                           "throughput_ratio": round(hi["requests_per_s"] / lo["requests_per_s"], 3),
                           "bank_bytes_per_task": round(hi["bank_tensor_bytes"] / hi["tasks"])})
    return {"backend": rt.backend, "batch_size": s.scaling_batch_size, "seq_len": seq,
            "requests_per_round": s.scaling_requests, "virtual_tokens": s.scaling_virtual_tokens,
            "mpt_rank": s.scaling_mpt_rank, "mpt_tasks_per_adapter": MPT_TASKS_PER_ADAPTER, "rows": rows,
            "ratios": ratios}
