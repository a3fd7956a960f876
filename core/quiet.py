"""Keep library chatter off promptmux's own output (the exporters, the CLI and the benchmarks call this once)."""

from __future__ import annotations

import logging
import os
import warnings

CHATTY_LOGGERS = ("torch.onnx", "torch._dynamo", "torch.export", "onnxruntime", "onnxscript", "onnx_ir")


def quiet_libraries(all_warnings: bool = False) -> None:
    """Silence the exporters' notes (missing torchvision ops, pattern-matcher notes), transformers' loading bars
    and logs, and deprecation warnings meant for library authors. all_warnings: every Python warning (benchmarks
    print their own progress, and a warning in the middle of a table helps nobody)."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if all_warnings:
        warnings.filterwarnings("ignore")
    else:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
