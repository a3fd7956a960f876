"""Deployments to benchmark that need no download: the GPT-2-small shape with synthetic prompt-tuning adapters.

    python -m promptmux.bench.deployments gpt2-small --out DIR [--tasks 2] [--virtual-tokens 20] [--cache-dir D]

The base model (GPT-2 config: 12 layers, 768 hidden, 12 heads, vocab 50257; random weights, torch seed 0) and
the PEFT prompt-tuning adapters (random prompts at the scale of the embeddings) are the generation benchmark's
(bench/models.py), cached the same way; the adapters are written with PeftModel.save_pretrained so that
`promptmux bench --baseline peft` loads them back like any user adapter. The MiniLM demo deployment is
`promptmux demo --out DIR` (real weights, the two trained demo adapters).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .models import base_model, default_cache, log, make_adapter


def gpt2_small(out: str | Path, tasks: int = 2, virtual_tokens: int = 20, cache: str | Path | None = None,
               fresh: bool = False, quick: bool = False, overwrite: bool = True) -> Path:
    """Export the GPT-2-small shape with `tasks` prompt-tuning adapters (task0, task1, ...) into out."""
    from promptmux.export.deploy import export_deployment

    cache = Path(cache) if cache else default_cache()
    base, desc = base_model("gpt2-small", quick, cache, fresh, seed=0)
    adapters = {f"task{i}": make_adapter(base, virtual_tokens, 1 + 2 * i, cache, fresh)
                for i in range(tasks)}
    log(f"gpt2-small: exporting {', '.join(adapters)} to {out} ({desc})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_deployment(base, adapters, out, overwrite=overwrite, quiet=True)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m promptmux.bench.deployments", description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=["gpt2-small"])
    p.add_argument("--out", required=True, help="deployment folder to write (replaced if it exists)")
    p.add_argument("--tasks", type=int, default=2, help="number of synthetic prompt-tuning adapters")
    p.add_argument("--virtual-tokens", type=int, default=20)
    p.add_argument("--cache-dir", help="base model and adapters (default $PROMPTMUX_BENCH_CACHE or "
                                       "~/.cache/promptmux/bench)")
    p.add_argument("--fresh", action="store_true", help="rebuild the cached base model and adapters")
    p.add_argument("--quick", action="store_true", help="a tiny GPT-2 instead (smoke runs)")
    args = p.parse_args(argv)
    if args.tasks < 1 or args.virtual_tokens < 1:
        raise SystemExit("--tasks and --virtual-tokens must be positive")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = gpt2_small(args.out, args.tasks, args.virtual_tokens, args.cache_dir, args.fresh, args.quick)
    print(json.dumps({"deployment": str(out)}))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
