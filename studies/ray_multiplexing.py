"""Ray Serve's model multiplexing for promptmux's generation: does routing each request by its task help?
(issue 24, item 8)

    python studies/ray_multiplexing.py DEPLOY [--tasks 64] [--kv-cache-mb 8] [--requests 160] [--rounds 2]

DEPLOY: a causal-LM deployment with a prompt-tuning task (the SmolLM2 demo's). Run it as a script: the Ray
deployment class below is then shipped to the replicas by value.

Serve's multiplexing (`@serve.multiplexed`, the `serve_multiplexed_model_id` header) sends a request to a replica
that already holds its "model". For promptmux a model is a task, and what a replica holds of it is the task's prompt
key/values: for prompt tuning a forward pass over its virtual tokens, kept in an LRU bounded in bytes
(`--kv-cache-mb`). Routed without it, every replica sees every task and caches the same hot set; routed by task,
each sees part of them, so its cache covers more of its traffic, but the hottest task's replica gets more work.
Batches stay mixed either way: promptmux's scheduler batches whatever its replica gets (Serve's @serve.batch, which
would split batches by model id, is not used).

The deployment is grown to N clones of its prompt-tuning task (with noise, bench/many_tasks.build). Each mode runs
in a process of its own, alternating, each round a fresh Ray with 2 replicas (1 CPU, 1 thread each):
- default: Serve's router (power of two choices), no header;
- multiplexed: the header names the task, each replica's loader registers it (max_num_models_per_replica = the
  tasks its KV cache holds).
Load: R greedy completions from C concurrent clients, tasks drawn from Zipf(1.0) over the N tasks (the same draws
in every round). Per mode: requests/s, p50/p99 latency, the prompt KV computations (cache misses) and their time,
summed over the replicas; and that every request got the same text in both modes. JSON to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HEADER = "serve_multiplexed_model_id"
REPLICAS = 2


def application(deploy: str, kv_mb: float, per_replica: int, max_batch: int):
    from ray import serve

    from promptmux.runtime.server.options import ServeOptions

    options = ServeOptions(threads=1, kv_cache_mb=kv_mb, max_batch=max_batch)
    replica: list = []  # this replica's deployment object, for the middleware

    def build():
        from promptmux.runtime.generate import Generator
        from promptmux.runtime.server.app import create_app

        app = create_app(deploy, options)
        counts = {"kv_computed": 0, "kv_seconds": 0.0, "tasks_loaded": 0}
        compute = Generator._compute_kv

        def counted(self, view):  # a prompt KV cache miss
            t = time.perf_counter()
            kv = compute(self, view)
            counts["kv_computed"] += 1
            counts["kv_seconds"] += time.perf_counter() - t
            return kv

        Generator._compute_kv = counted

        @app.get("/study/counts")
        def study_counts():
            return {"pid": os.getpid(), **counts, "tasks_loaded": replica[0].loaded if replica else 0}

        @app.middleware("http")
        async def register_task(request, call_next):  # what makes Serve route this task here next time
            task = serve.get_multiplexed_model_id()
            if task and replica:
                await replica[0].load_task(task)
            return await call_next(request)

        return app

    class Replica:
        def __init__(self):
            self.loaded = 0
            replica[:] = [self]

        @serve.multiplexed(max_num_models_per_replica=per_replica)
        async def load_task(self, task: str) -> str:
            self.loaded += 1  # nothing to load: the first request of the task computes its prompt KV
            return task

    return serve.deployment(name="promptmux", num_replicas=REPLICAS, ray_actor_options={"num_cpus": 1},
                            max_ongoing_requests=2 * max_batch)(serve.ingress(build)(Replica)).bind()


async def load(url: str, bodies: list[dict], concurrency: int, multiplexed: bool) -> tuple[list, list]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat, texts = [0.0] * len(bodies), [""] * len(bodies)

    async def one(c, i, body):
        async with sem:
            headers = {HEADER: body["model"]} if multiplexed else {}
            t = time.perf_counter()
            r = await c.post(f"{url}/v1/completions", json=body, headers=headers)
            lat[i] = time.perf_counter() - t
            r.raise_for_status()
            texts[i] = r.json()["choices"][0]["text"]

    async with httpx.AsyncClient(timeout=300) as c:
        await asyncio.gather(*(one(c, i, b) for i, b in enumerate(bodies)))
    return lat, texts


def counts_of_replicas(url: str) -> list[dict]:
    import httpx

    seen = {}
    for _ in range(200):  # Serve's router picks the replica: ask until both have answered
        r = httpx.get(f"{url}/study/counts", timeout=30).json()
        seen[r["pid"]] = r
        if len(seen) == REPLICAS:
            break
    return list(seen.values())


def child(mode: str, deploy: str, args: dict) -> dict:
    import ray
    from ray import serve

    from promptmux.runtime.cpu import describe

    kv_per_task = args["kv_bytes_per_task"]
    per_replica = max(1, int(args["kv_cache_mb"] * 2**20 // kv_per_task))
    ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False)
    port = 8700 + os.getpid() % 200
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        t = time.perf_counter()
        serve.run(application(deploy, args["kv_cache_mb"], per_replica, args["max_batch"]), name="study",
                  route_prefix="/")
        started = time.perf_counter() - t
        rng = np.random.default_rng(args["seed"])
        from promptmux.bench.workload import zipf_ranks

        ranks = zipf_ranks(rng, args["tasks"], args["requests"])
        bodies = [{"model": f"user-{int(r)}", "prompt": f"Request {i}: say something about the number {i % 13}.",
                   "max_tokens": args["new_tokens"], "temperature": 0} for i, r in enumerate(ranks)]
        before = {r["pid"]: r for r in counts_of_replicas(url)}  # the KV computed at start (precompute) is not counted
        load_start = os.getloadavg()
        t = time.perf_counter()
        lat, texts = asyncio.run(load(url, bodies, args["concurrency"], mode == "multiplexed"))
        wall = time.perf_counter() - t
        replicas = [{**r, **{k: r[k] - before.get(r["pid"], {}).get(k, 0) for k in ("kv_computed", "kv_seconds",
                                                                                     "tasks_loaded")}}
                    for r in counts_of_replicas(url)]
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"mode": mode, "machine": describe(), "serve_start_s": round(started, 1), "wall_s": round(wall, 2),
            "requests_per_s": round(len(bodies) / wall, 3),
            "p50_ms": round(1e3 * statistics.median(lat), 1),
            "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 1),
            "kv_computed": sum(r["kv_computed"] for r in replicas),
            "kv_seconds": round(sum(r["kv_seconds"] for r in replicas), 2),
            "tasks_loaded": sum(r["tasks_loaded"] for r in replicas),
            "per_replica": replicas, "tasks_per_replica_cache": per_replica,
            "distinct_tasks": len(set(ranks.tolist())), "load_average_start": load_start,
            "load_average_end": os.getloadavg(), "texts": texts}


def kv_bytes_per_task(deploy: Path) -> int:
    """A prompt-tuning task's prompt key/values: layers x 2 x kv heads x T x head dim, fp32."""
    from promptmux import Runtime
    from promptmux.core.folder import read_bank

    rt = Runtime(deploy, backend="onnxruntime")
    view = read_bank(deploy).view("user-0")
    d = rt.dims
    return d.num_layers * 2 * d.num_kv_heads * view.num_virtual_tokens * d.head_dim * 4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("deploy", type=Path)
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--kv-cache-mb", type=float, default=8.0)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # MODE DEPLOY JSON
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], json.loads(a.child[2]))))
        return 0

    from promptmux.bench.many_tasks import build

    work = Path(tempfile.mkdtemp(prefix="promptmux-ray-mux-"))
    try:
        grown = work / "deploy"
        build(a.deploy, grown, a.tasks + 2)  # its 2 tasks + user-0 .. user-{tasks-1}
        args = {"tasks": a.tasks, "kv_cache_mb": a.kv_cache_mb, "requests": a.requests, "concurrency": a.concurrency,
                "new_tokens": a.new_tokens, "max_batch": a.max_batch, "seed": a.seed,
                "kv_bytes_per_task": kv_bytes_per_task(grown)}
        result = {"command": " ".join(sys.argv), "args": args, "load_average_start": os.getloadavg(), "rounds": []}
        for r in range(a.rounds):
            modes = ("default", "multiplexed") if r % 2 == 0 else ("multiplexed", "default")
            for mode in modes:
                proc = subprocess.run([sys.executable, __file__, str(grown), "--child", mode, str(grown),
                                       json.dumps(args)], check=False, capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"{mode} round {r} failed:\n{proc.stderr[-4000:]}")
                out = json.loads(proc.stdout.strip().splitlines()[-1])
                print(json.dumps({k: v for k, v in out.items() if k not in ("texts", "per_replica")}), flush=True)
                result["rounds"].append(out)
        texts = {m: [o["texts"] for o in result["rounds"] if o["mode"] == m] for m in ("default", "multiplexed")}
        result["same_texts"] = all(t == texts["default"][0] for m in texts for t in texts[m])
        summary = {}
        for m in texts:
            rows = [o for o in result["rounds"] if o["mode"] == m]
            summary[m] = {k: statistics.median(o[k] for o in rows)
                          for k in ("requests_per_s", "p50_ms", "p99_ms", "kv_computed", "kv_seconds", "tasks_loaded")}
        summary["multiplexed_vs_default_throughput"] = round(
            summary["multiplexed"]["requests_per_s"] / summary["default"]["requests_per_s"], 3)
        result["summary"] = summary
        result["load_average_end"] = os.getloadavg()
        for o in result["rounds"]:
            o.pop("texts")
        print(json.dumps({"summary": summary, "same_texts": result["same_texts"]}, indent=1))
        if a.out:
            a.out.write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
