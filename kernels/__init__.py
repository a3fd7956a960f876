"""Kernels for prompt composition: the Multitask Prompt Tuning prompt.

mpt_reference: the PyTorch reference (and the custom op the exporter turns into one ONNX node);
mpt_triton: the fused Triton kernel, its CPU path and a dispatcher; tensorrt_plugin: the TensorRT plugin.
"""

from .mpt_reference import mpt_prompt_concat, mpt_prompt_concat_reference

_TRITON = ("mpt_prompt_concat_fused", "mpt_prompt_concat_torch", "mpt_prompt_concat_triton")


def __getattr__(name):
    # The Triton module imports triton (a second of start-up, and the interpreter mode is fixed then):
    # load it only when asked for, not with every export.
    if name in _TRITON:
        from . import mpt_triton

        return getattr(mpt_triton, name)
    if name == "register_tensorrt_plugins":
        from .tensorrt_plugin import register_tensorrt_plugins

        return register_tensorrt_plugins
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["mpt_prompt_concat", "mpt_prompt_concat_reference", *_TRITON, "register_tensorrt_plugins"]
