"""Prefix tuning / P-tuning v2 (PEFT PREFIX_TUNING): per-layer key/value prefixes, the view/permute of PEFT's
get_prompt, attended to as a cache before the tokens."""

from .base import KVPrefixKind


class Prefix(KVPrefixKind):
    name = "prefix"
    peft_types = ("PREFIX_TUNING",)


KIND = Prefix()
