"""Generation benchmark (issue 3): promptmux cached generation vs PEFT eager `generate` on the CPU.

    python -m promptmux.bench.generation [--models gpt2-small,smollm2] [--batch-sizes 1,8]
        [--new-tokens 32] [--repeats 3] [--threads N] [--out results/] [--quick] [--fresh]

Measures, in one run and with both systems on the same token ids:

(a) decoding throughput: generated tokens per second of `promptmux.Runtime.generate` (ONNX Runtime,
    the deployment's cached decoder graph) and of `PeftModel.generate` (eager PyTorch, greedy, one
    adapter), every row generating exactly --new-tokens tokens (EOS disabled on both sides). The
    greedy tokens of the two are compared row by row: a benchmark of a wrong answer is meaningless.
    A profiled extra run splits promptmux's time into ONNX Runtime `session.run` and host-side work,
    and PEFT's into the model's forward and the rest of `generate`.
(b) prefill with vs without the precomputed prompt key/values: `Generator.stream(precompute=...)`
    through `Runtime.generate(max_new_tokens=1)` on a task with P virtual tokens and S prompt tokens.
    Precompute runs only the S tokens (the prompt's KV is the past), so the expected time ratio is
    about S / (P + S).

Repetitions of the two systems are interleaved (promptmux, PEFT, promptmux, ...) so that load from
other processes hits both alike; the median is reported. The base models, adapters and exported
deployments (models.py) are cached (--cache-dir) keyed by their recipe and the export code's source; --fresh
rebuilds them. Results: <out>/generation-cpu.json and generation-cpu.md (with --quick:
generation-cpu-quick.*, tiny random models, for a smoke run).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from promptmux.core.archs import pad_id as graph_pad_id
from promptmux.core.quiet import quiet_libraries

from .baseline import generate_pad_id
from .machine import machine_info
from .measure import load_average
from .models import Skip, base_model, default_cache, export_code_hash, log, make_adapter, make_deployment
from .workload import make_batch

MODELS = ("gpt2-small", "smollm2")
DEFAULT_OUT = Path("promptmux-results")  # in the working directory: recorded results go to results/ by hand, with a row in its index


# ---- settings ------------------------------------------------------------------------------

@dataclass
class Settings:
    models: list[str]
    batch_sizes: list[int]
    new_tokens: int
    repeats: int
    threads: int
    prompt_tokens: int  # S of the generation benchmark (per row, before padding)
    virtual_tokens: int  # P of the generation benchmark's adapter
    prefill_virtual_tokens: int  # P of the prefill benchmark's adapter
    prefill_prompt_tokens: int  # S of the prefill benchmark
    prefill_batch_sizes: list[int]
    quick: bool
    seed: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m promptmux.bench.generation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help=f"comma-separated, from {', '.join(MODELS)} "
                   "(default: both; with --quick: gpt2-small)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,8; --quick: 1,2)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row (default 32; --quick: 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions after a warm-up (default 3; --quick: 1)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt tokens per row (default 32; --quick: 6)")
    p.add_argument("--virtual-tokens", type=int, default=None, help="virtual tokens of the adapter (default 20; --quick: 4)")
    p.add_argument("--prefill-virtual-tokens", type=int, default=None, help="P of the prefill benchmark (default 64)")
    p.add_argument("--prefill-prompt-tokens", type=int, default=None, help="S of the prefill benchmark (default 64)")
    p.add_argument("--prefill-batch-sizes", default=None, help="comma-separated (default: --batch-sizes)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for torch and ONNX Runtime alike (default: all cores)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the JSON and markdown results")
    p.add_argument("--cache-dir", default=None,
                   help="models, adapters and deployments (default $PROMPTMUX_BENCH_CACHE or ~/.cache/promptmux/bench)")
    p.add_argument("--fresh", action="store_true", help="rebuild cached models, adapters and deployments")
    p.add_argument("--quick", action="store_true", help="tiny random models and sizes: a smoke run, not a benchmark")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    q = args.quick

    def ints(text, default):
        vals = [int(x) for x in str(text).split(",") if x.strip()] if text else default
        if not vals or any(v < 1 for v in vals):
            raise SystemExit(f"batch sizes must be positive integers, got {text!r}")
        return vals

    models = [m.strip() for m in (args.models or ("gpt2-small" if q else ",".join(MODELS))).split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    batch = ints(args.batch_sizes, [1, 2] if q else [1, 8])

    def pick(value, full, quick):
        v = value if value is not None else (quick if q else full)
        if v < 1:
            raise SystemExit(f"sizes must be positive, got {v}")
        return v

    return Settings(
        models=models,
        batch_sizes=batch,
        new_tokens=pick(args.new_tokens, 32, 4),
        repeats=pick(args.repeats, 3, 1),
        threads=args.threads or os.cpu_count() or 1,
        prompt_tokens=pick(args.prompt_tokens, 32, 6),
        virtual_tokens=pick(args.virtual_tokens, 20, 4),
        prefill_virtual_tokens=pick(args.prefill_virtual_tokens, 64, 8),
        prefill_prompt_tokens=pick(args.prefill_prompt_tokens, 64, 8),
        prefill_batch_sizes=ints(args.prefill_batch_sizes, batch),
        quick=q,
        seed=args.seed,
    )


# ---- the two systems -----------------------------------------------------------------------

class Peft:
    """PeftModel.generate with one adapter: greedy, exactly n new tokens per row."""

    def __init__(self, base_dir: Path, adapter_dir: Path, pad_id: int):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
        self.model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        # EOS off (promptmux side: eos_token_id=[]): no row stops early and no logit is masked.
        self.model.generation_config.eos_token_id = None
        self.model.base_model.generation_config.eos_token_id = None
        self.pad_id = pad_id
        self.forward_s = 0.0
        self.forward_calls = 0
        self._profiling = False
        inner = self.model.get_base_model()
        inner.register_forward_pre_hook(self._pre)
        inner.register_forward_hook(self._post)

    def _pre(self, *_):
        if self._profiling:
            self._t = time.perf_counter()

    def _post(self, *_):
        if self._profiling:
            self.forward_s += time.perf_counter() - self._t
            self.forward_calls += 1

    def generate(self, ids: np.ndarray, mask: np.ndarray, n: int) -> list[list[int]]:
        import torch

        with torch.inference_mode():
            out = self.model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                      max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                                      pad_token_id=self.pad_id, use_cache=True)
        return out[:, ids.shape[1]:].tolist()

    def profile(self, ids, mask, n) -> dict:
        self.forward_s, self.forward_calls, self._profiling = 0.0, 0, True
        try:
            t = time.perf_counter()
            self.generate(ids, mask, n)
            total = time.perf_counter() - t
        finally:
            self._profiling = False
        return {"total_ms": 1e3 * total, "forward_ms": 1e3 * self.forward_s, "forward_calls": self.forward_calls,
                "outside_forward_ms": 1e3 * (total - self.forward_s)}


class Promptmux:
    """promptmux.Runtime(deploy).generate on token ids, EOS disabled."""

    def __init__(self, deploy_dir: Path, threads: int):
        from promptmux import Runtime

        self.rt = Runtime(deploy_dir, threads=threads)
        self.gen = self.rt.generator  # load the decoder session now, not inside a timed run

    def generate(self, ids, mask, task: str, n: int, precompute: bool = True) -> list[list[int]]:
        out = self.rt.generate({"input_ids": ids, "attention_mask": mask}, task, max_new_tokens=n,
                               eos_token_id=[], precompute=precompute)
        return [r["token_ids"] for r in out]

    def profile(self, ids, mask, task, n) -> dict:
        """One run with ONNX Runtime's session.run timed per call: the first call is the prefill."""
        session = self.gen.session
        calls: list[float] = []
        original = session.run_all

        def timed(feeds):
            t = time.perf_counter()
            try:
                return original(feeds)
            finally:
                calls.append(time.perf_counter() - t)

        session.run_all = timed  # instance attribute: shadows the method for this run only
        try:
            t = time.perf_counter()
            self.generate(ids, mask, task, n)
            total = time.perf_counter() - t
        finally:
            del session.run_all
        decode = calls[1:]
        ort = sum(calls)
        return {
            "total_ms": 1e3 * total,
            "session_run_calls": len(calls),
            "prefill_session_run_ms": 1e3 * calls[0],
            "decode_session_run_ms_per_step": 1e3 * statistics.mean(decode) if decode else None,
            "session_run_ms": 1e3 * ort,
            "host_ms": 1e3 * (total - ort),
            "host_ms_per_step": 1e3 * (total - ort) / len(calls),
        }


def _timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    rows = [i for i in range(len(a)) if a[i] == b[i]]
    first = None
    for i in range(len(a)):
        if a[i] != b[i]:
            step = next((j for j, (x, y) in enumerate(zip(a[i], b[i])) if x != y), min(len(a[i]), len(b[i])))
            first = {"row": i, "step": step}
            break
    return {"tokens_agree": len(rows) == len(a), "rows_agree": len(rows), "rows": len(a), "first_mismatch": first}


# ---- benchmark -----------------------------------------------------------------------------

def bench_model(name: str, s: Settings, cache: Path, fresh: bool) -> dict:
    import torch
    from transformers import AutoConfig

    base_dir, desc = base_model(name, s.quick, cache, fresh, s.seed)
    log(f"{name}: {desc}")
    config = AutoConfig.from_pretrained(str(base_dir))
    vocab = config.vocab_size
    pad_id = graph_pad_id(config)
    adapter = make_adapter(base_dir, s.virtual_tokens, s.seed + 1, cache, fresh)
    adapter_long = make_adapter(base_dir, s.prefill_virtual_tokens, s.seed + 2, cache, fresh)
    tasks = {"task": adapter, "long": adapter_long}
    deploy = make_deployment(base_dir, tasks, cache, fresh)

    torch.set_num_threads(s.threads)
    log(f"{name}: loading promptmux runtime and PEFT model ({s.threads} threads)")
    pm = Promptmux(deploy, s.threads)
    peft = Peft(base_dir, adapter, generate_pad_id(config))

    rows = []
    for b in s.batch_sizes:
        ids, mask = make_batch(b, s.prompt_tokens, vocab, pad_id, seed=s.seed + 100 + b)
        n = s.new_tokens
        log(f"{name} B={b}: warm-up")
        ours = pm.generate(ids, mask, "task", n)
        theirs = peft.generate(ids, mask, n)
        lengths_ok = all(len(r) == n for r in ours + theirs)
        agree = _agreement(ours, theirs)
        t_pm, t_peft = [], []
        for r in range(s.repeats):
            dt, out = _timed(lambda: pm.generate(ids, mask, "task", n))
            t_pm.append(dt)
            agree["tokens_agree"] &= out == ours
            dt, out = _timed(lambda: peft.generate(ids, mask, n))
            t_peft.append(dt)
            agree["tokens_agree"] &= out == theirs
            log(f"{name} B={b}: rep {r + 1}/{s.repeats}: promptmux {dt_str(t_pm[-1])}, PEFT {dt_str(t_peft[-1])}")
        prof_pm = pm.profile(ids, mask, "task", n)
        prof_peft = peft.profile(ids, mask, n)
        med_pm, med_peft = statistics.median(t_pm), statistics.median(t_peft)
        row = {
            "model": name,
            "batch_size": b,
            "prompt_tokens": s.prompt_tokens,
            "padded_rows": int((mask == 0).any(1).sum()),
            "virtual_tokens": s.virtual_tokens,
            "new_tokens": n,
            "tokens_per_s_promptmux": round(b * n / med_pm, 2),
            "tokens_per_s_peft": round(b * n / med_peft, 2),
            "speedup": round(med_peft / med_pm, 3),
            "tokens_agree": bool(agree["tokens_agree"] and lengths_ok),
            "rows_agree": agree["rows_agree"],
            "first_mismatch": agree["first_mismatch"],
            "all_rows_generated_new_tokens": lengths_ok,
            "seconds_promptmux": [round(x, 4) for x in t_pm],
            "seconds_peft": [round(x, 4) for x in t_peft],
            "profile_promptmux": _round(prof_pm),
            "profile_peft": _round(prof_peft),
        }
        log(f"{name} B={b}: promptmux {row['tokens_per_s_promptmux']} tok/s, PEFT {row['tokens_per_s_peft']} tok/s, "
            f"speedup {row['speedup']}x, tokens agree: {row['tokens_agree']}")
        rows.append(row)

    prefill = []
    for b in s.prefill_batch_sizes:
        # no padding: every row has exactly S tokens
        ids, mask = make_batch(b, s.prefill_prompt_tokens, vocab, pad_id, seed=s.seed + 200 + b, padded=False)
        log(f"{name} prefill B={b}: warm-up (P={s.prefill_virtual_tokens}, S={s.prefill_prompt_tokens})")
        first_pre = pm.generate(ids, mask, "long", 1, precompute=True)
        first_inline = pm.generate(ids, mask, "long", 1, precompute=False)
        t_pre, t_inline = [], []
        for _ in range(s.repeats):
            t_pre.append(_timed(lambda: pm.generate(ids, mask, "long", 1, precompute=True))[0])
            t_inline.append(_timed(lambda: pm.generate(ids, mask, "long", 1, precompute=False))[0])
        med_pre, med_inline = statistics.median(t_pre), statistics.median(t_inline)
        p, sq = s.prefill_virtual_tokens, s.prefill_prompt_tokens
        item = {
            "model": name,
            "batch_size": b,
            "virtual_tokens": p,
            "prompt_tokens": sq,
            "ms_precompute": round(1e3 * med_pre, 2),
            "ms_inline": round(1e3 * med_inline, 2),
            "ratio": round(med_pre / med_inline, 3),
            "expected_ratio": round(sq / (p + sq), 3),
            "first_token_agrees": first_pre == first_inline,
            "seconds_precompute": [round(x, 4) for x in t_pre],
            "seconds_inline": [round(x, 4) for x in t_inline],
        }
        log(f"{name} prefill B={b}: precompute {item['ms_precompute']} ms, inline {item['ms_inline']} ms, "
            f"ratio {item['ratio']} (expected ~{item['expected_ratio']})")
        prefill.append(item)
    return {"model": name, "base": desc, "deployment": str(deploy), "export_code": export_code_hash(),
            "generation": rows, "prefill": prefill}


def dt_str(sec: float) -> str:
    return f"{sec * 1e3:.0f} ms"


def _round(d: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}


# ---- report --------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Generation benchmark (CPU)" + (" — quick smoke run, tiny random models" if result["settings"]["quick"] else ""),
        "",
        f"`{result['command']}`",
        "",
        f"{result['date']}; {m['cpu_model']}, {m['cores']} cores, {m['threads']} threads for torch and ONNX Runtime; "
        f"torch {m['versions']['torch']}, onnxruntime {m['versions']['onnxruntime']}, "
        f"transformers {m['versions']['transformers']}, peft {m['versions']['peft']}.",
        "",
    ]
    if result["contention"]:
        lines += [f"**Contention:** the load average was {m['load_average_start'][0]} at the start "
                  f"({m['cores']} cores), so another process was using the CPU; absolute timings are noisy. Both "
                  "systems ran interleaved in the same run, so their ratio is the more reliable number."
                  + (" With as many threads as cores and a core taken by another process, every parallel region "
                     "waits on a descheduled worker thread; PyTorch (OpenMP/MKL, many small parallel ops per step) "
                     "suffers far more from this than ONNX Runtime, which inflates the speedup: compare a "
                     "`--threads 1` run." if m["threads"] >= m["cores"] > 1 else ""), ""]
    st = result["settings"]
    lines += [
        f"Greedy generation, {st['new_tokens']} new tokens per row (EOS disabled), {st['prompt_tokens']} prompt tokens "
        f"per row (left padded: row i has i mod 4 pads), one prompt-tuning adapter with {st['virtual_tokens']} virtual "
        f"tokens; median of {st['repeats']} runs after a warm-up. promptmux: `Runtime.generate` (ONNX Runtime, "
        "cached decoder graph, precomputed prompt KV). PEFT: `PeftModel.generate` (eager PyTorch, KV cache).",
        "",
        "| model | batch | promptmux tok/s | PEFT tok/s | speedup | tokens agree |",
        "|---|---|---|---|---|---|",
    ]
    for mod in result["models"]:
        for r in mod["generation"]:
            lines.append(f"| {r['model']} | {r['batch_size']} | {r['tokens_per_s_promptmux']:.1f} | "
                         f"{r['tokens_per_s_peft']:.1f} | {r['speedup']:.2f}x | "
                         f"{'yes' if r['tokens_agree'] else 'NO (%d/%d rows)' % (r['rows_agree'], r['batch_size'])} |")
    lines += ["", "Where the time goes (one profiled run; ms):", "",
              "| model | batch | promptmux: prefill run | decode run/step | host/step | PEFT: forward total | "
              "outside forward |",
              "|---|---|---|---|---|---|---|"]
    for mod in result["models"]:
        for r in mod["generation"]:
            a, b = r["profile_promptmux"], r["profile_peft"]
            lines.append(f"| {r['model']} | {r['batch_size']} | {a['prefill_session_run_ms']:.1f} | "
                         f"{(a['decode_session_run_ms_per_step'] or 0):.2f} | {a['host_ms_per_step']:.2f} | "
                         f"{b['forward_ms']:.0f} ({b['forward_calls']} calls) | {b['outside_forward_ms']:.0f} |")
    lines += ["", f"Prefill with vs without precomputed prompt KV (`generate(max_new_tokens=1)`, median of "
              f"{st['repeats']}): precompute runs only the S prompt tokens with the P virtual tokens' KV as the past, "
              "so the expected ratio is about S/(P+S).", "",
              "| model | batch | P | S | precompute ms | inline ms | ratio | expected S/(P+S) |",
              "|---|---|---|---|---|---|---|---|"]
    for mod in result["models"]:
        for r in mod["prefill"]:
            lines.append(f"| {r['model']} | {r['batch_size']} | {r['virtual_tokens']} | {r['prompt_tokens']} | "
                         f"{r['ms_precompute']:.1f} | {r['ms_inline']:.1f} | {r['ratio']:.2f} | "
                         f"{r['expected_ratio']:.2f} |")
    if result["skipped"]:
        lines += [""] + [f"Skipped {s['model']}: {s['reason']}" for s in result["skipped"]]
    lines += ["", "Models: " + "; ".join(f"{mod['model']}: {mod['base']}" for mod in result["models"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    s = settings_from(args)
    quiet_libraries(all_warnings=True)
    import logging

    logging.getLogger("promptmux.export").setLevel(logging.ERROR)

    cache = Path(args.cache_dir) if args.cache_dir else default_cache()
    out = Path(args.out)
    machine = machine_info(s.threads)
    contention = machine["load_average_start"][0] > 0.5
    log(f"{machine['cpu_model']}, {machine['cores']} cores, threads {s.threads}, "
        f"load average {machine['load_average_start']}" + (" (contention: timings will be noisy)" if contention else ""))
    started = time.perf_counter()
    result = {
        "benchmark": "generation",
        "command": "python -m promptmux.bench.generation" + (" " + shlex.join(argv) if argv else ""),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine,
        "contention": contention,
        "settings": {k: v for k, v in s.__dict__.items()},
        "models": [],
        "skipped": [],
    }
    for name in s.models:
        try:
            result["models"].append(bench_model(name, s, cache, args.fresh))
        except Skip as e:
            log(f"skipping {name}: {e}")
            result["skipped"].append({"model": name, "reason": str(e)})
    machine["load_average_end"] = load_average()
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    stem = "generation-cpu-quick" if s.quick else "generation-cpu"
    if s.threads != os.cpu_count():  # a run with fewer threads than cores keeps the default run's files
        stem += f"-threads{s.threads}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    log(f"wrote {out / (stem + '.json')} and {stem}.md in {result['wall_seconds']} s")
    return result


if __name__ == "__main__":
    main()
