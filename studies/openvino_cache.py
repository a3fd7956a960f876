"""What an OpenVINO restart costs, and whether OpenVINO's compiled-model cache may be used for promptmux graphs.

For each deployment graph this times, interleaved over rounds in one process:

* compile: `core.compile_model(core.read_model(IR))` from the IR that promptmux already caches in
  `DEPLOY/openvino/` (what every start does today);
* import:  `core.import_model(blob)` of the same compiled model exported with `CompiledModel.export_model`
  (what a compiled-blob cache, promptmux's own or OpenVINO's CACHE_DIR, would do instead);

and checks correctness: the imported model, and a model loaded through OpenVINO's CACHE_DIR, against the freshly
compiled one on the feeds a real call made (captured from `Runtime`), as the largest absolute difference. It also
counts the fused RoPE nodes in the compiled graph, and times the ONNX -> IR conversion that the first start pays
(once per deployment).

    python -m studies.openvino_cache out/minilm-demo:cls:fp32 out/minilm-demo:cls:bf16 \
        out/gpt2-small:gen:fp32 out/smollm2-demo:gen:fp32 [--rounds 5] [--out results/openvino-cache.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from studies.capture import session_calls


def captured_feeds(deploy: Path, mode: str, precision: str):
    """The OpenVINO session a real call used, and the feeds of every call it made."""
    from promptmux.runtime.openvino_session import OpenVinoSession
    from promptmux.runtime.runtime import Runtime

    with session_calls(OpenVinoSession, "run_all") as calls:
        rt = Runtime(deploy, backend="openvino", precision=precision)
        tasks = rt.tasks
        if mode == "gen":  # a prefill and two decode steps, two tasks
            rt.generate([[11, 12, 13, 14, 15], [21, 22, 23, 24, 25]], [tasks[0], tasks[-1]], max_new_tokens=3)
        else:
            texts = ["a fine film with a great cast", "stocks fell sharply as markets slid", "the match ended"] * 3
            rt.forward_text(texts, [tasks[i % len(tasks)] for i in range(len(texts))])
    session = calls[0][0]
    return session, [f for s, f in calls if s is session]


def outputs(compiled, feeds):
    req = compiled.create_infer_request()
    req.infer({i.any_name: np.ascontiguousarray(feeds[i.any_name]) for i in compiled.inputs})
    return [np.array(req.get_tensor(o).data, copy=True) for o in compiled.outputs]


def largest_diff(compiled, reference, feed_list) -> float:
    return max(float(np.abs(a - b).max()) if a.size else 0.0
               for feeds, want in zip(feed_list, reference) for a, b in zip(outputs(compiled, feeds), want))


def study(spec: str, rounds: int, work: Path) -> dict:
    import openvino as ov

    from promptmux.runtime.openvino_session import OV_PRECISION

    deploy, mode, precision = spec.split(":")
    session, feed_list = captured_feeds(Path(deploy), mode, precision)
    xml = next(p for p in sorted((Path(deploy) / "openvino").glob("*.xml"))
               if {i.any_name for i in ov.Core().read_model(p).inputs} == set(session.input_names))
    config = {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY"}
    reference = [outputs(session.compiled, f) for f in feed_list]
    blob = work / "model.blob"
    blob.write_bytes(session.compiled.export_model().getbuffer())
    times = collections.defaultdict(list)
    for _ in range(rounds):
        core = ov.Core()
        t0 = time.perf_counter()
        core.compile_model(core.read_model(xml), "CPU", config)
        times["compile_s"].append(time.perf_counter() - t0)
        core = ov.Core()
        t0 = time.perf_counter()
        imported = core.import_model(blob.read_bytes(), "CPU", config)
        times["import_s"].append(time.perf_counter() - t0)
    cache_dir = work / "ov-cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    via_cache = []
    for _ in range(3):  # the first call fills OpenVINO's cache; the next two load from it
        core = ov.Core()
        core.set_property({"CACHE_DIR": str(cache_dir)})
        via_cache.append(largest_diff(core.compile_model(str(xml), "CPU", config), reference, feed_list))
    from promptmux.runtime.openvino_session import convert_graph

    onnx_graph = Path(deploy) / (xml.stem + ".onnx")
    (work / "ir").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    convert_graph(onnx_graph.resolve(), work / "ir", progress=lambda _: None)  # what the first start pays once
    convert_s = time.perf_counter() - t0
    shutil.rmtree(work / "ir")
    layer_types = collections.Counter(op.get_rt_info()["layerType"].astype(str)
                                      for op in session.compiled.get_runtime_model().get_ops())
    return {"deployment": deploy, "graph": xml.name, "mode": mode, "precision": precision, "calls": len(feed_list),
            "rope_nodes": layer_types.get("RoPE", 0), "blob_mib": round(blob.stat().st_size / 2**20, 1),
            "convert_once_s": round(convert_s, 2), **{k: round(statistics.median(v), 3) for k, v in times.items()},
            "imported_max_abs_diff": largest_diff(imported, reference, feed_list),
            "ov_cache_max_abs_diff": via_cache}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("specs", nargs="+", help="DEPLOY:cls|gen:fp32|bf16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("results/openvino-cache.json"))
    args = p.parse_args(argv)
    import openvino as ov

    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [study(s, args.rounds, Path(tmp)) for s in args.specs]
    load.append(os.getloadavg()[0])
    result = {"command": "python -m studies.openvino_cache " + " ".join(argv or sys.argv[1:]),
              "openvino": ov.get_version(), "load_avg_start_end": load, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
