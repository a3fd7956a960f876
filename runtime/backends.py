"""The backends as a table, like the kinds: what each one runs (precisions, model families), what it needs here, and
how it makes its sessions. `Runtime` looks its backend up in BACKENDS and calls it; `choose_backend` resolves "auto"
from AUTO. Adding a backend is one entry here (ARCHITECTURE.md, "How to add a backend").

Sessions come in three sorts: ONNX graph sessions (GraphBackend: ONNX Runtime, OpenVINO, both routed, ONNX Runtime on
CUDA), the TensorRT engines written by `promptmux build-engine`, and eager PyTorch over the base model (the reference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from promptmux.core.families import FAMILIES as MODEL_FAMILIES
from promptmux.core.families import family_of
from promptmux.core.folder import FOLDED_GRAPH, GRAPH

from .errors import BackendUnavailable, InputError
from .sessions import for_runtime

if TYPE_CHECKING:  # the annotations only: runtime.py imports this module
    from promptmux.runtime.runtime import Runtime

FAMILIES = tuple(MODEL_FAMILIES)  # by name: the tables below say which families each backend and precision run
PRECISIONS = ("fp32", "bf16", "int8")
# Which families a precision's graphs can be made for (int8: runtime/quantize.py has a recipe for these).
PRECISION_FAMILIES = {"int8": ("encoder", "decoder")}


def _words(families) -> str:
    """Families by name, as a message says them ("classifiers and causal LMs")."""
    return " and ".join(family_of(f).words for f in families)


def openvino_installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16), as OpenVINO's CPU plugin sees it."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@dataclass(frozen=True)
class Backend:
    """One backend. precisions and families: what it runs; cpu_engine: it runs on this CPU (it then gives the slot
    groups no row uses zero length, Runtime.layout); noprefix_graph: batches without key/value-prefix rows run the
    graph without prefix inputs, where the export wrote one (no empty cache concatenated in every layer)."""

    name: str
    precisions: tuple[str, ...] = ("fp32",)
    families: tuple[str, ...] = FAMILIES
    cpu_engine: bool = False
    noprefix_graph: bool = False
    needs: Callable[[str], None] | None = None  # raises BackendUnavailable if what `precision` needs is missing here
    precision_families: dict = field(default_factory=dict)  # a precision it runs for these families only

    def check(self, precision: str, family: str) -> None:
        """Raise BackendUnavailable, saying what to do, if this backend cannot run `precision` for `family` here."""
        if precision not in self.precisions:
            runs = [b.name for b in BACKENDS.values() if precision in b.precisions]
            raise BackendUnavailable(f"precision {precision} runs on backend {' or '.join(runs)}, not {self.name!r}; "
                                     f"pass --backend {runs[0]} (or auto)")
        only = self.precision_families.get(precision)
        if only and family not in only:
            others = [b.name for b in BACKENDS.values() if precision in b.precisions and b is not self]
            raise BackendUnavailable(f"precision {precision} on backend {self.name} runs {_words(only)}, not "
                                     f"{family_of(family).words}; "
                                     f"pass --backend {' or '.join(others)} (or auto)")
        if family not in self.families:
            raise BackendUnavailable(f"backend {self.name} runs {' or '.join(self.precisions)} "
                                     f"{_words(self.families)} "
                                     f"({', '.join(f + 's' for f in self.families)}), not {family_of(family).words}; "
                                     "pass --backend onnxruntime or openvino")
        if self.needs:
            self.needs(precision)

    def open(self, rt: Runtime, base: Path | None) -> None:
        """Make rt.session (the full-sequence graph), rt.folded_session and rt.noprefix_session."""
        raise NotImplementedError

    def decoder_session(self, rt: Runtime):
        """The cached decoder step of a generative deployment."""
        raise NotImplementedError


def _openvino_needs(precision: str) -> None:
    """OpenVINO installed; for bf16 a CPU that computes it; for int8 NNCF (openvino_int8.py), so that a missing one
    is an error when the Runtime opens, not at its first request."""
    from .openvino_session import import_openvino

    import_openvino()
    if precision == "bf16" and not cpu_has_bf16():
        raise BackendUnavailable("precision bf16 needs a CPU with AMX or AVX512-BF16 (OpenVINO reports no BF16 "
                                 "capability here); use precision fp32")
    if precision == "int8":
        from .openvino_int8 import import_nncf

        import_nncf()


def _onnxruntime(rt: Runtime, path: Path, precision: str, keep_fp32: tuple[int, ...], ort_device: str):
    from .sessions import OrtSession

    if precision == "int8":  # the dynamic int8 copy (quantize.py; keep_fp32: the layers accuracy control keeps fp32)
        from .quantize import int8_graph

        path = int8_graph(path, rt.spec.family.int8_full_sequence, keep_fp32)
    return OrtSession(path, rt.threads)


def _openvino(rt: Runtime, path: Path, precision: str, keep_fp32: tuple[int, ...], ort_device: str):
    if precision == "int8":  # NNCF's static int8, calibrated on rt's contract rows when first used (openvino_int8.py)
        from .openvino_int8 import int8_session

        return for_runtime(rt, lambda owner: int8_session(owner, path))
    from .openvino_session import OpenVinoSession

    return OpenVinoSession(path, precision, rt.threads)


def _routed(rt: Runtime, path: Path, precision: str, keep_fp32: tuple[int, ...], ort_device: str):
    """Each batch on ONNX Runtime or OpenVINO, whichever this CPU ran faster at its size (routing.py)."""
    from .openvino_session import OpenVinoSession
    from .routed_session import RoutedSession
    from .sessions import OrtSession

    threads = rt.threads  # a value: the session must not hold rt (sessions.for_runtime)
    return RoutedSession(lambda: OrtSession(path, threads), lambda: OpenVinoSession(path, "fp32", threads),
                         rt.routing)


def _onnxruntime_cuda(rt: Runtime, path: Path, precision: str, keep_fp32: tuple[int, ...], ort_device: str):
    from .sessions import OrtBoundSession

    return OrtBoundSession(path, device=ort_device, device_id=rt.device_id, threads=rt.threads)


@dataclass(frozen=True)
class GraphBackend(Backend):
    """Runs the deployment's ONNX graphs; make(rt, path, precision, keep_fp32, ort_device) makes one session."""

    make: Callable = _onnxruntime

    def graph_session(self, rt: Runtime, path: Path, precision: str, keep_fp32: tuple[int, ...] = (),
                      ort_device: str = "cuda"):
        return self.make(rt, path, precision, keep_fp32, ort_device)

    def open(self, rt: Runtime, base: Path | None) -> None:
        noprefix = rt.manifest["graph"].get("noprefix")
        if noprefix and self.noprefix_graph:  # made when a batch without prefix rows comes
            rt.noprefix_session = for_runtime(rt, lambda owner: owner.graph_session(owner.dir / noprefix["file"]))
        if rt.spec.family.generation == "causal" or (rt.noprefix_session is not None and self.cpu_engine):
            # made on first use: generation needs only the cached decoder graph, and an encoder whose batches have
            # no prefix rows only the graph without prefix inputs (a GPU backend opens it now all the same, so that
            # a missing CUDA provider is an error when the Runtime opens, not at its first request)
            rt.session = for_runtime(rt, lambda owner: owner.graph_session(owner.dir / GRAPH))
        else:
            rt.session = rt.graph_session(rt.dir / GRAPH)
        rt.folded_session = rt.graph_session(rt.dir / FOLDED_GRAPH) if rt.folded_task else None

    def decoder_session(self, rt: Runtime):
        return rt.graph_session(rt.dir / rt.manifest["decoder"]["file"])


class TensorRTBackend(Backend):
    """The engines `promptmux build-engine` wrote (trt_session.py); they serve every task, so nothing is folded."""

    def open(self, rt: Runtime, base: Path | None) -> None:
        from .trt_session import engine_sessions

        rt.session, decoder = engine_sessions(rt.dir, rt.manifest, rt.device_id)
        rt.backend_state = {"decoder": decoder}
        rt.folded_session, rt.folded_task = None, None

    def decoder_session(self, rt: Runtime):
        if rt.backend_state["decoder"] is None:
            raise InputError(f"{rt.dir} has no TensorRT engine for the cached decoder; run promptmux build-engine "
                             "again with this promptmux version")
        return rt.backend_state["decoder"]


class TorchBackend(Backend):
    """Eager PyTorch over the base model folder recorded at export (or `base`): the reference."""

    def open(self, rt: Runtime, base: Path | None) -> None:
        from .sessions import torch_session

        rt.session, model = torch_session(Path(base or rt.manifest["base"]["path"]), rt.hf_config, rt.spec,
                                          rt.threads)
        rt.backend_state = {"model": model}
        rt.folded_session, rt.folded_task = None, None

    def decoder_session(self, rt: Runtime):
        from .sessions import torch_decoder_session

        return torch_decoder_session(rt.backend_state["model"], rt.spec, rt.dims)


BACKENDS = {b.name: b for b in (
    GraphBackend("onnxruntime", precisions=("fp32", "int8"), cpu_engine=True, noprefix_graph=True, make=_onnxruntime),
    GraphBackend("openvino", precisions=("fp32", "bf16", "int8"), cpu_engine=True, noprefix_graph=True,
                 needs=_openvino_needs, precision_families={"int8": ("encoder",)}, make=_openvino),
    GraphBackend("onnxruntime+openvino", families=("encoder",), cpu_engine=True, noprefix_graph=True,
                 needs=_openvino_needs, make=_routed),
    # On an H200 its forward was launch-bound (studies/ort_cuda_profile.py), and the full graph's empty prefix adds a
    # Split, Squeezes and Concats in every layer: prompt-only batches take the graph without them. Not yet timed there.
    GraphBackend("onnxruntime-cuda", noprefix_graph=True, make=_onnxruntime_cuda),
    TensorRTBackend("tensorrt"),
    TorchBackend("torch"),
)}
CPU_ENGINES = tuple(name for name, b in BACKENDS.items() if b.cpu_engine)

# backend "auto": the first row whose precision and families match and whose condition holds (measured:
# results/cpu-precision.md: ONNX Runtime decodes SmolLM2 1.6x faster than OpenVINO and runs GPT-2's
# full-sequence logits faster too; routing.py: each classifier batch on the engine this CPU ran faster at its size).
AUTO = (
    ("bf16", FAMILIES, None, "openvino", "bf16 runs on OpenVINO"),
    ("int8", ("decoder",), None, "onnxruntime", "int8 weight-only decoding runs on ONNX Runtime (MatMulNBits)"),
    ("int8", ("encoder",), None, "onnxruntime", "dynamic int8 classifiers run on ONNX Runtime"),
    ("fp32", ("decoder", "seq2seq"), None, "onnxruntime",
     "the fastest exact backend for causal LMs and seq2seq measured here"),
    ("fp32", ("encoder",), openvino_installed, "onnxruntime+openvino",
     "the fastest exact backends for classifiers: each batch on ONNX Runtime or OpenVINO, whichever this CPU ran "
     "faster at its size"),
    ("fp32", ("encoder",), None, "onnxruntime",
     "OpenVINO is not installed (pip install 'promptmux[openvino]' is faster for classifiers)"),
)


def choose_backend(backend: str, precision: str, family: str) -> tuple[str, str]:
    """(backend, why) for a requested backend ("auto" included) and precision; raises if it cannot run here."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)} or fast (the "
                         "fastest of them that keeps its accuracy contract here)")
    if family not in PRECISION_FAMILIES.get(precision, FAMILIES):
        raise BackendUnavailable(f"precision {precision} runs "
                                 f"{_words(PRECISION_FAMILIES[precision])}; a {family} "
                                 "deployment stays fp32")
    why = "requested"
    if backend == "auto":
        backend, why = next((name, reason) for p, families, condition, name, reason in AUTO
                            if p == precision and family in families and (condition is None or condition()))
    BACKENDS[backend].check(precision, family)
    return backend, why
