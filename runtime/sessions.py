"""Backends that run the exported computation: ONNX Runtime (CPU, or CUDA with IO binding), and eager PyTorch
as the reference."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np

# Graph inputs whose values depend only on the batch's tasks (the prompt bank), never on the text: a device session
# keeps them resident, keyed by the bank version and the batch's task tuple.
from promptmux.core.io_spec import BANK_INPUTS  # noqa: E402

from .cpu import default_threads
from .errors import BackendUnavailable

# ONNX Runtime's CPU SkipLayerNormalization (which its online optimizer fuses from Add + LayerNormalization) was
# slower than the two ops it replaces on an AMX Xeon: disabling the fusion took 3-15 % off a MiniLM forward at
# B = 1, 8 and 32 (python -m studies.ort_fusions; results/ort-fusions-minilm.json). Decomposing the
# graph's Attention nodes into MatMul/Softmax/MatMul for ORT was tried too and was not faster.
CPU_DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]


class OrtSession:
    """One ONNX Runtime CPU session over a graph of the deployment."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads := threads or default_threads():  # PROMPTMUX_THREADS where none is given
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=CPU_DISABLED_OPTIMIZERS)
        self.graph_file = Path(path).name  # what runs (an int8 copy's own name): Runtime.graph_runs counts it
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name

    def run(self, feeds: dict[str, np.ndarray], bank_key=None) -> np.ndarray:
        return self.session.run([self.output_name], {n: feeds[n] for n in self.input_names})[0]

    def run_all(self, feeds: dict[str, np.ndarray], bank_key=None) -> list[np.ndarray]:
        return self.session.run(None, {n: feeds[n] for n in self.input_names})


class OnFirstUse:
    """A session made when it is first used: a causal LM's full-sequence graph (forward(), full-sequence
    benchmarks) is not loaded, converted or compiled by a process that only generates."""

    def __init__(self, make):
        self._make, self._session, self._lock = make, None, threading.Lock()

    def __getattr__(self, name):  # only for what the session has (run, run_all, input_names, ...)
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = self._make()
        return getattr(self._session, name)

    @property
    def made(self) -> bool:
        return self._session is not None

    def release(self) -> None:
        """Drop the session made (if any): the next use makes it again."""
        with self._lock:
            self._session = None


def release_full_sequence(rt) -> None:
    """Drop the full-sequence sessions rt has made, each made again by its next batch. After a precision contract
    was measured: its calibration batches (many shapes) grew the engines' caches and arenas, which serving would
    then carry. On the Zen 4 demo, after serving the benchmarks' four shapes, OpenVINO's bf16 held 1.3 GB against
    2.3 GB kept, ONNX Runtime's int8 0.7 GB against 1.6 GB (python -m studies.fast_open_memory)."""
    for name in ("session", "noprefix_session"):
        session = getattr(rt, name, None)
        if isinstance(session, OnFirstUse):
            session.release()


def for_runtime(rt, make) -> OnFirstUse:
    """OnFirstUse(make(rt)), holding rt weakly. A runtime's own session that held it strongly would put the runtime
    in a reference cycle, so that dropping it freed nothing until Python's cycle collector next ran. `fast` opens a
    runtime per candidate precision: on MiniLM's first open that peaked at 5.2 GB against 3.3 GB without the cycles
    (python -m studies.fast_open_memory), and a benchmark worker kept 5.7 GB after it."""
    ref = weakref.ref(rt)

    def make_now():
        owner = ref()
        if owner is None:
            raise RuntimeError("this session's Runtime is gone; open the deployment again")
        return make(owner)

    return OnFirstUse(make_now)


def host(x) -> np.ndarray:
    """A session output as a numpy array (device sessions return OrtValues or torch tensors that stay on the
    device)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "cpu"):  # torch tensor (TensorRT backend)
        return x.float().cpu().numpy()
    return x.numpy()  # OrtValue


class OrtBoundSession:
    """ONNX Runtime with IO binding: inputs copied to the device once, bank tensors resident on the device,
    every output but the first (logits / features) left on the device as OrtValues, so a decoder's present
    key/values go straight back in as the next step's past with no host round trip.

    device "cuda" needs onnxruntime-gpu; device "cpu" runs the same binding logic on the CPU provider.
    """

    def __init__(self, path: Path, device: str = "cuda", device_id: int = 0, threads: int | None = None,
                 bank_cache: int = 64):
        import onnxruntime as ort

        self.ort = ort
        self.device, self.device_id = device, device_id
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads := threads or default_threads():  # PROMPTMUX_THREADS where none is given
            so.intra_op_num_threads = threads
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable(
                    f"backend 'onnxruntime-cuda' needs onnxruntime-gpu with the CUDA execution provider; this "
                    f"onnxruntime {ort.__version__} has only {', '.join(ort.get_available_providers())}. "
                    "pip uninstall onnxruntime && pip install onnxruntime-gpu")
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # the CUDA/cuDNN libraries of pip-installed nvidia packages
            # use_tf32 0: ONNX Runtime's CUDA provider multiplies fp32 matrices in TF32 by default (10-bit mantissas):
            # on an H200 that moved a MiniLM-shaped classifier's outputs by up to 6.0e-4 from the CPU session's,
            # against 8.5e-7 without it (studies/gpu_exactness.py, results/gpu-exactness-h200.json), and the exact
            # contract is 1e-4 of PEFT. The half-precision graphs do not use TF32 anyway.
            providers = [("CUDAExecutionProvider", {"device_id": device_id, "use_tf32": 0}), "CPUExecutionProvider"]
        elif device == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise ValueError(f"unknown device {device!r}; use 'cuda' or 'cpu'")
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendUnavailable(f"ONNX Runtime could not start the CUDA provider ({self.session.get_providers()});"
                                     " check the CUDA and cuDNN libraries onnxruntime-gpu needs")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_name = self.output_names[0]
        self._bank: OrderedDict = OrderedDict()  # (key, input name) -> OrtValue on the device
        self._bank_cache = bank_cache

    def _value(self, name: str, x, bank_key):
        if not isinstance(x, np.ndarray):
            return x  # already an OrtValue (a previous step's output)
        if bank_key is not None and name in BANK_INPUTS:
            key = (bank_key, name)
            if key in self._bank:
                self._bank.move_to_end(key)
                return self._bank[key]
        value = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), self.device, self.device_id)
        if bank_key is not None and name in BANK_INPUTS:
            self._bank[key] = value
            while len(self._bank) > self._bank_cache:
                self._bank.popitem(last=False)
        return value

    def run_all(self, feeds: dict, bank_key=None) -> list:
        """Outputs: the first as numpy, the others as OrtValues on the device (see host())."""
        binding = self.session.io_binding()
        for name in self.input_names:
            binding.bind_ortvalue_input(name, self._value(name, feeds[name], bank_key))
        for name in self.output_names:
            binding.bind_output(name, self.device, self.device_id)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return [outputs[0].numpy(), *outputs[1:]]

    def run(self, feeds: dict, bank_key=None) -> np.ndarray:
        return self.run_all(feeds, bank_key)[0]


class TorchSession:
    """The same computation in eager PyTorch (the reference backend)."""

    def __init__(self, module, names: list[str], threads: int | None = None):
        import torch

        if threads := threads or default_threads():  # PROMPTMUX_THREADS where none is given
            torch.set_num_threads(threads)
        self.module = module.eval()
        self.input_names = names

    def run(self, feeds: dict[str, np.ndarray], bank_key=None) -> np.ndarray:
        return self.run_all(feeds)[0]

    def run_all(self, feeds: dict[str, np.ndarray], bank_key=None) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names])
        return [t.float().numpy() for t in (out if isinstance(out, tuple) else (out,))]


def torch_session(base: Path, hf_config, spec, threads: int | None):
    """(session, model): the backend "torch", eager PyTorch over the base model folder (the reference)."""
    from promptmux.core.folder import load_base_model
    from promptmux.core.graph import PromptedBackbone
    from promptmux.core.io_spec import input_names
    from promptmux.core.seq2seq_graph import PromptedEncoder

    if not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"the torch backend needs the base model; {base} is missing. Pass base=<folder> (CLI: --base)")
    model = load_base_model(base, hf_config)
    module = PromptedEncoder(model) if spec.family.encoder_decoder else PromptedBackbone(model)
    return TorchSession(module, input_names(spec), threads), model


def torch_decoder_session(model, spec, dims) -> TorchSession:
    """The cached decoder step in eager PyTorch (backend "torch"), over the model torch_session loaded."""
    if spec.family.encoder_decoder:
        from promptmux.core.seq2seq_graph import DECODER_STEP_INPUTS, cross_names, decoder_step, self_names

        step = decoder_step(model)
        return TorchSession(step, [*DECODER_STEP_INPUTS, *self_names(step.layers), *cross_names(step.layers)])
    from promptmux.core.graph import PromptedDecoder
    from promptmux.core.io_spec import DECODER_INPUTS, past_names

    return TorchSession(PromptedDecoder(model), list(DECODER_INPUTS) + past_names(dims.num_layers))
