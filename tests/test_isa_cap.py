"""bench/isa_cap: a process (and its children) run as on a CPU with fewer instruction sets."""

import json
import os
import subprocess
import sys

import pytest

from promptmux.bench import isa_cap
from promptmux.runtime import cpu

pytestmark = pytest.mark.skipif(bool(isa_cap.unavailable()), reason=str(isa_cap.unavailable()))

PROBE = """
import json, subprocess, sys
import numpy as np, onnxruntime as ort, openvino, torch
from onnx import TensorProto, helper, numpy_helper
from promptmux.runtime import cpu
child = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                       capture_output=True, text=True).stdout.strip()
# ONNX Runtime's MLAS has no capability to ask, but its kernels differ in a result: uint8 x int8 products summed in
# pairs saturate at 16 bits in the AVX2 kernel (vpmaddubsw), and do not with VNNI or AMX. uint8 x uint8 products
# (uint8 weights) are multiplied in 16-bit lanes that cannot saturate (studies/ort_int8_recipes: dynamic-u8).
def product(value, dtype):
    weight = numpy_helper.from_array(np.full((64, 16), value, dtype), "b")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [16, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [16, 16])], [weight])
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    return int(session.run(None, {"a": np.full((16, 64), 255, np.uint8)})[0].max())
mlas, mlas_u8 = product(127, np.int8), product(255, np.uint8)
print(json.dumps({"cap": cpu.isa_cap(), "flags": cpu.cpu_flags(), "model": cpu.cpu_model(),
                  "torch": torch.backends.cpu.get_cpu_capability(), "child_torch": child,
                  "openvino": openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"), "mlas": mlas,
                  "mlas_u8": mlas_u8}))
"""


def capped(cap: str, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "promptmux.bench.isa_cap", cap, "--", *command],
                          capture_output=True, text=True, timeout=300)


def test_an_avx2_capped_process_and_its_children_see_no_avx512_bf16_or_amx():
    done = capped("avx2", sys.executable, "-c", PROBE)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["cap"] == "avx2" and seen["model"].endswith("(capped to avx2)")
    assert seen["flags"] == {"avx2": True, "avx512f": False, "avx512_vnni": False, "avx512_bf16": False,
                             "amx_bf16": False, "amx_int8": False}
    assert seen["torch"] == seen["child_torch"] == "AVX2"  # PyTorch's own cpuid dispatch, here and in a child
    assert "BF16" not in seen["openvino"]  # OpenVINO's: it then refuses bf16, as on a Zen 3
    assert seen["mlas"] == 32 * 32767  # ONNX Runtime's AVX2 int8 kernel: 32 pairs, each saturated (exact: 32 * 64770)
    assert seen["mlas_u8"] == 64 * 255 * 255  # uint8 weights: exact


def test_a_real_segfault_under_the_cap_still_reaches_pythons_handler_and_kills_the_process():
    done = capped("avx2", sys.executable, "-X", "faulthandler", "-c", "import ctypes; ctypes.string_at(0)")
    assert done.returncode == -11
    assert "Fatal Python error: Segmentation fault" in done.stderr


def test_the_cap_is_believed_only_where_its_library_is_loaded():
    # The variable alone changes no kernel, so promptmux ignores it: a child without LD_PRELOAD (this suite may
    # itself run under a cap) reports the host's flags and no cap.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {isa_cap.ENV: "avx2"}
    done = subprocess.run([sys.executable, "-c", "from promptmux.runtime import cpu; print(cpu.isa_cap(), "
                           "cpu.cpu_flags()['avx512f'], 'capped' in cpu.cpu_model())"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", str("avx512f" in cpu.host_flags()), "False"]


def test_unknown_caps_and_commands_are_refused_saying_what_to_give(capsys):
    with pytest.raises(ValueError, match="choose one of avx2, avx512"):
        isa_cap.environ("avx3")
    assert isa_cap.main(["avx3", "--", "true"]) == 2
    assert "usage" in capsys.readouterr().err
    assert isa_cap.main(["avx2", "--", "no-such-command-here"]) == 2
    assert "no command 'no-such-command-here'" in capsys.readouterr().err
    bad = subprocess.run([sys.executable, "-c", "pass"], capture_output=True, text=True,
                         env={**isa_cap.environ("avx2"), isa_cap.ENV: "sse"})
    assert bad.returncode == 2 and "must be avx2 or avx512" in bad.stderr
