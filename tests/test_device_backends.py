"""The GPU backends' host logic, on this CPU machine.

`onnxruntime-cuda` binds inputs and outputs with ONNX Runtime's IO binding, keeps the prompt bank's
tensors resident on the device and leaves a decoder's present key/values on the device between steps.
Here the same binding code runs on the CPU provider (runtime._ORT_DEVICE = "cpu"), so everything but
the CUDA kernels is checked: outputs equal the plain session's, resident bank tensors are reused and
refreshed when the bank changes, generation feeds device outputs back in. The CUDA run itself needs
onnxruntime-gpu and a GPU (results records where it ran).
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
from conftest import random_batch

import promptmux.runtime.runtime as runtime_mod
from promptmux import BackendUnavailable, Runtime


@pytest.fixture
def bound_on_cpu(monkeypatch):
    """The binding on the CPU provider; on a GPU machine with onnxruntime-gpu, PROMPTMUX_TEST_CUDA=1 keeps it on the
    GPU, so these tests compare the CUDA provider's outputs with the CPU session's (studies/gpu_check.sh)."""
    if os.environ.get("PROMPTMUX_TEST_CUDA") == "1":
        assert "CUDAExecutionProvider" in ort.get_available_providers(), "PROMPTMUX_TEST_CUDA=1 without onnxruntime-gpu"
        return
    monkeypatch.setattr(runtime_mod, "_ORT_DEVICE", "cpu")


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_bound_session_matches_plain_session_in_mixed_batches(deployment, bound_on_cpu):
    plain = Runtime(deployment.deploy, backend="onnxruntime", use_folded=False)
    bound = Runtime(deployment.deploy, backend="onnxruntime-cuda", use_folded=False)
    tasks = deployment.task_names()
    ids, mask = random_batch("bert", len(tasks), 7, seed=3, padding_side="right")
    want = plain.forward(ids, mask, tasks)
    got = bound.forward(ids, mask, tasks)
    assert max(float(np.abs(a - b).max()) for a, b in zip(want, got)) < 1e-5
    # Rows without a key/value prefix run the graph without prefix inputs, as on the CPU engines.
    prompt_only = [t for t in tasks if bound.graph_for([bound.bank.view(t)])[1] == "model_noprefix.onnx"]
    assert prompt_only and len(prompt_only) < len(tasks)
    want = plain.forward(ids[: len(prompt_only)], mask[: len(prompt_only)], prompt_only)
    got = bound.forward(ids[: len(prompt_only)], mask[: len(prompt_only)], prompt_only)
    assert max(float(np.abs(a - b).max()) for a, b in zip(want, got)) < 1e-5
    assert bound.graph_runs == {"model.onnx": 1, "model_noprefix.onnx": 1}


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_bank_tensors_stay_resident_and_follow_bank_changes(deployment, bound_on_cpu):
    rt = Runtime(deployment.deploy, backend="onnxruntime-cuda", use_folded=False)
    tasks = ["pt", "mpt/1", "prefix"]  # a prefix row: the full graph, with every kind of bank input
    ids, mask = random_batch("bert", len(tasks), 6, seed=4, padding_side="right")
    rt.forward(ids, mask, tasks)
    resident = dict(rt.session._bank)
    assert {name for _, name in resident} >= {"prompt_embeds", "mpt_cols", "prefix_keys"}
    rt.forward(ids, mask, tasks)  # same tasks: the very same device values are bound again
    assert all(rt.session._bank[k] is v for k, v in resident.items())
    assert len(rt.session._bank) == len(resident)

    # Replacing the task under the same name must not serve the old resident prompt.
    rt.add_task("pt", deployment.adapters["ptmlp"], replace=True)
    got = rt.forward(ids, mask, tasks)[0]
    plain = Runtime(deployment.deploy, backend="onnxruntime", use_folded=False)
    plain.add_task("pt", deployment.adapters["ptmlp"], replace=True)
    assert float(np.abs(got - plain.forward(ids, mask, tasks)[0]).max()) < 1e-5


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_bound_generation_keeps_the_cache_on_the_device(deployment, bound_on_cpu):
    plain = Runtime(deployment.deploy, backend="onnxruntime")
    bound = Runtime(deployment.deploy, backend="onnxruntime-cuda")
    tasks = ["pt", "prefix", "mpt/2", "ptlstm"]
    ids, mask = random_batch("gpt2", len(tasks), 6, seed=5, padding_side="left")
    want = plain.generate({"input_ids": ids, "attention_mask": mask}, tasks, max_new_tokens=5, eos_token_id=[])
    got = bound.generate({"input_ids": ids, "attention_mask": mask}, tasks, max_new_tokens=5, eos_token_id=[])
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in want]
    feeds = bound.generator._layout(ids, mask, [bound.bank.view(t) for t in tasks]).feeds
    outs = bound.generator._run(feeds, np.zeros(len(tasks), np.int64))[1]
    assert all(isinstance(o, ort.OrtValue) for o in outs)  # presents are device values, not host arrays


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA provider present")
@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_cuda_backend_without_onnxruntime_gpu_says_what_to_install(deployment):
    with pytest.raises(BackendUnavailable, match="pip install onnxruntime-gpu"):
        Runtime(deployment.deploy, backend="onnxruntime-cuda")


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_tensorrt_backend_without_an_engine_says_how_to_build_one(deployment):
    with pytest.raises(FileNotFoundError, match="promptmux build-engine"):
        Runtime(deployment.deploy, backend="tensorrt")
