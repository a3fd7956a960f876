"""How consistently one engine beats the other, round by round, at the sizes the routing times (runtime/routing.py):
both engines of a deployment kept to one engine each (the routing's own configurations), each in a process of its
own, alternating (runtime/timing.time_apart); for each size, OpenVINO's time over ONNX Runtime's in each round, the
rounds OpenVINO won, the median ratio, and the split routing.split makes of it. Each engine's process asserts that
it ran its own graphs (graph_runs).

    python -m studies.routing_rounds DEPLOY [--rounds 7] [--threads 2] [--out results/routing-rounds.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    from promptmux.runtime import routing
    from promptmux.runtime.cpu import describe
    from promptmux.runtime.timing import time_apart

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("deploy")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/routing-rounds.json")
    args = ap.parse_args()

    configs = {e: {"backend": "onnxruntime+openvino", "route_positions": 0, "threads": args.threads, "force": e}
               for e in routing.ENGINES}
    shapes = list(routing.SIZES)
    load_start, started = os.getloadavg(), time.perf_counter()
    timed = time_apart(args.deploy, configs, shapes, rounds=args.rounds)
    for engine, t in timed.items():  # each process ran only its engine's graphs
        assert t["graph_runs"] and all(("shape-specialised" in g) == (engine == "openvino")
                                       for g in t["graph_runs"]), (engine, t["graph_runs"])
    sizes = []
    for i, (rows, tokens) in enumerate(shapes):
        rounds = routing.paired_rounds(timed, i)
        ratios = [ov / ort for ort, ov in rounds]
        sizes.append({**routing.size_record(rows, tokens, timed["openvino"]["positions"][i], rounds),
                      "openvino_over_onnxruntime": [round(r, 4) for r in ratios],
                      "median_ratio": round(statistics.median(ratios), 4)})
        print(f"{rows} x {tokens}: OpenVINO / ONNX Runtime per round {sizes[-1]['openvino_over_onnxruntime']}, "
              f"won {sizes[-1]['openvino_ahead']} of {len(ratios)}")
    with_rounds = routing.split(sizes)
    margin_only = routing.split([{k: s[k] for k in ("positions", "onnxruntime_ms", "openvino_ms")} for s in sizes])
    print(f"split: {with_rounds} positions (by the median and MARGIN alone: {margin_only})")
    result = {"command": "python -m studies.routing_rounds " + " ".join(
                  f"--{k} {v}" if k != "deploy" else str(v) for k, v in vars(args).items()),
              "cpu": describe(), "date": time.strftime("%Y-%m-%d"), "threads": args.threads,
              "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "seconds": round(time.perf_counter() - started, 1), "sizes": sizes,
              "split": with_rounds, "split_by_margin_only": margin_only,
              "graph_runs": {e: timed[e]["graph_runs"] for e in timed}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
