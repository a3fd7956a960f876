"""Where an OpenVINO forward of a classifier deployment spends its time, by executed layer type (OpenVINO's
performance counters), at a given precision and batch size: what bounds bf16 once AMX does the matrix work. It
also lists the source operations OpenVINO fused into its "Subgraph" nodes.

    python -m studies.openvino_profile [DEPLOY] [--precision bf16] [--batch 1] [--tokens 64] [--threads 2]
        [--runs 30] [--out results/openvino-profile-minilm-demo-bf16-b1.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from studies.capture import session_calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("deploy", nargs="?", default="out/minilm-demo")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    import openvino as ov

    from promptmux.runtime import openvino_session
    from promptmux.runtime.runtime import Runtime

    rt = Runtime(args.deploy, backend="openvino", precision=args.precision, threads=args.threads)
    with session_calls(openvino_session.OpenVinoSession) as calls:
        ids = np.random.default_rng(0).integers(1000, 20000, (args.batch, args.tokens))
        rt.forward(ids, None, [rt.tasks[i % 2] for i in range(args.batch)])
    session, feeds = calls[-1]
    xml = next(x for x in sorted((Path(args.deploy) / "openvino").glob("*.xml"))
               if {i.any_name for i in ov.Core().read_model(x).inputs} == set(session.input_names))
    config = {"INFERENCE_PRECISION_HINT": openvino_session.OV_PRECISION[args.precision],
              "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": args.threads, "PERF_COUNT": True}
    core = ov.Core()
    compiled = core.compile_model(core.read_model(xml), "CPU", config)
    request = compiled.create_infer_request()
    # What OpenVINO fused into its "Subgraph" nodes: the source operations, by name without path and number.
    fused = collections.Counter(
        name.rsplit("/", 1)[-1].split("_")[0] for op in compiled.get_runtime_model().get_ops()
        if op.get_rt_info()["layerType"].astype(str) == "Subgraph"
        for name in op.get_rt_info()["originalLayersNames"].astype(str).split(","))
    f = {n: np.ascontiguousarray(feeds[n]) for n in session.input_names}
    for _ in range(5):
        request.infer(f)
    by_type, wall = collections.Counter(), []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        request.infer(f)
        wall.append((time.perf_counter() - t0) * 1e3)
        for info in request.profiling_info:
            by_type[f"{info.node_type} ({info.exec_type})"] += info.real_time.total_seconds() * 1e3
    counted = sum(by_type.values()) / args.runs
    median = float(np.median(wall))
    result = {"command": "python -m studies.openvino_profile " + " ".join(argv or sys.argv[1:]), "graph": xml.name,
              "precision": args.precision, "batch": args.batch, "tokens": args.tokens,
              "positions": int(np.prod(feeds["attention_mask"].shape)), "wall_ms_median": median,
              "counted_ms": counted, "outside_the_layers_ms": median - counted,
              "subgraph_fuses": dict(fused.most_common()),
              "layers": {k: {"ms": v / args.runs, "share_of_wall": v / args.runs / median}
                         for k, v in by_type.most_common()},
              "load_avg": os.getloadavg()[0]}
    out = args.out or Path(f"results/openvino-profile-{Path(args.deploy).name}-{args.precision}"
                           f"-b{args.batch}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "layers"}))
    for k, r in list(result["layers"].items())[:10]:
        print(f"{k:50s} {r['ms']:7.2f} ms {100 * r['share_of_wall']:5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
