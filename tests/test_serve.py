"""`promptmux serve` as a real process on loopback: mixed-task load checked response by response against the
single-request result of each task, task hot-swap under load, every bad-request class, overload, timeouts,
disconnects and SIGTERM drain. Every loop is bounded; every server is stopped by its fixture."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import time

import httpx
import numpy as np
import pytest
from conftest import copy_deployment
from servekit import EXTRA_ADAPTER, raw_exchange, running_server, server_fixture

from promptmux import Runtime

TOKEN = "test-admin-token"
CONCURRENCY = 32
WORDS = ("the film was warm and funny", "a tedious mess", "rates rose again", "the striker scored twice",
         "chips and batteries", "flat jokes", "markets fell", "a quiet drama", "new phones", "the cup final")


_server = server_fixture


@pytest.fixture(scope="module")
def bert_server(text_deployments):
    d = text_deployments["bert"]
    yield from _server(d.deploy, "--admin-token", TOKEN, "--adapter-root", str(d.adapter_root))


@pytest.fixture(scope="module")
def gpt2_server(text_deployments):
    d = text_deployments["gpt2"]
    yield from _server(d.deploy, "--admin-token", TOKEN, "--adapter-root", str(d.adapter_root))


async def _metrics_show(url: str, check, failure: str) -> None:
    """Wait (without blocking the event loop that sends the held requests) until the server's metrics pass `check`:
    an event, polled every 25 ms with a generous bound of 10 s; fails with `failure` if they never do."""
    for _ in range(400):
        if check(await asyncio.to_thread(_metrics, url)):
            return
        await asyncio.sleep(0.025)
    raise AssertionError(failure)


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(WORDS, 2)) + f" {i}" for i in range(n)]


def _metrics(url: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _sample(metrics, name, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def _bounded(coros, limit=CONCURRENCY):
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


def _client(url, **kw):
    return httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=CONCURRENCY), **kw)


# ---- classification ------------------------------------------------------------------------------------------
def test_mixed_task_classification_load_with_hot_swap(text_deployments, bert_server):
    d = text_deployments["bert"]
    rt = Runtime(d.deploy)
    rt.add_task("extra", d.adapters[EXTRA_ADAPTER])
    texts = _texts(40, seed=0)
    tasks = d.tasks + ["extra"]
    ref = {(t, x): rt.classify([x], t)[0]["scores"] for t in tasks for x in texts}
    rng = random.Random(1)
    load = [(rng.choice(d.tasks), rng.choice(texts)) for _ in range(2000)]
    admin = {"Authorization": f"Bearer {TOKEN}"}

    def check(task, text, r):
        if r.status_code != 200:
            return False
        body = r.json()
        got = np.array(body["results"][0]["scores"])
        return (body["task"] == task and len(got) == 3
                and np.abs(got - ref[(task, text)]).max() < 1e-4
                and body["results"][0]["label_id"] == int(np.argmax(ref[(task, text)])))

    async def main():
        async with _client(bert_server.url) as c:
            async def classify(task, text):
                r = await c.post("/v1/classify", json={"task": task, "text": text})
                return task, text, r

            async def hot_swap():
                """Add and remove a task three times while the load runs; its requests meanwhile either get the
                task's own result or (only around the removal) unknown_task; never anything else."""
                outcomes = []
                for _ in range(3):
                    r = await c.post("/v1/tasks", json={"name": "extra", "adapter": EXTRA_ADAPTER}, headers=admin)
                    assert r.status_code == 200 and r.json()["added"] == ["extra"] and r.json()["tasks"] > 1, r.text
                    present = await asyncio.gather(*(classify("extra", x) for x in texts[:10]))
                    assert all(check(*o) for o in present)
                    racing = [classify("extra", x) for x in texts[10:30]]
                    removal = c.delete("/v1/tasks/extra", headers=admin)
                    *raced, removed = await asyncio.gather(*racing, removal)
                    assert removed.status_code == 200 and removed.json()["removed"] == ["extra"]
                    outcomes += raced
                    await asyncio.sleep(0.2)
                return outcomes

            swap = asyncio.ensure_future(hot_swap())
            results = await _bounded([classify(t, x) for t, x in load])
            return results, await swap

    results, raced = asyncio.run(main())
    errors = [r.status_code for _, _, r in results if r.status_code != 200]
    wrong = [(t, x) for t, x, r in results if r.status_code == 200 and not check(t, x, r)]
    assert errors == [] and wrong == []  # 0 errors, 0 misrouted among 2,000
    for task, text, r in raced:
        assert check(task, text, r) or (r.status_code == 404 and r.json()["error"]["type"] == "unknown_task"), r.text
    m = _metrics(bert_server.url)
    batches = _sample(m, "promptmux_batch_tasks_count", queue="classify")
    single_task = _sample(m, "promptmux_batch_tasks_bucket", queue="classify", le="1.0")
    assert batches > 0 and single_task < batches  # batches really mixed tasks
    assert _sample(m, "promptmux_requests_total", endpoint="/v1/classify", task="pt", status="200") > 0


def test_rows_that_fit_alone_are_never_batched_past_the_positions(text_deployments, bert_server):
    """ptmlp has 3 virtual tokens, pt 4: a 61-token ptmlp row and a 60-token pt row each fit the 64 positions,
    but padded to one width they would not. They still get their single-request results."""
    d = text_deployments["bert"]
    rt = Runtime(d.deploy)
    cases = [("ptmlp", "m" * 59), ("pt", "p" * 58)] * 16  # + <cls> and <sep>
    ref = {c: rt.classify([c[1]], c[0])[0]["scores"] for c in cases[:2]}

    async def main():
        async with _client(bert_server.url) as c:
            return await asyncio.gather(*(c.post("/v1/classify", json={"task": t, "text": x}) for t, x in cases))

    for (task, text), r in zip(cases, asyncio.run(main())):
        assert r.status_code == 200, r.text
        assert np.abs(np.array(r.json()["results"][0]["scores"]) - ref[(task, text)]).max() < 1e-4


# ---- generation ------------------------------------------------------------------------------------------------
def _completion_cases(tasks, n: int, seed: int):
    rng = random.Random(seed)
    prompts = _texts(30, seed=seed)
    cases = []
    for i in range(n):
        body = {"model": rng.choice(tasks), "prompt": rng.choice(prompts)[:20], "max_tokens": rng.randint(1, 16)}
        if i % 2:
            body.update(temperature=round(rng.uniform(0.5, 1.5), 2), seed=rng.randint(0, 1000), top_p=0.9)
        else:
            body["temperature"] = 0
        if i % 5 == 0:
            body["prompt"] = [body["prompt"], rng.choice(prompts)[:12]]
        body["stream"] = i % 3 == 0
        cases.append(body)
    return cases


def _reference(rt, body):
    prompts = [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"]
    kw = dict(eos_token_id=None, stop=[body["stop"]] if body.get("stop") else ())
    if body.get("temperature", 1.0) > 0:
        kw.update(do_sample=True, temperature=body["temperature"], top_p=body.get("top_p", 1.0), seed=body.get("seed"))
    out = []
    for p in prompts:  # each prompt alone: the single-request result
        r = rt.generate([p], body["model"], max_new_tokens=body["max_tokens"], **kw)[0]
        out.append((r["text"], "length" if r["finish_reason"] == "length" else "stop", len(r["token_ids"])))
    return out


async def _complete(c, body):
    """(status, [(text, finish_reason)], completion tokens or None) for a plain or streamed completion."""
    if not body.get("stream"):
        r = await c.post("/v1/completions", json=body)
        if r.status_code != 200:
            return r.status_code, r.text, None
        j = r.json()
        return 200, [(ch["text"], ch["finish_reason"]) for ch in j["choices"]], j["usage"]["completion_tokens"]
    n = 1 if isinstance(body["prompt"], str) else len(body["prompt"])
    texts, finish = [""] * n, [None] * n
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, (await r.aread()).decode(), None
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return 500, chunk, None
            ch = chunk["choices"][0]
            texts[ch["index"]] += ch["text"]
            finish[ch["index"]] = ch["finish_reason"] or finish[ch["index"]]
    return (200 if done else 599), list(zip(texts, finish)), None


def test_mixed_task_generation_load_with_hot_swap(text_deployments, gpt2_server):
    d = text_deployments["gpt2"]
    rt = Runtime(d.deploy)
    cases = _completion_cases(d.tasks, 200, seed=3)
    for body in cases[::7]:  # some rows stop on a string from their own greedy output
        greedy = _reference(rt, dict(body, temperature=0, stream=False))[0][0]
        if len(greedy) > 3:
            body.update(temperature=0, stop=greedy[2:4])
    expected = [_reference(rt, b) for b in cases]
    rt.add_task("extra", d.adapters[EXTRA_ADAPTER])
    extra = {"model": "extra", "prompt": "the cup final", "max_tokens": 40, "temperature": 0, "stream": True}
    extra_expected = _reference(rt, extra)
    admin = {"Authorization": f"Bearer {TOKEN}"}

    async def main():
        async with _client(gpt2_server.url) as c:
            async def removed_mid_stream():
                """A task removed while its request streams: the request finishes with the task's tokens."""
                r = await c.post("/v1/tasks", json={"name": "extra", "adapter": EXTRA_ADAPTER}, headers=admin)
                assert r.status_code == 200, r.text
                text, finish, removed = "", None, None
                async with c.stream("POST", "/v1/completions", json=extra) as s:
                    assert s.status_code == 200
                    async for line in s.aiter_lines():
                        if line.startswith("data: {"):
                            ch = json.loads(line[6:])["choices"][0]
                            text += ch["text"]
                            finish = ch["finish_reason"] or finish
                            if removed is None:
                                removed = await c.delete("/v1/tasks/extra", headers=admin)
                after = await c.post("/v1/completions", json=dict(extra, stream=False))
                return text, finish, removed, after

            swap = asyncio.ensure_future(removed_mid_stream())
            results = await _bounded([_complete(c, b) for b in cases])
            return results, await swap

    results, (text, finish, removed, after) = asyncio.run(main())
    failed = [(b, r) for b, r in zip(cases, results) if r[0] != 200]
    assert failed == []
    for body, (_, choices, tokens), want in zip(cases, results, expected):
        assert choices == [(t, f) for t, f, _ in want], body  # 0 misrouted: each row is its task's own result
        if tokens is not None:
            assert tokens == sum(n for _, _, n in want)
    assert removed.status_code == 200 and removed.json()["removed"] == ["extra"]
    assert (text, finish) == extra_expected[0][:2]
    error = after.json()["error"]
    assert after.status_code == 404 and (error["type"], error["field"]) == ("unknown_task", "model")
    named = error["message"].removeprefix("unknown task 'extra'; this deployment serves: ")  # a few: named
    assert set(named.split(", ")) >= set(text_deployments["gpt2"].tasks) and "extra" not in named.split(", ")
    m = _metrics(gpt2_server.url)
    steps = _sample(m, "promptmux_batch_size_count", queue="generate")
    alone = _sample(m, "promptmux_batch_size_bucket", queue="generate", le="1.0")
    assert alone < steps  # rows shared decoding steps (that rows of different tasks do: the test below)
    assert _sample(m, "promptmux_running_rows") == 0 and _sample(m, "promptmux_queue_depth", queue="generate") == 0


def test_a_classify_batch_of_rows_with_and_without_token_types_runs_as_one(text_deployments, monkeypatch):
    """/v1 text rows carry the tokenizer's token_type_ids, v2 input_ids rows none: one batch, the latter segment 0
    as alone (it raised, and each request ran again alone, unlogged)."""
    from promptmux.runtime import scheduler
    from promptmux.runtime.batch import label_scores, run_batch

    rt = Runtime(text_deployments["bert"].deploy)
    calls = []
    monkeypatch.setattr(scheduler, "run_batch", lambda *a, **k: calls.append(1) or run_batch(*a, **k))
    loop = asyncio.new_event_loop()
    rows = [([[5, 6, 7]], [[0, 0, 1]], "pt"), ([[8, 9]], None, "prefix")]
    jobs = [scheduler.ClassifyJob(ids=ids, types=types, view=rt.bank.view(t), deadline=time.monotonic() + 60,
                                  loop=loop, future=loop.create_future()) for ids, types, t in rows]
    scheduler.Scheduler(rt)._classify(jobs)
    loop.run_until_complete(asyncio.sleep(0))
    assert calls == [1]
    for job, (ids, types, t) in zip(jobs, rows):
        alone = rt.forward(np.array(ids), np.ones((1, len(ids[0])), np.int64), t,
                           None if types is None else np.array(types))
        assert job.future.result()[0]["label"] == label_scores(job.view, alone[0])["label"]
        assert np.allclose(job.future.result()[0]["scores"], label_scores(job.view, alone[0])["scores"], atol=1e-5)
    loop.close()


def test_a_task_named_like_the_served_name_in_any_unicode_form_is_refused():
    """The served name guards the base model's own name: a task named "modèle" typed with a combining accent (stored
    as the precomposed name) clashed with nothing, and the next start failed on the served name."""
    from types import SimpleNamespace

    from promptmux.runtime.server.admin import apply_change
    from promptmux.runtime.server.api_errors import ApiError

    engine = SimpleNamespace(options=SimpleNamespace(persist_tasks=True), served_name="mod\u00e8le")
    for op in ({"action": "add", "name": "mode\u0300le"},
               {"action": "upload", "items": [{"name": "x"}, {"name": "mode\u0300le"}]}):
        with pytest.raises(ApiError) as e:
            apply_change(engine, op)
        assert e.value.status == 409 and "is the served model name" in e.value.message


def test_a_new_tasks_name_is_capped_in_the_form_the_bank_stores():
    """The 128-character cap counts characters as stored (NFC): 100 accented letters typed decomposed (200 code
    points) are a name of 100; 129 characters are refused, naming the field."""
    import unicodedata

    from pydantic import ValidationError

    from promptmux.runtime.server.schemas import AddTaskRequest

    typed = unicodedata.normalize("NFD", "\u00e9" * 100)
    assert len(typed) == 200 and AddTaskRequest(name=typed, adapter="a").name == "\u00e9" * 100
    with pytest.raises(ValidationError, match="at most 128 characters"):
        AddTaskRequest(name="n" * 129, adapter="a")


def test_classify_labels_a_row_with_the_task_version_that_scored_it(text_deployments, monkeypatch, tmp_path):
    """A task replaced (by another process, say) between the forward pass and the labelling: the result is the old
    version's whole answer, never its scores with the new version's label names."""
    import dataclasses

    from conftest import copy_deployment

    rt = Runtime(copy_deployment(text_deployments["bert"].deploy, tmp_path / "d"))  # its store is changed below
    old = rt.bank.view("pt")
    forward_text = Runtime.forward_text

    def then_replaced(self, *a, **k):
        out = forward_text(self, *a, **k)
        rt.bank.add([dataclasses.replace(rt.bank.view("pt"), labels=["x", "y", "z"])], replace=True)
        return out
    monkeypatch.setattr(Runtime, "forward_text", then_replaced)
    [got] = rt.classify(["a warm funny film"], "pt")
    assert rt.bank.view("pt").labels == ["x", "y", "z"] and got["label"] not in ("x", "y", "z")
    assert got["label"] == label_of(old, got["label_id"])


def label_of(view, i: int) -> str:
    from promptmux.runtime.batch import label_scores

    return label_scores(view, np.eye(len(view.labels) if view.labels else 3, dtype=np.float32)[i])["label"]


def test_a_request_of_another_task_joins_the_running_decoding_steps(text_deployments):
    """Continuous batching across tasks at the server: a request of one task arrives while another task's row is
    decoding (each step 20 ms slower, so it still is), joins that row's steps, and both get their alone results. Under
    load the 200-request test above could see every request finish before the next was admitted."""
    d = text_deployments["gpt2"]
    rt = Runtime(d.deploy)
    first, second = d.tasks[0], d.tasks[1]
    bodies = [{"model": t, "prompt": f"join {t}", "max_tokens": 40, "temperature": 0} for t in (first, second)]
    expected = [_reference(rt, b)[0][:2] for b in bodies]
    with running_server(d.deploy, step_delay=0.02) as server:
        async def main():
            async with _client(server.url) as c:
                running = asyncio.ensure_future(c.post("/v1/completions", json=bodies[0]))
                await _metrics_show(server.url, lambda m: _sample(m, "promptmux_running_rows") == 1,
                                    "the first request never started decoding")
                return await asyncio.gather(running, c.post("/v1/completions", json=bodies[1]))

        answers = asyncio.run(main())
        m = _metrics(server.url)
    got = [(r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]) for r in answers]
    assert got == expected
    steps = _sample(m, "promptmux_batch_size_count", queue="generate")
    assert steps - _sample(m, "promptmux_batch_tasks_bucket", queue="generate", le="1.0") > 0  # steps of 2 tasks


# ---- bad requests --------------------------------------------------------------------------------------------
J = {"Content-Type": "application/json"}
ADMIN = {"Authorization": f"Bearer {TOKEN}", **J}
BAD = {
    "bert": [
        ("unknown task", "POST", "/v1/classify", {"task": "nope", "text": "a"}, J, 404, "task"),
        ("empty text", "POST", "/v1/classify", {"task": "pt", "text": "   "}, J, 400, "text"),
        ("empty texts", "POST", "/v1/classify", {"task": "pt", "texts": []}, J, 400, "texts"),
        ("empty item", "POST", "/v1/classify", {"task": "pt", "texts": ["ok", ""]}, J, 400, "texts[1]"),
        ("too many texts", "POST", "/v1/classify", {"task": "pt", "texts": ["a"] * 65}, J, 400, "texts"),
        ("text and texts", "POST", "/v1/classify", {"task": "pt", "text": "a", "texts": ["b"]}, J, 400, "text"),
        ("no text", "POST", "/v1/classify", {"task": "pt"}, J, 400, "text"),
        ("over-long", "POST", "/v1/classify", {"task": "pt", "text": "a" * 70}, J, 400, "text"),
        ("way over-long", "POST", "/v1/classify", {"task": "pt", "text": "a" * 5000}, J, 400, "text"),
        ("wrong type", "POST", "/v1/classify", {"task": "pt", "text": 5}, J, 400, "text"),
        ("wrong item type", "POST", "/v1/classify", {"task": "pt", "texts": ["a", 3]}, J, 400, "texts[1]"),
        ("task not a string", "POST", "/v1/classify", {"task": ["pt"], "text": "a"}, J, 400, "task"),
        ("unknown field", "POST", "/v1/classify", {"task": "pt", "text": "a", "labelz": 1}, J, 400, "labelz"),
        ("body not an object", "POST", "/v1/classify", ["pt"], J, 400, "body"),
        ("malformed JSON", "POST", "/v1/classify", b'{"task": "pt", "text": ', J, 400, "body"),
        ("not JSON", "POST", "/v1/classify", b"task=pt&text=a", {"Content-Type": "application/x-www-form-urlencoded"},
         415, "content-type"),
        ("oversized body", "POST", "/v1/classify", b'{"task": "pt", "text": "' + b"a" * (1 << 20) + b'"}', J, 413,
         "body"),
        ("wrong endpoint for the model", "POST", "/v1/completions", {"model": "pt", "prompt": "a"}, J, 400, "model"),
        ("unknown path", "GET", "/v3/whatever", None, {}, 404, "path"),
        ("wrong method", "DELETE", "/v1/classify", None, {}, 405, "method"),
        ("admin without token", "GET", "/v1/tasks", None, {}, 401, "authorization"),
        ("admin wrong token", "POST", "/v1/tasks", {"name": "x", "adapter": "pt"},
         {"Authorization": "Bearer nope", **J}, 401, "authorization"),
        ("traversal", "POST", "/v1/tasks", {"name": "x", "adapter": "../deploy"}, ADMIN, 400, "adapter"),
        ("absolute path", "POST", "/v1/tasks", {"name": "x", "adapter": "/etc"}, ADMIN, 400, "adapter"),
        ("the root itself", "POST", "/v1/tasks", {"name": "x", "adapter": "pt/.."}, ADMIN, 400, "adapter"),
        ("missing adapter", "POST", "/v1/tasks", {"name": "x", "adapter": "nope"}, ADMIN, 404, "adapter"),
        ("bad task name", "POST", "/v1/tasks", {"name": "a/b", "adapter": "pt"}, ADMIN, 400, "name"),
        ("existing task", "POST", "/v1/tasks", {"name": "pt", "adapter": "pt"}, ADMIN, 409, "name"),
        ("remove unknown", "DELETE", "/v1/tasks/nope", None, ADMIN, 404, "name"),
        ("lone surrogate text", "POST", "/v1/classify", {"task": "pt", "text": "a\ud800"}, J, 400, "text"),
        ("lone surrogate item", "POST", "/v1/classify", {"task": "pt", "texts": ["a", "\udfff"]}, J, 400, "texts[1]"),
        ("lone surrogate task", "POST", "/v1/classify", {"task": "\ud800", "text": "a"}, J, 400, "task"),
        ("lone surrogate field", "POST", "/v1/classify", {"task": "pt", "text": "a", "\ud800": 1}, J, 400, "body"),
        ("lone surrogate adapter", "POST", "/v1/tasks", {"name": "x", "adapter": "\ud800"}, ADMIN, 400, "adapter"),
        ("lone surrogate name", "POST", "/v1/tasks", {"name": "\ud800", "adapter": "pt"}, ADMIN, 400, "name"),
    ],
    "gpt2": [
        ("unknown model", "POST", "/v1/completions", {"model": "nope", "prompt": "a"}, J, 404, "model"),
        ("empty prompt", "POST", "/v1/completions", {"model": "pt", "prompt": " "}, J, 400, "prompt"),
        ("no prompts", "POST", "/v1/completions", {"model": "pt", "prompt": []}, J, 400, "prompt"),
        ("empty prompt item", "POST", "/v1/completions", {"model": "pt", "prompt": ["a", ""]}, J, 400, "prompt[1]"),
        ("over-long prompt", "POST", "/v1/completions", {"model": "pt", "prompt": "a" * 61}, J, 400, "prompt"),
        ("too many tokens", "POST", "/v1/completions", {"model": "pt", "prompt": "abc", "max_tokens": 60}, J, 400,
         "max_tokens"),
        ("max_tokens 0", "POST", "/v1/completions", {"model": "pt", "prompt": "a", "max_tokens": 0}, J, 400,
         "max_tokens"),
        ("max_tokens a string", "POST", "/v1/completions", {"model": "pt", "prompt": "a", "max_tokens": "4"}, J, 400,
         "max_tokens"),
        ("temperature < 0", "POST", "/v1/completions", {"model": "pt", "prompt": "a", "temperature": -0.1}, J, 400,
         "temperature"),
        ("temperature > 2", "POST", "/v1/completions", {"model": "pt", "prompt": "a", "temperature": 2.5}, J, 400,
         "temperature"),
        ("temperature NaN", "POST", "/v1/completions", b'{"model": "pt", "prompt": "a", "temperature": NaN}', J, 400,
         "temperature"),
        ("top_p 0", "POST", "/v1/completions", {"model": "pt", "prompt": "a", "top_p": 0}, J, 400, "top_p"),
        ("top_p > 1", "POST", "/v1/completions", {"model": "pt", "prompt": "a", "top_p": 1.01}, J, 400, "top_p"),
        ("top_k < 0", "POST", "/v1/completions", {"model": "pt", "prompt": "a", "top_k": -1}, J, 400, "top_k"),
        ("seed < 0", "POST", "/v1/completions", {"model": "pt", "prompt": "a", "seed": -1}, J, 400, "seed"),
        ("seed huge", "POST", "/v1/completions", {"model": "pt", "prompt": "a", "seed": 2**70}, J, 400, "seed"),
        ("five stops", "POST", "/v1/completions", {"model": "pt", "prompt": "a", "stop": list("abcde")}, J, 400,
         "stop"),
        ("empty stop", "POST", "/v1/completions", {"model": "pt", "prompt": "a", "stop": ["x", ""]}, J, 400,
         "stop[1]"),
        ("stop a number", "POST", "/v1/completions", {"model": "pt", "prompt": "a", "stop": 3}, J, 400, "stop"),
        ("stream a string", "POST", "/v1/completions", {"model": "pt", "prompt": "a", "stream": "yes"}, J, 400,
         "stream"),
        ("n 2", "POST", "/v1/completions", {"model": "pt", "prompt": "a", "n": 2}, J, 400, "n"),
        ("echo", "POST", "/v1/completions", {"model": "pt", "prompt": "a", "echo": True}, J, 400, "echo"),
        ("unknown field", "POST", "/v1/completions", {"model": "pt", "prompt": "a", "best_of": 2}, J, 400,
         "best_of"),
        ("malformed JSON", "POST", "/v1/completions", b"{'model': 'pt'}", J, 400, "body"),
        ("oversized chunked body", "POST", "/v1/completions", "chunked", J, 413, "body"),
        ("classify on a generator", "POST", "/v1/classify", {"task": "pt", "text": "a"}, J, 400, "task"),
        ("lone surrogate prompt", "POST", "/v1/completions", {"model": "pt", "prompt": "\ud800"}, J, 400, "prompt"),
        ("lone surrogate prompt item", "POST", "/v1/completions", {"model": "pt", "prompt": ["a", "b\udc00"]}, J,
         400, "prompt[1]"),
        ("lone surrogate stop", "POST", "/v1/completions", {"model": "pt", "prompt": "a", "stop": "\ud800"}, J, 400,
         "stop"),
        ("lone surrogate model", "POST", "/v1/completions", {"model": "\ud800", "prompt": "a"}, J, 400, "model"),
    ],
}


def _chunks():
    for _ in range(40):
        yield b"x" * 65536  # 2.5 MiB without a Content-Length


@pytest.mark.parametrize("arch,case", [(a, c) for a in BAD for c in BAD[a]], ids=[f"{a}-{c[0]}" for a in BAD
                                                                                  for c in BAD[a]])
def test_bad_requests_get_a_4xx_naming_the_field(request, arch, case):
    server = request.getfixturevalue(f"{arch}_server")
    _, method, path, body, headers, status, field = case
    kw = {}
    if body == "chunked":
        kw["content"] = _chunks()
    elif isinstance(body, bytes):
        kw["content"] = body
    elif body is not None:
        kw["content"] = json.dumps(body).encode()
    r = httpx.request(method, server.url + path, headers=headers, timeout=30, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["field"] == field and error["message"] and error["type"], error
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["tasks"] >= 1  # the loaded engine's task count, not null
    # every engine the routing can pick was built and run before the server listened (runtime/prepare.py)
    prepared = {(p["graph"], p["engine"]) for p in health.json()["prepared"]}
    routing = health.json().get("routing")  # bert: the engines the split measured on this CPU can pick
    assert bool(routing and routing["measured"]) == (arch == "bert")
    assert prepared == ({(g, e) for g in ("model.onnx", "model_noprefix.onnx") for e in routing["engines"]}
                        if arch == "bert" else {("decoder", "onnxruntime")})
    assert (f"preparing model_noprefix.onnx on {routing['engines'][-1]}" if arch == "bert" else
            "preparing the cached decoder on onnxruntime") in server.logs()  # the server's log said so as it started


def test_symlink_out_of_the_adapter_root_is_refused(text_deployments, bert_server):
    d = text_deployments["bert"]
    link = d.adapter_root / "escape"
    if not link.exists():
        os.symlink(d.deploy, link)
    r = httpx.post(bert_server.url + "/v1/tasks", json={"name": "x", "adapter": "escape"}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"]["field"] == "adapter"
    assert str(d.adapter_root) not in r.text  # server paths stay private


def test_broken_adapters_are_a_400_saying_what_is_wrong(text_deployments, bert_server, tmp_path):
    from brokenkit import build_corrupt

    d = text_deployments["bert"]
    root = d.adapter_root / "broken"
    cases = build_corrupt(d.adapters["pt"], root)
    for name, word in cases.items():
        r = httpx.post(bert_server.url + "/v1/tasks", json={"name": "x", "adapter": f"broken/{name}"}, headers=ADMIN)
        assert r.status_code == 400, (name, r.text)
        error = r.json()["error"]
        assert error["field"] == "adapter" and word.lower() in error["message"].lower(), (name, error)
        assert str(d.adapter_root) not in r.text
    assert "x" not in [m["id"] for m in httpx.get(bert_server.url + "/v1/models").json()["data"]]


def test_no_adapter_file_is_read_from_outside_the_root(text_deployments, bert_server, tmp_path):
    """Files inside an allowed folder that link outside the root are refused; a base model folder the adapter
    names outside the root is not read (nor quoted)."""
    from brokenkit import build_escapes

    d = text_deployments["bert"]
    escapes = build_escapes(d.adapters["pt"], d.adapter_root / "escapes", tmp_path / "outside")
    for name, what in escapes.items():
        r = httpx.post(bert_server.url + "/v1/tasks", json={"name": "esc", "adapter": f"escapes/{name}"},
                       headers=ADMIN)
        assert "SECRET" not in r.text and str(tmp_path) not in r.text, (name, r.text)
        if name == "esc-base":  # base_model_name_or_path is not followed under a root: the adapter itself is fine
            assert r.status_code == 200, r.text
            assert httpx.delete(bert_server.url + "/v1/tasks/esc", headers=ADMIN).status_code == 200
        else:
            assert r.status_code == 400 and "outside the adapter root" in r.json()["error"]["message"], (name, r.text)


def test_task_listings_page_with_a_cursor_and_one_task_reads_alone(text_deployments, bert_server):
    d = text_deployments["bert"]
    url = bert_server.url
    everything = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    assert everything == sorted(d.tasks)  # one default page holds them all, in name order
    assert _sample(_metrics(url), "promptmux_tasks") == len(everything)
    seen, after = [], None
    while True:  # pages of 4 with the cursor, as a client walks a million
        params = {"limit": 4, **({"after": after} if after else {})}
        page = httpx.get(url + "/v1/models", params=params).json()
        seen += [m["id"] for m in page["data"]]
        assert len(page["data"]) <= 4 and page["last_id"] == page["data"][-1]["id"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == everything
    tasks = httpx.get(url + "/v1/tasks", params={"limit": 2, "after": "mpt/2"}, headers=ADMIN).json()
    at = everything.index("mpt/2") + 1
    assert [t["name"] for t in tasks["tasks"]] == everything[at:at + 2] and tasks["has_more"] is True
    one = httpx.get(url + "/v1/tasks/mpt/1", headers=ADMIN).json()
    assert one["name"] == "mpt/1" and one["kind"] == "mpt" and one["num_labels"] == 3
    missing = httpx.get(url + "/v1/tasks/nope", headers=ADMIN)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "unknown_task"
    # a cursor is a place in name order, whether or not a task has that name (it may have been removed since)
    gone = httpx.get(url + "/v1/models", params={"after": "mpt/1x"}).json()
    assert [m["id"] for m in gone["data"]] == [t for t in everything if t > "mpt/1x"]
    for params, field in (({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"after": "x" * 1025}, "after")):
        r = httpx.get(url + "/v1/models", params=params)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, (params, r.text)


def test_the_openai_client_lists_the_tasks_and_completes(text_deployments, bert_server, gpt2_server):
    """The README's claim: OpenAI's own Python client works against the server (the model list, a completion)."""
    from openai import OpenAI

    listed = [m.id for m in OpenAI(base_url=bert_server.url + "/v1", api_key="-").models.list()]
    assert listed == sorted(text_deployments["bert"].tasks)
    client = OpenAI(base_url=gpt2_server.url + "/v1", api_key="-", max_retries=0)
    done = client.completions.create(model="pt", prompt="abc", max_tokens=4, temperature=0, seed=1)
    assert done.model == "pt" and done.usage.completion_tokens == 4 and done.choices[0].finish_reason == "length"
    again = client.completions.create(model="pt", prompt="abc", max_tokens=4, temperature=0, seed=1)
    assert again.choices[0].text == done.choices[0].text  # greedy: the same text


def test_extreme_sampling_parameters_generate(gpt2_server):
    for extra in ({"top_p": 1e-7}, {"temperature": 5e-324}, {"temperature": 5e-324, "top_p": 1e-300, "top_k": 1}):
        body = {"model": "pt", "prompt": "abc", "max_tokens": 4, "seed": 1, **extra}
        r = httpx.post(gpt2_server.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, (extra, r.text)


def test_openapi_documents_every_endpoint(bert_server):
    spec = httpx.get(bert_server.url + "/openapi.json").json()
    ops = {(p, m) for p, item in spec["paths"].items() for m in item}
    assert ops >= {("/v1/classify", "post"), ("/v1/completions", "post"), ("/v1/models", "get"), ("/v1/tasks", "get"),
                   ("/v1/tasks", "post"), ("/v1/tasks/{name}", "delete"), ("/health", "get"), ("/ready", "get"),
                   ("/metrics", "get")}
    assert spec["paths"]["/v1/completions"]["post"]["responses"]["400"]


# ---- overload, timeouts, disconnects, drain -------------------------------------------------------------------
def test_tiny_queue_answers_503_with_retry_after(text_deployments):
    """--max-queue 1 with one row running: a request that finds the queue full gets 503 + Retry-After at once, the
    running and the queued one their results. Each step 50 ms slower: the running row takes 2 s, so the queue is
    full for certain when the refused requests come (they used to race 48 clients against the model)."""
    d = text_deployments["gpt2"]
    with running_server(d.deploy, "--max-queue", "1", "--max-batch", "1", step_delay=0.05) as server:
        body = {"model": "pt", "prompt": "abc", "max_tokens": 40, "temperature": 0}

        async def main():
            async with _client(server.url) as c:
                # One after the other: sent together, the second can find the first still in the queue of 1
                held = [asyncio.ensure_future(c.post("/v1/completions", json=body))]
                await _metrics_show(server.url, lambda m: _sample(m, "promptmux_running_rows") == 1,
                                    "the first held request never started decoding")
                held.append(asyncio.ensure_future(c.post("/v1/completions", json=body)))
                await _metrics_show(server.url, lambda m: _sample(m, "promptmux_running_rows") == 1 and _sample(
                    m, "promptmux_queue_depth", queue="generate") == 1,
                    "the second held request never waited in the queue")
                refused = [await c.post("/v1/completions", json=body) for _ in range(3)]
                return refused, await asyncio.gather(*held)

        refused, answered = asyncio.run(main())
        for r in refused:
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["type"] == "overloaded"
        assert [r.status_code for r in answered] == [200, 200]
        assert answered[0].json()["choices"][0]["text"] == answered[1].json()["choices"][0]["text"]
        # More prompts in one request than the queue holds: refused as a bad request (waiting would not help).
        r = httpx.post(server.url + "/v1/completions", json={**body, "prompt": ["abc", "abd"]})
        assert r.status_code == 400 and "--max-queue 1" in r.json()["error"]["message"], r.text
        # Admin is off without a token.
        r = httpx.get(server.url + "/v1/tasks", headers={"Authorization": "Bearer x"})
        assert r.status_code == 403 and r.json()["error"]["field"] == "authorization"
        m = _metrics(server.url)
        assert _sample(m, "promptmux_requests_total", endpoint="/v1/completions", task="pt", status="503") == 3
        assert _sample(m, "promptmux_requests_total", endpoint="/v1/completions", task="pt", status="200") == 2


def test_slow_and_abusive_clients_are_bounded(text_deployments):
    """Slowloris headers or body: 408 and closed after the timeouts; an oversized head: 431; beyond
    --max-inflight: 503 + Retry-After while the admitted requests get their results; /docs off by default."""
    d = text_deployments["bert"]
    # Two classify requests are held by a batch of 3 that does not fill for 5 s: they are in flight, for certain,
    # when the third arrives (no race between the clients' sends and the model).
    with running_server(d.deploy, "--header-timeout", "1", "--body-timeout", "1", "--max-inflight", "2",
                        "--max-batch", "3", "--max-wait-ms", "5000", "--max-queue-wait", "60") as server:
        # Each 408 is the server's answer once its 1 s timeout passes (raw_exchange would give b"" after its own 10)
        out, _ = raw_exchange(server.url, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Ty")
        assert out.startswith(b"HTTP/1.1 408"), out
        out, _ = raw_exchange(server.url, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                                     b"Content-Type: application/json\r\n\r\n{\"task\"")
        assert out.startswith(b"HTTP/1.1 408"), out
        out, _ = raw_exchange(server.url, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (100 * 1024) + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 431"), out[:100]
        assert httpx.get(server.url + "/health").status_code == 200  # a normal request after all that

        async def main():
            body = {"task": "pt", "text": "a"}
            async with _client(server.url) as c:
                held = [asyncio.ensure_future(c.post("/v1/classify", json=body)) for _ in range(2)]
                await _metrics_show(server.url, lambda m: _sample(m, "promptmux_queue_depth", queue="classify") == 2,
                                    "the two held requests never showed in the classify queue")
                refused = await c.post("/v1/classify", json=body)
                return refused, await asyncio.gather(*held)

        refused, answered = asyncio.run(main())
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert "2 requests in flight" in refused.json()["error"]["message"]
        assert [r.status_code for r in answered] == [200, 200]
        assert answered[0].json() == answered[1].json()
        assert httpx.get(server.url + "/docs").status_code == 404
        assert httpx.get(server.url + "/openapi.json").status_code == 200


def test_a_pipelined_request_slower_than_the_header_timeout_is_answered(text_deployments):
    """HTTP/1.1 pipelining: the second request, read whole while the first ran, runs once the first is answered;
    the header timeout is not armed again for it (it was answered 408 after --header-timeout)."""
    d = text_deployments["bert"]
    with running_server(d.deploy, "--header-timeout", "1", "--max-batch", "64", "--max-wait-ms", "1500") as server:
        body = b'{"task": "pt", "text": "a"}'

        def request(connection: bytes) -> bytes:
            return (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: "
                    + connection + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

        out, _ = raw_exchange(server.url, request(b"keep-alive") + request(b"close"), wait=30)
    assert out.count(b"HTTP/1.1 200") == 2 and b"408" not in out, out[:300]


def test_timeout_and_client_disconnect(text_deployments):
    d = text_deployments["bert"]
    # A batch that waits 60 s to fill: the request's 0.5 s timeout answers it, well inside the client's 20 s.
    with running_server(d.deploy, "--max-wait-ms", "60000", "--max-batch", "64", "--request-timeout", "0.5") as server:
        r = httpx.post(server.url + "/v1/classify", json={"task": "pt", "text": "a"}, timeout=20)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        with pytest.raises(httpx.TimeoutException):  # the client gives up first and hangs up
            httpx.post(server.url + "/v1/classify", json={"task": "mpt/0", "text": "a"}, timeout=0.2)
        for _ in range(50):
            m = _metrics(server.url)
            if _sample(m, "promptmux_requests_total", endpoint="/v1/classify", task="mpt/0", status="499"):
                break
            time.sleep(0.1)
        assert _sample(m, "promptmux_requests_total", endpoint="/v1/classify", task="mpt/0", status="499") == 1
        assert _sample(m, "promptmux_queue_depth", queue="classify") == 0  # its work was dropped


async def _refuses_connections(url: str, within: float = 30.0) -> bool:
    """Whether the server at url stops accepting connections (within a generous deadline: the signal's effect,
    not its speed, is what is checked)."""
    deadline = time.monotonic() + within
    async with httpx.AsyncClient() as c:
        while time.monotonic() < deadline:
            try:
                await c.get(url + "/health")
            # refused, or accepted from the backlog as the listening socket closed and then closed unanswered
            except (httpx.ConnectError, httpx.RemoteProtocolError):
                return True
            await asyncio.sleep(0.05)
    return False


def test_sigterm_drains_in_flight_requests_then_stops(text_deployments):
    d = text_deployments["gpt2"]
    rt = Runtime(d.deploy)
    bodies = [{"model": t, "prompt": f"drain {i}", "max_tokens": 48, "temperature": 0, "stream": True}
              for i, t in enumerate(d.tasks)]
    expected = [_reference(rt, b)[0][:2] for b in bodies]
    # One row at a time, each step 10 ms slower: the work takes about 4 s in all, far longer than admitting it
    # (a tiny model otherwise finishes before the test can look). No admission limit applies.
    with running_server(d.deploy, "--max-batch", "1", "--max-inflight", "64", "--max-queue-wait", "60",
                        step_delay=0.01) as server:
        async def main():
            async with _client(server.url) as c:
                streams = [c.stream("POST", "/v1/completions", json=b) for b in bodies]
                responses = await asyncio.gather(*(s.__aenter__() for s in streams))  # headers in: all admitted
                assert all(r.status_code == 200 for r in responses)
                m = _metrics(server.url)
                waiting = _sample(m, "promptmux_queue_depth", queue="generate") + _sample(m, "promptmux_running_rows")
                assert waiting >= len(bodies) - 2  # work is in flight when the signal comes
                os.kill(server.pid, signal.SIGTERM)
                assert await _refuses_connections(server.url)  # no new connections while draining

                async def read(r):
                    text, finish = "", None
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            ch = json.loads(line[6:])["choices"][0]
                            text += ch["text"]
                            finish = ch["finish_reason"] or finish
                    return text, finish

                out = await asyncio.gather(*(read(r) for r in responses))
                for s in streams:
                    await s.__aexit__(None, None, None)
                return out

        got = asyncio.run(main())
        assert got == expected
        server.proc.wait(30)
        assert server.proc.returncode in (0, -signal.SIGTERM)
        with socket.socket() as s:
            port = int(server.url.rsplit(":", 1)[1])
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_a_cancelled_generation_leaves_the_running_batch(text_deployments):
    """What a client disconnect or timeout does to generation, at the scheduler: the row leaves at the next step
    while the other rows go on with their own tokens."""
    from promptmux.runtime.generate import SamplingParams
    from promptmux.runtime.scheduler import GenerateJob, Scheduler

    rt = Runtime(text_deployments["gpt2"].deploy)
    sched = Scheduler(rt, max_batch=4)
    step = sched.batch.gen.step

    def slow_step(*args):  # a tiny model is too quick to cancel anything mid-way
        time.sleep(0.005)
        return step(*args)

    sched.batch.gen.step = slow_step
    sched.start()
    try:
        async def main():
            loop = asyncio.get_running_loop()

            def job(prompt, task, n):
                ids = rt.tokenizer(prompt)["input_ids"]
                return GenerateJob(prompts=[ids], view=rt.bank.view(task), loop=loop, tokenizer=rt.tokenizer,
                                   params=SamplingParams(max_new_tokens=n, eos_token_id=[]),
                                   deadline=time.monotonic() + 30)

            gone, kept = job("bye", "prefix", 50), job("stay", "mpt/1", 30)
            sched.submit_generate(gone)
            sched.submit_generate(kept)
            events = list(await gone.queue.get())
            gone.cancelled = True
            sched.wake()
            while events[-1][0] != "finish":
                events += await asyncio.wait_for(gone.queue.get(), 10)
            kept_events = []
            while not kept_events or kept_events[-1][0] != "finish":
                kept_events += await asyncio.wait_for(kept.queue.get(), 10)
            return events, kept_events

        events, kept_events = asyncio.run(main())
    finally:
        sched.stop()
    assert events[-1] == ("finish", 0, "cancelled") and len(events) < 20
    assert sched.running() == 0 and sched.depth("generate") == 0
    tokens = [e[3] for e in kept_events if e[0] == "token" and e[3] is not None]
    alone = rt.generate(["stay"], "mpt/1", max_new_tokens=30, eos_token_id=[])[0]["token_ids"]
    assert tokens == alone and kept_events[-1] == ("finish", 0, "length")


def test_persisted_task_changes_reach_every_server_on_the_store(text_deployments, tmp_path):
    """Two servers on one deployment with --persist-tasks: a task added through one is served by the other at
    once (the store is their log), stays after both stop, and its removal reaches both; the bank's metrics show."""
    from contextlib import ExitStack

    from promptmux.core.folder import read_bank

    d = text_deployments["bert"]
    deploy = tmp_path / "deploy"
    copy_deployment(d.deploy, deploy)
    admin = {"Authorization": f"Bearer {TOKEN}"}
    body = {"task": "extra", "text": "persisted"}
    args = ("--admin-token", TOKEN, "--adapter-root", str(d.adapter_root), "--persist-tasks", "--bank-cache-mb", "1")
    with ExitStack() as stack:
        a, b = (stack.enter_context(running_server(deploy, *args)) for _ in range(2))
        assert httpx.post(b.url + "/v1/classify", json=body).status_code == 404
        r = httpx.post(a.url + "/v1/tasks", json={"name": "extra", "adapter": EXTRA_ADAPTER}, headers=admin)
        assert r.status_code == 200 and r.json()["added"] == ["extra"], r.text
        via_b = httpx.post(b.url + "/v1/classify", json=body)
        via_a = httpx.post(a.url + "/v1/classify", json=body)
        assert via_b.status_code == 200 and via_b.json()["results"] == via_a.json()["results"]
        metrics = httpx.get(b.url + "/metrics").text
        assert "promptmux_bank_cache_misses" in metrics and "promptmux_bank_store_bytes" in metrics
        misses = float(metrics.split("\npromptmux_bank_cache_misses ")[1].split()[0])
        assert misses >= 1  # the new task was read from the store
    assert "extra" in read_bank(deploy)  # the change outlives the servers
    with running_server(deploy, *args) as c:
        assert httpx.post(c.url + "/v1/classify", json=body).json()["results"] == via_a.json()["results"]
        assert httpx.delete(c.url + "/v1/tasks/extra", headers=admin).status_code == 200
        assert httpx.post(c.url + "/v1/classify", json=body).status_code == 404
    assert "extra" not in read_bank(deploy)


def _upload_item(name, adapter_dir, **change):
    import base64

    item = {"name": name, "adapter_config": json.loads((adapter_dir / "adapter_config.json").read_text()),
            "adapter_model": base64.b64encode((adapter_dir / "adapter_model.safetensors").read_bytes()).decode()}
    return {**item, **change}


def test_uploaded_adapters_serve_like_the_folder_and_bad_uploads_leave_nothing(bert_server, text_deployments):
    """POST /v1/tasks/upload: adapters sent in the request (no file on the server's disk) serve exactly as the
    same folders exported; a batch is one transaction; malformed, oversized and lying uploads get a 400 / 413 that
    names the field, and leave no task and no temporary file behind."""
    import base64
    import glob
    import tempfile

    d = text_deployments["bert"]
    admin = {"Authorization": f"Bearer {TOKEN}"}
    url = bert_server.url
    def leftovers():
        return set(glob.glob(f"{tempfile.gettempdir()}/promptmux-upload-*"))

    before = leftovers()
    r = httpx.post(url + "/v1/tasks/upload", headers=admin, json={"tasks": [
        _upload_item("up-pt", d.adapters["pt"]), _upload_item("up-prefix", d.adapters["prefix"])]})
    assert r.status_code == 200 and r.json()["added"] == ["up-pt", "up-prefix"], r.text
    for uploaded, exported in (("up-pt", "pt"), ("up-prefix", "prefix")):
        a = httpx.post(url + "/v1/classify", json={"task": uploaded, "text": "the film was warm"}).json()
        b = httpx.post(url + "/v1/classify", json={"task": exported, "text": "the film was warm"}).json()
        assert a["results"] == b["results"]
    bad = {
        "tasks[1].adapter_model": _upload_item("x2", d.adapters["pt"], adapter_model="not base64!"),
        "tasks[1].adapter_model ": _upload_item("x2", d.adapters["pt"],
                                                adapter_model=base64.b64encode(b"\x00" * 64).decode()),
        "tasks[1].adapter_config": _upload_item("x2", d.adapters["pt"], adapter_config={"peft_type": "LORA"}),
        "tasks[1].name": _upload_item("a/b", d.adapters["pt"]),
    }
    for field, item in bad.items():  # the first item is fine: nothing of the batch may be added
        r = httpx.post(url + "/v1/tasks/upload", headers=admin,
                       json={"tasks": [_upload_item("x1", d.adapters["pt"]), item]})
        assert r.status_code == 400 and r.json()["error"]["field"] == field.strip(), (field, r.text)
    lying = _upload_item("x1", d.adapters["pt"])
    lying["adapter_config"]["num_virtual_tokens"] += 3  # the config says more virtual tokens than the tensor has
    r = httpx.post(url + "/v1/tasks/upload", headers=admin, json={"tasks": [lying]})
    assert r.status_code == 400 and r.json()["error"]["field"] == "tasks[0].adapter_model", r.text
    huge = _upload_item("x1", d.adapters["pt"], adapter_model="A" * (2 << 20))
    assert httpx.post(url + "/v1/tasks/upload", headers=admin, json={"tasks": [huge]}).status_code == 413
    listed = httpx.get(url + "/v1/tasks", headers=admin, params={"limit": 1000}).json()["tasks"]
    assert not {t["name"] for t in listed} & {"x1", "x2", "a/b"}
    assert leftovers() == before
    r = httpx.post(url + "/v1/tasks/upload", headers=admin, json={"replace": True, "tasks": [
        _upload_item("up-pt", d.adapters["pt"]), _upload_item("up-new", d.adapters["pt"])]})
    assert (r.json()["added"], r.json()["replaced"]) == (["up-pt", "up-new"], ["up-pt"]), r.text  # says what went
    assert httpx.delete(url + "/v1/tasks/up-new", headers=admin).json()["removed"] == ["up-new"]
    r = httpx.get(url + "/v1/tasks/upload", headers=admin)  # the POST route asked with GET: not a task "upload"
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.text
    for name in ("up-pt", "up-prefix"):
        assert httpx.delete(url + f"/v1/tasks/{name}", headers=admin).status_code == 200


def _embeds(values: np.ndarray, dtype: str = "float32", shape=None) -> dict:
    import base64

    raw = values.astype("<f4").tobytes() if dtype == "float32" else (
        values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return {"shape": list(shape or values.shape), "dtype": dtype, "data": base64.b64encode(raw).decode()}


def test_inline_prompts_give_a_stored_tasks_tokens_and_bad_ones_name_the_field(text_deployments):
    """serve --allow-inline-prompts: a completion for the base model's served name with the stored task's own prompt
    as prompt_embeds gives that task's tokens (float32; bfloat16 of a bf16-exact prompt too); without prompt_embeds
    the bare base model answers as transformers' generate; every bad payload is a 400 naming the field."""
    from conftest import base_class

    d = text_deployments["gpt2"]
    rt = Runtime(d.deploy)
    prompt = rt.bank.view("pt").tensors["prompt"]
    body = {"prompt": "abc", "max_tokens": 6, "temperature": 0}
    with running_server(d.deploy, "--allow-inline-prompts", "--served-model-name", "base") as server:
        url = server.url + "/v1/completions"
        want = httpx.post(url, json={**body, "model": "pt"}).json()["choices"][0]["text"]
        got = httpx.post(url, json={**body, "model": "base", "prompt_embeds": _embeds(prompt)})
        assert got.status_code == 200 and got.json()["choices"][0]["text"] == want, got.text
        bf16 = (prompt.view(np.uint32) & 0xFFFF0000).view(np.float32)  # exactly representable in bfloat16
        rt.add_task("pt-bf16", d.adapters["pt"])
        rt.bank.add([__import__("dataclasses").replace(rt.bank.view("pt-bf16"), name="bf", tensors={"prompt": bf16})])
        want_bf = rt.generate(["abc"], "bf", max_new_tokens=6)[0]["text"]
        got_bf = httpx.post(url, json={**body, "model": "base", "prompt_embeds": _embeds(bf16, "bfloat16")}).json()
        assert got_bf["choices"][0]["text"] == want_bf
        bare = httpx.post(url, json={**body, "model": "base"}).json()["choices"][0]["text"]
        base = base_class("gpt2").from_pretrained(d.base).eval()
        ids = rt.tokenizer(["abc"], return_tensors="pt")["input_ids"]
        tokens = base.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert bare == rt.tokenizer.decode(tokens[0, ids.shape[1]:])
        assert "base" in [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
        hidden = prompt.shape[1]
        lying = _embeds(prompt)
        lying["shape"] = [prompt.shape[0] + 5, hidden]  # declares more rows than the payload holds
        nan = prompt.copy()
        nan[0, 0] = np.nan
        bad = {
            "prompt_embeds.shape": _embeds(np.zeros((2, hidden + 1), np.float32)),  # another hidden size
            "prompt_embeds.shape ": _embeds(np.zeros((64, hidden), np.float32)),  # more than the positions
            "prompt_embeds.data": lying,
            "prompt_embeds.data ": _embeds(nan),
            "prompt_embeds.data  ": {**_embeds(prompt), "data": "!!" + _embeds(prompt)["data"][2:]},  # not base64
        }
        for field, embeds in bad.items():
            r = httpx.post(url, json={**body, "model": "base", "prompt_embeds": embeds})
            assert r.status_code == 400 and r.json()["error"]["field"] == field.strip(), (field, r.text)
        r = httpx.post(url, json={**body, "model": "pt", "prompt_embeds": _embeds(prompt)})
        assert r.status_code == 400 and r.json()["error"]["field"] == "prompt_embeds"
    with running_server(d.deploy) as server:  # off by default, and says how to turn it on
        r = httpx.post(server.url + "/v1/completions", json={**body, "model": d.deploy.name,
                                                            "prompt_embeds": _embeds(prompt)})
        assert r.status_code == 400 and "--allow-inline-prompts" in r.json()["error"]["message"]
