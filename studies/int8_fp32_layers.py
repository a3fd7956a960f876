"""ONNX Runtime's int8 with its most sensitive layers kept fp32: how many answers it keeps on rows the contract never
saw, and what each layer kept costs in speed.

    python -m studies.int8_fp32_layers DEPLOY [--keep 0,1,2,4,9] [--threads 2] [--out results/....json]
    python -m promptmux.bench.isa_cap avx2 -- python -m studies.int8_fp32_layers DEPLOY ...   (as on Zen 3)

DEPLOY: the demo deployment (`promptmux demo --out DIR`; its calibration.jsonl holds the 200 labelled rows a task
the contract is measured on). The weight MatMuls are ranked as accuracy control ranks them (runtime/accuracy_control:
each quantized alone, scored on sentiment's calibration rows, the task that misses), then for each count in --keep
the top ones stay fp32 and the rest int8, in a copy of the deployment. Each variant is measured against fp32 ONNX
Runtime on the calibration rows and on the held-out rows after them (bench/accuracy.held_out; mixed batches of 32),
and timed against fp32 with each in a process of its own (runtime/timing.time_apart; graph_runs asserted).
Where the contract passes narrowly (97.5 % kept on 200 calibration rows, the rule 97 %), all-int8 kept 96.0 % of
the held-out sentiment answers capped to AVX2
(results/accuracy-fast-minilm-intel-capped-avx2-after-calibration-rows.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

SHAPES = ((1, 64), (8, 64), (32, 64), (8, 256))


def time_int8_variants(deploy: Path, configs: dict, entries: dict) -> list[float]:
    """Time each int8 variant in `configs` (and "fp32") on SHAPES, each in a process of its own; each entry gets
    its speedups over fp32 and the graphs its timing ran (asserted: the int8 graph for a variant, never for fp32).
    Returns fp32's seconds per shape."""
    from promptmux.runtime.timing import time_apart

    timed = time_apart(deploy, configs, SHAPES)
    fp32 = timed["fp32"]["seconds"]
    for name, entry in entries.items():
        runs = timed[name]["graph_runs"]
        assert runs and all(".int8." in g for g in runs), runs  # the int8 graph ran, not the fp32 one
        entry["speedup_vs_fp32"] = [round(f / s, 3) for f, s in zip(fp32, timed[name]["seconds"])]
        entry["graph_runs"] = runs
    assert not any(".int8." in g for g in timed["fp32"]["graph_runs"])
    return fp32


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.int8_fp32_layers", description=__doc__.splitlines()[0])
    p.add_argument("deploy", type=Path)
    p.add_argument("--keep", default="0,1,2,4,9", help="counts of layers kept fp32, most sensitive first")
    p.add_argument("--order", choices=("sensitivity", "per-weight"), default="sensitivity",
                   help="sensitivity: accuracy control's ranking; per-weight: its score divided by the layer's weight "
                        "count (its cost: a feed-forward layer has 4x an attention projection's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    counts = [int(k) for k in args.keep.split(",")]

    import numpy as np

    from promptmux import Runtime
    from promptmux.bench.accuracy import deployment_answers, held_out
    from promptmux.bench.machine import machine_info
    from promptmux.bench.measure import load_average
    from promptmux.demo import CALIBRATION_ROWS
    from promptmux.runtime import accuracy_control, cpu
    from promptmux.runtime.calibration import classifier_batches
    from promptmux.runtime.precision import LABELLED_FILE, calibration_texts
    from promptmux.runtime.quantize import int8_graph

    load_start = load_average()
    rows = [r for r in calibration_texts(args.deploy / LABELLED_FILE) if isinstance(r, dict)]
    exact = Runtime(args.deploy, backend="onnxruntime", precision="fp32", threads=args.threads)
    tasks = sorted({r["task"] for r in rows})
    sets = {"calibration": [e for t in tasks for e in held_out(t, exact.tokenizer, CALIBRATION_ROWS, True)],
            "held_out": [e for t in tasks for e in held_out(t, exact.tokenizer)]}
    def answers(rt, examples):  # the predicted class per example (tasks have different label counts)
        return [int(np.argmax(logits)) for logits in deployment_answers(rt, examples)[0]]

    want = {name: answers(exact, examples) for name, examples in sets.items()}

    result = {"command": "python -m studies.int8_fp32_layers " + " ".join(sys.argv[1:] if argv is None else argv),
              "cpu": cpu.describe(), "machine": machine_info(args.threads), "shapes": [list(s) for s in SHAPES],
              "rows": {name: {t: sum(e[0] == t for e in ex) for t in tasks} for name, ex in sets.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ranked = work / "ranked"
        shutil.copytree(args.deploy, ranked)
        rt = Runtime(ranked, backend="onnxruntime", precision="int8", threads=args.threads)
        mine = [r["text"] for r in rows if r["task"] == "sentiment"]
        scores: list[float] = []
        order = accuracy_control.rank(rt, exact, {"sentiment": classifier_batches(exact, mine, "sentiment")},
                                      scores)
        if args.order == "per-weight":  # the most sensitivity for the least fp32 work first
            import onnx

            from promptmux.runtime.quantize import weight_matmuls

            graph = onnx.load(str(args.deploy / "model_noprefix.onnx"), load_external_data=False).graph
            sizes = {t.name: int(np.prod(t.dims)) for t in graph.initializer}
            nodes = {n.name: n for n in graph.node}
            weights = [sizes[nodes[name].input[1]] for name in weight_matmuls(graph)]
            order = sorted(range(len(scores)), key=lambda i: scores[i] / weights[i], reverse=True)
        result["ranking"], result["order"], result["scores"] = order, args.order, [round(x, 6) for x in scores]
        del rt
        shutil.rmtree(ranked)
        variants, configs = {}, {"fp32": {"backend": "onnxruntime", "precision": "fp32", "threads": args.threads}}
        for k in counts:
            keep = tuple(sorted(order[:k]))
            copy = work / f"keep{k}"
            shutil.copytree(args.deploy, copy)
            manifest = json.loads((copy / "manifest.json").read_text())
            manifest["precision"]["onnxruntime/int8"]["fp32_layers"] = list(keep)  # what the Runtime makes again
            (copy / "manifest.json").write_text(json.dumps(manifest, indent=1))
            for graph in ("model_noprefix.onnx", "model.onnx"):
                int8_graph(copy / graph, True, keep)
            rt = Runtime(copy, backend="onnxruntime", precision="int8", threads=args.threads)
            assert rt.int8_fp32_layers == keep, (rt.int8_fp32_layers, keep)
            entry = {"fp32_layers": list(keep)}
            for name, examples in sets.items():
                got = answers(rt, examples)
                entry[name] = {t: round(float(np.mean([g == w for g, w, e in zip(got, want[name], examples)
                                                        if e[0] == t])), 4) for t in tasks}
            del rt
            variants[f"keep {k}"] = entry
            configs[f"keep {k}"] = {"deploy": str(copy), "backend": "onnxruntime", "precision": "int8",
                                    "threads": args.threads}
            print(f"{k} layers fp32: kept {entry}", flush=True)
        fp32 = time_int8_variants(args.deploy, configs, variants)
    result.update(variants=variants, fp32_seconds=[round(s, 5) for s in fp32],
                  load_average=[load_start, load_average()])
    for name, entry in variants.items():
        print(name, entry["held_out"], entry["speedup_vs_fp32"])
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
