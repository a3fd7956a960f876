"""The TensorRT backend: run a deployment's engines with the prompt bank resident on the GPU.

`promptmux build-engine` writes `model.engine` (and, for causal LMs, `decoder.engine`) with their build
settings in the manifest. Here they are loaded (refused when built for another TensorRT version or device),
the MPT plugin is registered first, and every call binds device buffers by address:

- inputs that depend only on the batch's tasks (prompt embeddings, MPT factors, prefix key/values) are
  uploaded once per (bank version, task tuple) and stay on the device;
- the first output (logits / features) comes back to the host; the others (a decoder's present key/values)
  stay on the device as torch tensors and go straight back in as the next step's past.

Buffers are torch CUDA tensors, so this backend needs a CUDA build of torch and a GPU that the installed
TensorRT accepts (TensorRT-RTX, for one, refuses data-centre GPUs such as the H100).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from promptmux.core.trt_compat import EngineError

from .errors import BackendUnavailable, InputError
from .sessions import BANK_INPUTS


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    return table[dtype]


class TrtSession:
    """One TensorRT engine; run()/run_all() take the same feeds as the ONNX Runtime sessions."""

    def __init__(self, path: Path, settings: dict, device_id: int = 0, bank_cache: int = 64):
        import torch

        from promptmux.core.trt_compat import execution_support

        ok, why = execution_support()
        if not ok:
            raise BackendUnavailable(f"backend 'tensorrt' cannot run engines here: {why}")
        self.torch = torch
        self.device = torch.device("cuda", device_id)
        torch.cuda.set_device(self.device)
        self.engine = load_engine(path, settings)  # registers the plugin; refuses foreign engines
        from promptmux.core.trt_compat import import_tensorrt

        self.trt = trt = import_tensorrt()
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.output_name = self.output_names[0]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.stream = torch.cuda.Stream(self.device)
        self._bank: OrderedDict = OrderedDict()
        self._bank_cache = bank_cache
        self._empty = torch.empty(1, device=self.device)  # an address for zero-size tensors

    def _tensor(self, name: str, x, bank_key):
        torch = self.torch
        if isinstance(x, torch.Tensor):
            return x.contiguous()  # a previous step's output, already on the device
        cached = bank_key is not None and name in BANK_INPUTS
        if cached and (bank_key, name) in self._bank:
            self._bank.move_to_end((bank_key, name))
            return self._bank[(bank_key, name)]
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, self.dtypes[name], non_blocking=False)
        if cached:
            self._bank[(bank_key, name)] = t
            while len(self._bank) > self._bank_cache:
                self._bank.popitem(last=False)
        return t

    def run_all(self, feeds: dict, bank_key=None) -> list:
        """Outputs: the first as numpy, the others as torch tensors on the device (see sessions.host())."""
        torch = self.torch
        keep = []
        for name in self.input_names:
            t = self._tensor(name, feeds[name], bank_key)
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise InputError(f"input {name!r} of shape {tuple(t.shape)} is outside the engine's optimization "
                                 "profile; send a smaller batch or shorter input, or rebuild the engine with larger "
                                 "--max-batch/--max-seq/--max-prompt/--max-past")
            self.context.set_tensor_address(name, t.data_ptr() if t.numel() else self._empty.data_ptr())
        outputs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            t = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            outputs.append(t)
            self.context.set_tensor_address(name, t.data_ptr() if t.numel() else self._empty.data_ptr())
        # Inputs were copied on the current stream; the engine runs on ours.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine (see its log above)")
        self.stream.synchronize()
        return [outputs[0].float().cpu().numpy(), *outputs[1:]]

    def run(self, feeds: dict, bank_key=None) -> np.ndarray:
        return self.run_all(feeds, bank_key)[0]


def engine_sessions(deploy_dir: Path, manifest: dict, device_id: int = 0):
    """(session of model.engine, session of decoder.engine or None) of a deployment."""
    engines = manifest.get("engines") or {}
    if "model" not in engines:
        raise FileNotFoundError(f"{deploy_dir} has no TensorRT engine; run: promptmux build-engine {deploy_dir}")
    main = TrtSession(Path(deploy_dir) / engines["model"]["file"], engines["model"], device_id)
    decoder = None
    if "decoder" in engines:
        decoder = TrtSession(Path(deploy_dir) / engines["decoder"]["file"], engines["decoder"], device_id)
    return main, decoder


# ---- load --------------------------------------------------------------------------------------

def load_engine(path, manifest_settings: dict, device_id: int = 0, trt=None):
    """Deserialize an engine built by build_engine; refuses, saying why, one built for another TensorRT
    (flavor or version), one whose file changed since, and one built on a device of another compute
    capability (TensorRT engines; TensorRT-RTX engines are portable across the GPUs it supports)."""
    from promptmux.core import trt_compat
    from promptmux.kernels.tensorrt_plugin import register_tensorrt_plugins

    path = Path(path)
    rebuild = f"rebuild it: promptmux build-engine {path.parent}"
    if not path.is_file():
        raise EngineError(f"{path} does not exist; {rebuild}")
    trt = trt or trt_compat.import_tensorrt()
    built, here = manifest_settings.get("tensorrt", {}), trt_compat.describe(trt)
    if (built.get("flavor"), built.get("version")) != (here["flavor"], here["version"]):
        raise EngineError(f"{path} was built with {built.get('flavor')} {built.get('version')} but this process uses "
                          f"{here['flavor']} {here['version']}; an engine only loads in the TensorRT version that "
                          f"built it: {rebuild}, or install that version")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest_settings.get("sha256"):
        raise EngineError(f"{path} is not the engine the manifest describes (replaced or changed since it was "
                          f"built); {rebuild}")
    ok, why = trt_compat.execution_support(trt)
    if not ok:
        raise EngineError(f"cannot load {path} here: {why}")
    device, built_on = trt_compat.cuda_device(device_id), manifest_settings.get("device")
    if here["flavor"] == "tensorrt" and isinstance(built_on, dict) and device \
            and built_on.get("compute_capability") != device["compute_capability"]:
        raise EngineError(f"{path} was built on {built_on.get('name')} (compute capability "
                          f"{built_on.get('compute_capability')}), this is {device['name']} (compute capability "
                          f"{device['compute_capability']}); TensorRT engines are device-specific: {rebuild} here")
    if manifest_settings.get("plugin", {}).get("used"):
        register_tensorrt_plugins(trt)  # the engine finds its plugin through the registry
    logger = trt_compat.make_logger(trt)
    engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    if engine is None:
        raise EngineError(f"TensorRT could not load {path}: {'; '.join(logger.errors[-3:])}; {rebuild}")
    return engine
