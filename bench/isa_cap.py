"""Run a command as on a CPU with fewer instruction sets: `python -m promptmux.bench.isa_cap avx2 -- CMD ...`.

Users run promptmux on Intel Xeons with AMX and on AMD EPYC Zen 3 (AVX2 and FMA only), and a session here gets one
or the other. isa_cap.c, loaded with LD_PRELOAD, makes every library in the process and its children (PyTorch, MKL,
oneDNN, OpenVINO, ONNX Runtime's MLAS) see a CPU without the sets above the cap, through Linux's CPUID faulting, so
their kernels take the paths they take there; promptmux.runtime.cpu reports the capped flags and says the cap in
the model name, so fast and routing choose for the capped CPU and benchmarks record it.

What it is not: the cores, caches, memory and clock stay this machine's, so a capped Xeon is not a Zen 3 and its
numbers are labelled as capped, never as the other CPU's.

Caps: "avx2" (Zen 3's set: AVX2, FMA; no AVX-512, VNNI, bf16 or AMX), "avx512" (AVX-512 with VNNI and bf16, no
AMX: Zen 4's). Needs Linux on x86-64 with the cpuid_fault flag and a C compiler (`cc`) to build the library once.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from promptmux.runtime.cpu import host_flags

CAPS = ("avx2", "avx512")
SOURCE = Path(__file__).with_name("isa_cap.c")
ENV = "PROMPTMUX_ISA_CAP"


class CapUnavailable(RuntimeError):
    """This machine cannot cap instruction sets (the message says why and what to do)."""


def unavailable() -> str | None:
    """Why caps cannot run here, or None where they can."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"instruction-set caps need Linux on x86-64 (this is {sys.platform} on {platform.machine()})"
    flags = host_flags()
    if flags is None:
        return "instruction-set caps need /proc/cpuinfo's flags, which this system does not list"
    if "cpuid_fault" not in flags:
        return ("this CPU or hypervisor cannot fault on cpuid (no cpuid_fault flag in /proc/cpuinfo), which is how "
                "the cap hides instruction sets; run on a machine that has it")
    if not (shutil.which("cc") or shutil.which("gcc")):
        return "building the cap library needs a C compiler: install gcc (apt install gcc)"
    return None


def library() -> Path:
    """The cap library, built from isa_cap.c once per source version into the user cache."""
    if reason := unavailable():
        raise CapUnavailable(reason)
    source = SOURCE.read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "promptmux" / "isa-cap"
    built = cache / f"isa_cap-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if built.exists():
        return built
    cache.mkdir(parents=True, exist_ok=True)
    staged = built.with_suffix(f".{os.getpid()}.tmp")
    compiler = shutil.which("cc") or shutil.which("gcc")
    done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(staged), str(SOURCE), "-ldl"],
                          capture_output=True, text=True)
    if done.returncode:
        raise CapUnavailable(f"building {SOURCE.name} failed ({compiler}):\n{done.stderr.strip()}")
    os.replace(staged, built)  # another process building the same source at once writes the same file
    return built


def environ(cap: str, base: dict | None = None) -> dict:
    """`base` (default os.environ) with the cap loaded into every process started with it."""
    if cap not in CAPS:
        raise ValueError(f"unknown instruction-set cap {cap!r}: choose one of {', '.join(CAPS)}")
    env = dict(os.environ if base is None else base)
    preload = [str(library())] + [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    env["LD_PRELOAD"] = ":".join(preload)
    env[ENV] = cap
    return env


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] not in CAPS or argv[1] != "--":
        print(f"usage: python -m promptmux.bench.isa_cap {{{','.join(CAPS)}}} -- COMMAND [ARGS...]\n\n"
              + __doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        env = environ(argv[0])
    except CapUnavailable as e:
        print(f"promptmux isa_cap: {e}", file=sys.stderr)
        return 2
    command = argv[2:]
    if not shutil.which(command[0]):
        print(f"promptmux isa_cap: no command {command[0]!r} on PATH", file=sys.stderr)
        return 2
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    sys.exit(main())
