"""MPT prompt composition on CUDA: the fused Triton kernel vs the unfused PyTorch reference.

    python -m studies.kernels_mpt [--batch-sizes 1,8,32] [--dims 768,4096] [--ranks 1,4]
        [--T 100] [--S 128] [--dtype float16] [--reps 30] [--inner 10] [--json PATH]

For every shape it checks the kernel against `mpt_prompt_concat_reference`, then times, with CUDA
events after a warm-up, the median over --reps of --inner back-to-back calls of:

* reference:        mpt_prompt_concat_reference(task_ids, shared_ids, shared, cols, rows, embeds)
* triton:           mpt_prompt_concat_triton(...) with the same arguments (output allocated per call)
* triton out=:      the same writing into a preallocated output (what a TensorRT plugin does)
* ref + embedding:  F.embedding(input_ids, weight) then the reference
* triton gather:    mpt_prompt_concat_triton(..., input_ids=, weight=) (the embedding lookup fused)

GB/s is the minimum traffic of the op (the bytes it must move) over the time: the output written,
the token embeddings read (or their rows of the table), and each distinct task's factors and
shared prompt read once. Small shapes are launch-bound (a few microseconds whatever the bytes) and
fit in the H100's 50 MB L2, so their GB/s says little; the large ones approach HBM bandwidth.

The batch's task ids cycle over K=8 tasks that share A=2 shared prompts, like a mixed-task batch.
Needs a CUDA GPU and triton; without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

K_TASKS = 8
A_SHARED = 2
VOCAB = 32000


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def make_inputs(B, T, S, d, r, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    task_ids = torch.arange(B) % K_TASKS
    shared_ids = torch.arange(K_TASKS) % A_SHARED
    x = dict(
        task_ids=task_ids,
        shared_ids=shared_ids,
        # Scaled so the fp16 product stays well inside fp16's range.
        shared=torch.randn(A_SHARED, T, d, generator=g),
        cols=torch.randn(K_TASKS, T, r, generator=g) / r**0.5,
        rows=torch.randn(K_TASKS, r, d, generator=g),
        embeds=torch.randn(B, S, d, generator=g),
        input_ids=torch.randint(0, VOCAB, (B, S), generator=g),
        weight=torch.randn(VOCAB, d, generator=g),
    )
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in x.items()}


def min_bytes(x, gather: bool) -> int:
    """The traffic the op cannot avoid: write the output, read the tail, read each used factor once."""
    B, S, d = x["embeds"].shape
    T = x["shared"].shape[1]
    esize = x["embeds"].element_size()
    tasks = x["task_ids"].unique()
    n_tasks, n_shared = len(tasks), len(x["shared_ids"][tasks].unique())
    r = x["cols"].shape[2]
    factors = (n_tasks * (T * r + r * d) + n_shared * T * d) * x["shared"].element_size()
    tail = B * S * d * esize + (B * S * x["input_ids"].element_size() if gather else 0)
    return B * (T + S) * d * esize + tail + factors + B * x["task_ids"].element_size()


def time_ms(fn, reps: int, inner: int, warmup: int = 10) -> float:
    """Median milliseconds per call over `reps` samples of `inner` back-to-back calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32])
    ap.add_argument("--dims", type=_ints, default=[768, 4096])
    ap.add_argument("--ranks", type=_ints, default=[1, 4])
    ap.add_argument("--T", type=int, default=100, help="virtual tokens")
    ap.add_argument("--S", type=int, default=128, help="prompt tokens")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("kernels_mpt: this benchmark needs a CUDA GPU (none found); nothing to do.")
        return 0
    from promptmux.kernels.mpt_reference import mpt_prompt_concat_reference
    from promptmux.kernels.mpt_triton import HAS_TRITON, mpt_prompt_concat_triton

    if not HAS_TRITON:
        print("kernels_mpt: triton is not installed (pip install triton); cannot benchmark the kernel.")
        return 1

    import triton

    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{args.dtype}, T={args.T}, S={args.S}, K={K_TASKS} tasks over A={A_SHARED} shared prompts")
    print(f"# median of {args.reps} x {args.inner} calls; GB/s = minimum bytes moved / time")
    header = f"{'B':>3} {'d':>5} {'r':>2} | {'variant':<16} {'us':>9} {'GB/s':>8} {'MB moved':>9} {'speedup':>8}"
    print(header)
    print("-" * len(header))

    results = []
    for B in args.batch_sizes:
        for d in args.dims:
            for r in args.ranks:
                x = make_inputs(B, args.T, args.S, d, r, dtype, device)
                ti, si, sh, co, ro = x["task_ids"], x["shared_ids"], x["shared"], x["cols"], x["rows"]
                emb, ids, w = x["embeds"], x["input_ids"], x["weight"]
                out = torch.empty(B, args.T + args.S, d, dtype=dtype, device=device)

                # A benchmark of a wrong answer is meaningless: check both variants first.
                ref = mpt_prompt_concat_reference(ti, si, sh.float(), co.float(), ro.float(), emb.float()).to(dtype)
                tol = 1e-5 if dtype == torch.float32 else 1e-2
                torch.testing.assert_close(mpt_prompt_concat_triton(ti, si, sh, co, ro, emb), ref, rtol=tol, atol=tol)
                ref_g = torch.cat([ref[:, : args.T], w[ids]], dim=1)
                got_g = mpt_prompt_concat_triton(ti, si, sh, co, ro, input_ids=ids, weight=w)
                torch.testing.assert_close(got_g, ref_g, rtol=tol, atol=tol)

                variants = {
                    "reference": (lambda: mpt_prompt_concat_reference(ti, si, sh, co, ro, emb), False),
                    "triton": (lambda: mpt_prompt_concat_triton(ti, si, sh, co, ro, emb), False),
                    "triton out=": (lambda: mpt_prompt_concat_triton(ti, si, sh, co, ro, emb, out=out), False),
                    "ref + embedding": (
                        lambda: mpt_prompt_concat_reference(ti, si, sh, co, ro, torch.nn.functional.embedding(ids, w)),
                        True,
                    ),
                    "triton gather": (
                        lambda: mpt_prompt_concat_triton(ti, si, sh, co, ro, input_ids=ids, weight=w, out=out),
                        True,
                    ),
                }
                base = {}
                for name, (fn, gather) in variants.items():
                    ms = time_ms(fn, args.reps, args.inner)
                    nbytes = min_bytes(x, gather)
                    gbs = nbytes / (ms * 1e-3) / 1e9
                    # Speedup over the unfused version of the same variant (with or without the lookup).
                    ref_ms = base.setdefault(gather, ms)
                    row = dict(B=B, d=d, r=r, T=args.T, S=args.S, dtype=args.dtype, variant=name,
                               us=ms * 1e3, gb_per_s=gbs, bytes=nbytes, speedup=ref_ms / ms)
                    results.append(row)
                    print(f"{B:>3} {d:>5} {r:>2} | {name:<16} {ms * 1e3:>9.1f} {gbs:>8.1f} {nbytes / 1e6:>9.2f} "
                          f"{ref_ms / ms:>7.2f}x")
                del x, out, ref, ref_g, got_g
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(device), torch=torch.__version__,
                           triton=triton.__version__, results=results), f, indent=1)
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
