"""Multitask Prompt Tuning prompt composition as one fused Triton kernel, and a dispatcher.

For each batch row b with MPT task t_b (see mpt_reference.py for the math and the tables):

    prompt[b] = shared[shared_ids[t_b]] * (cols[t_b] @ rows[t_b])      # [T, d]
    out[b]    = concat(prompt[b], embeds[b])                          # [T + S, d]

The unfused PyTorch version launches a gather per table, a batched matmul, a multiply, a cast and a
concat, and writes each intermediate (three of them [B, T, d]) to memory and reads it back. The kernel here does all of it in
one pass: each program reads its row's factors straight from the tables (the gather is an index
into a pointer), accumulates the rank-r product in fp32 registers, multiplies by the shared prompt,
casts once, and stores into its slice of `out`; programs past the prompt rows copy the token
embeddings into the tail. Optionally it also does the token-embedding lookup: given `input_ids`
[B, S] and the embedding table `weight` [V, d] instead of `embeds`, the tail is weight[input_ids].

Public API:

* `mpt_prompt_concat_triton(...)`: the Triton kernel (CUDA tensors; CPU tensors only when the
  kernel runs in Triton's interpreter, i.e. TRITON_INTERPRET=1 was set before this module was
  imported).
* `mpt_prompt_concat_torch(...)`: the same computation in plain PyTorch (any device), the CPU path.
* `mpt_prompt_concat_fused(...)`: the dispatcher: Triton for CUDA tensors when triton is
  importable, otherwise the PyTorch path.

All three take `(task_ids, shared_ids, shared, cols, rows, embeds=None, *, input_ids=None,
weight=None, out=None)`; exactly one of `embeds` or (`input_ids`, `weight`) is given. `out`, if
given, is a preallocated [B, T + S, d] tensor to write into (a TensorRT plugin's enqueue hands one
in); it is returned. Index tensors may be int32 or int64. Float tensors may be fp32, fp16 or bf16;
the output dtype is the dtype of `embeds` (or `weight`), and the prompt factors may be of another
float dtype: they are read, multiplied in fp32 and cast once at the store.

Indices are not range-checked on the Triton path (that would need a device sync): an out-of-range
task id, shared id or token id reads out of bounds (PyTorch's own CUDA gathers stop on a device
assert instead). The PyTorch path raises IndexError as usual.
"""

from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path and the argument checks work without triton
    triton = None
    tl = None

__all__ = ["mpt_prompt_concat_triton", "mpt_prompt_concat_torch", "mpt_prompt_concat_fused", "HAS_TRITON"]

HAS_TRITON = triton is not None

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INDEX = (torch.int32, torch.int64)

# Tile of one program: BLOCK_ROWS rows of the output (prompt rows or tail rows, never both) by
# BLOCK_D columns of d. The op is memory-bound for any realistic rank, so the tile only needs to be
# wide enough along d for vectorised 16-byte loads and stores and few enough registers for the fp32
# accumulator (16 x 256 fp32 over 4 warps = 32 registers a thread).
BLOCK_ROWS = 16
MAX_BLOCK_D = 256
NUM_WARPS = 4
MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions y and z (the batch and the d tiles)


if HAS_TRITON:

    @triton.jit
    def _mpt_prompt_concat_kernel(
        out_ptr,  # [B, T + S, D], the output dtype
        task_ids_ptr,  # [B] int32/int64
        shared_ids_ptr,  # [K] int32/int64
        shared_ptr,  # [A, T, D]
        cols_ptr,  # [K, T, R]
        rows_ptr,  # [K, R, D]
        tail_ptr,  # embeds [B, S, D]; with GATHER the embedding table weight [V, D]
        input_ids_ptr,  # [B, S] int32/int64 with GATHER; any pointer (unused) otherwise
        T,
        S,
        D,
        stride_ob, stride_ot, stride_od,
        stride_task,
        stride_sid,
        stride_sa, stride_st, stride_sd,
        stride_ck, stride_ct, stride_cr,
        stride_rk, stride_rr, stride_rd,
        stride_eb, stride_es, stride_ed,  # embeds, or (0, V-stride, d-stride) of weight with GATHER
        stride_ib, stride_is,  # input_ids (GATHER only)
        R: tl.constexpr,  # the rank; compile-time (see the loop below)
        GATHER: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # Grid: (prompt row tiles + tail row tiles, B, d tiles). A program's rows are either all
        # prompt rows or all tail rows, so each program takes one branch below.
        pid_rows = tl.program_id(0)
        # int64 before any multiply by a stride: B * (T + S) * D may exceed 2**31 elements.
        b = tl.program_id(1).to(tl.int64)
        pid_d = tl.program_id(2)

        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        out_row = out_ptr + b * stride_ob
        n_prompt_tiles = tl.cdiv(T, BLOCK_ROWS)

        if pid_rows < n_prompt_tiles:
            # The prompt: gather this row's task and shared prompt (int64: the tables can be big).
            task = tl.load(task_ids_ptr + b * stride_task).to(tl.int64)
            sid = tl.load(shared_ids_ptr + task * stride_sid).to(tl.int64)
            offs_t = pid_rows * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            mask_t = offs_t < T
            mask = mask_t[:, None] & mask_d[None, :]

            # cols[task] @ rows[task] as a sum of R outer products, accumulated in fp32. R is small
            # (1 to a few tens) and the op is memory-bound, so a plain loop beats padding R up to
            # tl.dot's minimum of 16 (and keeps fp32 exact: tl.dot would use tf32 by default).
            # R is a constexpr: one compile per rank (a deployment pads its adapters to one rank),
            # the loop can be unrolled, and Triton 3.6's interpreter cannot loop over a runtime
            # int argument with numpy 2.4 (it wraps the int in a 1-element array).
            cols_base = cols_ptr + task * stride_ck + offs_t * stride_ct
            rows_base = rows_ptr + task * stride_rk + offs_d * stride_rd
            acc = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
            for k in range(R):
                c = tl.load(cols_base + k * stride_cr, mask=mask_t, other=0.0).to(tl.float32)
                r = tl.load(rows_base + k * stride_rr, mask=mask_d, other=0.0).to(tl.float32)
                acc += c[:, None] * r[None, :]

            s_ptrs = shared_ptr + sid * stride_sa + offs_t[:, None] * stride_st + offs_d[None, :] * stride_sd
            s = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
            prompt = (s * acc).to(out_ptr.dtype.element_ty)  # the one rounding, at the store
            tl.store(out_row + offs_t[:, None] * stride_ot + offs_d[None, :] * stride_od, prompt, mask=mask)
        else:
            # The tail: token embeddings, copied (or gathered from the table) unchanged.
            offs_s = (pid_rows - n_prompt_tiles) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            mask_s = offs_s < S
            mask = mask_s[:, None] & mask_d[None, :]
            if GATHER:
                tok = tl.load(input_ids_ptr + b * stride_ib + offs_s * stride_is, mask=mask_s, other=0)
                src = tail_ptr + tok.to(tl.int64)[:, None] * stride_es + offs_d[None, :] * stride_ed
            else:
                src = tail_ptr + b * stride_eb + offs_s[:, None] * stride_es + offs_d[None, :] * stride_ed
            x = tl.load(src, mask=mask)
            dst = out_row + (T + offs_s)[:, None] * stride_ot + offs_d[None, :] * stride_od
            tl.store(dst, x, mask=mask)

    # The interpreter is chosen when the kernel is decorated (TRITON_INTERPRET=1 at import time);
    # only then may the kernel be handed CPU tensors.
    _INTERPRETED = not isinstance(_mpt_prompt_concat_kernel, triton.runtime.jit.JITFunction)
else:
    _INTERPRETED = False


def _check_args(task_ids, shared_ids, shared, cols, rows, embeds, input_ids, weight, out, name):
    """Validate shapes, dtypes and devices; return (B, T, S, d, output dtype, device)."""

    def fail(msg):
        raise ValueError(f"{name}: {msg}")

    gather = input_ids is not None or weight is not None
    if embeds is not None and gather:
        fail("pass either embeds or (input_ids, weight), not both")
    if embeds is None and not gather:
        fail("pass embeds [B, S, d], or input_ids [B, S] and weight [V, d]")
    if gather and (input_ids is None or weight is None):
        fail("the embedding-gather variant needs both input_ids [B, S] and weight [V, d]")

    named = dict(task_ids=task_ids, shared_ids=shared_ids, shared=shared, cols=cols, rows=rows)
    named.update(dict(input_ids=input_ids, weight=weight) if gather else dict(embeds=embeds))
    if out is not None:
        named["out"] = out
    for key, t in named.items():
        if not isinstance(t, torch.Tensor):
            fail(f"{key} must be a torch.Tensor, got {type(t).__name__}")

    ndims = dict(task_ids=1, shared_ids=1, shared=3, cols=3, rows=3, embeds=3, input_ids=2, weight=2, out=3)
    layouts = dict(task_ids="[B]", shared_ids="[K]", shared="[A, T, d]", cols="[K, T, r]", rows="[K, r, d]",
                   embeds="[B, S, d]", input_ids="[B, S]", weight="[V, d]", out="[B, T + S, d]")
    for key, t in named.items():
        if t.dim() != ndims[key]:
            fail(f"{key} must be {ndims[key]}-D {layouts[key]}, got shape {tuple(t.shape)}")

    for key in ("task_ids", "shared_ids") + (("input_ids",) if gather else ()):
        if named[key].dtype not in _INDEX:
            fail(f"{key} must be int32 or int64, got {named[key].dtype}")
    for key in ("shared", "cols", "rows") + (("weight",) if gather else ("embeds",)):
        if named[key].dtype not in _FLOATS:
            fail(f"{key} must be float32, float16 or bfloat16, got {named[key].dtype}")

    devices = {key: t.device for key, t in named.items()}
    if len(set(devices.values())) > 1:
        fail("all tensors must be on one device, got " + ", ".join(f"{k}={d}" for k, d in devices.items()))

    K, T, r = cols.shape
    A, d = shared.shape[0], shared.shape[2]
    B = task_ids.shape[0]
    tail = input_ids if gather else embeds
    S = tail.shape[1]
    if shared_ids.shape[0] != K:
        fail(f"shared_ids has {shared_ids.shape[0]} entries but cols has K={K} tasks (cols {tuple(cols.shape)})")
    if rows.shape[0] != K or rows.shape[1] != r:
        fail(f"rows {tuple(rows.shape)} does not match cols {tuple(cols.shape)}: need rows [K={K}, r={r}, d]")
    if shared.shape[1] != T:
        fail(f"shared {tuple(shared.shape)} has T={shared.shape[1]} virtual tokens, cols {tuple(cols.shape)} has T={T}")
    if rows.shape[2] != d:
        fail(f"rows {tuple(rows.shape)} has d={rows.shape[2]}, shared {tuple(shared.shape)} has d={d}")
    if A == 0 and B > 0 and T > 0:
        fail("shared is empty (A=0) but the batch needs a shared prompt")
    if tail.shape[0] != B:
        key = "input_ids" if gather else "embeds"
        fail(f"{key} {tuple(tail.shape)} has batch {tail.shape[0]}, task_ids has B={B}")
    if gather:
        if weight.shape[1] != d:
            fail(f"weight {tuple(weight.shape)} has d={weight.shape[1]}, shared {tuple(shared.shape)} has d={d}")
    elif embeds.shape[2] != d:
        fail(f"embeds {tuple(embeds.shape)} has d={embeds.shape[2]}, shared {tuple(shared.shape)} has d={d}")

    dtype = weight.dtype if gather else embeds.dtype
    if out is not None:
        if tuple(out.shape) != (B, T + S, d):
            fail(f"out has shape {tuple(out.shape)}, expected [B, T + S, d] = {(B, T + S, d)}")
        if out.dtype != dtype:
            fail(f"out has dtype {out.dtype}, expected {dtype} (the dtype of {'weight' if gather else 'embeds'})")
    return B, T, S, d, dtype, task_ids.device


def mpt_prompt_concat_triton(
    task_ids: torch.Tensor,
    shared_ids: torch.Tensor,
    shared: torch.Tensor,
    cols: torch.Tensor,
    rows: torch.Tensor,
    embeds: torch.Tensor | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused Triton kernel; returns `out` ([B, T + S, d], allocated if not given).

    Runs on the current CUDA stream of the tensors' device; it allocates nothing when `out` is
    given, so it can run inside a TensorRT plugin's enqueue or a CUDA graph capture.
    """
    name = "mpt_prompt_concat_triton"
    if not HAS_TRITON:
        raise ImportError(f"{name}: triton is not installed (pip install triton); use mpt_prompt_concat_fused")
    B, T, S, d, dtype, device = _check_args(
        task_ids, shared_ids, shared, cols, rows, embeds, input_ids, weight, out, name
    )
    if device.type != "cuda" and not _INTERPRETED:
        raise ValueError(
            f"{name}: needs CUDA tensors, got {device}; use mpt_prompt_concat_fused for the CPU path "
            "(or set TRITON_INTERPRET=1 before importing this module to run the kernel in Triton's interpreter)"
        )
    if B > MAX_GRID_YZ:
        raise ValueError(f"{name}: batch size {B} exceeds the CUDA grid limit {MAX_GRID_YZ}; split the batch")
    if out is None:
        out = torch.empty((B, T + S, d), dtype=dtype, device=device)
    if out.numel() == 0:
        return out

    gather = embeds is None
    if gather:
        tail = weight
        tail_strides = (0, weight.stride(0), weight.stride(1))
        ids, ids_strides = input_ids, input_ids.stride()
    else:
        tail = embeds
        tail_strides = embeds.stride()
        ids, ids_strides = task_ids, (0, 0)  # placeholder pointer, never read

    block_d = min(triton.next_power_of_2(d), MAX_BLOCK_D)
    grid = (triton.cdiv(T, BLOCK_ROWS) + triton.cdiv(S, BLOCK_ROWS), B, triton.cdiv(d, block_d))
    # Triton launches on the current device: make it the tensors' device (cuda:1, ...).
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _mpt_prompt_concat_kernel[grid](
            out, task_ids, shared_ids, shared, cols, rows, tail, ids,
            T, S, d,
            *out.stride(),
            task_ids.stride(0),
            shared_ids.stride(0),
            *shared.stride(),
            *cols.stride(),
            *rows.stride(),
            *tail_strides,
            *ids_strides,
            R=cols.shape[2],
            GATHER=gather,
            BLOCK_ROWS=BLOCK_ROWS,
            BLOCK_D=block_d,
            num_warps=NUM_WARPS,
        )
    return out


def mpt_prompt_concat_torch(
    task_ids: torch.Tensor,
    shared_ids: torch.Tensor,
    shared: torch.Tensor,
    cols: torch.Tensor,
    rows: torch.Tensor,
    embeds: torch.Tensor | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same computation in plain PyTorch, on any device: the path for machines without a GPU.

    This is mpt_prompt_concat_reference with the kernel's numerics (factors read as fp32, one cast
    at the end; the reference multiplies in the factors' own dtype, and fails on mixed dtypes) plus
    the embedding-gather variant.
    """
    B, T, S, d, dtype, device = _check_args(
        task_ids, shared_ids, shared, cols, rows, embeds, input_ids, weight, out, "mpt_prompt_concat_torch"
    )
    if out is None:
        out = torch.empty((B, T + S, d), dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    task_ids = task_ids.long()
    low_rank = torch.matmul(cols[task_ids].float(), rows[task_ids].float())  # [B, T, d]
    prompt = shared[shared_ids.long()[task_ids]].float() * low_rank
    out[:, :T].copy_(prompt)  # copy_ casts to out's dtype
    if embeds is None:
        out[:, T:].copy_(torch.nn.functional.embedding(input_ids.long(), weight))
    else:
        out[:, T:].copy_(embeds)
    return out


def mpt_prompt_concat_fused(
    task_ids: torch.Tensor,
    shared_ids: torch.Tensor,
    shared: torch.Tensor,
    cols: torch.Tensor,
    rows: torch.Tensor,
    embeds: torch.Tensor | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton kernel for CUDA tensors when triton is importable, else the PyTorch path."""
    on_cuda = isinstance(task_ids, torch.Tensor) and task_ids.device.type == "cuda"
    fn = mpt_prompt_concat_triton if HAS_TRITON and on_cuda else mpt_prompt_concat_torch
    return fn(task_ids, shared_ids, shared, cols, rows, embeds, input_ids=input_ids, weight=weight, out=out)
