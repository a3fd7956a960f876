"""Cartridges (PEFT CARTRIDGE): a key/value prefix stored directly as parameters, [n, layers * 2 * kv_dim],
the first num_frozen_tokens of them frozen during training.

PEFT treats it like PREFIX_TUNING everywhere (peft_model.py: the same get_prompt and past_key_values path for
every task type), so it is served the same way: the same view/permute into per-layer keys/values, attended to as
a cache before the tokens, positions after the prefix. num_frozen_tokens only splits training.
"""

from .base import KVPrefixKind


class Cartridge(KVPrefixKind):
    name = "cartridge"
    peft_types = ("CARTRIDGE",)


KIND = Cartridge()
