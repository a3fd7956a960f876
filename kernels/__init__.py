"""Kernels for prompt composition: the Multitask Prompt Tuning prompt (reference implementation)."""

from .mpt_reference import mpt_prompt_concat, mpt_prompt_concat_reference

__all__ = ["mpt_prompt_concat", "mpt_prompt_concat_reference"]
