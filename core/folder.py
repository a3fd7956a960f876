"""The deployment folder: its file names, manifest and base-model files, and the one way to change it.

Tasks change in the prompt bank's store, one transaction each (core/bank.py; update_tasks). Every other change
(an engine or a precision contract recorded, an old bank migrated) runs under deployment_lock and replaces files
durably (temp file, fsync, rename), so readers see the old state or the new one and concurrent writers (CLI,
Runtime(persist=True), the server) never lose each other's change.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path

from .archs import ARCHS, arch_for, causal_classifier, check_config, is_causal_lm, windows_off
from .durable import durable_replace, write_durably
from .families import family_of

MANIFEST = "manifest.json"
GRAPH = "model.onnx"
DECODER_GRAPH = "decoder.onnx"  # causal LMs: the cached graph for generation
FOLDED_GRAPH = "model_folded.onnx"
NOPREFIX_GRAPH = "model_noprefix.onnx"  # encoders: the graph for batches without a key/value prefix row
FORMAT_VERSION = 1


LOCK_FILE = ".promptmux.lock"
TEMP_PATTERNS = (".tasks-*.tmp", ".manifest-*", ".calibration-*")  # what a change killed midway leaves behind


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

    config = config or load_base_config(base_dir)
    family = arch_for(config).family
    cls = family.auto_class()
    kwargs = {"num_labels": num_labels} if num_labels is not None else {}
    unwindowed = windows_off(config)  # what the graphs compute: rows fit the window, padding slots must not count
    if unwindowed is not config:
        if num_labels is not None:  # given with a config object, from_pretrained would pass it to the model
            unwindowed.num_labels = kwargs.pop("num_labels")
        kwargs["config"] = unwindowed
    # T5's SDPA path reshapes a transposed output, which torch.export cannot trace with dynamic shapes.
    attn = "eager" if family.encoder_decoder else "sdpa"
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


def write_manifest(deploy_dir: str | Path, change) -> None:
    """Read manifest.json, change(manifest) in place, write it back durably. Callers outside a change of the
    bank hold deployment_lock around it (see update_manifest)."""
    path = Path(deploy_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    write_durably(path, json.dumps(manifest, indent=2))


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
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask: a group shares the lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for pattern in TEMP_PATTERNS:
            for stale in folder.glob(pattern):
                stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)


def update_tasks(deploy_dir: str | Path, spec, change):
    """Change the tasks of a deployment folder: change(bank) on its store, where each add or remove is one
    transaction (SQLite serialises writers across processes, so concurrent changes from the CLI, runtimes and
    servers are all kept). The manifest does not list tasks, so nothing else is rewritten: a change costs the same
    with two tasks or a million. A deployment written before the store is migrated first (migrate_bank). Returns
    change's result."""
    from .bank import STORE_FILE, PromptBank

    deploy_dir = Path(deploy_dir)
    if not (deploy_dir / STORE_FILE).is_file():
        migrate_bank(deploy_dir, spec)
    bank = PromptBank.load(deploy_dir, spec)
    try:
        return change(bank)
    finally:
        bank.close()


def migrate_bank(deploy_dir: str | Path, spec) -> None:
    """bank.safetensors (the bank before the store) -> tasks.sqlite, under the deployment's lock: the store is
    written to a temporary file and renamed into place, then the manifest records it and drops its task list, then
    the old file goes. A migration killed midway leaves the old bank (and a temporary file the next change removes)
    or the new store, which readers prefer."""
    from .bank import DEFAULT_CACHE_BYTES, LEGACY_FILE, STORE_FILE, PromptBank
    from .bank_legacy import load_legacy

    deploy_dir = Path(deploy_dir)
    with deployment_lock(deploy_dir):
        if (deploy_dir / STORE_FILE).is_file():
            return  # another process migrated it meanwhile
        bank = load_legacy(PromptBank, deploy_dir, spec, DEFAULT_CACHE_BYTES)
        tmp = deploy_dir / f".tasks-{os.getpid()}.tmp"
        try:
            bank.save_as(tmp)
            durable_replace(tmp, deploy_dir / STORE_FILE)
        finally:
            tmp.unlink(missing_ok=True)

        def record(manifest):
            manifest.pop("tasks", None)
            manifest["bank"] = {"store": STORE_FILE, "engine": "sqlite-wal", "migrated_from": LEGACY_FILE,
                                "tasks_at_migration": len(bank)}

        write_manifest(deploy_dir, record)
        (deploy_dir / LEGACY_FILE).unlink(missing_ok=True)


def read_manifest(deploy_dir: str | Path) -> dict:
    """manifest.json of a deployment folder; a folder without one is refused, saying what to do."""
    path = Path(deploy_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{deploy_dir} is not a promptmux deployment (no {MANIFEST}); run promptmux export")
    return json.loads(path.read_text())


def read_bank(deploy_dir: str | Path, manifest: dict | None = None, cache_bytes: int | None = None):
    """The deployment's prompt bank, its architecture taken from the manifest (no model config is loaded: fast).
    Opening reads no task: each is read from the store when first used (cache_bytes: the hot views kept)."""
    from .bank import DEFAULT_CACHE_BYTES, PromptBank

    manifest = manifest or read_manifest(deploy_dir)
    model_type = manifest["base"]["model_type"]
    if model_type not in ARCHS and not is_causal_lm(model_type):  # an encoder on generic rules: read from its config
        from transformers import AutoConfig

        spec = arch_for(AutoConfig.from_pretrained(str(deploy_dir)))
    else:
        spec = arch_for(model_type)
    recorded = manifest["base"].get("family")
    if recorded and family_of(recorded).classifies and not spec.family.classifies:  # a causal LM as a classifier
        spec = causal_classifier(spec)
    return PromptBank.load(deploy_dir, spec, DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes)


def check_out_folder(out_dir: Path, overwrite: bool, inputs: dict[str, str | Path], what: str = "a deployment",
                     replaceable=None, flag: str = "--overwrite") -> Path:
    """The folder to write (--out resolved: `.`, `..`, a link to a folder: the folder it names), refusing an --out
    that would lose data: a file, a link to nothing, a non-empty folder without `flag`, and with it one that holds
    what this command reads or that is not `what` (replaceable(folder); default: a deployment)."""
    if out_dir.is_symlink() and not out_dir.exists():
        raise FileExistsError(f"{out_dir} is a link to nothing ({os.readlink(out_dir)}); --out names a folder")
    out = out_dir.resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out_dir} is a file; --out names the folder to write {what} in")
    if not out.exists() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another --out" +
                              (f" or pass {flag}" if flag else ""))
    for name, path in inputs.items():
        if path is not None and Path(path).resolve().is_relative_to(out):
            raise FileExistsError(f"--out {out_dir} holds {name} ({path}) that this command reads; {flag} would "
                                  "delete it: choose another --out")
    if not (replaceable or (lambda folder: (folder / MANIFEST).is_file()))(out):
        raise FileExistsError(f"{out_dir} is not {what} written by promptmux; {flag} replaces only that: choose "
                              "another --out, or remove the folder yourself")
    return out
