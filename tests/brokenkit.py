"""Broken and hostile adapter folders, as an attacker would hand them to `POST /v1/tasks` or `promptmux tasks add`.

Each builder copies a good adapter and breaks one thing. CORRUPT: what every entry point must refuse with a
message (400 / exit 2). ESCAPES: files that lead outside the adapter root, refused only where a root applies."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _copy(src: Path, dest: Path) -> Path:
    if dest.exists() or dest.is_symlink():
        shutil.rmtree(dest) if dest.is_dir() and not dest.is_symlink() else dest.unlink()
    shutil.copytree(src, dest)
    return dest


def _weights(data: bytes):
    return lambda d: (d / WEIGHTS).write_bytes(data)


def _config(change):
    def apply(d: Path):
        cfg = json.loads((d / CONFIG).read_text())
        (d / CONFIG).write_text(json.dumps(change(cfg)))
    return apply


def _set(**kw):
    return _config(lambda cfg: {**cfg, **kw})


def _file_loop(d: Path):
    (d / CONFIG).unlink()
    os.symlink(d / "loop-b", d / CONFIG)
    os.symlink(d / CONFIG, d / "loop-b")


def _header(length: int, header: bytes) -> bytes:
    return struct.pack("<Q", length) + header


def _nan(d: Path):
    from safetensors.numpy import load_file, save_file

    w = load_file(str(d / WEIGHTS))
    key = next(k for k in w if "prompt_embeddings" in k)
    w[key] = w[key].copy()
    w[key].flat[0] = float("nan")  # a diverged training run's checkpoint
    save_file(w, str(d / WEIGHTS))


def _no_labels(d: Path):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    w = load_file(str(d / WEIGHTS))
    for key in [k for k in w if k.endswith(("classifier.weight", "classifier.bias"))]:
        w[key] = np.zeros((0, *w[key].shape[1:]), np.float32)  # init-adapter --num-labels 0 wrote this
    save_file(w, str(d / WEIGHTS))


CORRUPT = {  # name -> (break the copy, a word the message must contain)
    "st-nan": (_nan, "NaN or infinite values"),
    "st-head-no-labels": (_no_labels, "at least one output"),
    "cfg-nvt-over-positions": (_set(num_virtual_tokens=4096), "virtual tokens"),
    "st-random": (_weights(os.urandom(4096)), "safetensors"),
    "st-truncated": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:200]), "safetensors"),
    "st-header-2e62": (_weights(_header(1 << 62, b"{}")), "safetensors"),
    "st-empty": (_weights(b""), "safetensors"),
    "st-bad-json-header": (_weights(_header(9, b"{not json")), "safetensors"),
    "cfg-list": (_config(lambda cfg: [cfg]), "JSON object"),
    "cfg-not-json": (lambda d: (d / CONFIG).write_bytes(b"\xff{"), "JSON"),
    "cfg-nvt-missing": (_config(lambda cfg: {k: v for k, v in cfg.items() if k != "num_virtual_tokens"}),
                        "num_virtual_tokens"),
    "cfg-nvt-null": (_set(num_virtual_tokens=None), "num_virtual_tokens"),
    "cfg-nvt-string": (_set(num_virtual_tokens="4"), "num_virtual_tokens"),
    "cfg-nvt-float": (_set(num_virtual_tokens=4.5), "num_virtual_tokens"),
    "cfg-peft-type-list": (_set(peft_type=["PROMPT_TUNING"]), "prompt-learning"),
    "cfg-base-int": (_set(base_model_name_or_path=5), "base_model_name_or_path"),
    "cfg-base-long": (_set(base_model_name_or_path="a" * 5000), "base_model_name_or_path"),
    "cfg-symlink-loop": (_file_loop, "adapter_config.json"),
}


def build_corrupt(good: Path, root: Path) -> dict[str, str]:
    """The CORRUPT folders under root (rebuilt each time); returns name -> expected word."""
    out = {}
    for name, (damage, word) in CORRUPT.items():
        damage(_copy(good, root / name))
        out[name] = word
    loop = root / "dir-symlink-loop"
    if not loop.is_symlink():
        os.symlink(loop, loop)
    out["dir-symlink-loop"] = "adapter"
    return out


def build_escapes(good: Path, root: Path, outside: Path) -> dict[str, str]:
    """Adapters under root whose files lead outside it (outside: a folder beside root). Returns name -> the
    file that escapes. 'esc-base' names a base model folder outside whose config.json holds a secret."""
    outside.mkdir(exist_ok=True)
    (outside / "labels.json").write_text(json.dumps({"id2label": {"0": "SECRET-LABEL", "1": "b", "2": "c"}}))
    (outside / "config.json").write_text(json.dumps({"model_type": "SECRET-MODEL-TYPE", "vocab_size": 7}))
    shutil.copy(good / WEIGHTS, outside / WEIGHTS)
    shutil.copy(good / CONFIG, outside / CONFIG)
    out = {}
    for name in ("labels.json", WEIGHTS, CONFIG):
        d = _copy(good, root / f"esc-{name.split('.')[0]}")
        (d / name).unlink(missing_ok=True)
        os.symlink(outside / name, d / name)
        out[d.name] = name
    _set(base_model_name_or_path=str(outside))(_copy(good, root / "esc-base"))
    out["esc-base"] = "base_model_name_or_path"
    return out
