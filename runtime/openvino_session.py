"""The OpenVINO backend: the deployment's standard-op ONNX graphs compiled by OpenVINO's CPU plugin.

OpenVINO reads neither ONNX Runtime's contrib operators nor model-local ONNX functions, so each graph is
converted once: its local functions (the `ai.mpt::MPTPromptConcat` body) are inlined and the result is saved
as OpenVINO IR under `<deployment>/openvino/` (or, where the deployment folder is read-only, under
~/.cache/promptmux/openvino/), so a restarted server does not convert again; it only compiles the IR.

A batch shape that recurs gets a model compiled for exactly that shape (SPECIALIZE_AFTER below), which OpenVINO runs
faster than the dynamic-shape model; graph_runs counts its batches as "<graph> (shape-specialised)".

Precision is always set explicitly: on CPUs with AMX, OpenVINO's CPU plugin *defaults* to bf16, which would
make the "exact" backend silently inexact. After compiling, the precision that OpenVINO reports is checked.
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from promptmux.core.durable import save_onnx

from .cpu import default_threads
from .derived import graph_key, is_current, write_stamp
from .errors import BackendUnavailable

log = logging.getLogger("promptmux.runtime")

# promptmux precision -> OpenVINO's INFERENCE_PRECISION_HINT (int8: NNCF's quantized operations run in int8, the
# others in fp32, openvino_int8.py)
OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
INSTALL = "pip install 'promptmux[openvino]'  (or: pip install openvino)"

# Shape-specialised models. OpenVINO's CPU plugin runs a model compiled for one input shape faster than the
# dynamic-shape one: on an AMX Xeon (studies/openvino_static_shapes.py) the demo classifier in bf16 ran 1.05-1.33x as
# fast at B = 1-32 x 64-256 tokens (attention, its fused MHA kernel, took most of a bf16 batch at 256 tokens), and
# fp32 0.99-1.10x.
# A full-sequence graph's input shape seen SPECIALIZE_AFTER times gets a model compiled for exactly that shape, in
# a background thread (the dynamic model serves until it is ready). Each holds its own copy of the weights: at most
# SPECIALIZED_MAX are kept, fewer where they would hold more than STATIC_BYTES of weights together (one at least),
# least recently used first out. A session compiles at most COMPILES_PER_SLOT x that many in its life, so traffic with
# more recurring shapes than it keeps does not recompile forever. Graphs with a cache (decoder steps) are never
# specialised: their shapes change every step. STATIC_SHAPES_ENV=0 turns it off.
SPECIALIZE_AFTER = 3
SPECIALIZED_MAX = 8
STATIC_BYTES = 1 << 30
COMPILES_PER_SLOT = 4
STATIC_SHAPES_ENV = "PROMPTMUX_STATIC_SHAPES"


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
        save_onnx(model, flat, flat.name + ".data")  # (onnx's own refuses where the current folder has that name)
        del model
        converted = ov.convert_model(str(flat))
        staged = Path(tmp) / xml.name
        ov.save_model(converted, str(staged), compress_to_fp16=False)  # weights stay fp32: precision is a hint
        for suffix in (".xml", ".bin"):
            os.replace(staged.with_suffix(suffix), xml.with_suffix(suffix))
    write_stamp(stamp, key, graph=path.name, openvino=ov.get_version())
    return xml


_COMPILING: set = set()  # the specialising threads of every session, until they finish


def wait_for_specialisation(timeout: float = 120.0) -> None:
    """Block until every shape-specialised compilation started so far has finished (timing, tests, studies; and at
    exit: a compilation cut off by the interpreter's shutdown aborts the process, SIGABRT, whatever its status)."""
    for thread in list(_COMPILING):
        thread.join(timeout)


atexit.register(wait_for_specialisation)


class OpenVinoSession:
    """One compiled OpenVINO model over a graph of the deployment; the same feeds as the ONNX Runtime session."""

    def __init__(self, path: Path, precision: str = "fp32", threads: int | None = None, progress=None,
                 ir: Path | None = None, specialize: bool | None = None):
        """ir: an IR made from the graph at `path` to compile instead of its conversion (the int8 one). specialize:
        compile recurring input shapes apart (SPECIALIZE_AFTER); default: for graphs without a cache, unless
        PROMPTMUX_STATIC_SHAPES=0."""
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
        if specialize is None:
            specialize = os.environ.get(STATIC_SHAPES_ENV, "1").strip() != "0"
        self.specialize = specialize and not any(n.startswith("present") for n in self.output_names)  # no cache
        self._core, self._xml, self._config = core, Path(xml), config
        weights = Path(xml).with_suffix(".bin")
        self._max_static = max(1, min(SPECIALIZED_MAX, STATIC_BYTES // max(1, weights.stat().st_size)
                                      if weights.exists() else SPECIALIZED_MAX))
        self._lock = threading.Lock()
        self._seen: collections.Counter = collections.Counter()  # calls per input shape not yet specialised
        self._static: collections.OrderedDict = collections.OrderedDict()  # shape -> its compiled model
        self._compiling: dict = {}  # shape -> the thread compiling it
        self._compiles_left = COMPILES_PER_SLOT * self._max_static

    def _request(self, feeds: dict[str, np.ndarray]):
        """The calling thread's infer request on the model for these feeds' shape (its own compiled model where one
        is ready, else the dynamic one); sets the thread's `static` flag to which it is."""
        compiled = self.compiled
        if self.specialize:
            compiled = self._specialised(tuple(np.shape(feeds[n]) for n in self.input_names)) or self.compiled
        self._local.static = compiled is not self.compiled
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = {}
        req = requests.get(id(compiled))
        if req is None:
            if len(requests) > self._max_static + 1:  # the models evicted since: their requests go with them
                requests.clear()
            req = requests[id(compiled)] = (compiled, compiled.create_infer_request())
        return req[1]

    @property
    def ran_static(self) -> bool:
        """Whether this thread's last call ran a shape-specialised model."""
        return getattr(self._local, "static", False)

    def _specialised(self, key):
        """The compiled model for shape `key`, or None; counts the call and starts its compilation when due."""
        with self._lock:
            compiled = self._static.get(key)
            if compiled is not None:
                self._static.move_to_end(key)
                return compiled
            self._seen[key] += 1
            if self._seen[key] == SPECIALIZE_AFTER and key not in self._compiling and self._compiles_left > 0:
                self._compiles_left -= 1
                thread = threading.Thread(target=self._compile_static, args=(key,), daemon=True,
                                          name="openvino-specialise")
                self._compiling[key] = thread
                _COMPILING.add(thread)
                thread.start()
        return None

    def _compile_static(self, key) -> None:
        try:
            model = self._core.read_model(str(self._xml))
            model.reshape({name: list(shape) for name, shape in zip(self.input_names, key)})
            compiled = self._core.compile_model(model, "CPU", self._config)
        except Exception as e:  # noqa: BLE001 - a shape OpenVINO cannot specialise stays on the dynamic model
            log.info("OpenVINO could not compile %s for shape %s (the dynamic model serves it): %s",
                     self._xml.name, key, e)
            compiled = None
        with self._lock:
            del self._compiling[key]
            _COMPILING.discard(threading.current_thread())
            if compiled is None:  # its count is past SPECIALIZE_AFTER now: it is not tried again
                return
            self._seen.pop(key, None)
            self._static[key] = compiled
            while len(self._static) > self._max_static:
                self._static.popitem(last=False)

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
        req = self._request(feeds)
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

