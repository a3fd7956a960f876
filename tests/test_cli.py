"""The command line, run as users run it: `python -m promptmux ...` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import VOCAB, adapter_configs, make_adapter, make_base


def promptmux(*args, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "promptmux", "--quiet", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp("cli")
    base = make_base("bert", root / "base")
    words = ["good", "bad", "film", "plot", "great", "awful", "the", "a", "is", "was"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    vocab += [f"w{i}" for i in range(VOCAB - len(vocab))]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(base)
    cfgs = adapter_configs("bert")
    adapters = {name: make_adapter("bert", base, cfgs[name], root / name, seed=i + 1)
                for i, name in enumerate(["pt", "prefix", "mpt"])}
    return {"root": root, "base": base, "adapters": adapters}


@pytest.fixture(scope="module")
def deployed(setup):
    out = setup["root"] / "deploy"
    proc = promptmux("export", "--base", setup["base"], *sum((["--adapter", f"{n}={p}"]
                     for n, p in setup["adapters"].items()), []), "--out", out)
    return out, json.loads(proc.stdout)


def test_export_reports_every_task(deployed):
    out, report = deployed
    assert report["tasks"] == ["pt", "prefix", "mpt/0", "mpt/1", "mpt/2"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"]["model_type"] == "bert" and len(manifest["base"]["config_sha256"]) == 64
    assert {t["kind"] for t in manifest["tasks"]} == {"prompt", "prefix", "mpt"}
    assert (out / "model.onnx").is_file() and (out / "model.onnx.data").is_file()
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()


def test_tasks_list_json(deployed):
    out, _ = deployed
    rows = json.loads(promptmux("tasks", out, "list", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["prefix"]["shapes"]["prefix"] == [2, 2, 4, 4, 8]
    assert by_name["mpt/1"]["shapes"] == {"shared": [4, 32], "cols": [4, 2], "rows": [2, 32]}


def test_run_prints_json_classification(deployed):
    out, _ = deployed
    result = json.loads(promptmux("run", out, "--task", "mpt/2", "--text", "the film was great").stdout)
    assert result["task"] == "mpt/2" and len(result["scores"]) == 3
    assert abs(sum(result["scores"]) - 1) < 1e-5 and result["label_id"] == max(range(3), key=result["scores"].__getitem__)


def test_run_unknown_task_is_a_clear_error(deployed):
    out, _ = deployed
    proc = promptmux("run", out, "--task", "nope", "--text", "good", check=False)
    assert proc.returncode == 2
    assert "unknown task 'nope'; this deployment serves: pt, prefix, mpt/0, mpt/1, mpt/2" in proc.stderr


def test_tasks_add_then_remove_without_reexport(deployed, setup):
    out, _ = deployed
    graph_before = (out / "model.onnx").stat().st_mtime_ns
    assert json.loads(promptmux("tasks", out, "add", f"pt2={setup['adapters']['pt']}").stdout) == {"added": ["pt2"]}
    assert "pt2" in [r["name"] for r in json.loads(promptmux("tasks", out, "list", "--json").stdout)]
    assert json.loads(promptmux("tasks", out, "remove", "pt2").stdout) == {"removed": ["pt2"]}
    assert (out / "model.onnx").stat().st_mtime_ns == graph_before


def test_verify_passes_for_the_exported_adapters(deployed, setup):
    out, _ = deployed
    proc = promptmux("verify", out, "--base", setup["base"],
                     *sum((["--adapter", f"{n}={p}"] for n, p in setup["adapters"].items()), []))
    lines = [line.split("\t") for line in proc.stdout.splitlines() if "\t" in line]
    assert [name for name, *_ in lines] == ["pt", "prefix", "mpt/0", "mpt/1", "mpt/2"]
    assert all(float(diff.split("=")[1]) < 1e-4 for _, diff, _ in lines)


def test_verify_fails_when_the_deployment_differs(deployed, setup):
    out, _ = deployed
    other = make_adapter("bert", setup["base"], adapter_configs("bert")["pt"], setup["root"] / "other", seed=99)
    proc = promptmux("verify", out, "--base", setup["base"], "--adapter", f"pt={other}", check=False)
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "differ from PEFT eager by more than 0.0001" in proc.stderr


def test_bad_adapter_flag(setup, tmp_path):
    proc = promptmux("export", "--base", setup["base"], "--adapter", "noequals", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "--adapter takes NAME=DIR, got 'noequals'" in proc.stderr


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    """A GPT-2 deployment with a word-level tokenizer that has no pad token (the runtime pads with EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("causal")
    base = make_base("gpt2", root / "base")
    vocab = {"<eos>": 0, "<unk>": 1} | {f"w{i}": i + 2 for i in range(VOCAB - 2)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>").save_pretrained(base)
    cfgs = adapter_configs("gpt2")
    prefix = make_adapter("gpt2", base, cfgs["prefix"], root / "prefix", seed=5)
    pt = make_adapter("gpt2", base, cfgs["pt"], root / "pt", seed=6)
    out = root / "deploy"
    promptmux("export", "--base", base, "--adapter", f"p={prefix}", "--adapter", f"pt={pt}", "--out", out)
    return {"deploy": out, "vocab": vocab}


def test_run_on_a_causal_lm_prints_next_token_candidates(causal):
    result = json.loads(promptmux("run", causal["deploy"], "--task", "p", "--text", "w3 w7 w9").stdout)
    top = result["next_token"]
    assert len(top) == 5 and top[0]["logit"] >= top[-1]["logit"]
    assert all(t["token"] in causal["vocab"] for t in top)


def test_generate_prints_the_runtimes_tokens_per_prompt(causal):
    from promptmux import Runtime

    prompts, tasks = ["w3 w7 w9", "w5 w2"], ["p", "pt"]
    proc = promptmux("generate", causal["deploy"], "--task", "p", "--task", "pt", "--prompt", prompts[0],
                     "--prompt", prompts[1], "--max-new-tokens", 6)
    rows = json.loads(proc.stdout)
    want = Runtime(causal["deploy"]).generate(prompts, tasks, max_new_tokens=6)
    assert [(r["task"], r["prompt"], r["token_ids"], r["text"]) for r in rows] == [
        (w["task"], p, w["token_ids"], w["text"]) for w, p in zip(want, prompts)]


def test_generate_stream_prints_the_same_text(causal):
    from promptmux import Runtime

    proc = promptmux("generate", causal["deploy"], "--task", "pt", "--prompt", "w4 w4 w8", "--max-new-tokens", 5,
                     "--stream")
    want = Runtime(causal["deploy"]).generate("w4 w4 w8", "pt", max_new_tokens=5)[0]["text"]
    assert proc.stdout == want + "\n"


@pytest.mark.parametrize("args,message", [
    (["--task", "nope", "--prompt", "w1"], "unknown task 'nope'"),
    (["--task", "p", "--prompt", "   "], "empty prompt"),
    (["--task", "p", "--prompt", "w1", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--task", "p", "--task", "pt", "--task", "p", "--prompt", "w1", "--prompt", "w2"], "got 3 --task for 2 --prompt"),
])
def test_generate_bad_input_is_a_clear_error(causal, args, message):
    proc = promptmux("generate", causal["deploy"], *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def _has_tensorrt() -> bool:
    from promptmux.runtime import trt_compat

    try:
        trt_compat.import_tensorrt()
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_tensorrt(), reason="no TensorRT here (pip install tensorrt-rtx-cu13-bindings "
                                                "tensorrt-rtx-cu13-libs)")
def test_build_engine_on_a_default_export_records_the_engine(deployed):
    """The default export is ONNX Runtime-optimized; build-engine exports a portable graph again on its own."""
    out, _ = deployed
    proc = promptmux("build-engine", out, "--max-batch", 2, "--max-seq", 8, "--max-prompt", 8)
    engines = json.loads(proc.stdout)["engines"]
    assert list(engines) == ["model"] and engines["model"]["plugin"]["layers"] == ["node_mpt_prompt_concat"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engines"]["model"]["sha256"] == engines["model"]["sha256"]
    assert (out / "model.engine").stat().st_size == engines["model"]["bytes"]


def test_build_engine_rejects_an_empty_profile(deployed):
    proc = promptmux("build-engine", deployed[0], "--max-batch", 0, check=False)
    assert proc.returncode == 2 and "--max-batch must be at least 1" in proc.stderr
