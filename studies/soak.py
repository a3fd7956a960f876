"""Hardening soak (issue 13): mixed classify and generate traffic through real `promptmux serve` processes on
127.0.0.1, with every attack of issue 13 mixed in at random, and task changes under load.

    python -m studies.soak [--requests 600] [--attack-rate 0.25] [--concurrency 16] [--max-seconds 600]
        [--out results/] [--name soak-cpu]

It builds the tests' tiny BERT and GPT-2 deployments (tests/servekit.py: a character tokenizer, random
weights) in a temporary folder, computes each innocent request's single-request result in-process, then runs
--requests requests per server, a fraction --attack-rate of them attacks: lone surrogates, sampling extremes
(top_p 1e-7, temperature 5e-324), corrupt adapters and adapter files linking outside --adapter-root over the
admin API, slowloris headers and bodies, oversized headers; and adds/removes tasks over the admin API
throughout. Bounded: --requests per server and --max-seconds in all. Asserts: 0 innocent requests failed or
wrong, 0 responses 5xx, 0 tasks lost (the served task list is exactly what the successful changes imply).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from promptmux.bench.machine import machine_info

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results"
TOKEN = "soak-token"
TEXTS = ["the film was warm", "a tedious mess", "rates rose again", "the striker scored", "new phones", "flat jokes"]


def _tiny_deployments(root: Path):
    tests = Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(tests))  # the tests' tiny deployments and broken adapters
    import brokenkit
    import servekit

    return servekit, brokenkit, {arch: servekit.TextDeployment(arch, root / arch) for arch in ("bert", "gpt2")}


def _expected(rt, arch: str, tasks: list[str]) -> dict:
    if arch == "bert":
        return {(t, x): rt.classify([x], t)[0]["label_id"] for t in tasks for x in TEXTS}
    return {(t, x): rt.generate([x], t, max_new_tokens=6, eos_token_id=None)[0]["text"] for t in tasks for x in TEXTS}


ATTACKS = ["surrogate", "top_p", "temperature", "corrupt_adapter", "escape_adapter", "slow_headers", "slow_body",
           "big_header"]


async def _attack(c, url: str, arch: str, kind: str, broken: list[str], escapes: list[str], rng, servekit) -> int:
    admin = {"Authorization": f"Bearer {TOKEN}"}
    if kind == "surrogate":
        path, body = ("/v1/classify", '{"task": "pt", "text": "a\\ud800"}') if arch == "bert" else \
            ("/v1/completions", '{"model": "pt", "prompt": ["ok", "\\udc00"]}')
        return (await c.post(path, content=body, headers={"Content-Type": "application/json"})).status_code
    if kind in ("top_p", "temperature"):
        extra = {"top_p": 1e-7} if kind == "top_p" else {"temperature": 5e-324}
        return (await c.post("/v1/completions", json={"model": "pt", "prompt": "abc", "max_tokens": 4,
                                                      "seed": 1, **extra})).status_code
    if kind in ("corrupt_adapter", "escape_adapter"):
        folder = rng.choice(broken if kind == "corrupt_adapter" else escapes)
        r = await c.post("/v1/tasks", json={"name": "attack", "adapter": folder, "replace": True}, headers=admin)
        if r.status_code == 200:  # esc-base: a fine adapter whose base folder is not followed
            await c.delete("/v1/tasks/attack", headers=admin)
        return r.status_code
    data = {"slow_headers": b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Ty",
            "slow_body": b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n{\"task\"",
            "big_header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"}[kind]
    try:
        out, _ = await asyncio.to_thread(servekit.raw_exchange, url, data)
    except OSError:  # no answer in time: a slow client was not cut off
        return 0
    return int(out.split(b" ", 2)[1]) if out.startswith(b"HTTP/1.1 ") else 0  # 0: closed without an answer


async def _soak_server(url: str, arch: str, tasks: list[str], expected: dict, args, broken, escapes, seed: int,
                       servekit):
    rng = random.Random(seed)
    admin = {"Authorization": f"Bearer {TOKEN}"}
    stats = {"innocent": 0, "innocent_failed": 0, "attacks": {}, "attacks_unanswered": 0, "status_5xx": 0,
             "task_changes": 0,
             "latency_ms": []}
    served = set(tasks)
    lock = asyncio.Lock()

    async def innocent(c):
        task, text = rng.choice(tasks), rng.choice(TEXTS)
        start = time.perf_counter()
        if arch == "bert":
            r = await c.post("/v1/classify", json={"task": task, "text": text})
            ok = r.status_code == 200 and r.json()["results"][0]["label_id"] == expected[(task, text)]
        else:
            r = await c.post("/v1/completions", json={"model": task, "prompt": text, "max_tokens": 6,
                                                      "temperature": 0})
            ok = r.status_code == 200 and r.json()["choices"][0]["text"] == expected[(task, text)]
        stats["latency_ms"].append((time.perf_counter() - start) * 1000)
        stats["innocent"] += 1
        stats["innocent_failed"] += not ok
        stats["status_5xx"] += r.status_code >= 500

    async def change(c, k):
        async with lock:  # the soak's own bookkeeping of what is served, in the order the server answered
            name = f"soak-{seed}-{k}"
            r = await c.post("/v1/tasks", json={"name": name, "adapter": "ptlstm"}, headers=admin)
            if r.status_code == 200:
                served.add(name)
            if k % 2 and name in served:
                if (await c.delete(f"/v1/tasks/{name}", headers=admin)).status_code == 200:
                    served.discard(name)
            stats["task_changes"] += 1
            stats["status_5xx"] += r.status_code >= 500

    async def one(c, i):
        if i % 25 == 0:
            return await change(c, i)
        if rng.random() < args.attack_rate:
            kind = rng.choice([k for k in ATTACKS if arch == "gpt2" or k not in ("top_p", "temperature")])
            status = await _attack(c, url, arch, kind, broken, escapes, rng, servekit)
            stats["attacks"].setdefault(kind, {}).setdefault(str(status), 0)
            stats["attacks"][kind][str(status)] += 1
            stats["status_5xx"] += status >= 500
            stats["attacks_unanswered"] += status == 0
            return
        await innocent(c)

    import httpx

    sem = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        async def bounded(i):
            async with sem:
                await one(c, i)
        await asyncio.gather(*(bounded(i) for i in range(args.requests)))
        listed = {t["name"] for t in (await c.get("/v1/tasks", headers=admin)).json()["tasks"]}
    stats["tasks_lost"] = len(served - listed)
    stats["tasks_unexpected"] = len(listed - served)
    lat = np.array(stats.pop("latency_ms"))
    stats["innocent_p50_ms"], stats["innocent_p99_ms"] = (round(float(np.percentile(lat, q)), 1) for q in (50, 99))
    return stats


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=600, help="requests per server (classifier, causal LM)")
    p.add_argument("--attack-rate", type=float, default=0.25)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=600.0, help="the whole soak stops (and fails) after this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--name", default="soak-cpu")
    args = p.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="promptmux-soak-") as tmp:
        from promptmux import Runtime

        servekit, brokenkit, deps = _tiny_deployments(Path(tmp))
        results = {}
        for i, (arch, d) in enumerate(deps.items()):
            broken = [f"broken/{n}" for n in brokenkit.build_corrupt(d.adapters["pt"], d.adapter_root / "broken")]
            escapes = [f"escapes/{n}" for n in brokenkit.build_escapes(d.adapters["pt"], d.adapter_root / "escapes",
                                                                        Path(tmp) / f"outside-{arch}")]
            expected = _expected(Runtime(d.deploy), arch, d.tasks)
            with servekit.running_server(d.deploy, "--admin-token", TOKEN, "--adapter-root", str(d.adapter_root),
                                         "--header-timeout", "2", "--body-timeout", "2") as server:
                left = args.max_seconds - (time.monotonic() - started)
                t0 = time.monotonic()
                results[arch] = asyncio.run(asyncio.wait_for(
                    _soak_server(server.url, arch, d.tasks, expected, args, broken, escapes, args.seed + i, servekit), left))
                results[arch]["seconds"] = round(time.monotonic() - t0, 1)
    record = {"command": "python -m studies.soak " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine_info(os.cpu_count() or 1),
              "servers": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(results, indent=2))
    for arch, r in results.items():
        assert r["innocent_failed"] == 0, f"{arch}: {r['innocent_failed']} innocent requests failed"
        assert r["status_5xx"] == 0, f"{arch}: {r['status_5xx']} responses were 5xx"
        assert r["attacks_unanswered"] == 0, f"{arch}: {r['attacks_unanswered']} slow clients were never cut off"
        assert r["tasks_lost"] == 0 and r["tasks_unexpected"] == 0, f"{arch}: task list differs"
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
