"""The generation benchmark harness runs end to end (--quick: a tiny random GPT-2) and records what it must.

No timing is asserted: only that the harness measures both systems, checks their tokens agree and
writes the JSON and markdown results.
"""

from __future__ import annotations

import json

from promptmux.bench import generation


def test_quick_run_writes_results_and_tokens_agree(tmp_path):
    out = tmp_path / "results"
    result = generation.main(["--quick", "--models", "gpt2-small", "--batch-sizes", "1,2",
                              "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    data = json.loads((out / "generation-cpu-quick.json").read_text())
    assert data == json.loads(json.dumps(result))
    assert data["command"].startswith("python -m promptmux.bench.generation --quick")
    for key in ("date", "machine", "settings", "contention", "models", "skipped", "wall_seconds"):
        assert key in data, key
    m = data["machine"]
    for key in ("cpu_model", "cores", "threads", "load_average_start", "load_average_end"):
        assert key in m, key
    assert set(m["versions"]) >= {"torch", "onnxruntime", "transformers", "peft"}

    [model] = data["models"]
    assert model["model"] == "gpt2-small"
    rows = model["generation"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("tokens_per_s_promptmux", "tokens_per_s_peft", "speedup"):
            assert r[key] > 0, key
        assert r["tokens_agree"] is True, r["first_mismatch"]
        assert r["all_rows_generated_new_tokens"] is True
        assert r["profile_promptmux"]["session_run_calls"] == r["new_tokens"]
    assert rows[1]["padded_rows"] == 1  # row 1 of 2 is left padded

    for p in model["prefill"]:
        for key in ("ms_precompute", "ms_inline", "ratio"):
            assert p[key] > 0, key
        assert p["expected_ratio"] == round(p["prompt_tokens"] / (p["virtual_tokens"] + p["prompt_tokens"]), 3)
        assert p["first_token_agrees"] is True

    md = (out / "generation-cpu-quick.md").read_text()
    assert "| gpt2-small | 2 |" in md and "S/(P+S)" in md

    # A rerun reuses the cached model and adapters, and the deployment unless the export code changed.
    cache = tmp_path / "cache"
    cached = sorted(p.name for p in cache.iterdir() if not p.name.startswith("deploy-"))
    again = generation.main(["--quick", "--batch-sizes", "1", "--out", str(out), "--cache-dir", str(cache)])
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith("deploy-")) == cached
    if again["models"][0]["export_code"] == model["export_code"]:
        assert again["models"][0]["deployment"] == model["deployment"]


def test_unknown_model_is_refused():
    import pytest

    with pytest.raises(SystemExit):
        generation.main(["--quick", "--models", "gpt5"])
