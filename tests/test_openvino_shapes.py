"""OpenVINO's shape-specialised models (runtime/openvino_session.py): a full-sequence batch shape that recurs gets a
model compiled for exactly that shape, which then serves it with the dynamic model's results; the kept models are
bounded; decoder steps and PROMPTMUX_STATIC_SHAPES=0 never specialise."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_batch

from promptmux import Runtime
from promptmux.core.folder import DECODER_GRAPH, NOPREFIX_GRAPH
from promptmux.runtime import openvino_session
from promptmux.runtime.openvino_session import SPECIALIZE_AFTER, OpenVinoSession, wait_for_specialisation

pytest.importorskip("openvino", reason="the OpenVINO backend needs openvino")
SPECIALISED = f"{NOPREFIX_GRAPH} (shape-specialised)"


def _prompt_only_batch(rt, rows: int, seq: int, seed: int):
    """Rows of the tasks without a key/value prefix (they run model_noprefix.onnx), padded differently."""
    tasks = [t for t in rt.tasks if rt.bank.view(t).kind not in ("prefix", "cartridge")]
    ids, mask = random_batch("bert", rows=rows, seq=seq, seed=seed, padding_side="right")
    return ids, mask, [tasks[i % len(tasks)] for i in range(rows)]


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_a_recurring_shape_runs_a_model_compiled_for_it_with_the_same_results(deployment):
    rt = Runtime(deployment.deploy, backend="openvino")
    ids, mask, tasks = _prompt_only_batch(rt, rows=4, seq=9, seed=1)
    dynamic = [rt.forward(ids, mask, tasks) for _ in range(SPECIALIZE_AFTER)]
    wait_for_specialisation()
    assert dict(rt.graph_runs) == {NOPREFIX_GRAPH: SPECIALIZE_AFTER}
    specialised = rt.forward(ids, mask, tasks)
    assert dict(rt.graph_runs) == {NOPREFIX_GRAPH: SPECIALIZE_AFTER, SPECIALISED: 1}
    assert max(float(np.abs(a - b).max()) for a, b in zip(dynamic[0], specialised)) < 1e-5
    other = _prompt_only_batch(rt, rows=3, seq=9, seed=2)  # another shape: the dynamic model until it recurs
    rt.forward(*other)
    assert rt.graph_runs[NOPREFIX_GRAPH] == SPECIALIZE_AFTER + 1


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_specialised_models_are_bounded_least_recently_used_first_out(deployment, monkeypatch):
    monkeypatch.setattr(openvino_session, "SPECIALIZED_MAX", 1)
    rt = Runtime(deployment.deploy, backend="openvino")
    first, second = _prompt_only_batch(rt, 2, 7, seed=3), _prompt_only_batch(rt, 2, 8, seed=4)
    for batch in (first, second):  # the second shape's model replaces the first's
        for _ in range(SPECIALIZE_AFTER):
            rt.forward(*batch)
        wait_for_specialisation()
    rt.graph_runs.clear()
    rt.forward(*second)
    rt.forward(*first)
    assert dict(rt.graph_runs) == {SPECIALISED: 1, NOPREFIX_GRAPH: 1}


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_decoder_steps_and_the_switch_never_specialise(deployment, monkeypatch):
    """A decoder step's past grows every step, so its shapes never settle: it is never specialised. Neither is a
    graph when PROMPTMUX_STATIC_SHAPES=0."""
    assert OpenVinoSession(deployment.deploy / DECODER_GRAPH).specialize is False
    assert OpenVinoSession(deployment.deploy / "model.onnx").specialize is True
    monkeypatch.setenv("PROMPTMUX_STATIC_SHAPES", "0")
    assert OpenVinoSession(deployment.deploy / "model.onnx").specialize is False


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_a_session_stops_compiling_once_its_budget_is_spent(deployment, monkeypatch):
    """Traffic with more recurring shapes than a session keeps would otherwise recompile without end."""
    monkeypatch.setattr(openvino_session, "SPECIALIZED_MAX", 1)
    monkeypatch.setattr(openvino_session, "COMPILES_PER_SLOT", 1)
    rt = Runtime(deployment.deploy, backend="openvino")
    first, second = _prompt_only_batch(rt, 2, 7, seed=5), _prompt_only_batch(rt, 3, 7, seed=6)
    for batch in (first, second):
        for _ in range(SPECIALIZE_AFTER + 1):
            rt.forward(*batch)
        wait_for_specialisation()
    rt.graph_runs.clear()
    rt.forward(*first)
    rt.forward(*second)
    assert dict(rt.graph_runs) == {SPECIALISED: 1, NOPREFIX_GRAPH: 1}


def test_specialising_compilations_finish_before_the_interpreter_exits(tmp_path):
    """A shape-specialised compilation still running in its daemon thread when the process ends was cut off by the
    interpreter's exit, which aborted the process (SIGABRT: a failed contract measurement on OpenVINO exited 134,
    not 2). Exit now waits for them; here a compilation stands in as a thread that writes a file when done."""
    import subprocess
    import sys

    done = tmp_path / "done"
    code = ("import threading, time; from promptmux.runtime import openvino_session as s\n"
            f"def compile(): time.sleep(0.5); open({str(done)!r}, 'w').close()\n"
            "t = threading.Thread(target=compile, daemon=True); s._COMPILING.add(t); t.start()")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
    assert done.exists()
