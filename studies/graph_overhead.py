"""Where the promptmux ORT graph's overhead over a plain export comes from: MiniLM variants, one piece removed at a
time, timed interleaved in one process on ONNX Runtime CPU (the session options of runtime/sessions.py OrtSession).

Variants (all run the same token positions, S tokens + the task's T virtual tokens; a prompt-tuning batch):

* plain:        the bare encoder, TorchScript exporter at opset 17 with eager attention (bench/cpu_engines.py's
                ort-plain): input_ids, 2-D attention mask, token types; positions implicit; output the hidden states;
* plain-dynamo: the same bare encoder through the dynamo exporter at opset 23 (promptmux's exporter and opset,
                SDPA -> the ONNX Attention op), pooler output, none of promptmux's inputs;
* full:         the deployment's graph (model.onnx) with the feeds core/layout.py builds with min_slots=1 (one
                masked MPT slot, one masked prefix slot concatenated to the keys and values of every layer);
* full-zero:    the same graph, layout with min_slots=0 (zero-length MPT and prefix axes: no dummy slots);
* noprefix:     full-zero's graph exported without prefix_keys/prefix_values (no cache, mask [B, L]);
* noorder:      noprefix without the `order` gather;
* nompt:        noorder without the MPT node (prompt concat in front, then the backbone);
* nompt-pos:    nompt with implicit position ids (the model's arange);
* nompt-nomask: nompt without an attention mask (what an all-ones batch could run);
* runtime:      Runtime.forward on the deployment (full graph plus the host-side layout and heads).

    python -m studies.graph_overhead [DEPLOY] [--batch-sizes 1,8,32] [--seq-len 64] [--threads 2]
        [--rounds 7] [--work DIR] [--out results/graph-overhead.json]

DEPLOY defaults to a MiniLM demo deployment exported into the work folder. Exports are cached there too, and so are
ORT's optimized graphs (optimized-VARIANT.onnx), summarised by op type in the JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = ("plain", "plain-dynamo", "full", "full-zero", "noprefix", "noorder", "nompt", "nompt-pos", "nompt-nomask",
            "runtime")
# What each variant removes from the one before it (for the report).
STEPS = [("full", "full-zero", "the masked dummy MPT and prefix slots (layout min_slots 1 -> 0)"),
         ("full-zero", "noprefix", "prefix inputs (empty cache: Split/Squeeze/Concat per layer)"),
         ("noprefix", "noorder", "order gather"),
         ("noorder", "nompt", "MPT node (+ its masked slot)"),
         ("nompt", "nompt-pos", "explicit position_ids"),
         ("nompt", "nompt-nomask", "attention mask"),
         ("nompt-pos", "plain-dynamo", "prompt concat / inputs_embeds path"),
         ("plain-dynamo", "plain", "exporter: dynamo opset 23 -> TorchScript opset 17 (ORT's own attention fusion)"),
         ("full", "runtime", "host-side layout + heads (Runtime.forward)")]


def _variant_module(backbone, names: list[str], order: bool, mpt: bool, positions: bool, mask: bool):
    import torch
    from transformers import DynamicCache

    from promptmux.kernels.mpt_reference import mpt_prompt_concat

    class Variant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.b = backbone

        def forward(self, input_ids, *args):
            a = dict(zip(names[1:], args))
            b = self.b
            tokens = b.embed(input_ids)
            x = torch.cat([a["prompt_embeds"], tokens], dim=1)
            if mpt:
                x = mpt_prompt_concat(a["mpt_task_ids"], a["mpt_shared_ids"], a["mpt_shared"], a["mpt_cols"],
                                      a["mpt_rows"], x)
            if order:
                x = torch.gather(x, 1, a["order"].unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            kw = dict(inputs_embeds=x, token_type_ids=a["token_type_ids"])
            if mask:
                kw["attention_mask"] = a["attention_mask"]
            if positions:
                kw["position_ids"] = a["position_ids"]
            if "prefix_keys" in a:
                kw["past_key_values"] = DynamicCache([(a["prefix_keys"][i], a["prefix_values"][i])
                                                      for i in range(b.num_layers)], config=b.model.config)
            return b.model.base_model(**kw, return_dict=True).pooler_output

    return Variant().eval()


class _Bare:
    """The bare encoder on input_ids (plain-dynamo)."""

    @staticmethod
    def module(model):
        import torch

        class Bare(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = model

            def forward(self, input_ids, *args):  # *args: the exporter's nesting of dynamic shapes
                token_type_ids, attention_mask = args
                return self.m.base_model(input_ids=input_ids, token_type_ids=token_type_ids,
                                         attention_mask=attention_mask, return_dict=True).pooler_output

        return Bare().eval()


SPEC = {  # variant -> (order, mpt, prefix, positions, mask)
    "noprefix": (True, True, False, True, True),
    "noorder": (False, True, False, True, True),
    "nompt": (False, False, False, True, True),
    "nompt-pos": (False, False, False, False, True),
    "nompt-nomask": (False, False, False, True, False),
}


def _names(variant: str) -> list[str]:
    order, mpt, prefix, positions, mask = SPEC[variant]
    names = ["input_ids", "token_type_ids"]
    names += ["attention_mask"] if mask else []
    names += ["position_ids"] if positions else []
    names += ["order"] if order else []
    names += ["prompt_embeds"]
    names += ["mpt_task_ids", "mpt_shared_ids", "mpt_shared", "mpt_cols", "mpt_rows"] if mpt else []
    names += ["prefix_keys", "prefix_values"] if prefix else []
    return names


def export_variants(deploy: Path, work: Path) -> dict[str, Path]:
    """The ONNX file of every graph variant (exported once into work)."""
    import torch

    from promptmux.core.folder import load_base_model
    from promptmux.core.graph import PromptedBackbone
    from promptmux.core.quiet import quiet_libraries
    from promptmux.export import mpt_function
    from promptmux.export.onnx_export import dynamic_shapes, example_inputs, rename_axes, save_model, to_onnx
    from studies.cpu_engines import bare_onnx

    quiet_libraries()
    manifest = json.loads((deploy / "manifest.json").read_text())
    base = manifest["base"]["path"]
    paths = {"plain": bare_onnx(base, work, fused=False), "full": deploy / manifest["graph"]["file"]}
    model = None
    for variant in ("plain-dynamo", *SPEC):
        path = work / f"{variant}.onnx"
        paths[variant] = path
        if path.exists():
            continue
        if model is None:
            model = load_base_model(base)
        if variant == "plain-dynamo":
            names = ["input_ids", "token_type_ids", "attention_mask"]
            module = _Bare.module(model)
            ex = {"input_ids": torch.randint(0, 50, (2, 9)), "token_type_ids": torch.zeros(2, 9, dtype=torch.long),
                  "attention_mask": torch.ones(2, 9, dtype=torch.long)}
        else:
            order, mpt, *_ = SPEC[variant]
            names = _names(variant)
            module = _variant_module(PromptedBackbone(model), names, *SPEC[variant][:2], *SPEC[variant][3:])
            ex = example_inputs(model.config, tm=5 if mpt else 0, n=0)
            ex = {n: ex[n] for n in names}
        t = time.perf_counter()
        onnx_model = to_onnx(module, tuple(ex.values()), names, ["features"], dynamic_shapes(names))
        if any(n.domain == mpt_function.DOMAIN for n in onnx_model.graph.node):
            mpt_function.attach(onnx_model)
        rename_axes(onnx_model)
        save_model(onnx_model, path)
        print(f"exported {variant} in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return paths


def variant_feeds(variant: str, layout: dict, batch: int, seq: int, virtual: int, rng, layout0: dict) -> dict:
    """Feeds of one variant for a batch of one prompt-tuning task (T = virtual tokens, no padding); layout0: the
    layout built with min_slots=0."""
    if variant == "full":
        return layout
    if variant == "full-zero":
        return layout0
    if variant in ("plain", "plain-dynamo"):
        ids = np.concatenate([layout["input_ids"][:, :virtual], layout["input_ids"]], axis=1)  # S + T positions
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    order, mpt, prefix, positions, mask = SPEC[variant]
    if mpt:  # the min_slots=0 layout (zero MPT slots, prompt slots, tokens), without the (empty) prefix
        f = {k: v for k, v in layout0.items() if not k.startswith("prefix_")}
    else:  # [prompt | tokens]: exact for a batch of one prompt-tuning task
        length = virtual + seq
        f = {"input_ids": layout["input_ids"], "prompt_embeds": layout["prompt_embeds"][:, :virtual],
             "attention_mask": np.ones((batch, length), np.int64),
             "position_ids": np.tile(np.arange(length, dtype=np.int64), (batch, 1)),
             "token_type_ids": np.zeros((batch, length), np.int64)}
    return {k: v for k, v in f.items() if k in _names(variant)}


def _session(path: Path, threads: int, optimized: Path | None = None):
    """An ORT CPU session exactly as runtime/sessions.py OrtSession makes it (optionally writing the optimized
    graph)."""
    import onnxruntime as ort

    from promptmux.runtime.sessions import CPU_DISABLED_OPTIMIZERS

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    optimized.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=CPU_DISABLED_OPTIMIZERS)


def op_summary(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    ops = collections.Counter(f"{n.domain + '::' if n.domain not in ('', 'ai.onnx') else ''}{n.op_type}"
                              for n in m.graph.node)
    attention = []
    for n in m.graph.node:
        if "Attention" in n.op_type:
            attention.append({"op": f"{n.domain}::{n.op_type}", "inputs": list(n.input),
                              "attrs": {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute
                                        if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT)}})
            break
    return {"nodes": len(m.graph.node), "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "first_attention": attention[0] if attention else None}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.graph_overhead", description=__doc__.split("\n")[0])
    p.add_argument("deploy", nargs="?", help="a MiniLM-style encoder deployment (default: the demo, exported into "
                                             "--work)")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--task", default="sentiment")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--work", default="/tmp/promptmux-graph-overhead")
    p.add_argument("--out", help="JSON to write")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loadavg_start = Path("/proc/loadavg").read_text().split()[:3]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    deploy = Path(args.deploy) if args.deploy else work / "demo"
    if not (deploy / "manifest.json").is_file():
        from promptmux.demo import ADAPTERS, TASKS, base_model_dir
        from promptmux.export.deploy import export_deployment

        export_deployment(base_model_dir(), {t: ADAPTERS / t for t in TASKS}, deploy, overwrite=True, quiet=True)
    variants = args.variants.split(",")
    paths = export_variants(deploy, work)

    from promptmux import Runtime
    from promptmux.core.archs import position_offset
    from promptmux.core.layout import build_layout

    rt = Runtime(deploy, backend="onnxruntime", use_folded=False, threads=args.threads)
    view = rt.bank.view(args.task)
    virtual = view.num_virtual_tokens
    sessions, graphs = {}, {}
    for v in variants:
        if v in ("runtime", "full-zero"):
            continue
        opt = work / f"optimized-{v}.onnx"
        _session(paths[v], args.threads, opt)  # writes ORT's optimized graph
        graphs[v] = op_summary(opt)
        sessions[v] = _session(paths[v], args.threads)
    if "full-zero" in variants:  # the deployment's graph, other feeds
        sessions["full-zero"] = sessions.get("full") or _session(paths["full"], args.threads)

    rng = np.random.default_rng(0)
    results = {"command": "python -m studies.graph_overhead " + shlex.join(argv if argv is not None
                                                                                    else sys.argv[1:]),
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_start": loadavg_start, "threads": args.threads,
               "seq_len": args.seq_len, "task": args.task, "virtual_tokens": virtual, "graphs": graphs, "rows": []}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        ids = rng.integers(1000, 20000, size=(batch, args.seq_len)).astype(np.int64)
        mask = np.ones_like(ids)
        layout = build_layout(rt.spec, position_offset(rt.config), rt.config.pad_token_id, ids, mask, None,
                              [view] * batch, rt.dims).feeds
        layout0 = build_layout(rt.spec, position_offset(rt.config), rt.config.pad_token_id, ids, mask, None,
                               [view] * batch, rt.dims, min_slots=0).feeds
        calls = {}
        for v in variants:
            if v == "runtime":
                calls[v] = lambda: rt.forward(ids, mask, [args.task] * batch)
                continue
            s = sessions[v]
            f = variant_feeds(v, layout, batch, args.seq_len, virtual, rng, layout0)
            f = {i.name: f[i.name] for i in s.get_inputs()}
            calls[v] = (lambda s, f: lambda: s.run(None, f))(s, f)
        # Fidelity: the exact variants give the deployment's features for this batch.
        ref = sessions["full"].run(None, layout)[0] if "full" in variants else None
        check = {}
        for v in ("full-zero", "noprefix", "noorder", "nompt", "nompt-pos", "nompt-nomask"):
            if v in sessions and ref is not None:
                check[v] = float(np.abs(calls[v]()[0] - ref).max())
        reps = max(2, 24 // batch)
        per_round = {v: [] for v in variants}
        cpu_round = {v: [] for v in variants}  # process CPU time: less sensitive to other processes' load
        for c in calls.values():  # warm-up
            c(), c()
        for r in range(args.rounds):
            order = list(variants)
            random.Random(r).shuffle(order)
            for v in order:
                time.sleep(0.05)  # let the previous session's worker threads stop spinning
                calls[v]()
                times, cpu = [], []
                for _ in range(reps):
                    t, c = time.perf_counter(), time.process_time()
                    calls[v]()
                    times.append(time.perf_counter() - t)
                    cpu.append(time.process_time() - c)
                per_round[v].append(float(np.median(times)))
                cpu_round[v].append(float(np.median(cpu)))
        base = per_round.get("plain")
        for v in variants:
            ms = 1e3 * float(np.median(per_round[v]))
            row = {"batch_size": batch, "variant": v, "ms": ms, "rounds_ms": [1e3 * x for x in per_round[v]]}
            row["cpu_ms"] = 1e3 * float(np.median(cpu_round[v]))
            if base:
                row["vs_plain"] = float(np.median([a / b for a, b in zip(per_round[v], base)]))
                row["cpu_vs_plain"] = float(np.median([a / b for a, b in zip(cpu_round[v], cpu_round["plain"])]))
            if v in check:
                row["max_abs_diff_vs_full"] = check[v]
            results["rows"].append(row)
            print(f"B={batch:>3} {v:<13} {ms:8.2f} ms  x{row.get('vs_plain', float('nan')):.3f} of plain; cpu {row['cpu_ms']:8.2f} ms x{row.get('cpu_vs_plain', float('nan')):.3f}"
                  + (f"  (max|diff| vs full {check[v]:.1e})" if v in check else ""), flush=True)
    results["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
