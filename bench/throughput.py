"""The throughput part of `promptmux bench`: every (B, S, mix) configuration, each backend at each precision and
the PEFT baselines on the same request stream, rounds interleaved; then promptmux / PEFT ratios (comparisons)
and mixed / single-task ratios (mixing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from promptmux.core.archs import pad_id as graph_pad_id
from promptmux.runtime.text import too_long

from .baseline import compare
from .machine import device_of
from .measure import measure_jobs, progress, summarize, warm_up
from .settings import BenchSettings, peft_device
from .systems import build_systems, close_systems, peft_outputs
from .workload import assign_tasks, make_workload

if TYPE_CHECKING:  # the annotations only: the runtime is imported where it runs
    from promptmux.runtime.runtime import Runtime


def throughput(s: BenchSettings, rt: Runtime, env: dict) -> dict:
    """Every (B, S, mix) configuration: each backend at each precision and the PEFT baselines on the same request
    stream. rt: a Runtime of the deployment, for its tasks, bank and config."""
    systems, load_mb, peft = build_systems(s, rt)  # refuses an unrunnable backend before anything else
    try:
        return _configurations(s, rt, env, systems, load_mb, peft)
    finally:
        close_systems(systems)


def _configurations(s, rt: Runtime, env, systems, load_mb, peft) -> dict:
    family = rt.spec.family
    if not family.forward_rows and not s.new_tokens:
        raise ValueError("a seq2seq deployment is benchmarked by generation: pass --new-tokens N (N > 0)")
    if family.generation is None and s.new_tokens:
        raise ValueError("--new-tokens is for causal LM and seq2seq deployments; this one classifies")
    tasks = s.tasks or rt.tasks
    for t in tasks:
        rt.bank.view(t)  # UnknownTaskError names the deployment's tasks
    seq_lens = s.seq_lens or [family.bench_seq_len]
    vocab = rt.dims.vocab_size
    cfg = rt.config
    pad_id = graph_pad_id(cfg)
    for view in {t: rt.bank.view(t) for t in tasks}.values():
        refused = too_long(max(seq_lens), view.num_virtual_tokens, view.name, rt.max_positions, s.new_tokens,
                           "--new-tokens")
        if refused:
            raise ValueError(f"{refused}; pass smaller --seq-lens")

    for sy in systems:
        sy.prepare(s.new_tokens)
    baselines = [sy for sy in systems if sy.backend.startswith("peft")]

    runs_plan = []  # (mix, task list of the stream, label)
    for mix in s.mixes:
        if mix == "single":
            runs_plan += [("single", [t], t) for t in tasks]
        else:
            runs_plan.append((mix, tasks, None))
    configs = [(b, sq) for b in s.batch_sizes for sq in seq_lens]
    bar = progress(len(configs) * len(runs_plan) * s.repeats * len(systems), s.quiet)
    rows, checks = [], []
    try:
        for ci, (b, sq) in enumerate(configs):
            n = s.requests or max(32, 4 * b)
            bar.set_postfix_str(f"B={b} S={sq}")
            streams = []  # (mix, its tasks, the single task or None, workload): every mix of this (B, S)
            for mi, (mix, stream_tasks, single) in enumerate(runs_plan):
                seed = s.seed + 1000 * ci + 17 * mi
                names = assign_tasks(mix, stream_tasks, n, seed, s.zipf_s)
                w = make_workload(vocab, pad_id, n, sq, names, b, s.new_tokens, seed)
                streams.append((mix, stream_tasks, single, w))
                for sy in systems:
                    warm_up(sy, w)
                if peft is not None:  # the first arrival-order batch, row by row, against PEFT on the same rows
                    first = w.batches(False)[0]
                    want = peft_outputs(peft, w, first)
                    for sy in systems:
                        if sy in baselines:
                            continue
                        got = sy.run(w.ids[first], w.mask[first], [w.tasks[i] for i in first], w.new_tokens)
                        checks.append({"backend": sy.backend, "batch_size": b, "seq_len": sq, "mix": mix,
                                       "task": single, **compare(got, want, w.new_tokens)})
            # Every mix and system of this (B, S) in the same rounds: mixed vs single-task is compared under the
            # same machine conditions, like promptmux vs PEFT.
            jobs = [(sy, st[3]) for st in streams for sy in systems]
            runs = iter(measure_jobs(jobs, s.repeats, s.duration, bar))
            for mix, stream_tasks, single, w in streams:
                for sy in systems:
                    baseline = sy in baselines  # the precision its rows ran: forward's, or generation's
                    ran = sy.precision if s.new_tokens else getattr(sy, "forward_precision", sy.precision)
                    row = {"system": ("peft" if sy is peft else sy.backend) if baseline else "promptmux",
                           "backend": sy.backend, "precision": ran,
                           "device": device_of(("onnxruntime-cuda" if peft_device(s) == "cuda" else "onnxruntime")
                                               if baseline else sy.backend, env),
                           "batch_size": b, "seq_len": sq, "new_tokens": s.new_tokens, "mix": mix, "task": single,
                           "tasks": sorted(set(w.tasks), key=stream_tasks.index)}
                    row.update(summarize(next(runs)))
                    rows.append(row)
    finally:
        bar.close()
    contracts = {sy.name: getattr(sy, "contract", None) or getattr(getattr(sy, "rt", None), "contract", None)
                 for sy in systems if sy.precision != "fp32" and sy not in baselines}
    chosen = {sy.name: getattr(sy, "backend_reason", None) or getattr(getattr(sy, "rt", None), "backend_reason", None)
              for sy in systems if sy not in baselines}
    # Which graph files ran, per promptmux system: an int8 or folded system that silently ran fp32 shows here.
    graph_runs = {sy.name: sy.graph_runs() for sy in systems if hasattr(sy, "graph_runs") and sy not in baselines}
    fast = {sy.name: sy.fast for sy in systems if getattr(sy, "fast", None)}  # what precision "fast" chose, why
    return {"tasks": tasks, "seq_lens": seq_lens, "rows": rows, "agreement": checks, "graph_runs": graph_runs,
            "fast_choices": fast,
            "load_rss_mb": load_mb, "isolated": s.isolate, "backend_choice": chosen, "precision_contracts": contracts,
            "comparisons": comparisons(rows), "mixing": mixing(rows)}


def _key(r: dict) -> tuple:
    return (r["batch_size"], r["seq_len"], r["mix"], r["task"])


# The baselines a promptmux row is compared with: row system -> suffix of the comparison's keys.
COMPARED_WITH = {"peft": "", "peft-bf16": "_vs_peft_bf16", "peft-int8": "_vs_peft_int8"}


def comparisons(rows: list[dict]) -> list[dict]:
    """promptmux / PEFT throughput for every configuration both ran (same run, same request stream): "speedup"
    against PEFT eager fp32, "speedup_vs_peft_bf16" against PEFT under bf16 autocast and "speedup_vs_peft_int8"
    against PEFT in PyTorch's int8, where those ran too."""
    bases = {system: {_key(r): r for r in rows if r["system"] == system} for system in COMPARED_WITH}
    out = []
    for r in rows:
        if r["system"] != "promptmux" or not any(_key(r) in b for b in bases.values()):
            continue
        c = {"backend": r["backend"], "precision": r.get("precision", "fp32"), "batch_size": r["batch_size"],
             "seq_len": r["seq_len"], "mix": r["mix"], "task": r["task"], "requests_per_s": r["requests_per_s"]}
        for system, key in COMPARED_WITH.items():
            base = bases[system].get(_key(r))
            if base is None:
                continue
            prefix = system.replace("-", "_") + "_"
            c[f"{prefix}requests_per_s"] = base["requests_per_s"]
            c[f"speedup{key}"] = round(r["requests_per_s"] / base["requests_per_s"], 3)
            c[f"latency_p50_ratio{key}"] = round(base["latency_ms"]["p50"] / r["latency_ms"]["p50"], 3)
        out.append(c)
    return out


def mixing(rows: list[dict]) -> list[dict]:
    """Mixed traffic against the same requests served as single-task traffic: the single-task runs' rates give
    the time each task's share would take alone (sum of n_t / rps_t); ratio = mixed rate / that rate."""
    single = {(r["backend"], r["batch_size"], r["seq_len"], r["task"]): r for r in rows if r["mix"] == "single"}
    out = []
    for r in rows:
        if r["mix"] == "single":
            continue
        shares = {t: v["requests"] for t, v in r["per_task"].items()}
        alone = [single.get((r["backend"], r["batch_size"], r["seq_len"], t)) for t in shares]
        if any(a is None for a in alone):
            continue
        n = sum(shares.values())
        expected = n / sum(shares[t] / a["requests_per_s"] for t, a in zip(shares, alone))
        out.append({"system": r["system"], "backend": r["backend"], "batch_size": r["batch_size"],
                    "seq_len": r["seq_len"], "mix": r["mix"], "requests_per_s": r["requests_per_s"],
                    "single_task_requests_per_s": round(expected, 3),
                    "ratio": round(r["requests_per_s"] / expected, 3)})
    return out
