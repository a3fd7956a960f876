"""One entry point to TensorRT: NVIDIA TensorRT (`tensorrt`, 10.x+) or TensorRT-RTX (`tensorrt_rtx_bindings`).

Both expose the same Python API for what promptmux uses (builder, ONNX parser, plugin registry,
runtime). They differ in what matters here:

- TensorRT-RTX builds engines ahead of time on a machine without a GPU (CPU-only AOT); TensorRT needs
  a CUDA GPU to build. TensorRT-RTX engines run on the RTX GPUs it supports; it refuses others.
- TensorRT-RTX networks are always strongly typed (there is no FP16 builder flag): precision comes
  from the graph's types, which is how export/trt_engine.py does it for both.
- TensorRT-RTX's ONNX parser, when it imports a node as a plugin, dlopen()s the unversioned
  `libtensorrt_rtx.so`. The pip wheel ships only `libtensorrt_rtx.so.1`, and the parser then aborts the
  whole process ("terminate called without an active exception"). `prepare_plugin_parser()` creates the
  missing symlink next to the parser library, where the parser's RPATH ($ORIGIN) finds it. A link in
  another folder only helps through LD_LIBRARY_PATH set before Python starts: the loader reads that
  variable once, and a ctypes.CDLL(..., RTLD_GLOBAL) of the link does not satisfy a later dlopen of
  the bare name (verified: the parser still aborts).

Pick one with PROMPTMUX_TENSORRT=tensorrt|tensorrt_rtx; otherwise an already imported one is used,
else TensorRT-RTX, else TensorRT. Only one is ever imported in a process (both register the same
C++ symbols and plugin registries).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
from pathlib import Path

ENV = "PROMPTMUX_TENSORRT"
# flavor -> module name
MODULES = {"tensorrt_rtx": "tensorrt_rtx_bindings", "tensorrt": "tensorrt"}
INSTALL = {
    "tensorrt_rtx": "pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs",
    "tensorrt": "pip install tensorrt-cu12 (or tensorrt-cu13; needs a CUDA GPU to build engines)",
}
RTX_LIB = "libtensorrt_rtx.so"

_execution: tuple[bool, str] | None = None


def _flavor_of(module) -> str:
    return next(f for f, m in MODULES.items() if module.__name__ == m)


def import_tensorrt():
    """The TensorRT module to use (see the module docstring for how it is chosen)."""
    choice = os.environ.get(ENV, "").strip()
    if choice and choice not in MODULES:
        raise ImportError(f"{ENV}={choice!r} is not a TensorRT flavor; set it to one of: {', '.join(MODULES)}")
    loaded = [f for f, m in MODULES.items() if m in sys.modules]
    if choice:
        other = [f for f in loaded if f != choice]
        if other:
            raise ImportError(f"{ENV}={choice} but this process already imported {MODULES[other[0]]}; the two "
                              "cannot be used in one process: unset the variable or start a new process")
        order = [choice]
    else:
        order = loaded or list(MODULES)
    errors = []
    for flavor in order:
        try:
            return importlib.import_module(MODULES[flavor])
        except ImportError as e:
            errors.append(f"{MODULES[flavor]}: {e}")
    wanted = order if choice else list(MODULES)
    raise ImportError("TensorRT is not installed (" + "; ".join(errors) + "). Install one of: "
                      + " | ".join(INSTALL[f] for f in wanted))


def flavor(trt=None) -> str:
    """'tensorrt_rtx' or 'tensorrt'."""
    return _flavor_of(trt or import_tensorrt())


def version(trt=None) -> str:
    """The flavor and version, e.g. 'tensorrt_rtx 1.7.1.116'."""
    trt = trt or import_tensorrt()
    return f"{_flavor_of(trt)} {trt.__version__}"


def describe(trt=None) -> dict:
    trt = trt or import_tensorrt()
    return {"flavor": _flavor_of(trt), "version": trt.__version__}


def make_logger(trt, print_severity=None):
    """A TensorRT logger that keeps the errors it sees (for error messages) and prints those at least as
    severe as `print_severity` (default: errors) to stderr."""
    # Severity values: INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4 (pybind enums don't compare).
    shown = int(trt.ILogger.Severity.ERROR if print_severity is None else print_severity)

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, sev, msg):
            if int(sev) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if int(sev) <= shown:
                print(f"[TensorRT] {sev.name}: {msg}", file=sys.stderr)

    return _Logger()


# ---- TensorRT-RTX: the parser's unversioned library ------------------------------------------

def _loaded_library_dir(prefix: str) -> Path | None:
    """The folder of a shared library this process has loaded whose file name starts with `prefix`."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if Path(path).name.startswith(prefix):
            return Path(path).parent
    return None


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "promptmux" / "tensorrt_rtx"


def _symlink(target: Path, link: Path) -> None:
    """Create link -> target atomically (concurrent processes may race here)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def prepare_plugin_parser(trt=None) -> None:
    """Make sure TensorRT-RTX's ONNX parser can import plugin nodes without aborting the process.

    A no-op for TensorRT and off Linux. Raises RuntimeError saying what to do when the fix cannot be applied.
    """
    trt = trt or import_tensorrt()
    if _flavor_of(trt) != "tensorrt_rtx" or not sys.platform.startswith("linux"):
        return
    folder = _loaded_library_dir("libtensorrt_onnxparser_rtx.so")
    lib_dir = _loaded_library_dir("libtensorrt_rtx.so")
    if folder is None or lib_dir is None:
        return  # not the wheel layout we know (e.g. statically linked): nothing to fix
    link, target = folder / RTX_LIB, lib_dir / f"{RTX_LIB}.1"
    if link.exists():
        return
    try:
        _symlink(Path(target.name) if lib_dir == folder else target, link)
        return
    except OSError as e:
        why = f"{type(e).__name__}: {e}"
    # The folder is read-only. A library the loader finds by itself (LD_LIBRARY_PATH at start-up, ldconfig)
    # does as well.
    try:
        ctypes.CDLL(RTX_LIB)
        return
    except OSError:
        pass
    cache = _cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if not (cache / RTX_LIB).exists():
            _symlink(target, cache / RTX_LIB)
        alt = f"or start Python with LD_LIBRARY_PATH={cache}:$LD_LIBRARY_PATH (the link is there already)"
    except OSError:
        alt = "or create that link in any folder and start Python with LD_LIBRARY_PATH=<that folder>"
    raise RuntimeError(
        f"TensorRT-RTX's ONNX parser needs {link} (a symlink to {target}) to import the MPT plugin node, and "
        f"aborts the process without it; creating it failed ({why}). Fix: run `ln -s {target} {link}` as a user "
        f"who may write there, {alt}. (Building with use_plugin=False needs no link.)")


# ---- can engines run here? -------------------------------------------------------------------

def cuda_device(index: int = 0) -> dict | None:
    """{'name', 'compute_capability'} of CUDA device `index` through the driver API, or None (no driver/GPU)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count, dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= index:
        return None
    if cuda.cuDeviceGet(ctypes.byref(dev), index) != 0:
        return None
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, dev)
    return {"name": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"}


def _probe_engine(trt) -> tuple[bool, str]:
    """Build and load a one-layer engine: TensorRT itself tells whether it accepts this GPU."""
    logger = make_logger(trt, trt.ILogger.Severity.INTERNAL_ERROR)
    try:
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        x = network.add_input("x", trt.float32, (1,))
        network.mark_output(network.add_identity(x).get_output(0))
        plan = builder.build_serialized_network(network, builder.create_builder_config())
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan) if plan is not None else None
    except Exception as e:  # noqa: BLE001 - any failure means: cannot run here
        logger.errors.append(f"{type(e).__name__}: {e}")
        engine = None
    if engine is None:
        return False, "; ".join(logger.errors[-3:]) or "TensorRT could not load a test engine"
    return True, ""


def execution_support(trt=None) -> tuple[bool, str]:
    """(True, description) when engines can run here, else (False, why): build-only machines say so."""
    global _execution
    if _execution is None:
        try:
            trt = trt or import_tensorrt()
        except ImportError as e:
            _execution = (False, str(e))
            return _execution
        dev = cuda_device()
        name = version(trt)
        if dev is None:
            _execution = (False, f"no CUDA GPU here (no NVIDIA driver or no device); {name} can only build "
                                 + ("engines ahead of time on this machine" if _flavor_of(trt) == "tensorrt_rtx"
                                    else "engines on a machine with a GPU"))
        else:
            ok, why = _probe_engine(trt)
            where = f"{dev['name']} (compute capability {dev['compute_capability']})"
            _execution = (True, f"{name} runs engines on {where}") if ok else (
                False, f"{name} does not run engines on {where}: {why}")
    return _execution


class EngineError(RuntimeError):
    """A TensorRT engine cannot be built or loaded; the message says why and what to do."""
