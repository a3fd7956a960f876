"""`promptmux bench` outputs: the JSON result, a Markdown page and PNG plots (plots.py), the targets check, the
results page over several runs and the CLI's summary table.

Files for --out NAME.json: NAME.json, NAME.md, NAME-throughput.png (requests/s per task, every system),
NAME-latency.png (latency CDF per batch size) and NAME-scaling.png (task-count scaling), each plot only when
its part was measured.
"""

from __future__ import annotations

import json
from pathlib import Path

from .plots import plot_latency, plot_scaling, plot_throughput, pyplot

# The targets (ratios measured in one run).
CPU_ORT_SPEEDUP = 2.5
MIXED_RATIO = 0.97
GPU_SPEEDUP_B1, GPU_SPEEDUP_B32 = 3.0, 1.5
SCALING_RATIO = 0.97


def _system(acc: dict) -> str:
    """The system the accuracy ran on: BACKEND/PRECISION (results recorded before the precision was kept: BACKEND)."""
    return acc["backend"] + (f"/{acc['precision']}" if acc.get("precision") else "")


def _fmt(x, digits=1) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _lat(lat: dict) -> str:
    return " / ".join(_fmt(lat[k], 1) for k in ("p50", "p95", "p99"))


def _status(ok: bool) -> str:
    return "met" if ok else "missed"


def targets(result: dict) -> list[dict]:
    """Each target of the issue this run can speak to: measured value, met / missed / not measured."""
    out = []
    model = result["deployment"]["model"]
    tp = result.get("throughput")
    gpu_backends = ("onnxruntime-cuda", "tensorrt")
    if tp:
        n_new = result["settings"]["new_tokens"]
        if n_new:
            model += f"; generation, {n_new} new tokens"
        comps = [c for c in tp["comparisons"] if c["backend"] == "onnxruntime"]
        if comps:
            per_b = {}
            for c in comps:
                per_b[c["batch_size"]] = min(per_b.get(c["batch_size"], 1e9), c["speedup"])
            worst = min(per_b.values())
            out.append({"target": f"CPU, ONNX Runtime >= {CPU_ORT_SPEEDUP}x PEFT eager throughput at every batch "
                                  f"size ({model})",
                        "measured": ", ".join(f"B={b}: {v:.2f}x" for b, v in sorted(per_b.items()))
                                    + " (lowest over mixes and tasks)",
                        "status": _status(worst >= CPU_ORT_SPEEDUP)})
        for backend in result["settings"]["backends"]:
            mix = [m for m in tp["mixing"] if m["system"] == "promptmux" and m["backend"] == backend]
            if mix:
                worst = min(m["ratio"] for m in mix)
                out.append({"target": f"mixed-task traffic >= {MIXED_RATIO}x single-task throughput ({backend})",
                            "measured": ", ".join(f"B={m['batch_size']} {m['mix']}: {m['ratio']:.3f}" for m in mix),
                            "status": _status(worst >= MIXED_RATIO)})
        gpu = [c for c in tp["comparisons"] if c["backend"] in gpu_backends]
        if gpu:
            for b, need in ((1, GPU_SPEEDUP_B1), (32, GPU_SPEEDUP_B32)):
                at = [c["speedup"] for c in gpu if c["batch_size"] == b]
                out.append({"target": f"GPU >= {need}x PEFT eager at B={b}",
                            "measured": f"{min(at):.2f}x" if at else "B not in this run",
                            "status": _status(min(at) >= need) if at else "not measured"})
        else:
            out.append({"target": f"GPU (H100) >= {GPU_SPEEDUP_B1}x PEFT eager at B=1, >= {GPU_SPEEDUP_B32}x at B=32",
                        "measured": "—", "status": "not measured",
                        "note": "no GPU backend in this run"})
    sc = result.get("scaling")
    if sc:
        for r in sc["ratios"]:
            out.append({"target": f"{r['to_tasks']:,} tasks on one engine: throughput within 3% of "
                                  f"{r['from_tasks']} task ({r['kind']})",
                        "measured": f"{r['throughput_ratio']:.3f}x",
                        "status": _status(r["throughput_ratio"] >= SCALING_RATIO)})
    acc = result.get("accuracy")
    if acc:
        diff = sum(v["differing_predictions"] for v in acc["tasks"].values())
        out.append({"target": "demo tasks: accuracy through the deployment equals PEFT eager's (same predictions)",
                    "measured": f"{diff} differing predictions of {sum(v['examples'] for v in acc['tasks'].values())}",
                    "status": _status(diff == 0)})
    return out


# ---- markdown ------------------------------------------------------------------------------

def markdown(result: dict, plots: dict[str, str]) -> str:
    env, dep, st = result["environment"], result["deployment"], result["settings"]
    v = env["versions"]
    lines = [f"# promptmux bench: {dep['model']}", "", f"`{result['command']}`", "",
             f"{result['date']}; device: {'; '.join(result['devices'])}; the same thread count for ONNX Runtime and "
             f"torch; torch {v['torch']}, onnxruntime {v['onnxruntime']}, transformers {v['transformers']}, "
             f"peft {v['peft']}, promptmux {v['promptmux']}; Python {env['python']}, {env['platform']}.",
             "",
             f"Load average (1/5/15 min) at the start {env['load_average_start']}, at the end "
             f"{env.get('load_average_end')} on {env['cores']} cores"
             + (" (other processes were using the CPU: absolute numbers are noisy; systems ran interleaved, so "
                "ratios are the more reliable figures)." if env["load_average_start"][0] > 0.5 else "."),
             "",
             "Deployment: " + ", ".join(f"`{t['name']}` ({t['kind']}, {t['virtual_tokens']} virtual tokens)"
                                        for t in dep["tasks"]) + f"; {dep['family']} model.",
             ""]
    d = result["definitions"]
    tp = result.get("throughput")
    if tp:
        n_req = st["requests"] or "max(32, 4·B)"
        lines += ["## Throughput", "",
                  f"Random token ids, every row S real tokens; {n_req} requests per round"
                  + (f" (rounds of {st['duration'] / st['repeats']:g} s)" if st["duration"] else "")
                  + f", median of {st['repeats']} rounds after a warm-up, systems interleaved. "
                  f"A request: {d['request']}. Latency: {d['latency']}. {d['peft_batches']}, "
                  "`torch.inference_mode`, the same threads.", ""]
        peft = {(r["batch_size"], r["seq_len"], r["mix"], r["task"]): r for r in tp["rows"] if r["system"] == "peft"}
        lines += ["| backend | B | S | mix | task | req/s | PEFT req/s | speedup | tok/s | latency p50 / p95 / p99 ms "
                  "| PEFT latency p50 / p95 / p99 ms | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in tp["rows"]:
            if r["system"] != "promptmux":
                continue
            p = peft.get((r["batch_size"], r["seq_len"], r["mix"], r["task"]))
            speedup = f"{r['requests_per_s'] / p['requests_per_s']:.2f}x" if p else "—"
            lines.append(f"| {r['backend']} | {r['batch_size']} | {r['seq_len']} | {r['mix']} | {r['task'] or 'all'} "
                         f"| {_fmt(r['requests_per_s'])} | {_fmt(p['requests_per_s']) if p else '—'} | {speedup} | "
                         f"{_fmt(r['tokens_per_s'], 0)} | {_lat(r['latency_ms'])} | "
                         f"{_lat(p['latency_ms']) if p else '—'} | {_fmt(r['memory_mb']['peak_rss'], 0)} |")
        others = other_baselines(tp["comparisons"])
        if others:
            lines += ["", "Against the other PEFT baselines in the same rounds (" + "; ".join(
                f"{title.removeprefix('vs ')}: {d.get(_definition(key), 'see the JSON')}" for key, title in others)
                + "):",
                "", "| backend | B | S | mix | task | " + " | ".join(f"speedup {t}" for _, t in others) + " |",
                "|---|---|---|---|---|" + "---|" * len(others)]
            for c in tp["comparisons"]:
                lines.append(f"| {c['backend']} | {c['batch_size']} | {c['seq_len']} | {c['mix']} | "
                             f"{c['task'] or 'all'} | " + " | ".join(f"{c[k]:.2f}x" if k in c else "—"
                                                                    for k, _ in others) + " |")
        mixed = [r for r in tp["rows"] if r["mix"] != "single"]
        if mixed:
            lines += ["", "Per task within mixed traffic (requests/s of that task's requests; latency of the batches "
                      "that answered them):", "",
                      "| system | B | S | mix | task | requests | req/s | latency p50 / p95 / p99 ms |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in mixed:
                for t, pt in r["per_task"].items():
                    lines.append(f"| {r['backend']} | {r['batch_size']} | {r['seq_len']} | {r['mix']} | {t} | "
                                 f"{pt['requests']} | {_fmt(pt['requests_per_s'])} | {_lat(pt['latency_ms'])} |")
        if tp["mixing"]:
            lines += ["", "Cost of mixing tasks: mixed traffic against the same requests served as single-task "
                      "traffic (from the single-task runs' rates: time = sum over tasks of n_t / rate_t):", "",
                      "| system | B | S | mix | mixed req/s | single-task req/s | ratio |", "|---|---|---|---|---|---|---|"]
            for m in tp["mixing"]:
                lines.append(f"| {m['backend']} | {m['batch_size']} | {m['seq_len']} | {m['mix']} | "
                             f"{_fmt(m['requests_per_s'])} | {_fmt(m['single_task_requests_per_s'])} | "
                             f"{m['ratio']:.3f} |")
        lines += ["", f"Memory: {d['memory']}. Resident-set growth while each system loaded (weights, sessions): "
                  + ", ".join(f"{k}: {_fmt(val)} MB" for k, val in tp["load_rss_mb"].items()) + "."]
        for name, record in (tp.get("fast_choices") or {}).items():
            lines += ["", f"{name}: precision fast chose {record['precision']} on this CPU: {record['reason']}."]
        if tp.get("graph_runs"):
            lines += ["", "Graph files that ran (full-sequence batches, warm-up included): " + "; ".join(
                f"{k}: " + ", ".join(f"{g} {n}" for g, n in runs.items()) for k, runs in tp["graph_runs"].items()) + "."]
        if tp["agreement"]:
            lines += ["", "Same answers: the first batch of every configuration, promptmux (mixed batch) against "
                      "PEFT (the same rows, one task per batch):", "",
                      "| backend | B | S | mix | task | rows | rows with another prediction | max abs diff |",
                      "|---|---|---|---|---|---|---|---|"]
            for a in tp["agreement"]:
                diff = "—" if a["max_abs_diff"] is None else f"{a['max_abs_diff']:.1e}"
                lines.append(f"| {a['backend']} | {a['batch_size']} | {a['seq_len']} | {a['mix']} | {a['task'] or 'all'} "
                             f"| {a['rows']} | {a['rows_differing']} | {diff} |")
        for key, title in (("throughput", "Requests/s per task"), ("latency", "Latency CDF")):
            if key in plots:
                lines += ["", f"![{title}]({plots[key]})"]
        lines.append("")
    sc = result.get("scaling")
    if sc:
        lines += ["## Task-count scaling", "",
                  f"One engine ({sc['backend']}), synthetic banks: prompt tuning with {sc['virtual_tokens']} virtual "
                  f"tokens per task; MPT with one shared prompt per {sc['mpt_tasks_per_adapter']} tasks and rank-"
                  f"{sc['mpt_rank']} factors per task, stored as factors (composed in the graph) or composed ahead "
                  f"(plain prompts). Uniform traffic over all the tasks, B={sc['batch_size']}, S={sc['seq_len']}, "
                  f"{sc['requests_per_round']} requests per round, median of {st['repeats']} rounds, every "
                  "configuration interleaved.", "",
                  "| kind | tasks | bank tensors MB | per task KB | bank file MB | bank load ms | Runtime load ms | "
                  "first touch of all tasks ms | req/s | latency p50 / p95 / p99 ms |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sc["rows"]:
            lines.append(f"| {r['kind']} | {r['tasks']:,} | {r['bank_tensor_bytes'] / 2**20:.2f} | "
                         f"{r['bank_tensor_bytes'] / r['tasks'] / 1024:.1f} | {r['bank_file_bytes'] / 2**20:.2f} | "
                         f"{1e3 * r['bank_load_s']:.1f} | {1e3 * r['runtime_load_s']:.1f} | "
                         f"{1e3 * r['first_touch_views_s']:.1f} | {_fmt(r['requests_per_s'])} | "
                         f"{_lat(r['latency_ms'])} |")
        lines += ["", "| kind | throughput at the most tasks / at the fewest |", "|---|---|"]
        for r in sc["ratios"]:
            lines.append(f"| {r['kind']} | {r['to_tasks']:,} vs {r['from_tasks']}: {r['throughput_ratio']:.3f} |")
        if "scaling" in plots:
            lines += ["", f"![Scaling]({plots['scaling']})"]
        lines.append("")
    acc = result.get("accuracy")
    if acc:
        how = (f"The deployment ({_system(acc)}) and PEFT eager answer each prompt alone, as the server answers "
               "it; an answer is the text generated greedily up to end-of-sequence (at most "
               f"{acc.get('new_tokens')} tokens), right when it starts with the label, and differs when its tokens "
               f"do. Batch changes: the deployment's answers that change in mixed batches of {acc['batch_size']} "
               "(a padded batch counts a prompt-tuned row's padding among its positions, as PEFT does)"
               if acc.get("generation") else
               f"The deployment ({_system(acc)}) answers in mixed batches of both tasks, PEFT eager one adapter per "
               f"batch, batch size {acc['batch_size']}, the same token ids. Batch changes: the deployment's answers "
               "that change when the row runs alone")
        lines += ["## Held-out accuracy (demo tasks)", "", f"{acc['split']}. {how}.", "",
                  "| task | examples | promptmux accuracy | PEFT eager accuracy | recorded at training (PEFT) | "
                  "differing predictions | max abs logit diff | batch changes |", "|---|---|---|---|---|---|---|---|"]
        for t, r in acc["tasks"].items():
            diff = r.get("max_abs_logit_diff")
            lines.append(f"| {t} | {r['examples']} | {r['accuracy_promptmux']:.4f} | {r['accuracy_peft']:.4f} | "
                         f"{_fmt(r['recorded_accuracy_peft'], 4)} | {r['differing_predictions']} | "
                         f"{'—' if diff is None else f'{diff:.1e}'} | {_fmt(r.get('batch_changes'))} |")
        pass_ = "each prompt alone, up to end-of-sequence" if acc.get("generation") else "real text, padded per batch"
        lines += ["", f"Speed on this pass ({pass_}): promptmux {acc['promptmux_examples_per_s']:.1f} "
                  f"examples/s, PEFT eager {acc['peft_examples_per_s']:.1f} examples/s ({acc['speedup']:.2f}x).", ""]
        if acc.get("baselines"):
            lines += ["The other PEFT baselines on the same examples, against PEFT eager fp32:", "",
                      "| baseline | task | accuracy | PEFT eager accuracy | PEFT eager predictions kept | examples/s |",
                      "|---|---|---|---|---|---|"]
            for name, b in acc["baselines"].items():
                for t, r in b["tasks"].items():
                    lines.append(f"| {name} | {t} | {r['accuracy']:.4f} | {r['accuracy_peft']:.4f} | "
                                 f"{100 * r['kept']:.2f} % | {b['examples_per_s']:.1f} |")
            lines.append("")
    if result.get("targets"):  # this project's recorded results only (--render); a user's run has none
        lines += ["## Targets", "", "| target | measured | status |", "|---|---|---|"]
        for t in result["targets"]:
            note = f" ({t['note']})" if t.get("note") else ""
            lines.append(f"| {t['target']} | {t['measured']} | {t['status']}{note} |")
        lines.append("")
    lines += [f"Wall time {result['wall_seconds']} s. Machine-readable: `{Path(result['files']['json']).name}`.", ""]
    return "\n".join(lines)


def write_outputs(result: dict, out: Path) -> dict:
    """NAME.json, NAME.md and the plots; returns their paths (plots left out, with the reason, without
    matplotlib)."""
    out = Path(out)
    if out.suffix != ".json":
        out = out.with_name(out.name + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    files = {"json": str(out), "markdown": str(stem) + ".md", "plots": {}}
    title = result["deployment"]["model"] + " — " + "; ".join(result["devices"])
    jobs = []
    if result.get("throughput"):
        jobs += [("throughput", plot_throughput, result["throughput"]), ("latency", plot_latency, result["throughput"])]
    if result.get("scaling"):
        jobs.append(("scaling", plot_scaling, result["scaling"]))
    out.write_text(json.dumps(result, indent=2) + "\n")  # the measurements first: a failing plot loses none of them
    try:
        pyplot()
    except ImportError:
        files["plots_skipped"] = "matplotlib is not installed: pip install matplotlib (or promptmux[bench])"
        jobs = []
    for key, fn, data in jobs:
        path = Path(f"{stem}-{key}.png")
        fn(data, path, title)
        files["plots"][key] = str(path)
    result["files"] = files
    (Path(files["markdown"])).write_text(markdown(result, {k: Path(v).name for k, v in files["plots"].items()}))
    out.write_text(json.dumps(result, indent=2) + "\n")
    return files


# ---- the results page ------------------------------------------------------------------------

def index_page(results: list[dict], title: str = "promptmux bench: results") -> str:
    """One page over several result JSONs: every headline row with its device and date, every target, links."""
    lines = [f"# {title}", "",
             "Each row: the device and date it was measured on; each file: the exact command that produced it. "
             "Ratios compare systems measured in the same run (same process, same requests, interleaved rounds).", ""]
    rows = []
    for res in results:
        tp = res.get("throughput")
        if not tp:
            continue
        peft = {(r["batch_size"], r["seq_len"], r["mix"], r["task"]): r for r in tp["rows"] if r["system"] == "peft"}
        for r in tp["rows"]:
            if r["system"] != "promptmux" or r["mix"] == "single":
                continue
            p = peft.get((r["batch_size"], r["seq_len"], r["mix"], r["task"]))
            mix = next((m for m in tp["mixing"] if m["system"] == "promptmux" and m["backend"] == r["backend"]
                        and m["batch_size"] == r["batch_size"] and m["seq_len"] == r["seq_len"]
                        and m["mix"] == r["mix"]), None)
            rows.append(f"| {res['deployment']['model']}; {len(res['deployment']['tasks'])} tasks | "
                        f"{r['backend']} | {r['batch_size']} | {r['seq_len']} | {r['mix']} | "
                        f"{_fmt(r['requests_per_s'])} | {_fmt(p['requests_per_s']) if p else '—'} | "
                        f"{r['requests_per_s'] / p['requests_per_s']:.2f}x | " if p else "— | ")
            rows[-1] += (f"{mix['ratio']:.3f} | " if mix else "— | ") + \
                f"{_lat(r['latency_ms'])} | {r['device']} | {res['date'][:10]} | " \
                f"[{Path(res['files']['markdown']).name}]({Path(res['files']['markdown']).name}) |"
    if rows:
        lines += ["## Throughput (mixed-task traffic)", "",
                  "| model | backend | B | S | mix | req/s | PEFT eager req/s | speedup | mixed / single-task | "
                  "latency p50 / p95 / p99 ms | device | date | details |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"] + rows + [""]
    for res in results:
        sc = res.get("scaling")
        if sc:
            lines += [f"## Task-count scaling ({sc['backend']}, B={sc['batch_size']}, S={sc['seq_len']}; "
                      f"{'; '.join(res['devices'])}, {res['date'][:10]})", "",
                      "| kind | tasks | bank MB | Runtime load ms | req/s | vs fewest tasks |", "|---|---|---|---|---|---|"]
            first = {}
            for r in sc["rows"]:
                base = first.setdefault(r["kind"], r["requests_per_s"])
                lines.append(f"| {r['kind']} | {r['tasks']:,} | {r['bank_tensor_bytes'] / 2**20:.2f} | "
                             f"{1e3 * r['runtime_load_s']:.1f} | {_fmt(r['requests_per_s'])} | "
                             f"{r['requests_per_s'] / base:.3f} |")
            lines += ["", f"Details: [{Path(res['files']['markdown']).name}]({Path(res['files']['markdown']).name})", ""]
        acc = res.get("accuracy")
        if acc:
            lines += [f"## Held-out accuracy, demo tasks ({_system(acc)}; {'; '.join(res['devices'])}, "
                      f"{res['date'][:10]})", "",
                      "| task | examples | promptmux | PEFT eager | differing predictions |", "|---|---|---|---|---|"]
            for t, v in acc["tasks"].items():
                lines.append(f"| {t} | {v['examples']} | {v['accuracy_promptmux']:.4f} | {v['accuracy_peft']:.4f} | "
                             f"{v['differing_predictions']} |")
            lines += ["", f"Details: [{Path(res['files']['markdown']).name}]({Path(res['files']['markdown']).name})", ""]
    lines += ["## Targets", "", "| target | measured | status | device | date |", "|---|---|---|---|---|"]
    unmeasured = set()
    for res in results:
        for t in res.get("targets", []):
            if t["status"] == "not measured":  # once, not once per file
                if t["target"] in unmeasured:
                    continue
                unmeasured.add(t["target"])
            note = f" ({t['note']})" if t.get("note") else ""
            lines.append(f"| {t['target']} | {t['measured']} | {t['status']}{note} | {'; '.join(res['devices'])} | "
                         f"{res['date'][:10]} |")
    lines += ["", "## Commands", ""]
    for res in results:
        lines += [f"- [{Path(res['files']['markdown']).name}]({Path(res['files']['markdown']).name}): "
                  f"`{res['command']}`"]
    lines.append("")
    return "\n".join(lines)


# Comparison keys beside "speedup" (PEFT eager fp32), and their column titles.
OTHER_BASELINES = (("speedup_vs_peft_bf16", "vs PEFT-bf16"), ("speedup_vs_peft_int8", "vs PEFT-int8"))


def other_baselines(comparisons: list[dict]) -> list[tuple[str, str]]:
    """The entries of OTHER_BASELINES that these comparisons report (the baselines that ran)."""
    return [(key, title) for key, title in OTHER_BASELINES if any(key in c for c in comparisons)]


def _definition(key: str) -> str:
    """The definitions entry (result["definitions"]) that says what a baseline of OTHER_BASELINES is."""
    return key.removeprefix("speedup_vs_")


# ---- the CLI's summary -----------------------------------------------------------------------

def summary_table(result: dict) -> str:
    """What the CLI prints: the headline numbers as aligned text tables, and where the full result is."""
    blocks = []
    tp = result.get("throughput")
    if tp:
        config = ("backend", "batch_size", "seq_len", "mix", "task")
        comps = {tuple(c[k] for k in config): c for c in tp["comparisons"]}

        def ratio(r, key):
            c = comps.get(tuple(r[k] for k in config), {})
            return f"{c[key]:.2f}x" if key in c else ""

        others = other_baselines(tp["comparisons"])
        rows = [[*(r[k] for k in config[:-1]), r["task"] or "all", f"{r['requests_per_s']:.1f}", f"{r['tokens_per_s']:.0f}",
                 f"{r['latency_ms']['p50']:.1f}", ratio(r, "speedup"), *(ratio(r, key) for key, _ in others)]
                for r in tp["rows"]]
        blocks.append(_table(["backend", "B", "S", "mix", "task", "req/s", "tok/s", "p50 ms", "vs PEFT",
                              *(title for _, title in others)], rows))
    if "scaling" in result:
        blocks.append(_table(["kind", "tasks", "vs tasks", "throughput ratio"],
                             [[r["kind"], r["to_tasks"], r["from_tasks"], f"{r['throughput_ratio']:.3f}"]
                              for r in result["scaling"]["ratios"]]))
    if "accuracy" in result:
        blocks.append(_table(["task", "examples", "promptmux", "PEFT eager", "differing", "batch changes"],
                             [[t, v["examples"], f"{v['accuracy_promptmux']:.4f}", f"{v['accuracy_peft']:.4f}",
                               v["differing_predictions"], v["batch_changes"]]
                              for t, v in result["accuracy"]["tasks"].items()]))
        if result["accuracy"].get("baselines"):
            blocks.append(_table(["baseline", "task", "accuracy", "PEFT eager", "kept"],
                                 [[name, t, f"{v['accuracy']:.4f}", f"{v['accuracy_peft']:.4f}",
                                   f"{100 * v['kept']:.2f} %"]
                                  for name, b in result["accuracy"]["baselines"].items()
                                  for t, v in b["tasks"].items()]))
    files = result["files"]
    blocks.append(f"{'; '.join(result['devices'])}; {result['wall_seconds']} s. Full result: {files['json']} "
                  f"(and {files['markdown']}" + (", plots" if files["plots"] else "") + ")")
    return "\n\n".join(blocks)


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def main(argv: list[str] | None = None) -> None:
    """python -m promptmux.bench.report [--index OUT.md] [--render] RESULT.json ... : the results page over several
    runs (--index), and/or each result's Markdown and plots written again from its JSON (--render)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m promptmux.bench.report", description=main.__doc__)
    p.add_argument("--index", help="Markdown page to write")
    p.add_argument("--render", action="store_true", help="write each result's .md and PNGs again from its JSON")
    p.add_argument("--title", default="promptmux bench: results")
    p.add_argument("--preface", help="a Markdown file whose text goes under the title (notes, what is missing)")
    p.add_argument("results", nargs="+")
    args = p.parse_args(argv)
    results = [json.loads(Path(f).read_text()) for f in args.results]
    if args.render:
        for f, res in zip(args.results, results):
            res["targets"] = targets(res)
            write_outputs(res, Path(f))
    if not args.index:
        return
    page = index_page(results, args.title)
    if args.preface:
        head, _, rest = page.partition("\n\n")
        page = head + "\n\n" + Path(args.preface).read_text().strip() + "\n\n" + rest
    Path(args.index).write_text(page)


if __name__ == "__main__":
    main()
