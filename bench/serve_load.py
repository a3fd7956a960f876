"""HTTP serving load benchmark (issue 5): requests/s and p50/p95/p99 latency per task, single-task vs mixed-task
traffic, through a real `promptmux serve` process on this machine.

    python -m promptmux.bench.serve_load [DIR | --model minilm|smollm2] [--requests 2000] [--concurrency 32]
        [--max-tokens 8] [--max-batch 32] [--max-wait-ms 5] [--out bench/results/] [--name serve-cpu]

DIR is any deployment; without it, the embedded demo (--model minilm: the MiniLM sentiment/topic classifier;
--model smollm2: the SmolLM2-135M generation demo) from ./promptmux-demo (./promptmux-smollm2-demo) if
`promptmux demo` wrote it, else exported once into ~/.cache/promptmux/serve-bench-<model> ($PROMPTMUX_CACHE).
Classifiers get POST /v1/classify with one text; causal LMs get POST /v1/completions (greedy, --max-tokens).
Scenarios, each --requests requests at --concurrency after a warm-up: every task alone ("single:<task>"),
then all tasks interleaved at random ("mixed"), then one request at a time ("sequential", mixed tasks, a
tenth of --requests) for the unbatched latency. Latency is measured by the client, from sending the
request to the last byte. The load generator (httpx, asyncio) runs on the same machine and takes
CPU from the server: numbers are for the pair. Results: <out>/<name>.json and <name>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import importlib.util
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .machine import machine_info

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

# Made-up inputs in the demo tasks' domains (what the text says does not change the cost much; length does).
TEXTS = {
    "sentiment": [
        "A warm, funny and beautifully acted film that stays with you.",
        "A tedious, clumsy mess that wastes a talented cast.",
        "Flat jokes, a dull plot and far too long.",
        "The lead performance is magnetic and the script never talks down to its audience.",
        "It looks gorgeous, but the story goes nowhere and the ending is a shrug.",
        "One of the most moving documentaries of the year.",
        "A lazy sequel that repeats every beat of the original without any of its charm.",
        "Sharp, tender and surprisingly funny, with a final scene that lands perfectly.",
        "The director keeps the tension high from the first frame to the last.",
        "Two hours of noise, clichés and wooden dialogue.",
        "A small film with a big heart and a cast that clearly loves the material.",
        "Neither scary nor funny, it simply wastes everyone's time.",
    ],
    "topic": [
        "The central bank raised interest rates again as inflation reached a ten-year high.",
        "The striker scored twice as the home side won the cup final in extra time.",
        "The new phone's chip doubles battery life and speeds up its camera software.",
        "Ministers will vote next week on the proposed changes to the election law.",
        "The singer's new album went straight to the top of the charts in its first week.",
        "Shares in the airline fell sharply after it warned of lower profits this year.",
        "The opposition leader called for an inquiry into the government's spending plans.",
        "The film festival opened with a premiere attended by hundreds of fans.",
        "Researchers unveiled a faster web browser that uses far less memory.",
        "The coach was sacked after the team lost its fifth game in a row.",
        "The retailer reported record sales over the holiday period.",
        "A software update fixes a security flaw that let attackers read messages.",
    ],
}


def log(msg: str) -> None:
    print(f"[serve-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m promptmux.bench.serve_load", description=__doc__.split("\n")[0])
    p.add_argument("deploy", nargs="?", help="deployment folder (default: the embedded demo, exported first)")
    p.add_argument("--model", choices=["minilm", "smollm2"], default="minilm", help="which embedded demo")
    p.add_argument("--requests", type=int, default=1000, help="requests per scenario and repeat")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all scenarios (interleaved, so that load "
                                                         "from other processes hits every scenario alike)")
    p.add_argument("--client", choices=["aiohttp", "httpx"], default=None,
                   help="load generator (default aiohttp if installed: it takes less CPU from the server)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=8, help="completions: new tokens per request")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, help="the server's ONNX Runtime threads (default: ONNX Runtime's)")
    p.add_argument("--max-chars", type=int, help="cut the texts to this many characters (tiny test models)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--name", default=None, help="result file name (default serve-cpu or serve-cpu-smollm2)")
    return p.parse_args(argv)


def demo_deployment(model: str) -> Path:
    """What `promptmux demo [--model smollm2]` wrote in this folder, else the same export in a cache folder."""
    if model == "smollm2":
        from promptmux.demo.smollm2 import ADAPTERS, TASKS, smollm2_base_dir

        base, out = smollm2_base_dir, Path("promptmux-smollm2-demo")
    else:
        from promptmux.demo import ADAPTERS, TASKS, base_model_dir

        base, out = base_model_dir, Path("promptmux-demo")
    if (out / "manifest.json").is_file():
        return out
    root = os.environ.get("PROMPTMUX_CACHE")
    out = (Path(root).expanduser() if root else Path.home() / ".cache" / "promptmux") / f"serve-bench-{model}"
    if not (out / "manifest.json").is_file():
        from promptmux.export.deploy import export_deployment

        log(f"exporting the {model} demo to {out}")
        export_deployment(base(), {t: ADAPTERS / t for t in TASKS}, out, quiet=True, overwrite=out.exists())
    return out


def start_server(deploy: Path, args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "promptmux", "serve", str(deploy), "--port", "0", "--max-batch", str(args.max_batch),
           "--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(max(1024, 4 * args.concurrency))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("{"):
        proc.kill()
        raise RuntimeError("the server did not start")
    return proc, json.loads(line)["serving"]


def request_body(family: str, task: str, text: str, max_tokens: int, smollm2: bool) -> tuple[str, dict]:
    if family == "encoder":
        return "/v1/classify", {"task": task, "text": text}
    prompt = text
    if smollm2:
        from promptmux.demo.smollm2 import format_input

        prompt = format_input(text)
    return "/v1/completions", {"model": task, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


async def drive(url: str, reqs: list[tuple[str, str, dict]], concurrency: int, client: str):
    """[(task, seconds, status, completion tokens)], wall seconds."""
    sem = asyncio.Semaphore(concurrency)
    out = []
    if client == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=concurrency),
                                        timeout=aiohttp.ClientTimeout(total=120))

        async def post(path, body):
            async with session.post(path, json=body) as r:
                return r.status, await r.json()
    else:
        import httpx

        session = httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency))

        async def post(path, body):
            r = await session.post(path, json=body)
            return r.status_code, r.json()

    async def one(task, path, body):
        async with sem:
            t0 = time.perf_counter()
            status, answer = await post(path, body)
            dt = time.perf_counter() - t0
            tokens = answer.get("usage", {}).get("completion_tokens", 0) if status == 200 else 0
            out.append((task, dt, status, tokens))

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(*r) for r in reqs))
        return out, time.perf_counter() - t0
    finally:
        await (session.close() if client == "aiohttp" else session.aclose())


def server_batches(url: str, kind: str) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if s.labels.get("kind") == kind and s.name in ("promptmux_batch_size_sum", "promptmux_batch_size_count"):
                values[s.name] = s.value
            if s.labels.get("kind") == kind and s.name == "promptmux_batch_tasks_bucket" and s.labels["le"] == "1.0":
                values["single_task_batches"] = s.value
    return values


def _percentiles(lat_ms) -> dict:
    if not len(lat_ms):
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    return {f"p{q}_ms": round(float(np.percentile(lat_ms, q)), 1) for q in (50, 95, 99)}


def summarize(runs: list[tuple[list, float]]) -> dict:
    """runs: one (results, wall seconds) per repeat. req/s: the median over the repeats; latency percentiles over
    every request of every repeat."""
    results = [r for rs, _ in runs for r in rs]

    def rate(keep):
        return round(float(np.median([sum(1 for r in rs if keep(r)) / wall for rs, wall in runs])), 1)

    per_task = {}
    for task in sorted({r[0] for r in results}):
        mine = [r for r in results if r[0] == task]
        per_task[task] = {"requests": len(mine), "errors": sum(1 for r in mine if r[2] != 200),
                          "req_per_s": rate(lambda r, t=task: r[0] == t),
                          **_percentiles(np.array([r[1] for r in mine if r[2] == 200]) * 1000),
                          "completion_tokens": sum(r[3] for r in mine)}
    total = {"requests": len(results), "errors": sum(1 for r in results if r[2] != 200),
             "req_per_s": rate(lambda r: True), "req_per_s_each_repeat": [round(len(rs) / w, 1) for rs, w in runs],
             **_percentiles(np.array([r[1] for r in results if r[2] == 200]) * 1000)}
    return {"per_task": per_task, "all": total}


def busy_processes(limit: int = 3) -> list[str]:
    """Other processes using CPU when the run starts (the machine may be shared): '%CPU command'."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,pid,args", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out:
        cpu, pid, cmd = line.split(None, 2)
        if int(pid) != os.getpid() and float(cpu) >= 10:
            rows.append(f"{cpu}% {cmd[:100]}")
    return rows[:limit]


def main(argv=None) -> dict:
    args = parse_args(argv)
    deploy = Path(args.deploy) if args.deploy else demo_deployment(args.model)
    manifest = json.loads((deploy / "manifest.json").read_text())
    tasks = [t["name"] for t in manifest["tasks"]]
    from promptmux.core.archs import arch_for
    from promptmux.core.folder import load_base_config

    family = arch_for(load_base_config(deploy).model_type).family
    smollm2 = args.deploy is None and args.model == "smollm2"
    name = args.name or ("serve-cpu-smollm2" if family != "encoder" else "serve-cpu")
    rng = random.Random(0)
    pool = {t: [x[:args.max_chars] for x in TEXTS.get(t.split("/")[0], TEXTS["sentiment"] + TEXTS["topic"])]
            for t in tasks}

    def make(task_choice, n):
        reqs = []
        for _ in range(n):
            task = task_choice()
            reqs.append((task, *request_body(family, task, rng.choice(pool[task]), args.max_tokens, smollm2)))
        return reqs

    load_start = [round(x, 2) for x in os.getloadavg()]
    others = busy_processes()
    proc, url = start_server(deploy, args)
    import urllib.request

    with urllib.request.urlopen(url + "/health", timeout=30) as r:  # what the server's backend "auto" chose
        health = json.loads(r.read())
    kind = "classify" if family == "encoder" else "generate"
    client = args.client or ("aiohttp" if importlib.util.find_spec("aiohttp") else "httpx")
    plan = [(f"single:{t}", (lambda t=t: t), args.requests, args.concurrency) for t in tasks]
    plan += [("mixed", lambda: rng.choice(tasks), args.requests, args.concurrency),
             ("sequential", lambda: rng.choice(tasks), max(args.requests // 10, 20), 1)]
    runs = {label: [] for label, *_ in plan}
    server = {label: {"model_calls": 0, "rows": 0, "mixed_task_calls": 0} for label, *_ in plan}
    try:
        log(f"server at {url}; warm-up; load from {client}")
        asyncio.run(drive(url, make(lambda: rng.choice(tasks), 64), args.concurrency, client))
        for repeat in range(args.repeats):  # interleaved: contention from elsewhere hits every scenario alike
            for label, choose, n, conc in plan:
                before = server_batches(url, kind)
                results, wall = asyncio.run(drive(url, make(choose, n), conc, client))
                after = server_batches(url, kind)
                count = after.get("promptmux_batch_size_count", 0) - before.get("promptmux_batch_size_count", 0)
                single = after.get("single_task_batches", 0) - before.get("single_task_batches", 0)
                server[label]["model_calls"] += int(count)
                server[label]["rows"] += int(after.get("promptmux_batch_size_sum", 0)
                                             - before.get("promptmux_batch_size_sum", 0))
                server[label]["mixed_task_calls"] += int(count - single)
                runs[label].append((results, wall))
                errors = sum(1 for r in results if r[2] != 200)
                log(f"repeat {repeat + 1} {label}: {len(results) / wall:.1f} req/s, {errors} errors")
    finally:
        proc.terminate()
        proc.wait(60)
    scenarios = {}
    for label, *_ in plan:
        sv = server[label]
        scenarios[label] = {**summarize(runs[label]), "concurrency": plan[[p[0] for p in plan].index(label)][3],
                            "server": {"model_calls": sv["model_calls"], "mixed_task_calls": sv["mixed_task_calls"],
                                       "mean_rows_per_call": round(sv["rows"] / sv["model_calls"], 2)
                                       if sv["model_calls"] else None}}
    result = {
        "command": "python -m promptmux.bench.serve_load " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(args.threads or os.cpu_count() or 1), "load_average_start": load_start, "other_busy_processes_at_start": others,
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "deployment": {"path": str(deploy), "model_type": manifest["base"].get("model_type"), "tasks": tasks,
                       "family": family},
        "settings": {"requests": args.requests, "repeats": args.repeats, "concurrency": args.concurrency,
                     "max_batch": args.max_batch, "threads": args.threads, "client": client,
                     "backend": health.get("backend"), "precision": health.get("precision"),
                     "max_wait_ms": args.max_wait_ms, "max_tokens": args.max_tokens if family != "encoder" else None,
                     "endpoint": "/v1/classify" if family == "encoder" else "/v1/completions"},
        "scenarios": scenarios,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    log(f"wrote {out / name}.json and .md")
    return result


def markdown(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    lines = [f"# HTTP serving load ({r['deployment']['model_type']}, CPU)", "", f"`{r['command']}`", "",
             f"{r['date']}; {m['cpu_model']}, {m['cores']} cores; load average {m['load_average_start']} at start, "
             f"{m['load_average_end']} at end; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
             "",
             ("Other processes busy when the run started (a shared machine; they took CPU from the server and the "
              "load generator): " + "; ".join(f"`{p}`" for p in m["other_busy_processes_at_start"]) + "."
              if m["other_busy_processes_at_start"] else "No other process was busy when the run started."), "",
             f"`promptmux serve` ({s.get('backend') or 'ONNX Runtime'} {s.get('precision') or ''}, "
             f"{s['threads'] or 'default'} thread(s), --max-batch {s['max_batch']}, "
             f"--max-wait-ms {s['max_wait_ms']:g}) and the load generator ({s['client']}, asyncio) on the same "
             f"machine; {s['endpoint']}"
             + (f", greedy, max_tokens {s['max_tokens']}" if s["max_tokens"] else ", one text per request")
             + f"; {s['repeats']} rounds over the scenarios (interleaved), {s['requests']} requests per scenario and "
               f"round at concurrency {s['concurrency']} (sequential: a tenth, one at a time). req/s: the median "
               "round (per task: that task's requests per second of the scenario); latency percentiles over all "
               "rounds, from sending the request to the last byte, measured by the client.", "",
             "| scenario | task | requests | errors | req/s | p50 ms | p95 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for label, sc in r["scenarios"].items():
        for task, t in sc["per_task"].items():
            lines.append(f"| {label} | {task} | {t['requests']} | {t['errors']} | {t['req_per_s']} | {t['p50_ms']} | "
                         f"{t['p95_ms']} | {t['p99_ms']} |")
        a = sc["all"]
        lines.append(f"| {label} | **all** | {a['requests']} | {a['errors']} | **{a['req_per_s']}** | {a['p50_ms']} | "
                     f"{a['p95_ms']} | {a['p99_ms']} |")
    lines += ["", "Server side (from /metrics, per scenario): model calls (classification batches, or generation "
              "decoding steps; the prefills of joining rows are not counted), mean rows per call, calls mixing tasks.",
              "",
              "| scenario | model calls | mean rows/call | mixed-task calls |", "|---|---|---|---|"]
    for label, sc in r["scenarios"].items():
        sv = sc["server"]
        lines.append(f"| {label} | {sv['model_calls']} | {sv['mean_rows_per_call']} | {sv['mixed_task_calls']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
