"""What the KServe v2 protocols cost against /v1/classify: one `promptmux serve` (HTTP and --grpc-port), requests
of B texts one at a time (latency, no queueing), per protocol: /v1/classify (JSON), v2 HTTP with binary tensors
(tritonclient's default), v2 HTTP JSON and v2 gRPC (tritonclient). Each protocol's client runs in its own process,
the protocols alternate round by round, and the result is the median latency per protocol and its ratio to /v1.

    python -m promptmux.bench.kserve_overhead DEPLOY [--batch 8] [--requests 100] [--rounds 5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

PROTOCOLS = ("v1", "v2-http-binary", "v2-http-json", "v2-grpc")
TEXTS = ["A warm, funny and beautifully acted film that stays with you.",
         "The central bank raised interest rates again as inflation reached a ten-year high.",
         "A tedious, clumsy mess that wastes a talented cast.",
         "The striker scored twice as the home side won the cup final in extra time."]


def client(protocol: str, url: str, grpc_url: str, task: str, batch: int, requests: int) -> list[float]:
    """Seconds per request, after 5 warm-up requests."""
    import numpy as np

    texts = [TEXTS[i % len(TEXTS)] for i in range(batch)]
    if protocol == "v1":
        import httpx

        http = httpx.Client(base_url=url, timeout=60)

        def call():
            r = http.post("/v1/classify", json={"task": task, "texts": texts})
            assert r.status_code == 200, r.text
    else:
        if protocol == "v2-grpc":
            import tritonclient.grpc as module
            c = module.InferenceServerClient(grpc_url)
        else:
            import tritonclient.http as module
            c = module.InferenceServerClient(url.removeprefix("http://"))
        binary = protocol != "v2-http-json"

        def call():
            x = module.InferInput("text", [batch], "BYTES")
            data = np.array([t.encode() for t in texts], dtype=np.object_)
            x.set_data_from_numpy(data) if protocol == "v2-grpc" else x.set_data_from_numpy(data, binary_data=binary)
            outputs = None if protocol == "v2-grpc" else [module.InferRequestedOutput(n, binary_data=binary)
                                                            for n in ("scores", "label_id", "label")]
            r = c.infer(task, [x], outputs=outputs)
            assert r.as_numpy("scores").shape[0] == batch
    for _ in range(5):
        call()
    times = []
    for _ in range(requests):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("deploy")
    p.add_argument("--task")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default="kserve-overhead.json")
    p.add_argument("--client", help=argparse.SUPPRESS)  # PROTOCOL URL GRPC TASK: one client process
    args = p.parse_args(argv)
    if args.client:
        protocol, url, grpc_url, task = args.client.split(",")
        print(json.dumps(client(protocol, url, grpc_url, task, args.batch, args.requests)))
        return 0
    from promptmux.runtime.cpu import describe

    from .measure import load_average as loadavg

    server_args = ["--grpc-port", "0"] + (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.Popen([sys.executable, "-m", "promptmux", "serve", args.deploy, "--port", "0", *server_args],
                            stdout=subprocess.PIPE, text=True)
    try:
        first = json.loads(next(line for line in proc.stdout if line.startswith("{")))
        url, grpc_url = first["serving"], first["grpc"]
        import httpx

        task = args.task or httpx.get(url + "/v1/models").json()["data"][0]["id"]
        load_start = loadavg()
        times = {p: [] for p in PROTOCOLS}
        for r in range(args.rounds):
            for protocol in PROTOCOLS if r % 2 == 0 else PROTOCOLS[::-1]:
                out = subprocess.run([sys.executable, "-m", "promptmux.bench.kserve_overhead", args.deploy,
                                      "--batch", str(args.batch), "--requests", str(args.requests),
                                      "--client", f"{protocol},{url},{grpc_url},{task}"],
                                     capture_output=True, text=True, check=True)
                times[protocol] += json.loads(out.stdout.strip().splitlines()[-1])
        health = httpx.get(url + "/health").json()
    finally:
        proc.terminate()
        proc.wait(30)
    ms = {p: round(1e3 * statistics.median(ts), 3) for p, ts in times.items()}
    result = {"command": " ".join(["python -m promptmux.bench.kserve_overhead", *(argv or sys.argv[1:])]),
              "cpu": describe(), "load_average_start": load_start, "load_average_end": loadavg(),
              "backend": health.get("backend"), "task": task, "batch": args.batch, "requests_per_round":
              args.requests, "rounds": args.rounds, "median_latency_ms": ms,
              "p99_latency_ms": {p: round(1e3 * sorted(ts)[int(0.99 * (len(ts) - 1))], 3) for p, ts in times.items()},
              "ratio_to_v1": {p: round(ms[p] / ms["v1"], 3) for p in PROTOCOLS}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("median_latency_ms", "ratio_to_v1")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
