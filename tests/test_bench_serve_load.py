"""The serving load benchmark runs end to end against a tiny deployment and records what it must (no timing is
asserted: the numbers are recorded by a real run on the demo, results/serve-cpu.md)."""

from __future__ import annotations

import json

import servekit

from promptmux.bench import serve_load


def test_serve_load_writes_results_per_task_and_scenario(tmp_path, text_deployments):
    """From a cold server (no warm-up) with a task added and removed under the mixed load: no request fails."""
    d = text_deployments["bert"]
    result = serve_load.main([str(d.deploy), "--requests", "40", "--repeats", "1", "--concurrency", "8",
                              "--max-chars", "40", "--warmup", "0",
                              "--hot-swap", str(d.adapters[servekit.EXTRA_ADAPTER]),
                              "--out", str(tmp_path), "--name", "smoke"])
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert data == json.loads(json.dumps(result))
    assert data["command"].startswith("python -m promptmux.bench.serve_load ")
    assert data["settings"]["warmup"] == 0 and data["server_ready_s"] > 0 and data["prepared"]
    assert set(data["scenarios"]) == {f"single:{t}" for t in d.tasks} | {"mixed", "sequential"}
    for label, sc in data["scenarios"].items():
        swapped = 30 if label == "mixed" else 0  # 3 rounds of 10 requests for the added task
        assert sc["all"]["errors"] == 0 and sc["all"]["requests"] == (20 if label == "sequential" else 40 + swapped)
        assert sc["all"]["overloaded"] == 0
        assert all(t["p50_ms"] <= t["p95_ms"] <= t["p99_ms"] for t in sc["per_task"].values())
        assert sc["server"]["model_calls"] > 0
    mixed = data["scenarios"]["mixed"]
    assert set(mixed["per_task"]) == set(d.tasks) | {"hot-swap"}
    assert {op: (c["count"], c["failed"]) for op, c in mixed["task_changes"].items()} == {
        "add": (3, 0), "remove": (3, 0)}
    assert "| mixed | **all** | 70 | 0 | 0 |" in (tmp_path / "smoke.md").read_text()
