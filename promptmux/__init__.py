"""promptmux: deploy prompt-tuned transformers so that one engine serves every task.

Public API:
    export_deployment(base_dir, {"task": adapter_dir, ...}, out_dir, fold=None)
    Runtime(deploy_dir, backend="auto", precision="fp32", calibration=None, strict=False)
        backend: auto | onnxruntime | openvino | onnxruntime+openvino | onnxruntime-cuda | tensorrt | torch
        (runtime/backends.py); precision: fp32 (exact) | bf16 | int8 | fast, each non-exact one under an
        accuracy contract measured against fp32 (runtime/precision.py)
        .forward(input_ids, attention_mask, tasks) / .classify(texts, tasks, truncation=False)
        .generate(inputs, tasks, max_new_tokens=32, ...) / .generate_stream(...)
        .add_task(name, adapter_dir, persist=False) / .remove_task(name, persist=False)
    similar_tasks(deploy_dir, query, top_k=5, method="avg-cosine" | "per-token-cosine")
    init_adapter(deploy_dir, base_dir, out_dir, from_task=None, top_k=None, weighted=False,
                 kind="prompt-tuning" | "mpt-target", query=None)
"""

import importlib

__version__ = "0.1.0"

# Imported on first use: torch and transformers take over a second to import, which `promptmux --help`,
# `--version` and `tasks list` should not pay.
_EXPORTS = {
    "AdapterError": "promptmux.core.adapters",
    "load_adapter": "promptmux.core.adapters",
    "export_deployment": "promptmux.export.deploy",
    "LibraryError": "promptmux.library.prompts",
    "init_adapter": "promptmux.library.adapter_writer",
    "similar_tasks": "promptmux.library.retrieval",
    "UnknownTaskError": "promptmux.core.bank",
    "BackendUnavailable": "promptmux.runtime.errors",
    "InputError": "promptmux.runtime.errors",
    "Runtime": "promptmux.runtime.runtime",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'promptmux' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = [*_EXPORTS, "__version__"]
