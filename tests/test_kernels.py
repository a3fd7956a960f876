"""The fused MPT prompt kernel (kernels/mpt_triton.py) against mpt_prompt_concat_reference.

How the Triton tests run: on a machine without a GPU the kernel runs in Triton's interpreter, which
Triton picks when the kernel is *decorated* (TRITON_INTERPRET=1 must be set when
promptmux.kernels.mpt_triton is first imported). In one `pytest tests` process that cannot be
arranged reliably: any test that imports promptmux.kernels (the exporter does) imports it first,
and torch.export imports triton itself once it is installed. So:

* `test_triton_*` run in this process when the kernel can run here: on CUDA (compiled), or when
  this process was started with TRITON_INTERPRET=1. Otherwise they are skipped here and
* `test_kernel_in_triton_interpreter` runs them in a child `pytest -k test_triton_` with
  TRITON_INTERPRET=1 set from the start, and fails with the child's report if any fails.

The CPU path (`mpt_prompt_concat_fused` on CPU tensors) and the argument checks need no triton.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from promptmux.kernels import mpt_triton as mt
from promptmux.kernels.mpt_reference import mpt_prompt_concat_reference

if mt._INTERPRETED:
    KERNEL_DEVICE = "cpu"
elif mt.HAS_TRITON and torch.cuda.is_available():
    KERNEL_DEVICE = "cuda"
else:
    KERNEL_DEVICE = None

needs_kernel = pytest.mark.skipif(
    KERNEL_DEVICE is None,
    reason="triton is not installed" if not mt.HAS_TRITON
    else "no CUDA here: run in Triton's interpreter by test_kernel_in_triton_interpreter (a subprocess)",
)


@dataclass(frozen=True)
class Case:
    B: int = 5
    T: int = 5
    S: int = 7
    d: int = 40  # not a power of two: the last d tile is masked
    r: int = 3
    dtype: torch.dtype = torch.float32  # embeds / weight / output
    factor_dtype: torch.dtype | None = None  # shared, cols, rows; None: same as dtype
    index_dtype: torch.dtype = torch.int64
    strided: bool = False  # non-contiguous views for every input

    def __str__(self):
        f = "" if self.factor_dtype is None else f"-fac{str(self.factor_dtype)[6:]}"
        return (f"B{self.B}-T{self.T}-S{self.S}-d{self.d}-r{self.r}-{str(self.dtype)[6:]}{f}"
                f"-{str(self.index_dtype)[6:]}{'-strided' if self.strided else ''}")


# K=4 tasks over A=2 shared prompts (tasks 0, 2, 3 share prompt 1); task ids repeat in the batch.
SHARED_IDS = [1, 0, 1, 1]
TASK_IDS = [2, 0, 2, 3, 1, 2, 0, 3]
VOCAB = 50

CASES = [
    Case(r=1),
    Case(r=3, T=1, S=1, d=1),
    Case(r=3, T=20, S=17, d=300),  # several row tiles (16 rows) and d tiles (256 columns)
    Case(r=16, B=3, d=48),
    Case(r=3, index_dtype=torch.int32),
    Case(r=3, strided=True),
    Case(r=1, dtype=torch.float16),
    Case(r=3, dtype=torch.float16, T=18, d=260),
    Case(r=16, dtype=torch.float16, B=2),
    Case(r=1, dtype=torch.bfloat16),
    Case(r=3, dtype=torch.bfloat16, index_dtype=torch.int32, strided=True),
    Case(r=16, dtype=torch.bfloat16, B=2, d=72),
    Case(r=3, dtype=torch.float16, factor_dtype=torch.float32),  # factors cast in the kernel
    Case(r=3, dtype=torch.bfloat16, factor_dtype=torch.float16),
    Case(r=3, dtype=torch.float32, factor_dtype=torch.bfloat16),
    Case(T=0),  # no prompt rows
    Case(S=0),  # no token rows
    Case(B=0),
]
IDS = [str(c) for c in CASES]


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view: every other element of a twice-as-wide buffer."""
    buf = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    buf[..., ::2] = x
    return buf[..., ::2]


def make_inputs(case: Case, device, gather: bool = False, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    K, A = len(SHARED_IDS), 2
    fdt = case.factor_dtype or case.dtype
    x = dict(
        task_ids=torch.tensor([TASK_IDS[i % len(TASK_IDS)] for i in range(case.B)], dtype=case.index_dtype),
        shared_ids=torch.tensor(SHARED_IDS, dtype=case.index_dtype),
        shared=torch.randn(A, case.T, case.d, generator=g).to(fdt),
        cols=torch.randn(K, case.T, case.r, generator=g).to(fdt),
        rows=torch.randn(K, case.r, case.d, generator=g).to(fdt),
    )
    if gather:
        x["input_ids"] = torch.randint(0, VOCAB, (case.B, case.S), generator=g, dtype=case.index_dtype)
        x["weight"] = torch.randn(VOCAB, case.d, generator=g).to(case.dtype)
    else:
        x["embeds"] = torch.randn(case.B, case.S, case.d, generator=g).to(case.dtype)
    x = {k: v.to(device) for k, v in x.items()}
    if case.strided:
        x = {k: _strided(v) for k, v in x.items()}
    return x


def expected(x: dict, dtype: torch.dtype) -> torch.Tensor:
    """The reference computed in fp32 (factors and embeddings upcast), then cast to the output dtype."""
    embeds = x["embeds"] if "embeds" in x else x["weight"][x["input_ids"].long()]
    ref = mpt_prompt_concat_reference(
        x["task_ids"].long().cpu(), x["shared_ids"].long().cpu(),
        x["shared"].float().cpu(), x["cols"].float().cpu(), x["rows"].float().cpu(), embeds.float().cpu(),
    )
    return ref.to(dtype)


def call(fn, x: dict, out=None) -> torch.Tensor:
    args = [x["task_ids"], x["shared_ids"], x["shared"], x["cols"], x["rows"]]
    if "embeds" in x:
        return fn(*args, x["embeds"], out=out)
    return fn(*args, input_ids=x["input_ids"], weight=x["weight"], out=out)


def check(got: torch.Tensor, x: dict, case: Case):
    want = expected(x, case.dtype)
    assert got.shape == (case.B, case.T + case.S, case.d)
    assert got.dtype == case.dtype
    got = got.cpu()
    # The token rows are copied: bit-exact in every dtype.
    tail = x["embeds"] if "embeds" in x else x["weight"][x["input_ids"].long()]
    assert torch.equal(got[:, case.T:], tail.cpu()), "token embeddings not copied exactly"
    # The prompt rows: fp32 accumulation in another order than the reference's matmul; in fp16 and
    # bf16, one rounding of nearly the same fp32 value (Triton's interpreter truncates fp32 -> bf16
    # where CUDA rounds to nearest even: up to one bf16 ulp, 2**-7 relative, either way).
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[case.dtype]
    torch.testing.assert_close(got[:, :case.T].float(), want[:, :case.T].float(), rtol=tol, atol=tol)


# --- the Triton kernel (in this process on CUDA or under TRITON_INTERPRET=1, else in a child) ---


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_matches_reference(case):
    x = make_inputs(case, KERNEL_DEVICE)
    check(mt.mpt_prompt_concat_triton(**x), x, case)


@needs_kernel
@pytest.mark.parametrize(
    "case",
    [Case(r=3), Case(r=1, dtype=torch.float16, T=18, d=260), Case(r=16, dtype=torch.bfloat16, B=3),
     Case(r=3, index_dtype=torch.int32, strided=True), Case(S=0), Case(T=0)],
    ids=str,
)
def test_triton_embedding_gather(case):
    x = make_inputs(case, KERNEL_DEVICE, gather=True)
    check(mt.mpt_prompt_concat_triton(**x), x, case)


@needs_kernel
@pytest.mark.parametrize("gather", [False, True], ids=["embeds", "gather"])
@pytest.mark.parametrize("layout", ["contiguous", "view"])
def test_triton_out_argument(gather, layout):
    case = Case(r=3, dtype=torch.float16, T=6, S=9, d=40)
    x = make_inputs(case, KERNEL_DEVICE, gather=gather)
    shape = (case.B, case.T + case.S, case.d)
    if layout == "contiguous":
        out = torch.full(shape, float("nan"), dtype=case.dtype, device=KERNEL_DEVICE)
    else:  # a window into a bigger buffer: non-contiguous rows, the rest of the buffer untouched
        buf = torch.full((case.B, case.T + case.S + 3, case.d + 8), -7.0, dtype=case.dtype, device=KERNEL_DEVICE)
        out = buf[:, 2:2 + case.T + case.S, 4:4 + case.d]
    got = call(mt.mpt_prompt_concat_triton, x, out=out)
    assert got is out
    check(out, x, case)
    if layout == "view":
        mask = torch.ones(buf.shape, dtype=torch.bool, device=buf.device)
        mask[:, 2:2 + case.T + case.S, 4:4 + case.d] = False
        assert bool((buf[mask] == -7.0).all()), "the kernel wrote outside out"


@needs_kernel
def test_dispatcher_uses_kernel_on_cuda(monkeypatch):
    if KERNEL_DEVICE != "cuda":
        pytest.skip("the dispatcher takes the Triton path for CUDA tensors only")

    def no_torch_path(*a, **k):
        raise AssertionError("the dispatcher took the PyTorch path for CUDA tensors")

    monkeypatch.setattr(mt, "mpt_prompt_concat_torch", no_torch_path)
    case = Case(r=3, dtype=torch.float16)
    x = make_inputs(case, "cuda")
    check(mt.mpt_prompt_concat_fused(**x), x, case)


def test_kernel_in_triton_interpreter():
    if not mt.HAS_TRITON:
        pytest.skip("triton is not installed (pip install triton)")
    if mt._INTERPRETED:
        pytest.skip("this process already runs the kernel in the interpreter: the test_triton_* tests ran here")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve()),
           "-k", "test_triton_"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"Triton kernel tests failed in the interpreter:\n{report}"
    assert re.search(r"\d+ passed", proc.stdout), report
    assert "skipped" not in proc.stdout.splitlines()[-1], f"kernel tests were skipped in the interpreter:\n{report}"


# --- the PyTorch path: the dispatcher on CPU tensors (no triton needed) ---


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cpu_dispatcher_matches_reference(case, monkeypatch):
    def no_triton(*a, **k):
        raise AssertionError("the dispatcher took the Triton path for CPU tensors")

    monkeypatch.setattr(mt, "mpt_prompt_concat_triton", no_triton)
    x = make_inputs(case, "cpu")
    check(mt.mpt_prompt_concat_fused(**x), x, case)


def test_cpu_path_equals_reference_exactly_in_fp32():
    x = make_inputs(Case(r=3, T=20, S=17, d=300), "cpu")
    got = mt.mpt_prompt_concat_fused(**x)
    assert torch.equal(got, mpt_prompt_concat_reference(**x))


@pytest.mark.parametrize("case", [Case(r=3), Case(r=1, dtype=torch.bfloat16, index_dtype=torch.int32, strided=True),
                                  Case(S=0)], ids=str)
def test_cpu_embedding_gather(case):
    x = make_inputs(case, "cpu", gather=True)
    check(mt.mpt_prompt_concat_fused(**x), x, case)


@pytest.mark.parametrize("gather", [False, True], ids=["embeds", "gather"])
def test_cpu_out_argument(gather):
    case = Case(r=3, dtype=torch.float16)
    x = make_inputs(case, "cpu", gather=gather)
    buf = torch.full((case.B, case.T + case.S + 3, case.d + 8), -7.0, dtype=case.dtype)
    out = buf[:, 2:2 + case.T + case.S, 4:4 + case.d]
    assert call(mt.mpt_prompt_concat_fused, x, out=out) is out
    check(out, x, case)
    assert float(buf[:, :2].abs().sum()) == 7.0 * buf[:, :2].numel()


# --- argument checks: every entry point raises the same ValueError ---


def _entry_points():
    fns = [mt.mpt_prompt_concat_fused, mt.mpt_prompt_concat_torch]
    return fns + ([mt.mpt_prompt_concat_triton] if mt.HAS_TRITON else [])


def _drop(key, **extra):
    def change(x):
        x.pop(key)
        return extra
    return change


def _set(**kw):
    def change(x):
        x.update({k: v(x) if callable(v) else v for k, v in kw.items()})
    return change


# (what is wrong, how to break the arguments of Case(r=3): B=5 T=5 S=7 d=40 r=3 K=4 A=2, message)
BAD = [
    ("both embeds and ids", _set(input_ids=torch.zeros(5, 7, dtype=torch.long), weight=torch.zeros(9, 40)),
     r"pass either embeds or \(input_ids, weight\), not both"),
    ("no tail", _drop("embeds"), r"pass embeds \[B, S, d\], or input_ids \[B, S\] and weight \[V, d\]"),
    ("ids without weight", _drop("embeds", input_ids=torch.zeros(5, 7, dtype=torch.long)),
     r"needs both input_ids \[B, S\] and weight \[V, d\]"),
    ("not a tensor", _set(rows=[1, 2]), r"rows must be a torch.Tensor, got list"),
    ("cols 2-D", _set(cols=lambda x: x["cols"][0]), r"cols must be 3-D \[K, T, r\], got shape \(5, 3\)"),
    ("float task ids", _set(task_ids=lambda x: x["task_ids"].float()),
     r"task_ids must be int32 or int64, got torch.float32"),
    ("int16 shared ids", _set(shared_ids=lambda x: x["shared_ids"].short()),
     r"shared_ids must be int32 or int64, got torch.int16"),
    ("float64 embeds", _set(embeds=lambda x: x["embeds"].double()),
     r"embeds must be float32, float16 or bfloat16, got torch.float64"),
    ("rank mismatch", _set(rows=lambda x: x["rows"][:, :2]),
     r"rows \(4, 2, 40\) does not match cols \(4, 5, 3\): need rows \[K=4, r=3, d\]"),
    ("shared_ids length", _set(shared_ids=lambda x: x["shared_ids"][:3]),
     r"shared_ids has 3 entries but cols has K=4 tasks"),
    ("T mismatch", _set(shared=lambda x: x["shared"][:, :4]),
     r"shared \(2, 4, 40\) has T=4 virtual tokens, cols \(4, 5, 3\) has T=5"),
    ("d mismatch", _set(embeds=lambda x: x["embeds"][..., :32]),
     r"embeds \(5, 7, 32\) has d=32, shared \(2, 5, 40\) has d=40"),
    ("batch mismatch", _set(embeds=lambda x: x["embeds"][:4]), r"embeds \(4, 7, 40\) has batch 4, task_ids has B=5"),
    ("out shape", _set(out=torch.empty(5, 11, 40)),
     r"out has shape \(5, 11, 40\), expected \[B, T \+ S, d\] = \(5, 12, 40\)"),
    ("out dtype", _set(out=torch.empty(5, 12, 40, dtype=torch.float16)),
     r"out has dtype torch.float16, expected torch.float32 \(the dtype of embeds\)"),
]


@pytest.mark.parametrize("change, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_validation_errors(change, message):
    for fn in _entry_points():
        x = make_inputs(Case(r=3), "cpu")
        x.update(change(x) or {})
        with pytest.raises(ValueError, match=message) as err:
            fn(**x)
        assert str(err.value).startswith("mpt_prompt_concat_"), str(err.value)


def test_validation_gather_weight_d():
    x = make_inputs(Case(r=3), "cpu", gather=True)
    x["weight"] = x["weight"][:, :30]
    for fn in _entry_points():
        with pytest.raises(ValueError, match=r"weight \(50, 30\) has d=30, shared \(2, 5, 40\) has d=40"):
            fn(**x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_validation_mixed_devices():
    x = make_inputs(Case(r=3), "cpu")
    x["embeds"] = x["embeds"].cuda()
    for fn in _entry_points():
        with pytest.raises(ValueError, match=r"all tensors must be on one device, got .*embeds=cuda:0"):
            fn(**x)


@pytest.mark.skipif(not mt.HAS_TRITON, reason="triton is not installed")
def test_cpu_tensors_rejected_by_triton_entry():
    if mt._INTERPRETED:
        pytest.skip("in the interpreter the kernel takes CPU tensors")
    x = make_inputs(Case(r=3), "cpu")
    with pytest.raises(ValueError, match=r"needs CUDA tensors, got cpu; use mpt_prompt_concat_fused"):
        mt.mpt_prompt_concat_triton(**x)
