"""The deployment folder: its file names, manifest and base-model files, and the one way to change it.

Every change of a deployment (tasks added or removed, an engine or a precision contract recorded) runs under
deployment_lock and replaces files durably (temp file, fsync, rename), so readers see the old state or the new
one and concurrent writers (CLI, Runtime(persist=True), the server) never lose each other's change.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

from .archs import arch_for, causal_classifier, check_config

MANIFEST = "manifest.json"
GRAPH = "model.onnx"
DECODER_GRAPH = "decoder.onnx"  # causal LMs: the cached graph for generation
FOLDED_GRAPH = "model_folded.onnx"
NOPREFIX_GRAPH = "model_noprefix.onnx"  # encoders: the graph for batches without a key/value prefix row
FORMAT_VERSION = 1


LOCK_FILE = ".promptmux.lock"
TEMP_PATTERNS = (".bank-*.tmp", ".manifest-*", ".calibration-*")  # what a change killed midway leaves behind


def load_base_config(base_dir: str | Path):
    from transformers import AutoConfig

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"base model folder {str(base_dir)!r} has no config.json; pass a folder written by save_pretrained"
        )
    config = AutoConfig.from_pretrained(str(base_dir))
    check_config(config)  # refuse unsupported families (and settings) early
    return config


def load_base_model(base_dir: str | Path, config=None, num_labels: int | None = None):
    """The base model in the head class PEFT uses for its task type, fp32, eval mode.

    num_labels: build the classification head with this many outputs (an adapter's saved head must fit).
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    config = config or load_base_config(base_dir)
    family = arch_for(config).family
    cls = {"encoder": AutoModelForSequenceClassification, "decoder": AutoModelForCausalLM,
           "seq2seq": AutoModelForSeq2SeqLM}[family]
    kwargs = {"num_labels": num_labels} if num_labels is not None else {}
    # T5's SDPA path reshapes a transposed output, which torch.export cannot trace with dynamic shapes.
    attn = "eager" if family == "seq2seq" else "sdpa"
    try:
        model = cls.from_pretrained(str(base_dir), dtype=torch.float32, attn_implementation=attn, **kwargs)
    except ValueError as e:  # a family without an SDPA path (Gemma2: attention logit soft-capping) runs eager
        if "scaled_dot_product_attention" not in str(e):
            raise
        model = cls.from_pretrained(str(base_dir), dtype=torch.float32, attn_implementation="eager", **kwargs)
    # The class it was loaded as, where the checkpoint says another (a causal LM's checkpoint as a classifier): the
    # graphs read the rules from the model's config.
    model.config.architectures = [type(model).__name__]
    return model.eval()


def config_hash(config) -> str:
    d = config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "architectures", "id2label", "label2id", "num_labels",
                     "dtype", "torch_dtype", "attn_implementation", "_attn_implementation_autoset"):
        d.pop(volatile, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _fsync(path: str | Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(tmp: str | Path, target: str | Path) -> None:
    """os.replace that survives a crash: the data is on disk before the rename, the rename before we return."""
    _fsync(tmp)
    os.replace(tmp, target)
    _fsync(Path(target).parent, directory=True)


def write_manifest(deploy_dir: str | Path, change) -> None:
    """Read manifest.json, change(manifest) in place, write it back durably. Callers outside a change of the
    bank hold deployment_lock around it (see update_manifest)."""
    path = Path(deploy_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=deploy_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=2)
        durable_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def update_manifest(deploy_dir: str | Path, key: str, value) -> None:
    """Set one manifest entry (an engine record, a precision contract) under the deployment's lock, so that it
    neither loses nor is lost to a concurrent task change."""
    with deployment_lock(deploy_dir):
        write_manifest(deploy_dir, lambda m: m.__setitem__(key, value))


@contextlib.contextmanager
def deployment_lock(folder: str | Path):
    """Serialises changes of a deployment folder across threads and processes (an exclusive flock on
    FOLDER/.promptmux.lock, released by the kernel if the holder dies). On entry nobody else is writing, so
    temp files found then are leftovers of a change killed midway: they are removed."""
    folder = Path(folder)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for pattern in TEMP_PATTERNS:
            for stale in folder.glob(pattern):
                stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)


def write_manifest_tasks(deploy_dir: str | Path, bank) -> None:
    """Refresh the manifest's task list after a bank change (the bank file is the source of truth; the list
    here is derived from it, and update_tasks rewrites it at every change)."""
    write_manifest(deploy_dir, lambda m: m.__setitem__("tasks", bank.describe()))


def update_tasks(deploy_dir: str | Path, spec, change):
    """Change the tasks of a deployment folder: under its lock, change(bank) on the bank as it is on disk now
    (not as some process read it earlier), then the bank and the manifest derived from it are committed.
    Concurrent changes (CLI, Runtime persist=True) are serialised, so none is lost. Returns change's result.

    The two files cannot be renamed as one: a crash between them leaves a manifest whose task list lags the
    bank. The bank is the truth (every reader of tasks reads it) and the next change rewrites the list."""
    from .bank import PromptBank

    with deployment_lock(deploy_dir):
        bank = PromptBank.load(deploy_dir, spec)
        result = change(bank)
        bank.save(deploy_dir)
        write_manifest_tasks(deploy_dir, bank)
    return result


def read_manifest(deploy_dir: str | Path) -> dict:
    """manifest.json of a deployment folder; a folder without one is refused, saying what to do."""
    path = Path(deploy_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{deploy_dir} is not a promptmux deployment (no {MANIFEST}); run promptmux export")
    return json.loads(path.read_text())


def read_bank(deploy_dir: str | Path, manifest: dict | None = None):
    """The deployment's prompt bank, its architecture taken from the manifest (no model config is loaded: fast)."""
    from .bank import PromptBank

    manifest = manifest or read_manifest(deploy_dir)
    spec = arch_for(manifest["base"]["model_type"])
    if spec.family == "decoder" and manifest["base"].get("family") == "encoder":  # a causal LM as a classifier
        spec = causal_classifier(spec)
    return PromptBank.load(deploy_dir, spec)

