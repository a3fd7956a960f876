"""`promptmux bench`: throughput per task, mixing cost, the PEFT eager baseline, task-count scaling, accuracy.

What a measured configuration is: a backend (or PEFT), a batch size B, a sequence length S (random token ids,
every row S real tokens), --new-tokens N (0: one full-sequence forward per request; classification: one row
classified; N > 0: greedy generation of exactly N tokens, EOS off), and a traffic mix over the chosen tasks:

- single:  every request uses one task; one run per task (what each task gets on its own);
- uniform: each request's task drawn uniformly at random (seeded);
- zipf:    task of rank k (the order of --tasks) drawn with probability proportional to 1/k^s (s = --zipf-s).

The request stream of a configuration is fixed (seeded) and identical for every system. promptmux takes the
requests in arrival order, B at a time, tasks mixed within a batch. PEFT serves one adapter per batch, so it
gets its best fair setup: the same requests grouped by task, then B at a time (its last batch of each task may
be smaller). Every system runs a warm-up (each distinct batch shape once), then --repeats rounds; a round runs
every system on every mix of one (B, S) once, in an order reversed every other round, so that load from other
processes hits all systems and mixes alike. A round is one pass over the stream (--requests N), or as many
passes as fit in --duration / --repeats seconds (at least one).

Figures per system and configuration: requests/s and tokens/s (median over rounds; tokens = real input tokens
for N = 0, generated tokens for N > 0), per task the same, latency p50/p95/p99 (a request's latency is the
time of the model call that answered it: batch service time, no queueing), and memory: the process's resident
set (psutil RSS sampled every 5 ms while the system runs; without psutil, getrusage ru_maxrss deltas). Both
systems live in one process, so the peak includes the other system's weights; the load deltas are reported
apart. Before timing, the first promptmux batch is compared row by row with PEFT's outputs for the same rows.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from promptmux.core.quiet import quiet_libraries

from .accuracy import accuracy
from .machine import device_of, environment
from .measure import load_average, memory_method
from .models import describe_config
from .report import write_outputs
from .scaling import scaling
from .settings import BenchSettings, settings_from_args, system_pairs
from .throughput import throughput

if TYPE_CHECKING:  # the annotations only: the runtime is imported where it runs
    from promptmux.runtime.runtime import Runtime


def deployment_info(rt: Runtime) -> dict:
    return {"path": str(Path(rt.dir).resolve()), "model": describe_config(rt.config),
            "family": rt.spec.family.name, "base": rt.manifest["base"].get("path"),
            "tasks": [{"name": t, "kind": rt.bank.view(t).kind, "virtual_tokens": rt.bank.view(t).num_virtual_tokens}
                      for t in rt.tasks]}


def run(s: BenchSettings) -> dict:
    """Everything the settings ask for; writes <out>.json, .md and the PNG plots. Returns the result."""
    import torch

    s.check()
    quiet_libraries(all_warnings=True)
    if not s.threads:
        s.threads = os.cpu_count() or 1
    torch.set_num_threads(s.threads)
    if not (Path(s.deploy) / "manifest.json").is_file():
        raise FileNotFoundError(f"{s.deploy} is not a promptmux deployment (no manifest.json); run promptmux export")
    from promptmux.runtime.runtime import Runtime

    # The parent's own Runtime: the deployment's tasks, bank and config, and the engine of --scaling / --accuracy
    # (the first backend and precision; otherwise the lightest, as the systems run in their own processes).
    engine = bool(s.scaling or s.accuracy or not s.isolate)
    first = system_pairs(s)[0]
    rt = Runtime(s.deploy, backend=first[0] if engine else "onnxruntime", precision=first[1] if engine else "fp32",
                 threads=s.threads, base=s.base)
    env = environment(s.threads, s.backends)
    started = time.perf_counter()
    result = {
        "benchmark": "promptmux bench",
        "command": s.command(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "environment": env,
        "devices": sorted({device_of(b, env) for b in s.backends}),
        "settings": asdict(s),
        "deployment": deployment_info(rt),
        "definitions": {
            "request": "classification: one row classified; causal LM: one full-sequence forward (new_tokens 0) or "
                       "one generation of new_tokens tokens",
            "tokens_per_s": "real input tokens per second (new_tokens 0), generated tokens per second otherwise",
            "latency": "batch service time of the model call that answered the request (no queueing)",
            "requests_per_s": "median over rounds of requests / round wall time",
            "memory": memory_method() + "; with isolation (the default) each system is its own process and "
                      "peak_rss is that process's; with --same-process every system is loaded in one process, so "
                      "peak_rss includes the others' weights; rss_growth = peak during the round - RSS at its start (the allocator "
                      "and ONNX Runtime's arena keep memory, so only a round that needs more than before shows it); "
                      "load_rss_mb = RSS growth while a system loaded (safetensors weights are memory-mapped and "
                      "counted only once touched, so PEFT's load delta undercounts its weights)",
            "peft_batches": "PEFT eager: the same requests grouped by task, then batch_size at a time (one adapter "
                            "per batch)",
            "peft_bf16": "PEFT eager inside torch.autocast(bfloat16) (weights fp32, matrix products bf16)",
            "peft_int8": "PEFT eager after PyTorch's torch.ao.quantization.quantize_dynamic (every torch.nn.Linear "
                         "int8, weights per output channel, activations per batch; CPU only)",
            "isolation": "each system in its own process, driven in alternating rounds (default), or all in this "
                         "process (--same-process)",
        },
    }
    if s.throughput:
        result["throughput"] = throughput(s, rt, env)
    if s.scaling:
        result["scaling"] = scaling(s, rt)
    if s.accuracy:
        result["accuracy"] = accuracy(s, rt)
    env["load_average_end"] = load_average()
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    # No "targets" here: those are this project's own goals (python -m promptmux.bench.report --render adds them to
    # the recorded results), not a measure of a user's deployment.
    result["files"] = write_outputs(result, Path(s.out))
    return result


def run_from_args(args) -> dict:
    return run(settings_from_args(args))


__all__ = ["deployment_info", "run", "run_from_args"]
