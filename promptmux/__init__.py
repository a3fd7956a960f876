"""promptmux: deploy prompt-tuned transformers so that one engine serves every task.

Public API:
    export_deployment(base_dir, {"task": adapter_dir, ...}, out_dir, fold=None)
    Runtime(deploy_dir, backend="onnxruntime" | "onnxruntime-cuda" | "tensorrt" | "torch")
        .forward(input_ids, attention_mask, tasks) / .classify(texts, tasks)
        .add_task(name, adapter_dir, persist=False) / .remove_task(name, persist=False)
    similar_tasks(deploy_dir, query, top_k=5, method="avg-cosine" | "per-token-cosine")
    init_adapter(deploy_dir, base_dir, out_dir, from_task=None, top_k=None, weighted=False,
                 kind="prompt-tuning" | "mpt-target", query=None)
"""

__version__ = "0.1.0"

from promptmux.export.adapters import AdapterError, load_adapter  # noqa: E402
from promptmux.export.deploy import export_deployment  # noqa: E402
from promptmux.export.library import LibraryError, init_adapter, similar_tasks  # noqa: E402
from promptmux.runtime.bank import UnknownTaskError  # noqa: E402
from promptmux.runtime.errors import BackendUnavailable  # noqa: E402
from promptmux.runtime.runtime import InputError, Runtime  # noqa: E402

__all__ = ["AdapterError", "LibraryError", "init_adapter", "similar_tasks", "BackendUnavailable", "InputError", "Runtime", "UnknownTaskError", "export_deployment", "load_adapter",
           "__version__"]
