"""`promptmux serve DIR --ray --replicas 2` on a local Ray instance: the same API behind Ray Serve's HTTP proxy,
an engine and bank per replica, both replicas answering, results identical to a single runtime's, and requests
routed by task with --multiplex-tasks."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest
from conftest import copy_deployment
from servekit import EXTRA_ADAPTER, running_server

from promptmux import Runtime

pytest.importorskip("ray.serve", reason="the Ray Serve test needs ray[serve]")



def test_two_ray_serve_replicas_serve_the_same_api(text_deployments):
    d = text_deployments["gpt2"]
    rt = Runtime(d.deploy)
    bodies = [{"model": d.tasks[i % len(d.tasks)], "prompt": f"ray {i} says", "max_tokens": 8, "temperature": 0,
               "stream": i % 2 == 1} for i in range(48)]
    expected = [rt.generate([b["prompt"]], b["model"], max_new_tokens=8)[0]["text"] for b in bodies]
    with running_server(d.deploy, "--ray", "--replicas", "2", "--replica-cpus", "1", "--admin-token", "t",
                        "--adapter-root", str(d.adapter_root), "--multiplex-tasks", "4") as server:
        async def one(c, body):
            if not body["stream"]:
                r = await c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"], r.headers["x-promptmux-worker"]
            text = ""
            async with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        text += json.loads(line[6:])["choices"][0]["text"]
                return text, r.headers["x-promptmux-worker"]

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
                return await asyncio.gather(*(one(c, b) for b in bodies))

        results = asyncio.run(main())
        assert [text for text, _ in results] == expected
        workers = {worker for _, worker in results}
        # Ray's router picks between replicas by the queue lengths they report; a burst can all go to one (1 full
        # run in 3 here sent all 48 there), so the same burst again until both have answered, at most 4 times more.
        for _ in range(4):
            if len(workers) == 2:
                break
            again = asyncio.run(main())
            assert [text for text, _ in again] == expected
            workers |= {worker for _, worker in again}
        assert len(workers) == 2  # both replicas answered
        # --multiplex-tasks: a request naming its task in Serve's header goes to the replica that served the task
        # (once the router has heard which replica holds it); one without the header went to both, above.
        routed = {}
        for task in d.tasks[:3]:
            body = {"model": task, "prompt": "ray routed", "max_tokens": 2, "temperature": 0}
            head = {"serve_multiplexed_model_id": task}
            httpx.post(server.url + "/v1/completions", json=body, headers=head, timeout=60)
            time.sleep(2)  # replicas report their tasks to the router in the background
            routed[task] = {httpx.post(server.url + "/v1/completions", json=body, headers=head,
                                       timeout=60).headers["x-promptmux-worker"] for _ in range(8)}
        assert all(len(workers) == 1 for workers in routed.values()), routed  # by chance: 1 in 128 a task
        models = httpx.get(server.url + "/v1/models").json()
        assert sorted(m["id"] for m in models["data"]) == sorted([*d.tasks, d.deploy.name])  # + the base model
        bad = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "a"})
        assert bad.status_code == 404 and bad.json()["error"]["field"] == "model"
        # A task added through one replica goes live on both (they follow one task log), then leaves both.
        admin = {"Authorization": "Bearer t"}
        r = httpx.post(server.url + "/v1/tasks", json={"name": "extra", "adapter": EXTRA_ADAPTER}, headers=admin)
        assert r.status_code == 200 and r.json()["added"] == ["extra"] and r.json()["tasks"] > 1, r.text
        rt.add_task("extra", d.adapters[EXTRA_ADAPTER])
        want = rt.generate(["ray extra"], "extra", max_new_tokens=8)[0]["text"]
        body = {"model": "extra", "prompt": "ray extra", "max_tokens": 8, "temperature": 0}
        assert _until(lambda: _statuses(server.url, body) == {200}), "a replica never got the new task"
        # Both replicas serve it, with the same text: requests until each has answered one (Ray's router picks by
        # queue length, so a busy moment can send a run of requests to one replica; bounded at 64).
        served = []
        while len(served) < 64 and len({s.headers["x-promptmux-worker"] for s in served}) < 2:
            served.append(httpx.post(server.url + "/v1/completions", json=body))
        assert {s.json()["choices"][0]["text"] for s in served} == {want}
        assert len({s.headers["x-promptmux-worker"] for s in served}) == 2
        r = httpx.delete(server.url + "/v1/tasks/extra", headers=admin)
        assert r.status_code == 200 and r.json()["removed"] == ["extra"]
        assert _until(lambda: _statuses(server.url, body) == {404}), "a replica kept the removed task"
        assert server.stop(signal.SIGTERM, timeout=90) == 0  # Serve and the local Ray instance shut down


def _statuses(url, body, n=12):
    return {httpx.post(url + "/v1/completions", json=body).status_code for _ in range(n)}


def _until(check, seconds=15.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.3)
    return False


def test_ray_replicas_with_persisted_tasks_share_the_store(text_deployments, tmp_path):
    """--persist-tasks: the replicas share the deployment's store instead of a task log. A task added through one
    replica is served by both within a second, and is in the store (it outlives every replica); its removal
    reaches both."""

    from promptmux.core.folder import read_bank

    d = text_deployments["gpt2"]
    deploy = tmp_path / "deploy"
    copy_deployment(d.deploy, deploy)
    admin = {"Authorization": "Bearer t"}
    body = {"model": "shared", "prompt": "ray store", "max_tokens": 4, "temperature": 0}
    with running_server(deploy, "--ray", "--replicas", "2", "--replica-cpus", "1", "--admin-token", "t",
                        "--adapter-root", str(d.adapter_root), "--persist-tasks") as server:
        r = httpx.post(server.url + "/v1/tasks", json={"name": "shared", "adapter": EXTRA_ADAPTER}, headers=admin)
        assert r.status_code == 200, r.text
        assert "shared" in read_bank(deploy)
        served = []
        while len(served) < 64 and len({s.headers["x-promptmux-worker"] for s in served}) < 2:
            served.append(httpx.post(server.url + "/v1/completions", json=body))
        assert {s.status_code for s in served} == {200}  # no replica missed it: the store is read at each lookup
        assert len({s.headers["x-promptmux-worker"] for s in served}) == 2
        assert len({s.json()["choices"][0]["text"] for s in served}) == 1
        assert httpx.delete(server.url + "/v1/tasks/shared", headers=admin).status_code == 200
        assert _until(lambda: _statuses(server.url, body) == {404}, 1.5), "a replica kept the removed task"
        assert server.stop(signal.SIGTERM, timeout=90) == 0
    assert "shared" not in read_bank(deploy)
