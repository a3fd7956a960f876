"""The OpenVINO backend: the deployment's standard-op ONNX graphs compiled by OpenVINO's CPU plugin.

OpenVINO reads neither ONNX Runtime's contrib operators nor model-local ONNX functions, so each graph is
converted once: its local functions (the `ai.mpt::MPTPromptConcat` body) are inlined and the result is saved
as OpenVINO IR under `<deployment>/openvino/` (or, where the deployment folder is read-only, under
~/.cache/promptmux/openvino/), so a restarted server does not convert again; it only compiles the IR.

Precision is always set explicitly: on CPUs with AMX, OpenVINO's CPU plugin *defaults* to bf16, which would
make the "exact" backend silently inexact. After compiling, the precision that OpenVINO reports is checked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from .cpu import default_threads
from .derived import graph_key, is_current, write_stamp
from .errors import BackendUnavailable

log = logging.getLogger("promptmux.runtime")

# promptmux precision -> OpenVINO's INFERENCE_PRECISION_HINT (int8: NNCF's quantized operations run in int8, the
# others in fp32, openvino_int8.py)
OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
INSTALL = "pip install 'promptmux[openvino]'  (or: pip install openvino)"


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailable(f"backend 'openvino' needs the OpenVINO runtime, which is not installed: {INSTALL}"
                                 ) from None
    return openvino


def ir_folder(deploy_dir: Path) -> Path:
    """Where converted graphs and compiled blobs live: in the deployment if it is writable, else the user cache."""
    own = deploy_dir / "openvino"
    try:
        own.mkdir(exist_ok=True)
        probe = own / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return own
    except OSError:
        digest = hashlib.sha256(str(deploy_dir.resolve()).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "promptmux" / "openvino" / digest
        cache.mkdir(parents=True, exist_ok=True)
        return cache


def convert_graph(path: Path, folder: Path, progress=None) -> Path:
    """The graph at `path` as OpenVINO IR in `folder` (converted once; reused while the graph is unchanged)."""
    ov = import_openvino()
    import onnx
    import onnx.inliner

    key = graph_key(path)
    xml = folder / f"{path.stem}.xml"
    stamp = folder / f"{path.stem}.json"
    if is_current(xml, stamp, key):
        return xml
    (progress or log.warning)(f"converting {path.name} for OpenVINO (once per deployment; seconds to minutes)")
    model = onnx.load(str(path))
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                      if n.domain not in ("", "ai.onnx") and n.domain not in {f.domain for f in model.functions}})
    if foreign:
        raise BackendUnavailable(f"{path} holds ONNX Runtime-only operators ({', '.join(foreign)}) from an export with "
                                 "--ort-optimize; OpenVINO cannot run them. Re-export without --ort-optimize, or use "
                                 "--backend onnxruntime")
    model = onnx.inliner.inline_local_functions(model)
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=folder) as tmp:
        flat = Path(tmp) / path.name
        onnx.save_model(model, str(flat), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=flat.name + ".data", size_threshold=1024)
        del model
        converted = ov.convert_model(str(flat))
        staged = Path(tmp) / xml.name
        ov.save_model(converted, str(staged), compress_to_fp16=False)  # weights stay fp32: precision is a hint
        for suffix in (".xml", ".bin"):
            os.replace(staged.with_suffix(suffix), xml.with_suffix(suffix))
    write_stamp(stamp, key, graph=path.name, openvino=ov.get_version())
    return xml


class OpenVinoSession:
    """One compiled OpenVINO model over a graph of the deployment; the same feeds as the ONNX Runtime session."""

    def __init__(self, path: Path, precision: str = "fp32", threads: int | None = None, progress=None,
                 ir: Path | None = None):
        """ir: an IR made from the graph at `path` to compile instead of its conversion (the int8 one)."""
        ov = import_openvino()
        if precision not in OV_PRECISION:
            raise ValueError(f"the openvino backend runs precision {', '.join(OV_PRECISION)}, not {precision!r}")
        if precision == "int8" and ir is None:
            raise ValueError("precision int8 on openvino compiles the int8 IR NNCF made (openvino_int8.py): pass ir")
        path = path.resolve()  # a deployment linking another's graph (bench --scaling) shares its converted IR
        xml = ir or convert_graph(path, ir_folder(path.parent), progress)
        # No compiled-blob cache (OpenVINO's CACHE_DIR or export_model/import_model), measured with OpenVINO 2026.4
        # (studies/openvino_cache.py, results/openvino-cache.md): importing a blob takes as long as compiling
        # the IR (0.2 s MiniLM; 1.0 vs 0.55 s GPT-2; 1.6-2.3 vs 1.9 s SmolLM2), and a graph with fused RoPE nodes
        # (Llama family) computes garbage keys after the import. The slow part of a first start is the ONNX -> IR
        # conversion above (1.4-13 s), and that is done once per deployment.
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads := threads or default_threads():  # PROMPTMUX_THREADS where none is given
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if progress:
            progress(f"compiling {path.name} with OpenVINO ({precision})")
        self.compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
        ran = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        if ran != {"fp32": ov.Type.f32, "bf16": ov.Type.bf16, "int8": ov.Type.f32}[precision]:
            raise BackendUnavailable(f"OpenVINO compiled {path.name} in {ran.get_type_name()}, not the requested "
                                     f"{precision}; this CPU or OpenVINO version cannot run that precision")
        # int8: the operations the compiled model runs in int8 (none would mean the IR fell back to fp32)
        self.int8_ops = sum(op.get_rt_info()["runtimePrecision"].astype(str).lower() in ("i8", "u8")
                            for op in self.compiled.get_runtime_model().get_ops()) if precision == "int8" else 0
        if precision == "int8" and not self.int8_ops:
            raise BackendUnavailable(f"OpenVINO runs no operation of {xml.name} in int8 on this CPU; use --backend "
                                     "onnxruntime for int8")
        if ir is not None:
            self.graph_file = Path(ir).name  # what graph_runs counts (batch.py): the file that ran
        self.precision = precision
        self.input_names = [i.any_name for i in self.compiled.inputs]
        self.output_names = [o.any_name for o in self.compiled.outputs]
        self.output_name = self.output_names[0]
        self._local = threading.local()  # an infer request per thread: requests are not thread-safe
        self._tensor = ov.Tensor
        # Decoder graphs: present.* = past_key_values.* grown by the step's positions. Those outputs (and the
        # gathered logits) are written straight into fresh arrays that the caller then owns, as ONNX Runtime's
        # outputs are, instead of being copied out of the request's memory every step.
        self._past_of = {i: n.replace("present", "past_key_values", 1) for i, n in enumerate(self.output_names)
                         if n.startswith("present")}
        if any(name not in self.input_names for name in self._past_of.values()):
            self._past_of = {}
        logits = self.compiled.outputs[0].get_partial_shape()
        self._vocab = (logits[1].get_length() if self._past_of and logits.rank.is_static and logits.rank.get_length()
                       == 2 and logits[1].is_static else None)  # [rows, vocab]: one row per gathered position

    def _request(self):
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        return req

    def _output_arrays(self, feeds: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
        """Fresh arrays for the outputs whose shapes follow from the feeds (a decoder's logits and presents)."""
        if not self._past_of:
            return {}
        new = feeds["order"].shape[1] if "order" in feeds else feeds["input_ids"].shape[1]
        arrays = {}
        for i, past in self._past_of.items():
            b, h, t, d = feeds[past].shape
            arrays[i] = np.empty((b, h, t + new, d), np.float32)
        if self._vocab is not None:
            rows = feeds["logits_index" if "logits_index" in feeds else "input_ids"].shape[0]
            arrays[0] = np.empty((rows, self._vocab), np.float32)
        return arrays

    def run_all(self, feeds: dict[str, np.ndarray], bank_key=None) -> list[np.ndarray]:
        req = self._request()
        arrays = self._output_arrays(feeds)
        for i, a in arrays.items():
            req.set_output_tensor(i, self._tensor(a, shared_memory=True))
        req.infer({n: np.ascontiguousarray(feeds[n]) for n in self.input_names}, share_inputs=True)
        out = []
        for i in range(len(self.output_names)):
            data = req.get_output_tensor(i).data
            mine = arrays.get(i)
            if mine is not None and mine.shape == data.shape and np.shares_memory(mine, data):
                out.append(mine)  # OpenVINO wrote into the array given
            else:  # the request's own memory, reused by its next call: copy out
                out.append(np.array(data, copy=True))
        return out

    def run(self, feeds: dict[str, np.ndarray], bank_key=None) -> np.ndarray:
        return self.run_all(feeds)[0]  # the graphs run() serves have one output

