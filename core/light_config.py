"""A deployment's model config without transformers, so that opening a deployment imports neither transformers
nor torch: on the MiniLM demo they were 1.7 s of a 2.0-s `Runtime()` (AMD Zen 4, 2 cores).

The export records the transformers config whole in the manifest (`base.config`: `to_dict()`, the class defaults
included, which config.json leaves out, and the class's `attribute_map`). LightConfig answers attribute reads from
it as the config object would (`hidden_size` through `attribute_map` to `n_embd`, ...). The runtime uses it where
the family has a row in core/archs.py; generic families (their rules read from the transformers classes) and
deployments exported before it load the transformers config as before. What needs the real config (reading an
adapter, building the PyTorch model) asks `Runtime.hf_config`.
"""

from __future__ import annotations

import json
from pathlib import Path


def config_record(config) -> dict | None:
    """What the manifest keeps of a transformers config (None for a multimodal one: its text config is nested)."""
    if config.get_text_config() is not config:
        return None
    return {"values": json.loads(config.to_json_string(use_diff=False)), "attribute_map": dict(getattr(type(config), "attribute_map", {}) or {})}


class LightConfig:
    def __init__(self, record: dict):
        self.__dict__["_values"] = record["values"]
        self.__dict__["_map"] = record["attribute_map"]

    def __getattr__(self, name: str):
        if name.startswith("__") or "_values" not in self.__dict__:  # copy/pickle probing a bare instance
            raise AttributeError(name)
        values = self.__dict__["_values"]
        key = self.__dict__["_map"].get(name, name)
        if key in values:
            return values[key]
        raise AttributeError(f"the deployment's {values.get('model_type')} config has no {name!r}")

    def __setattr__(self, name, value):
        raise AttributeError("a deployment's config is read-only")

    def get_text_config(self, *args, **kwargs) -> LightConfig:
        return self

    def to_dict(self) -> dict:
        return dict(self.__dict__["_values"])


def runtime_config(deploy_dir: Path, manifest: dict):
    """The config a Runtime reads: the manifest's record for a family with a row, else transformers'."""
    from .archs import ARCHS

    record = manifest.get("base", {}).get("config")
    if record and record["values"].get("model_type") in ARCHS:
        return LightConfig(record)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(deploy_dir))
