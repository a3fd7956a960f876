"""`promptmux export`: base model + PEFT prompt adapters -> a deployment folder.

The folder holds:
    model.onnx (+ model.onnx.data)   the frozen backbone, every prompt a graph input
    model_folded.onnx (+ .data)      with --fold TASK: that task's prompt baked in as constants
    tasks.sqlite                     the prompt bank: one record per task (see core/bank.py)
    manifest.json                    graphs, shapes, dtypes, base model identity, versions (not the tasks)
    config.json, tokenizer files     what the runtime needs to prepare inputs
It is written into a temporary folder beside the target and renamed into place at the end,
so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
import uuid
from pathlib import Path

import numpy as np

from promptmux.core.adapters import AdapterError, load_adapter
from promptmux.core.archs import UnsupportedModelError, arch_for, dims_of, for_task_type, position_offset
from promptmux.core.bank import STORE_FILE
from promptmux.core.durable import as_created_tree
from promptmux.core.folder import (
    DECODER_GRAPH,
    FOLDED_GRAPH,
    FORMAT_VERSION,
    GRAPH,
    MANIFEST,
    NOPREFIX_GRAPH,
    check_out_folder,
    config_hash,
    load_base_config,
    load_base_model,
)
from promptmux.core.light_config import config_record
from promptmux.core.quiet import quiet_libraries
from promptmux.core.task import Task

log = logging.getLogger("promptmux.export")

def base_head_weights(model, config) -> dict[str, np.ndarray]:
    spec = arch_for(config)
    out = {}
    for layer in spec.head:
        module = model.get_submodule(layer.module)
        out[f"{layer.module}.weight"] = module.weight.detach().float().numpy().copy()
        if module.bias is not None:
            out[f"{layer.module}.bias"] = module.bias.detach().float().numpy().copy()
    return out


def _task_type(adapters: dict[str, str | Path]) -> str | None:
    """The first adapter's PEFT task type (a causal LM is exported as a classifier for SEQ_CLS adapters); None if it
    cannot be read, which read_adapters then reports."""
    from promptmux.core.adapters import read_adapter_config

    try:
        return read_adapter_config(next(iter(adapters.values()))).get("task_type")
    except (AdapterError, OSError, StopIteration):
        return None


def read_adapters(adapters: dict[str, str | Path], config) -> list[Task]:
    tasks: list[Task] = []
    for name, adapter_dir in adapters.items():
        tasks.extend(load_adapter(name, adapter_dir, config))
    seen = set()
    for t in tasks:
        if t.name in seen:
            raise AdapterError(f"task name {t.name!r} appears twice; give each adapter a distinct NAME")
        seen.add(t.name)
    return tasks


# The manifest's record of a causal LM's cached decoder graph.
CAUSAL_DECODER = {"file": DECODER_GRAPH, "cache": "past_key_values.{i}.key/value -> present.{i}.key/value"}


def export_deployment(
    base_dir: str | Path,
    adapters: dict[str, str | Path],
    out_dir: str | Path,
    fold: str | None = None,
    overwrite: bool = False,
    optimize: bool = False,
    tolerance: float = 1e-4,
    quiet: bool = False,
    generation_only: bool = False,
) -> Path:
    """Export the base model once with every adapter's task in the bank. Returns the deployment folder.

    generation_only: a causal LM's cached decoder graph alone, without the full-sequence graph that forward()
    (logits for every token) runs: half the export time of a causal LM, for deployments that only generate."""
    from promptmux.core.bank import PromptBank
    from promptmux.progress import StepBar

    inputs = {"the base model": base_dir, **{f"adapter {n}": p for n, p in adapters.items()}}
    out_dir = check_out_folder(Path(out_dir), overwrite, inputs)
    if not adapters:
        raise AdapterError("no adapters given; pass at least one --adapter NAME=DIR")
    config = for_task_type(load_base_config(base_dir), _task_type(adapters))
    spec, dims = arch_for(config), dims_of(config)
    tasks = read_adapters(adapters, config)  # validate everything before the slow part
    if fold is not None and spec.family.encoder_decoder:
        raise AdapterError("--fold is for encoder and causal LM deployments; a seq2seq deployment has no folded graph")
    refused = _generation_only_refusal(spec, config, fold, optimize) if generation_only else None
    if refused:
        raise AdapterError(refused)
    if fold is not None and fold not in {t.name for t in tasks}:
        raise AdapterError(f"--fold {fold!r} names no task; tasks are: {', '.join(t.name for t in tasks)}")

    quiet_libraries()
    noprefix = _writes_noprefix(spec, optimize)
    steps = 4 + bool(fold) + spec.family.decoder_graph + noprefix + spec.verify_at_export - 2 * generation_only
    with StepBar(steps, "export", quiet) as bar:
        bar.step("loading base model")
        model = load_base_model(base_dir, config)
        bank = PromptBank(spec, base_head_weights(model, config) if spec.head else None)
        bank.add(tasks)
        bar.update()
        _write_deployment(base_dir, out_dir, config, spec, dims, model, bank, fold, optimize, tolerance, bar,
                          adapters, generation_only, lambda: check_out_folder(out_dir, overwrite, inputs))
    return out_dir


def _exporter_failure(e: Exception, config) -> Exception:
    """An error of torch.onnx's exporter (or onnxscript's passes) as a refusal saying which model it could not trace
    and why in a line, instead of hundreds of lines of exporter report; anything else as it is."""
    if type(e).__module__.split(".")[0] not in ("torch", "onnxscript", "onnx_ir", "onnx", "onnxruntime"):
        return e  # (onnxruntime: the exported graph's check, an operator it lacks for this model)
    text = str(e)
    summary = text.split("Exception summary", 1)[-1] if "Exception summary" in text else text
    reason = next((line.strip() for line in summary.splitlines() if line.strip() and "⬆" not in line), "")[:300]
    return UnsupportedModelError(
        f"the ONNX export of this {config.model_type} model fails ({type(e).__name__}: {reason}); promptmux "
        "cannot serve it yet. Nothing was written. Please report it with the base model's config.")


def _writes_noprefix(spec, optimize: bool) -> bool:
    """Whether the export writes the graph without prefix inputs (the progress bar counts it as a step)."""
    return spec.family.noprefix_graph and spec.supports_prefix and not optimize


def _generation_only_refusal(spec, config, fold, optimize) -> str | None:
    """Why --generation-only cannot make this deployment, or None."""
    if spec.family.generation != "causal":
        return (f"--generation-only is for causal LMs; {spec.family.words} need their full-sequence graph "
                f"({'their encoder, to generate' if spec.family.generation else 'it classifies'})")
    if fold is not None or optimize:
        return f"--generation-only leaves out the full-sequence graph that {'--fold' if fold else '--ort-optimize'} " \
               "makes; drop one of them"
    if spec.verify_at_export:
        return (f"--generation-only leaves out the full-sequence graph the export verifies {config.model_type} with "
                "(it runs on the generic rules, core/archs.py); export without --generation-only")
    return None


def _write_deployment(base_dir, out_dir: Path, config, spec, dims, model, bank, fold, optimize, tolerance, bar,
                      adapters, generation_only: bool = False, check_out=lambda: None):
    """Everything into a temporary folder beside out_dir, renamed into place at the end: an error or Ctrl-C
    (or, for a family on the generic rules, a difference from PEFT) leaves nothing behind."""
    from promptmux import __version__
    from promptmux.core.io_spec import input_names
    from promptmux.progress import raise_if_interrupted

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # The exporters' native extensions are imported before the temporary folder exists: a Ctrl-C that lands inside
    # a C++ module's import aborts the process (no Python exception, no cleanup), so it must not leave a folder.
    from . import onnx_export, seq2seq_export  # noqa: F401

    # Made inside the try: a Ctrl-C that lands after mkdtemp's mkdir and before a try is entered left the folder
    # behind (seen once in CI, 2026-12-05, under load: test_ctrl_c_during_export_...). The random name is chosen
    # first (uuid4: 122 random bits, so the folder removed on a failure is this export's own).
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir(mode=0o700)
        try:
            if spec.family.encoder_decoder:
                report, decoder = _export_seq2seq(model, config, dims, bank, tmp, tolerance, bar)
            else:
                report, decoder = _export_graphs(model, config, spec, dims, bank, tmp, fold, optimize, tolerance,
                                                 bar, generation_only)
        except Exception as e:
            raise _exporter_failure(e, config) from e
        folded = {"task": fold, "file": FOLDED_GRAPH, "digest": bank.digest(fold)} if fold else None

        bar.step("writing bank, tokenizer, manifest")
        bank.save(tmp)
        config.save_pretrained(tmp)
        _copy_generation_config(base_dir, tmp)
        _copy_tokenizer(base_dir, tmp)
        manifest = {
            "format": FORMAT_VERSION,
            "promptmux_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "base": {
                "path": str(Path(base_dir).resolve()),
                "model_type": config.model_type,
                "config_sha256": config_hash(config),
                "config": config_record(config),  # read by the runtime without transformers (core/light_config.py)
                "family": spec.family.name,
                "dims": dims.__dict__,
            },
            # generation_only: no full-sequence graph (file null); forward() refuses, generation runs the decoder
            "graph": {"file": None if generation_only else GRAPH, "inputs": input_names(spec),
                      "output": spec.family.graph_output,
                      "dtype": "float32", **report},
            "folded": folded,
            "decoder": decoder,
            # The tasks live in the store (listing reads it): a change never rewrites the manifest.
            "bank": {"store": STORE_FILE, "engine": "sqlite-wal", "tasks_at_export": len(bank)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        bar.update()
        if spec.verify_at_export:
            manifest["graph"]["verified_against_peft"] = _verify_generic(tmp, base_dir, adapters, config,
                                                                         tolerance, bar)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        raise_if_interrupted()  # a Ctrl-C that a callback swallowed still leaves nothing behind
        check_out()  # again: a folder made at --out meanwhile (another export, a user) is not replaced unasked
        as_created_tree(tmp)  # private while written; readable as any folder once in place
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _export_graphs(model, config, spec, dims, bank, tmp: Path, fold, optimize, tolerance, bar, generation_only=False):
    """Encoder classifiers and causal LMs: the full-sequence graph (+ cached decoder, + folded graph); a causal LM
    generation_only: the cached decoder alone."""
    import torch

    from promptmux.core.graph import PromptedBackbone, PromptedDecoder
    from promptmux.core.io_spec import input_names
    from promptmux.core.layout import build_layout

    from .onnx_export import (
        OPSET,
        check_graph,
        export_decoder_onnx,
        export_onnx,
        fold_task,
        optimize_onnx,
        share_weights,
    )

    if generation_only:
        bar.step("exporting cached decoder graph")
        export_decoder_onnx(PromptedDecoder(model), config, tmp / DECODER_GRAPH)
        bar.update()
        return {"opset": OPSET, "generation_only": True}, dict(CAUSAL_DECODER)
    backbone = PromptedBackbone(model)
    bar.step("exporting ONNX graph")
    export_onnx(backbone, config, tmp / GRAPH)
    bar.update()

    # Check (and optimize) on a mixed batch of every task.
    feeds = _check_batch(spec, config, dims, bank)
    with torch.inference_mode():
        reference = backbone(*[torch.from_numpy(feeds[n]) for n in input_names(spec)]).numpy()
    bar.step("checking against PyTorch" + (", optimizing with ONNX Runtime" if optimize else ""))
    report = {"opset": OPSET, "checked_max_abs_diff": check_graph(tmp / GRAPH, feeds, reference, tolerance)}
    if optimize:
        report["ort_optimization"] = optimize_onnx(tmp / GRAPH, config, feeds, reference, tolerance)
    bar.update()

    if _writes_noprefix(spec, optimize):
        # Batches with no prefix row run a graph without prefix inputs: no empty cache concatenated in every layer
        # (3-4 % of a MiniLM forward at B = 32, results/graph-overhead.md). It shares model.onnx's weights.
        bar.step("exporting the graph without prefix inputs")
        export_onnx(backbone, config, tmp / NOPREFIX_GRAPH, prefix=False)
        share_weights(tmp / NOPREFIX_GRAPH, tmp / GRAPH)
        plain = _check_batch(spec, config, dims, bank, prefix=False)
        with torch.inference_mode():
            want = backbone(*[torch.from_numpy(plain[n]) for n in input_names(spec)
                              if n in plain]).numpy()
        report["noprefix"] = {"file": NOPREFIX_GRAPH,
                              "checked_max_abs_diff": check_graph(tmp / NOPREFIX_GRAPH, plain, want, tolerance)}
        bar.update()

    decoder = None
    if spec.family.decoder_graph:
        bar.step("exporting cached decoder graph")
        export_decoder_onnx(PromptedDecoder(model), config, tmp / DECODER_GRAPH)
        decoder = dict(CAUSAL_DECODER)
        bar.update()

    if fold is not None:
        bar.step(f"folding task {fold}")
        one = build_layout(spec, position_offset(config), config.pad_token_id, feeds["input_ids"][:1],
                           np.ones_like(feeds["input_ids"][:1]), None, [bank.view(fold)], dims)
        export_onnx(fold_task(backbone, one.feeds), config, tmp / FOLDED_GRAPH, folded=True)
        bar.update()
    return report, decoder


def _export_seq2seq(model, config, dims, bank, tmp: Path, tolerance, bar):
    """T5 and BART families: the prompted encoder as the deployment's graph, and the cached decoder step.

    ORT's transformer optimizer has no pattern for these graphs; sessions still apply ORT's own
    optimizations at load. Both graphs are checked against PyTorch on a mixed batch of every task.
    """
    from promptmux.core.layout import encoder_layout
    from promptmux.core.seq2seq_graph import PromptedEncoder, decoder_step

    from .seq2seq_export import (
        check_against_torch,
        export_decoder_step_onnx,
        export_encoder_onnx,
    )

    encoder, step = PromptedEncoder(model), decoder_step(model)
    bar.step("exporting encoder graph")
    export_encoder_onnx(encoder, config, tmp / GRAPH)
    bar.update()
    bar.step("exporting cached decoder graph")
    export_decoder_step_onnx(step, config, tmp / DECODER_GRAPH)
    bar.update()
    bar.step("checking against PyTorch")
    ids, mask, views = _check_rows(dims, bank)
    feeds = encoder_layout(arch_for(config), config.pad_token_id, ids, mask, views, dims).feeds
    diff = check_against_torch(encoder, step, tmp / GRAPH, tmp / DECODER_GRAPH, feeds)
    if not diff <= tolerance:
        raise RuntimeError(f"the exported seq2seq graphs differ from PyTorch by {diff:.2e} relative (> {tolerance:g}); "
                           "please report this with the base model's config")
    bar.update()
    decoder = {"file": DECODER_GRAPH, "encoder": GRAPH,
               "cache": "past_key_values.{i}.decoder/encoder.key/value -> present.{i}.decoder.key/value"}
    return {"checked_max_rel_diff": diff}, decoder


def _verify_generic(deploy: Path, base_dir, adapters, config, tolerance: float, bar) -> dict[str, float]:
    """A model type with no row in core/archs.py, or a causal LM as a classifier, runs on the generic rules: the
    written deployment against PEFT eager on a padded mixed batch of every task, refused (UnsupportedModelError)
    where a task differs."""
    from .verify import verify

    what = "a classifier of a causal LM" if arch_for(config).feature == "last" else f"{config.model_type}"
    bar.step(f"verifying against PEFT ({what} runs on the generic rules)")
    details: dict = {}
    try:
        verify(deploy, base_dir, adapters, rows_per_task=2, seq=8, quiet=True, details=details)
    except (TypeError, AttributeError, IndexError, KeyError, RuntimeError) as e:
        if not any("/peft/" in frame.filename for frame in traceback.extract_tb(e.__traceback__)):
            raise  # not PEFT's own forward failing: a bug to see whole
        raise UnsupportedModelError(
            f"model type {config.model_type!r} has no row in promptmux's table, so its deployment is checked against "
            f"PEFT, and PEFT itself fails on these adapters ({type(e).__name__}: {str(e)[:200]}): there is nothing "
            "to check it against. Nothing was written. Export the adapter kinds PEFT runs on this model") from e
    bad = {t: d for t, d in details.items() if not d["max_abs_diff"] <= tolerance * max(1.0, d["scale"])}
    if bad:
        worst = "; ".join(f"task {t!r}: greedy tokens differ from PEFT's generate on {int(sum(d['rows']))} of "
                          f"{len(d['rows'])} rows" if d.get("tokens") else
                          f"task {t!r}: rows differ by {', '.join(f'{x:.2e}' for x in d['rows'])} (PEFT's outputs "
                          f"reach {d['scale']:.3g})" for t, d in bad.items())
        rules = ("as a sequence classifier runs on the generic rules (transformers' score head on the last token)"
                 if arch_for(config).feature == "last" else "has no row in promptmux's table")
        raise UnsupportedModelError(
            f"model type {config.model_type!r} {rules} and its deployment does not compute "
            f"what PEFT computes (tolerance {tolerance:g}, scaled by the outputs): {worst}. Nothing was written. "
            "Please report it with the base model's config, or add a row to core/archs.py (ARCHITECTURE.md: "
            "'A model family')")
    bar.update()
    return {t: d["max_abs_diff"] for t, d in details.items()}


def _check_rows(dims, bank):
    """Token ids, mask and task views of a mixed batch over every task (two rows each, one padded)."""
    names = bank.names()
    rng = np.random.default_rng(0)
    rows = 2 * len(names)
    seq = 6
    low = 5 if dims.vocab_size > 10 else 0
    ids = rng.integers(low, dims.vocab_size, size=(rows, seq))
    mask = np.ones_like(ids)
    mask[1::2, -2:] = 0
    return ids, mask, [bank.view(n) for n in names for _ in range(2)]


def _check_batch(spec, config, dims, bank, prefix: bool = True) -> dict[str, np.ndarray]:
    """A mixed batch over every task (two rows each, one of them padded) for checking the export; prefix=False:
    laid out for the graph without prefix inputs (key/value prefix rows then carry their tokens only, which is
    what that graph computes for them)."""
    from promptmux.core.layout import build_layout

    ids, mask, prompts = _check_rows(dims, bank)
    return build_layout(spec, position_offset(config), config.pad_token_id, ids, mask, None, prompts, dims,
                        min_slots=1 if prefix else 0, prefix=None if prefix else False).feeds


def _copy_generation_config(base_dir: str | Path, dest: Path) -> None:
    """The base model's generation_config.json, if it has one: the seq2seq generator applies its forced first and
    last tokens as transformers' generate does (BART's EOS)."""
    if (Path(base_dir) / "generation_config.json").is_file():
        shutil.copyfile(Path(base_dir) / "generation_config.json", dest / "generation_config.json")


def _copy_tokenizer(base_dir: str | Path, dest: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base_dir))
    except (OSError, ValueError, TypeError, ImportError) as e:  # ImportError: its tokenizer needs sentencepiece
        log.warning("no tokenizer in %s (%s); the deployment will take token ids only", base_dir, e)
        return
    if len(tok) <= len(set(tok.all_special_ids)):  # transformers makes an empty one for a folder without files
        log.warning("no tokenizer in %s (no vocabulary beyond its special tokens); the deployment will take token ids "
                    "only", base_dir)
        return
    tok.save_pretrained(str(dest))


def _replace_dir(src: Path, dest: Path) -> None:
    """Move a finished folder into place; an existing one is kept until the new one is there."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(src, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)


