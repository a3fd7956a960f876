"""The CPU backend x precision table: `promptmux bench` results read against the machine's limits.

    python -m studies.precision_report results/cpu-{minilm-s64,minilm-s256,gpt2-small,smollm2-b1,smollm2-b8,smollm2-bf16-b1}.json \\
        --limits results/machine-limits.json --notes results/cpu-precision-notes.md \\
        --out results/cpu-precision.md

Each promptmux row gets its ratio to PEFT fp32 and to PEFT under bf16 autocast (same run, same requests, each
system in its own process), its agreement with PEFT fp32 on the first batch, and the fraction of the limit that
bounds it: a full-sequence forward is matrix work (model FLOPs / s against the fp32 or bf16 GEMM rate), a
decoding step reads every weight once (weight bytes / s against the copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from studies.machine_limits import load as load_limits


def _config(path: str) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def _dims(cfg: dict) -> tuple[int, int, int, int]:
    """layers, hidden, intermediate, vocab (BERT, GPT-2 and Llama configs)."""
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    hidden = cfg.get("hidden_size") or cfg.get("n_embd")
    inner = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden
    return layers, hidden, inner, cfg["vocab_size"]


def forward_flops(cfg: dict, positions: int, logits_positions: int) -> float:
    """FLOPs of one row's forward over `positions` (projections, MLP, attention) plus an LM head on
    `logits_positions` of them (0 for a classifier). Gated MLPs (Llama) count three matrices."""
    layers, d, f, vocab = _dims(cfg)
    mlp = 3 if cfg.get("model_type") == "llama" else 2
    per_layer = 2 * positions * (4 * d * d + mlp * d * f) + 4 * positions * positions * d
    return layers * per_layer + 2 * logits_positions * d * vocab


def weight_bytes(cfg: dict, int8: bool) -> float:
    """Bytes a decoding step reads: every matrix once (int8: 1 byte plus an fp32 scale per 32), LM head included."""
    layers, d, f, vocab = _dims(cfg)
    mlp = 3 if cfg.get("model_type") == "llama" else 2
    kv = d * (cfg.get("num_key_value_heads") or cfg.get("num_attention_heads") or cfg.get("n_head")) \
        // (cfg.get("num_attention_heads") or cfg.get("n_head"))
    params = layers * (2 * d * d + 2 * d * kv + mlp * d * f) + vocab * d
    return params * ((1 + 4 / 32) if int8 else 4)


def rows(result: dict, limits: dict) -> list[dict]:
    tp = result["throughput"]
    cfg = _config(result["deployment"]["path"])
    virtual = max(t["virtual_tokens"] for t in result["deployment"]["tasks"])
    comps = {(c["backend"], c["batch_size"], c["seq_len"], c["mix"]): c for c in tp["comparisons"]}
    agree = {(a["backend"], a["batch_size"], a["seq_len"], a["mix"]): a for a in tp["agreement"]}
    out = []
    for r in tp["rows"]:
        key = (r["backend"], r["batch_size"], r["seq_len"], r["mix"])
        c, a = comps.get(key, {}), agree.get(key)
        precision = r.get("precision", "fp32")
        if r["new_tokens"]:
            steps = r["tokens_per_s"] / r["batch_size"]
            used = steps * weight_bytes(cfg, precision == "int8")
            bound = (f"{used / 1e9:.1f} GB/s", used / (limits["copy_gb_per_s"] * 1e9), "memory")
        else:
            causal = result["deployment"]["family"] == "decoder"
            positions = r["seq_len"] + virtual
            flops = r["requests_per_s"] * forward_flops(cfg, positions, r["seq_len"] if causal else 0)
            bf16 = precision == "bf16" or r["backend"] == "peft-bf16"
            limit = limits["bf16_gemm_gflops" if bf16 else "fp32_gemm_gflops"] * 1e9
            bound = (f"{flops / 1e9:.0f} GFLOP/s", flops / limit, "bf16 GEMM" if bf16 else "fp32 GEMM")
        out.append({"system": r["backend"] if r["system"] == "promptmux" else r["system"], "promptmux":
                    r["system"] == "promptmux", "B": r["batch_size"], "S": r["seq_len"], "new": r["new_tokens"],
                    "rps": r["requests_per_s"], "tps": r["tokens_per_s"], "p50": r["latency_ms"]["p50"],
                    "vs_peft": c.get("speedup"), "vs_peft_bf16": c.get("speedup_vs_peft_bf16"),
                    "agree": a, "rate": bound[0], "fraction": bound[1], "limit": bound[2]})
    return out


def _x(v) -> str:
    return f"**{v:.2f}x**" if v is not None else "—"


def _agreement(a: dict | None, new_tokens: int) -> str:
    if a is None:
        return "—"
    if new_tokens:
        return f"{a['rows'] - a['rows_differing']}/{a['rows']} rows' tokens identical"
    return f"{a['rows'] - a['rows_differing']}/{a['rows']} rows with every argmax equal, max diff {a['max_abs_diff']:.1e}"


def render(files: list[Path], limits_path: Path) -> str:
    limits = load_limits(limits_path)
    machine = json.loads(limits_path.read_text())
    lines = ["# CPU speed: backends and precisions", "",
             f"Machine limits (`python -m studies.machine_limits`, {machine['threads']} threads): fp32 GEMM "
             f"{limits['fp32_gemm_gflops']:.0f} GFLOP/s, bf16 GEMM {limits['bf16_gemm_gflops']:.0f} GFLOP/s, copy "
             f"{limits['copy_gb_per_s']:.1f} GB/s; {machine['machine']['cpu_model']}.", ""]
    for f in files:
        result = json.loads(f.read_text())
        env = result["environment"]
        lines += [f"## {result['deployment']['model']} — `{f.name}`", "",
                  f"`{result['command']}`", "",
                  f"{result['date']}; {env['cpu_model']}, {env['threads']} threads; load average "
                  f"{env['load_average_start']} at start, {env.get('load_average_end')} at end; "
                  + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".", "",
                  "| system | B | S | new tokens | req/s | tok/s | p50 ms | vs PEFT fp32 | vs PEFT bf16 | "
                  "agreement with PEFT fp32 (first batch) | rate | of the limit |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows(result, limits):
            lines.append(f"| {r['system']} | {r['B']} | {r['S']} | {r['new']} | {r['rps']:.2f} | {r['tps']:.0f} | "
                         f"{r['p50']:.1f} | {_x(r['vs_peft'])} | {_x(r['vs_peft_bf16'])} | "
                         f"{_agreement(r['agree'], r['new']) if r['promptmux'] else '—'} | {r['rate']} | "
                         f"{100 * r['fraction']:.0f}% of {r['limit']} |")
        contracts = result["throughput"].get("precision_contracts") or {}
        for name, c in contracts.items():
            if c:
                per = "; ".join(f"{t}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if k != "rows")
                                for t, m in c["tasks"].items())
                lines.append(f"\nContract of {name} (on {c['calibration']['source']}): {per}; "
                             f"{'passed' if c['passed'] else 'MISSED'}.")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m studies.precision_report", description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--limits", type=Path, default=Path("results/machine-limits.json"))
    p.add_argument("--notes", type=Path, help="a Markdown file appended after the tables (the findings)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    text = render(args.files, args.limits)
    if args.notes:
        text += "\n" + args.notes.read_text()
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
