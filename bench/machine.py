"""The machine a benchmark ran on (CPU, cores, versions, load, accelerator), the device a backend runs on, and
quiet library logging: what every benchmark records and does the same way."""

from __future__ import annotations

import os
import platform

import numpy as np

from promptmux.runtime.cpu import cpu_flags, cpu_model

from .measure import load_average, memory_method
from .settings import GPU_BACKENDS


def machine_info(threads: int) -> dict:
    import onnxruntime
    import peft
    import torch
    import transformers

    import promptmux

    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "numpy": np.__version__, "promptmux": promptmux.__version__},
        "load_average_start": load_average(),
    }


def environment(threads: int, backends: list[str]) -> dict:
    """machine_info (CPU, cores, versions, load) plus the accelerator, if a GPU backend runs."""
    import onnxruntime
    import torch

    m = machine_info(threads)
    m["onnxruntime_providers"] = onnxruntime.get_available_providers()
    m["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    m["memory_method"] = memory_method()
    try:
        import psutil

        m["memory_total_gb"] = round(psutil.virtual_memory().total / 1024**3, 1)
    except ImportError:
        pass
    return m


def device_of(backend: str, env: dict) -> str:
    if backend in GPU_BACKENDS:
        return f"GPU: {env.get('gpu') or 'unknown'}"
    threads = env["threads"]
    return f"CPU: {env['cpu_model']} ({env['cores']} cores, {threads} thread{'s' if threads != 1 else ''})"
