"""Issue 13: no request fails another, nothing a client or an adapter folder sends gives an unhandled error, no
task change is lost. The HTTP cases run against the servers of test_serve.py (BAD, broken adapters); these are
the scheduler, sampler, CLI and concurrency checks."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import servekit
from brokenkit import build_corrupt

from promptmux import Runtime
from promptmux.cli import main as cli
from promptmux.runtime.generate import SamplingParams, pick


@pytest.fixture(scope="session")
def text_deployments(tmp_path_factory):
    return servekit.text_deployments(tmp_path_factory)


# ---- 1. sampling -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [dict(top_p=1e-7), dict(top_p=1e-300), dict(temperature=5e-324),
                                    dict(temperature=5e-324, top_k=3, top_p=1e-7), dict(temperature=1e300)])
def test_sampling_never_gives_nan(params):
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32)
    logits[1, 7] = logits[1, 9] = 9.0  # a tie for the best token
    tokens = pick(logits, SamplingParams(do_sample=True, **params), np.random.default_rng(1))
    assert tokens.shape == (4,) and (tokens >= 0).all() and (tokens < 50).all()
    if params.get("top_p", 1.0) < 1e-6 or params.get("temperature", 1.0) < 1e-300:
        best = logits.max(-1, keepdims=True)
        assert (logits[np.arange(4), tokens] == best[:, 0]).all()  # what is left is the most likely token


def _scheduler_run(rt, jobs_spec, start_first=False, timeout=20.0):
    """Submit GenerateJobs together to a fresh scheduler; returns each job's events (or the exception of a job
    whose events stop coming before the timeout: a hang)."""
    from promptmux.runtime.scheduler import GenerateJob, Scheduler

    sched = Scheduler(rt, max_batch=8)
    try:
        async def main():
            loop = asyncio.get_running_loop()
            jobs = [GenerateJob(prompts=prompts, view=rt.bank.view(task), params=params, tokenizer=tok,
                                deadline=time.monotonic() + 60, loop=loop) for prompts, task, params, tok in jobs_spec]
            for job in jobs:  # submitted before the worker starts: they all join the batch in one prefill
                sched.submit_generate(job)
            sched.start()

            async def events(job):
                out, done = [], 0
                while done < len(job.prompts):
                    batch = await asyncio.wait_for(job.queue.get(), timeout)
                    out += batch
                    done += sum(e[0] in ("finish", "error") for e in batch)
                return out
            return await asyncio.gather(*(events(j) for j in jobs), return_exceptions=True)
        return asyncio.run(main())
    finally:
        sched.stop()


def _tokens(events, index=0):
    return [e[3] for e in events if e[0] == "token" and e[1] == index and e[3] is not None]


class _BrokenDecode:
    """A tokenizer whose decode fails after a few tokens: a row's detokenization error."""

    def __init__(self, tok, after=3):
        self.tok, self.after = tok, after

    def decode(self, ids, **kw):
        if len(ids) > self.after:
            raise RuntimeError("decode failed")
        return self.tok.decode(ids, **kw)


def test_a_failing_row_fails_only_its_request(text_deployments):
    rt = Runtime(text_deployments["gpt2"].deploy)
    tok = rt.tokenizer
    ids = lambda text: [tok(text)["input_ids"]]  # noqa: E731
    greedy = SamplingParams(max_new_tokens=12, eos_token_id=[])
    sampled = SamplingParams(max_new_tokens=12, eos_token_id=[], do_sample=True, temperature=0.8, seed=5)
    tiny_p = SamplingParams(max_new_tokens=12, eos_token_id=[], do_sample=True, top_p=1e-7, seed=1)
    tiny_t = SamplingParams(max_new_tokens=12, eos_token_id=[], do_sample=True, temperature=5e-324, seed=1)
    spec = [(ids("keep going"), "pt", greedy, tok), (ids("sampled"), "mpt/1", sampled, tok),
            (ids("broken text"), "prefix", greedy, _BrokenDecode(tok)), (ids("tiny p"), "ptmlp", tiny_p, tok),
            (ids("tiny t"), "pt", tiny_t, tok)]
    events = _scheduler_run(rt, spec)
    assert not any(isinstance(e, BaseException) for e in events), events
    assert events[2][-1][0] == "error" and "decode failed" in events[2][-1][2]
    for (prompt, task, params, _), got in zip([s for i, s in enumerate(spec) if i != 2],
                                              [e for i, e in enumerate(events) if i != 2]):
        alone = rt.generate([tok.decode(prompt[0])], task, max_new_tokens=12, eos_token_id=[],
                            do_sample=params.do_sample, temperature=params.temperature, top_p=params.top_p,
                            seed=params.seed)[0]["token_ids"]
        assert _tokens(got) == alone and got[-1] == ("finish", 0, "length"), task
    greedy_alone = rt.generate(["tiny p"], "ptmlp", max_new_tokens=12, eos_token_id=[])[0]["token_ids"]
    assert _tokens(events[3]) == greedy_alone  # top_p below the best token's mass keeps the best token


# ---- 2. failures while rows join ---------------------------------------------------------------------------
def test_rows_joining_get_a_prefill_error_at_once(text_deployments):
    rt = Runtime(text_deployments["gpt2"].deploy)
    tok = rt.tokenizer
    params = SamplingParams(max_new_tokens=8, eos_token_id=[])
    start = time.monotonic()
    events = _scheduler_run(rt, [([[]], "pt", params, tok), ([tok("joins too")["input_ids"]], "mpt/0", params, tok)],
                            timeout=10)
    assert time.monotonic() - start < 10
    assert not any(isinstance(e, BaseException) for e in events), events  # nobody waits out a timeout
    assert events[0][-1][0] == "error"
    alone = rt.generate(["joins too"], "mpt/0", max_new_tokens=8, eos_token_id=[])[0]["token_ids"]
    assert _tokens(events[1]) == alone  # an innocent row that joined with it is unaffected


def test_a_prompt_with_no_tokens_is_a_400(text_deployments):
    from fastapi.testclient import TestClient

    from promptmux.runtime.server import create_app

    with TestClient(create_app(text_deployments["gpt2"].deploy)) as client:
        client.app.state.engine.tok = lambda texts: {"input_ids": [[] for _ in texts]}  # maps everything to nothing
        r = client.post("/v1/completions", json={"model": "pt", "prompt": ["ok", "gone"], "max_tokens": 2})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == "prompt[0]" and "no tokens" in r.json()["error"]["message"]


# ---- 3. lone surrogates in the CLI -----------------------------------------------------------------------
@pytest.mark.parametrize("args", [["run", "{deploy}", "--task", "pt", "--text", "a\udcff"],
                                  ["generate", "{deploy}", "--task", "pt", "--prompt", "ok", "--stop", "\udcff"]])
def test_cli_text_that_is_not_utf8_exits_2(text_deployments, args, capsys):
    arch = "bert" if args[0] == "run" else "gpt2"
    args = [a.replace("{deploy}", str(text_deployments[arch].deploy)) for a in args]
    assert cli(args) == 2
    assert "not valid UTF-8" in capsys.readouterr().err


# ---- 4. broken adapters in the CLI ------------------------------------------------------------------------
def test_cli_refuses_broken_adapters_with_exit_2(text_deployments, tmp_path, capsys):
    d = text_deployments["bert"]
    cases = build_corrupt(d.adapters["pt"], tmp_path)
    before = (d.deploy / "bank.safetensors").read_bytes()
    for name, word in cases.items():
        assert cli(["tasks", str(d.deploy), "add", f"x={tmp_path / name}"]) == 2, name
        err = capsys.readouterr().err
        assert word.lower() in err.lower() and "Traceback" not in err, (name, err)
    for name in ("st-random", "cfg-list", "cfg-nvt-null", "cfg-base-int", "cfg-symlink-loop"):
        code = cli(["--quiet", "export", "--base", str(d.base), "--adapter", f"x={tmp_path / name}",
                    "--out", str(tmp_path / "out")])
        assert code == 2 and not (tmp_path / "out").exists(), name
    assert (d.deploy / "bank.safetensors").read_bytes() == before


# ---- 6. concurrent task changes ---------------------------------------------------------------------------
WORKER = r"""
import json, sys
from promptmux.cli import main
from promptmux import Runtime
deploy, adapter, me, n, mode = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
rt = Runtime(deploy) if mode == "api" else None
done = []
for k in range(n):
    name = f"{me}-{k}"
    if mode == "api":
        rt.add_task(name, adapter, persist=True)
    elif main(["tasks", deploy, "add", f"{name}={adapter}"]) != 0:
        continue
    done.append(("add", name))
    if k % 2:  # every other task is removed again
        if mode == "api":
            rt.remove_task(name, persist=True)
        elif main(["tasks", deploy, "remove", name]) != 0:
            continue
        done.append(("remove", name))
print(json.dumps(done))
"""


def test_concurrent_task_changes_from_several_processes_lose_nothing(text_deployments, tmp_path):
    from promptmux.core.archs import arch_for
    from promptmux.core.bank import PromptBank
    from promptmux.core.folder import load_base_config

    d = text_deployments["bert"]
    deploy = tmp_path / "deploy"
    shutil.copytree(d.deploy, deploy)
    (deploy / ".bank-stale.tmp").write_bytes(b"left by a change killed mid-write")
    initial = set(PromptBank.load(deploy, arch_for(load_base_config(deploy))).names())
    workers = [("cli0", "cli"), ("cli1", "cli"), ("cli2", "cli"), ("api0", "api")]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(deploy), str(d.adapters["pt"]), me, "6", mode],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for me, mode in workers]
    expected = set(initial)
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        done = json.loads(out.strip().splitlines()[-1])
        assert len(done) == 9, err  # 6 adds, 3 removes: each reported done
        for verb, name in done:
            expected.add(name) if verb == "add" else expected.discard(name)
    bank = PromptBank.load(deploy, arch_for(load_base_config(deploy)))
    assert set(bank.names()) == expected
    manifest = json.loads((deploy / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == bank.names()
    assert not list(deploy.glob(".bank-*")) and not list(deploy.glob(".manifest-*"))


def test_a_crash_between_bank_and_manifest_is_repaired_by_the_next_change(text_deployments, tmp_path, monkeypatch):
    import promptmux.core.folder as deploy_mod

    d = text_deployments["bert"]
    deploy = tmp_path / "deploy"
    shutil.copytree(d.deploy, deploy)
    real = deploy_mod.write_manifest_tasks

    def killed(*args):
        raise KeyboardInterrupt("killed after the bank was renamed into place")

    monkeypatch.setattr(deploy_mod, "write_manifest_tasks", killed)
    with pytest.raises(KeyboardInterrupt):
        Runtime(deploy).add_task("a", d.adapters["pt"], persist=True)
    monkeypatch.setattr(deploy_mod, "write_manifest_tasks", real)
    assert cli(["tasks", str(deploy), "add", f"b={d.adapters['pt']}"]) == 0
    manifest = [t["name"] for t in json.loads((deploy / "manifest.json").read_text())["tasks"]]
    assert manifest[-2:] == ["a", "b"]
