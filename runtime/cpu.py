"""The CPU this process runs on: its model name and the instruction-set flags that decide which precisions and
kernels are fast here. Machines differ (an Intel Xeon with AMX; an AMD EPYC with AVX2 only, or AVX-512 and
AVX512-BF16), so benchmarks record these and CI prints them."""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

from .errors import InputError

# The flags that matter for promptmux's CPU paths, as Linux names them in /proc/cpuinfo.
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


# The flags each instruction-set cap clears (bench/isa_cap.c: a benchmark or test run as on a CPU without them).
CAPPED = {"avx2": {"avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}, "avx512": {"amx_bf16", "amx_int8"}}


def isa_cap() -> str | None:
    """The cap bench/isa_cap.c puts on this process's instruction sets (every library's kernels then see a CPU
    without the sets above it), or None. Asked of the loaded library itself, so an environment variable alone
    cannot make promptmux believe in a cap the kernels do not have."""
    try:
        query = ctypes.CDLL(None).promptmux_isa_cap
    except (AttributeError, OSError, TypeError):  # TypeError: Windows has no handle for the process itself
        return None
    query.restype = ctypes.c_char_p
    cap = query()
    return cap.decode() if cap else None


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: the model from platform, the flags unknown
        return []


def cpu_model() -> str:
    """The CPU's model name; under an instruction-set cap, with the cap said."""
    name = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.lower().startswith("model name")),
                platform.processor() or platform.machine())
    cap = isa_cap()
    return f"{name} (capped to {cap})" if cap else name


def host_flags() -> set[str] | None:
    """Every flag the kernel lists for this CPU, before any cap; None where it lists none (not Linux)."""
    for line in _cpuinfo():
        if line.lower().startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def cpu_flags() -> dict[str, bool] | None:
    """{flag: present} for FLAGS, as this process's libraries see them (under a cap, without the capped ones), or
    None where the kernel does not list them (not Linux)."""
    present = host_flags()
    if present is None:
        return None
    present -= CAPPED.get(isa_cap(), set())
    return {f: f in present for f in FLAGS}


def describe() -> str:
    """One line: the model and which of FLAGS it has."""
    flags = cpu_flags()
    listed = "flags unknown" if flags is None else " ".join(f"{f}={'yes' if v else 'no'}" for f, v in flags.items())
    return f"{cpu_model()}: {listed}"


THREADS_ENV = "PROMPTMUX_THREADS"


def default_threads() -> int | None:
    """Threads a runtime uses when it is given none: PROMPTMUX_THREADS where set (several processes sharing the
    cores: servers on one machine, test workers), else None (each engine's own default: one per core)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise InputError(f"{THREADS_ENV}={value!r}: give a whole number of threads, 1 or more (or unset it: one "
                         "thread per core)")
    return int(value)
