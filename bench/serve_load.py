"""HTTP serving load benchmark (issue 5): requests/s and p50/p95/p99 latency per task, single-task vs mixed-task
traffic, through a real `promptmux serve` process on this machine.

    python -m promptmux.bench.serve_load [DIR | --model minilm|smollm2] [--requests 2000] [--concurrency 32]
        [--max-tokens 8] [--max-batch 32] [--max-wait-ms 5] [--warmup 64] [--hot-swap [ADAPTER]]
        [--out results/] [--name serve-cpu]

DIR is any deployment; without it, the embedded demo (--model minilm: the MiniLM sentiment/topic classifier;
--model smollm2: the SmolLM2-135M generation demo) from ./promptmux-demo (./promptmux-smollm2-demo) if
`promptmux demo` wrote it, else exported once into ~/.cache/promptmux/serve-bench-<model> ($PROMPTMUX_CACHE).
Classifiers get POST /v1/classify with one text; causal LMs get POST /v1/completions (greedy, --max-tokens).
Scenarios, each --requests requests at --concurrency after a warm-up: every task alone ("single:<task>"),
then all tasks interleaved at random ("mixed"), then one request at a time ("sequential", mixed tasks, a
tenth of --requests) for the unbatched latency. Latency is measured by the client, from sending the
request to the last byte. The load generator (httpx, asyncio) runs on the same machine and takes
CPU from the server: numbers are for the pair. --warmup 0 starts the load on the first request after the
server reported ready (what a client of a freshly started server sees). --hot-swap adds a PEFT adapter folder
(default for the demo: its first task's adapter) as task "hot-swap" through the admin API during every mixed
scenario, sends it 10 requests, removes it, three times; its requests are reported as task "hot-swap", and the
add/remove calls with their latency. Every table counts 503s (overloaded) apart from other errors.
Results: <out>/<name>.json and <name>.md.
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

DEFAULT_OUT = Path("promptmux-results")  # in the working directory: recorded results go to results/ by hand, with a row in its index

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
    p.add_argument("--warmup", type=int, default=64, help="requests before the measured rounds (0: none)")
    p.add_argument("--hot-swap", nargs="?", const="", default=None, metavar="ADAPTER",
                   help="add and remove this adapter as a task under load (default: the demo's first adapter)")
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


def start_server(deploy: Path, args, admin: tuple[str, Path] | None = None) -> tuple[subprocess.Popen, str]:
    """admin: (token, adapter root) for the hot swap."""
    cmd = [sys.executable, "-m", "promptmux", "serve", str(deploy), "--port", "0", "--max-batch", str(args.max_batch),
           "--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(max(1024, 4 * args.concurrency))]
    if admin:
        cmd += ["--admin-token", admin[0], "--adapter-root", str(admin[1])]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("{"):
        proc.kill()
        raise RuntimeError("the server did not start")
    return proc, json.loads(line)["serving"]


def request_body(family, task: str, text: str, max_tokens: int, smollm2: bool) -> tuple[str, dict]:
    if family.classifies:
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


HOT_SWAP = "hot-swap"  # the task name the hot swap adds and removes


async def hot_swap(url: str, token: str, adapter: str, make_request, rounds: int = 3, requests: int = 10):
    """Add the adapter as task HOT_SWAP, send it `requests` requests, remove it; `rounds` times while the load
    runs. Returns ([(task, seconds, status, tokens)] of its requests, [(operation, seconds, status)])."""
    import httpx

    served, changes = [], []
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        async def timed(method, path, **kw):
            t0 = time.perf_counter()
            r = await c.request(method, path, **kw)
            return r, time.perf_counter() - t0

        async def one():
            path, body = make_request()
            r, dt = await timed("POST", path, json=body)
            tokens = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
            served.append((HOT_SWAP, dt, r.status_code, tokens))

        for _ in range(rounds):
            r, dt = await timed("POST", "/v1/tasks", json={"name": HOT_SWAP, "adapter": adapter}, headers=headers)
            changes.append(("add", dt, r.status_code))
            if r.status_code == 200:
                await asyncio.gather(*(one() for _ in range(requests)))
            r, dt = await timed("DELETE", f"/v1/tasks/{HOT_SWAP}", headers=headers)
            changes.append(("remove", dt, r.status_code))
            await asyncio.sleep(0.2)
    return served, changes


def server_batches(url: str, queue: str) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if s.labels.get("queue") == queue and s.name in ("promptmux_batch_size_sum", "promptmux_batch_size_count"):
                values[s.name] = s.value
            if s.labels.get("queue") == queue and s.name == "promptmux_batch_tasks_bucket" and s.labels["le"] == "1.0":
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
                          "overloaded": sum(1 for r in mine if r[2] == 503),
                          "req_per_s": rate(lambda r, t=task: r[0] == t),
                          **_percentiles(np.array([r[1] for r in mine if r[2] == 200]) * 1000),
                          "completion_tokens": sum(r[3] for r in mine)}
    total = {"requests": len(results), "errors": sum(1 for r in results if r[2] != 200),
             "overloaded": sum(1 for r in results if r[2] == 503),
             "req_per_s": rate(lambda r: True), "req_per_s_each_repeat": [round(len(rs) / w, 1) for rs, w in runs],
             **_percentiles(np.array([r[1] for r in results if r[2] == 200]) * 1000)}
    return {"per_task": per_task, "all": total}


def changes_summary(changes: list[tuple[str, float, int]]) -> dict:
    """Per operation (add, remove): count, failures, p50 and max milliseconds."""
    out = {}
    for op in sorted({c[0] for c in changes}):
        ms = np.array([c[1] for c in changes if c[0] == op]) * 1000
        out[op] = {"count": len(ms), "failed": sum(1 for c in changes if c[0] == op and c[2] != 200),
                   "p50_ms": round(float(np.median(ms)), 1), "max_ms": round(float(ms.max()), 1)}
    return out


def swap_adapter(args) -> Path:
    """The adapter folder the hot swap adds: --hot-swap ADAPTER, or the embedded demo's first task's adapter."""
    if args.hot_swap:
        path = Path(args.hot_swap).resolve()
        if not (path / "adapter_config.json").is_file():
            raise SystemExit(f"--hot-swap {args.hot_swap}: no adapter_config.json there; give a PEFT adapter folder")
        return path
    if args.deploy is not None:
        raise SystemExit("--hot-swap needs an adapter folder with a deployment of your own: --hot-swap ADAPTER")
    if args.model == "smollm2":
        from promptmux.demo.smollm2 import ADAPTERS, TASKS
    else:
        from promptmux.demo import ADAPTERS, TASKS
    return (ADAPTERS / TASKS[0]).resolve()


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
    from promptmux.core.archs import arch_for
    from promptmux.core.folder import load_base_config, read_bank

    tasks = read_bank(deploy).names()
    manifest = json.loads((deploy / "manifest.json").read_text())

    family = arch_for(load_base_config(deploy)).family
    smollm2 = args.deploy is None and args.model == "smollm2"
    name = args.name or ("serve-cpu" if family.classifies else "serve-cpu-smollm2")
    rng = random.Random(0)
    pool = {t: [x[:args.max_chars] for x in TEXTS.get(t.split("/")[0], TEXTS["sentiment"] + TEXTS["topic"])]
            for t in tasks}

    def make(task_choice, n):
        reqs = []
        for _ in range(n):
            task = task_choice()
            reqs.append((task, *request_body(family, task, rng.choice(pool[task]), args.max_tokens, smollm2)))
        return reqs

    swap = swap_adapter(args) if args.hot_swap is not None else None
    token = os.urandom(16).hex()
    load_start = [round(x, 2) for x in os.getloadavg()]
    others = busy_processes()
    started = time.perf_counter()
    proc, url = start_server(deploy, args, (token, swap.parent) if swap else None)
    ready_s = round(time.perf_counter() - started, 1)
    import urllib.request

    with urllib.request.urlopen(url + "/health", timeout=30) as r:  # what the server's backend "auto" chose
        health = json.loads(r.read())
    queue = "classify" if family.classifies else "generate"
    client = args.client or ("aiohttp" if importlib.util.find_spec("aiohttp") else "httpx")
    plan = [(f"single:{t}", (lambda t=t: t), args.requests, args.concurrency) for t in tasks]
    plan += [("mixed", lambda: rng.choice(tasks), args.requests, args.concurrency),
             ("sequential", lambda: rng.choice(tasks), max(args.requests // 10, 20), 1)]
    runs = {label: [] for label, *_ in plan}
    server = {label: {"model_calls": 0, "rows": 0, "mixed_task_calls": 0, "task_changes": []} for label, *_ in plan}
    swap_texts = [x[:args.max_chars] for x in TEXTS.get(swap.name, TEXTS["sentiment"] + TEXTS["topic"])] if swap else []

    async def load(reqs, conc, with_swap):
        if not with_swap:
            return *(await drive(url, reqs, conc, client)), []
        (results, wall), (served, changes) = await asyncio.gather(
            drive(url, reqs, conc, client),
            hot_swap(url, token, swap.name,
                     lambda: request_body(family, HOT_SWAP, rng.choice(swap_texts), args.max_tokens, smollm2)))
        return results + served, wall, changes

    try:
        log(f"server at {url} ready after {ready_s} s; {args.warmup} warm-up requests; load from {client}")
        if args.warmup:
            asyncio.run(drive(url, make(lambda: rng.choice(tasks), args.warmup), args.concurrency, client))
        for repeat in range(args.repeats):  # interleaved: contention from elsewhere hits every scenario alike
            for label, choose, n, conc in plan:
                before = server_batches(url, queue)
                results, wall, changes = asyncio.run(load(make(choose, n), conc, swap is not None and label == "mixed"))
                server[label]["task_changes"] += changes
                after = server_batches(url, queue)
                count = after.get("promptmux_batch_size_count", 0) - before.get("promptmux_batch_size_count", 0)
                single = after.get("single_task_batches", 0) - before.get("single_task_batches", 0)
                server[label]["model_calls"] += int(count)
                server[label]["rows"] += int(after.get("promptmux_batch_size_sum", 0)
                                             - before.get("promptmux_batch_size_sum", 0))
                server[label]["mixed_task_calls"] += int(count - single)
                runs[label].append((results, wall))
                errors = sum(1 for r in results if r[2] != 200)
                log(f"repeat {repeat + 1} {label}: {len(results) / wall:.1f} req/s, {errors} errors "
                    f"({sum(1 for r in results if r[2] == 503)} of them 503)")
    finally:
        proc.terminate()
        proc.wait(60)
    scenarios = {}
    for label, *_ in plan:
        sv = server[label]
        scenarios[label] = {**summarize(runs[label]), "concurrency": plan[[p[0] for p in plan].index(label)][3],
                            "server": {"model_calls": sv["model_calls"], "mixed_task_calls": sv["mixed_task_calls"],
                                       "mean_rows_per_call": round(sv["rows"] / sv["model_calls"], 2)
                                       if sv["model_calls"] else None},
                            **({"task_changes": changes_summary(sv["task_changes"])} if sv["task_changes"] else {})}
    result = {
        "command": "python -m promptmux.bench.serve_load " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(args.threads or os.cpu_count() or 1), "load_average_start": load_start, "other_busy_processes_at_start": others,
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "deployment": {"path": str(deploy), "model_type": manifest["base"].get("model_type"), "tasks": tasks,
                       "family": family.name},
        "server_ready_s": ready_s,  # start to the first line (engines prepared, runtime/prepare.py)
        "prepared": health.get("prepared"),
        "settings": {"requests": args.requests, "repeats": args.repeats, "concurrency": args.concurrency,
                     "warmup": args.warmup, "hot_swap": str(swap) if swap else None,
                     "max_batch": args.max_batch, "threads": args.threads, "client": client,
                     "backend": health.get("backend"), "precision": health.get("precision"),
                     "max_wait_ms": args.max_wait_ms, "max_tokens": None if family.classifies else args.max_tokens,
                     "endpoint": "/v1/classify" if family.classifies else "/v1/completions"},
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
             f"Warm-up: {s.get('warmup', 64)} requests before the first round"
             + (" (none: the first request follows the server's ready line)" if s.get("warmup") == 0 else "")
             + f"; the server was ready {r.get('server_ready_s', '?')} s after its start."
             + (f" Hot swap: `{s['hot_swap']}` added as task `hot-swap`, 10 requests, removed, three times during "
                "every mixed round." if s.get("hot_swap") else ""), "",
             "| scenario | task | requests | errors | of them 503 | req/s | p50 ms | p95 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, sc in r["scenarios"].items():
        for task, t in sc["per_task"].items():
            lines.append(f"| {label} | {task} | {t['requests']} | {t['errors']} | {t.get('overloaded', '?')} | "
                         f"{t['req_per_s']} | {t['p50_ms']} | {t['p95_ms']} | {t['p99_ms']} |")
        a = sc["all"]
        lines.append(f"| {label} | **all** | {a['requests']} | {a['errors']} | {a.get('overloaded', '?')} | "
                     f"**{a['req_per_s']}** | {a['p50_ms']} | {a['p95_ms']} | {a['p99_ms']} |")
    for label, sc in r["scenarios"].items():
        for op, c in sc.get("task_changes", {}).items():
            lines.append(f"\nTask {op} under load ({label}): {c['count']} calls, {c['failed']} failed, p50 "
                         f"{c['p50_ms']} ms, max {c['max_ms']} ms.")
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
