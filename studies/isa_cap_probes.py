"""What an instruction-set cap (bench/isa_cap.py) changes in ONNX Runtime, on a deployment with int8 graphs: the
fp32 and int8 graphs' forward at one size, the int8 graph's profile (its quantize-and-multiply nodes against all
nodes), and MLAS's int8 kernel on inputs whose pairs of products saturate 16 bits. Each cap in a process of its own
(uncapped and capped alternating), the graphs opened by file name with the runtime's own session options.

    python -m studies.isa_cap_probes DEPLOY [--caps none,avx2] [--shape 32x64] [--rounds 2] [--threads 2]
        [--out results/isa-cap-probes.json]

DEPLOY needs model_noprefix.int8.onnx (`promptmux demo --precision int8`, or fast where it chose ONNX Runtime's).
"""

from __future__ import annotations

import argparse
import collections
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

GRAPHS = ("model_noprefix.onnx", "model_noprefix.int8.onnx")
INT8_PRODUCTS = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger"}


def _feeds(deploy: str, rows: int, tokens: int, threads: int) -> dict:
    """The feeds Runtime.forward gives the graph without prefix inputs for a batch of the first task."""
    from promptmux import Runtime
    from promptmux.runtime import sessions
    from promptmux.runtime.timing import workload

    seen = {}
    run = sessions.OrtSession.run

    def spy(self, feeds, bank_key=None):
        seen[self.graph_file] = dict(feeds)
        return run(self, feeds, bank_key)

    sessions.OrtSession.run = spy
    try:
        forward, _ = workload(Runtime(deploy, backend="onnxruntime", precision="fp32", threads=threads),
                              (rows, tokens))
        forward()
    finally:
        sessions.OrtSession.run = run
    assert list(seen) == [GRAPHS[0]], seen  # the batch ran the graph without prefix inputs
    return seen[GRAPHS[0]]


def _mlas_saturation() -> int:
    """MatMulInteger of uint8 255s by int8 127s over 64 columns: 2,072,640 exact; less where pairs saturate."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((64, 16), 127, np.int8), "b")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [16, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [16, 16])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return int(session.run(None, {"a": np.full((16, 64), 255, np.uint8)})[0].max())


def child(deploy: str, rows: int, tokens: int, threads: int) -> dict:
    import onnxruntime as ort

    from promptmux.runtime.cpu import describe
    from promptmux.runtime.sessions import CPU_DISABLED_OPTIMIZERS

    feeds = _feeds(deploy, rows, tokens, threads)
    result = {"cpu": describe(), "mlas_saturation_probe": _mlas_saturation(), "ms": {}}
    profiles = tempfile.mkdtemp(prefix="promptmux-isa-cap-probes-")  # ORT writes profiles to the cwd otherwise
    for graph in GRAPHS:
        for profile in (False, True) if graph == GRAPHS[1] else (False,):
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.intra_op_num_threads = threads
            so.enable_profiling = profile
            so.profile_file_prefix = str(Path(profiles) / "ort")
            session = ort.InferenceSession(str(Path(deploy) / graph), so, providers=["CPUExecutionProvider"],
                                           disabled_optimizers=CPU_DISABLED_OPTIMIZERS)
            mine = {i.name: feeds[i.name] for i in session.get_inputs()}
            for _ in range(3):
                session.run(None, mine)
            times = []
            for _ in range(5 if profile else 15):
                t = time.perf_counter()
                session.run(None, mine)
                times.append(time.perf_counter() - t)
            if not profile:
                result["ms"][graph] = round(1e3 * statistics.median(times), 2)
                continue
            per_op = collections.Counter()
            for event in json.loads(Path(session.end_profiling()).read_text()):
                if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                    per_op[event["args"]["op_name"]] += event["dur"]
            runs = 3 + 5  # the profile holds the warm-up calls too
            result["int8_profile_ms"] = {op: round(us / runs / 1e3, 2) for op, us in per_op.most_common()}
    shutil.rmtree(profiles, ignore_errors=True)
    profile = result["int8_profile_ms"]
    result["int8_products_ms"] = round(sum(v for k, v in profile.items() if k in INT8_PRODUCTS), 2)
    result["int8_all_nodes_ms"] = round(sum(profile.values()), 2)
    return result


def main(argv=None) -> int:
    from promptmux.bench import isa_cap

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("deploy")
    p.add_argument("--caps", default="none,avx2")
    p.add_argument("--shape", default="32x64")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results/isa-cap-probes.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    rows, tokens = (int(x) for x in args.shape.split("x"))
    if args.child:
        print(json.dumps(child(args.deploy, rows, tokens, args.threads)))
        return 0
    missing = [g for g in GRAPHS if not (Path(args.deploy) / g).is_file()]
    if missing:
        raise SystemExit(f"{args.deploy} has no {', '.join(missing)}: make it with `promptmux demo --precision int8`")
    caps = args.caps.split(",")
    load_start = os.getloadavg()
    runs = {cap: [] for cap in caps}
    for r in range(args.rounds):
        for cap in caps if r % 2 == 0 else caps[::-1]:
            env = None if cap == "none" else isa_cap.environ(cap)
            done = subprocess.run([sys.executable, "-m", "studies.isa_cap_probes", args.deploy, "--shape", args.shape,
                                   "--threads", str(args.threads), "--child"], env=env, capture_output=True,
                                  text=True, check=True)
            runs[cap].append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary = {}
    for cap, rs in runs.items():
        summary[cap] = {"cpu": rs[0]["cpu"], "mlas_saturation_probe": rs[0]["mlas_saturation_probe"],
                        **{f"{g}_ms": statistics.median(r["ms"][g] for r in rs) for g in GRAPHS},
                        "int8_products_ms": statistics.median(r["int8_products_ms"] for r in rs),
                        "int8_all_nodes_ms": statistics.median(r["int8_all_nodes_ms"] for r in rs)}
        print(cap, json.dumps(summary[cap]))
    result = {"command": "python -m studies.isa_cap_probes " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "shape": args.shape, "threads": args.threads,
              "load_average_start": load_start, "load_average_end": os.getloadavg(), "summary": summary,
              "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
