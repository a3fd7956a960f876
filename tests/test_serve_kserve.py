"""KServe v2 / Open Inference Protocol (runtime/server/kserve*.py), tested with the real tritonclient over HTTP
(binary tensors, its default) and gRPC: the same engine and batches as /v1, the same answers."""

from __future__ import annotations

import json
import os

import httpx
import numpy as np
import pytest

from servekit import server_fixture

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed: pip install "
                                 "'promptmux[grpc]' tritonclient geventhttpclient (.ci/run does)")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.xdist_group("kserve")
TEXTS = ["a warm funny film", "markets fell", "the cup final", "new phones", "flat jokes", "a quiet drama"]


@pytest.fixture(scope="module")
def server(text_deployments):
    d = text_deployments["bert"]
    yield from server_fixture(d.deploy, "--grpc-port", "0", "--max-body-bytes", "65536", "--admin-token", "t",
                              "--adapter-root", str(d.adapter_root))


@pytest.fixture(scope="module")
def clients(server):
    http = httpclient.InferenceServerClient(server.url.removeprefix("http://"), concurrency=8)
    grpc = grpcclient.InferenceServerClient(server.grpc)
    yield {"http": (httpclient, http), "grpc": (grpcclient, grpc)}
    http.close()
    grpc.close()


def _text_input(module, texts):
    x = module.InferInput("text", [len(texts)], "BYTES")
    x.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    return x


def _v1(server, task, texts):
    r = httpx.post(server.url + "/v1/classify", json={"task": task, "texts": texts}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def _same_scores(got, want_scores):
    """A protocol's float32 scores equal /v1's to float32 rounding. Not bit for bit even for the same batch: the third
    batch of a shape on OpenVINO gets a shape-specialised model, whose kernels round differently in the last bits."""
    want = np.array(want_scores, np.float32)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() < 1e-5, np.abs(got - want).max()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tritonclient_classifies_mixed_tasks_concurrently_with_the_scores_of_v1(server, clients, text_deployments,
                                                                                 protocol):
    module, client = clients[protocol]
    tasks = text_deployments["bert"].tasks
    want = {t: _v1(server, t, TEXTS) for t in tasks}

    def one(task):
        return client.infer(task, [_text_input(module, TEXTS)])

    # every task at the same time, so that their rows share batches (the clients' own asynchronous calls: the
    # HTTP client runs on gevent and stays in its thread)
    if protocol == "http":
        results = [r.get_result() for r in [client.async_infer(t, [_text_input(module, TEXTS)]) for t in tasks]]
    else:  # the gRPC client is thread-safe
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(tasks)) as pool:
            results = list(pool.map(one, tasks))
    for task, result in zip(tasks, results):
        # batched with other tasks' rows (another padded width): the same to float32 rounding
        _same_scores(result.as_numpy("scores"), [r["scores"] for r in want[task]])
        assert result.as_numpy("label_id").tolist() == [r["label_id"] for r in want[task]]
        assert [x.decode() for x in result.as_numpy("label")] == [r["label"] for r in want[task]]
    # alone, as the /v1 requests were: the same batch, so the same scores (v1's JSON floats are float32's), to the
    # last bits where both ran on one model; a recurring shape may have moved to its OpenVINO shape-specialised model
    for task in tasks[:3]:
        alone = one(task).as_numpy("scores")
        _same_scores(alone, [r["scores"] for r in want[task]])
    # input_ids with a padding mask give the same scores as the text they came from
    from promptmux.runtime.text import load_tokenizer

    tok = load_tokenizer(text_deployments["bert"].deploy)
    enc = tok(TEXTS[:2], padding=True, return_tensors="np")
    ids = module.InferInput("input_ids", list(enc["input_ids"].shape), "INT64")
    ids.set_data_from_numpy(enc["input_ids"].astype(np.int64))
    mask = module.InferInput("attention_mask", list(enc["attention_mask"].shape), "INT64")
    mask.set_data_from_numpy(enc["attention_mask"].astype(np.int64))
    got = client.infer("pt", [ids, mask], outputs=[module.InferRequestedOutput("scores")])
    assert got.as_numpy("label_id") is None  # only what was asked for
    pair = _v1(server, "pt", TEXTS[:2])  # the same two rows in one batch
    _same_scores(got.as_numpy("scores"), [r["scores"] for r in pair])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_liveness_readiness_and_model_metadata(server, clients, text_deployments, protocol):
    _, client = clients[protocol]
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mpt/1") and not client.is_model_ready("no-such-task")
    md = client.get_model_metadata("pt", as_json=True) if protocol == "grpc" else client.get_model_metadata("pt")
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in md["inputs"]}
    outputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in md["outputs"]}
    labels = len(_v1(server, "pt", TEXTS[:1])[0]["scores"])
    assert inputs == {"text": ("BYTES", [-1]), "input_ids": ("INT64", [-1, -1]), "attention_mask": ("INT64", [-1, -1])}
    assert outputs == {"scores": ("FP32", [-1, labels]), "label_id": ("INT64", [-1]), "label": ("BYTES", [-1])}
    server_md = client.get_server_metadata(as_json=True) if protocol == "grpc" else client.get_server_metadata()
    assert server_md["name"] == "promptmux" and "binary_tensor_data" in server_md["extensions"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_fail_cleanly_naming_what_is_wrong_and_the_server_goes_on(server, clients, protocol):
    module, client = clients[protocol]

    def fails(task, inputs, status, words):
        with pytest.raises(InferenceServerException) as e:
            client.infer(task, inputs)
        assert words in e.value.message(), e.value.message()
        assert str(status) in str(e.value.status()), e.value.status()

    grpc_code = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED"}
    code = (lambda s: s) if protocol == "http" else grpc_code.get
    fails("no-such-task", [_text_input(module, TEXTS)], code(404), "unknown task 'no-such-task'")
    wrong = module.InferInput("input_ids", [1, 3], "FP32")
    wrong.set_data_from_numpy(np.ones((1, 3), np.float32))
    fails("pt", [wrong], code(400), "inputs['input_ids'].datatype")
    half = module.InferInput("input_ids", [1, 3], "FP16")  # gRPC has no typed field for FP16: raw bytes only
    half.set_data_from_numpy(np.ones((1, 3), np.float16))
    fails("pt", [half], code(400), "input_ids are INT64")
    ids = module.InferInput("input_ids", [1, 3], "INT64")
    ids.set_data_from_numpy(np.ones((1, 3), np.int64))
    mask = module.InferInput("attention_mask", [1, 2], "INT64")
    mask.set_data_from_numpy(np.ones((1, 2), np.int64))
    fails("pt", [ids, mask], code(400), "inputs['attention_mask'].shape")
    fails("pt", [_text_input(module, ["x" * 70000])], code(413), "" if protocol == "grpc" else "body")
    unknown = module.InferInput("image", [1], "BYTES")
    unknown.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    fails("pt", [unknown], code(400), "inputs['image']")
    assert client.infer("pt", [_text_input(module, TEXTS[:1])]).as_numpy("label_id").shape == (1,)
    assert "no-such-task" not in httpx.get(server.url + "/metrics").text  # no label value from a client's name


def test_grpc_typed_contents_are_read_like_raw_ones(server):
    """A client that sends typed contents (not tritonclient's raw_input_contents) gets the same answer."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as rpc

    tensor = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[2],
                                                   contents=pb.InferTensorContents(bytes_contents=[b"new phones",
                                                                                                   b"flat jokes"]))
    with grpc.insecure_channel(server.grpc) as channel:
        reply = rpc.GRPCInferenceServiceStub(channel).ModelInfer(pb.ModelInferRequest(
            model_name="pt", inputs=[tensor], outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="label_id")]))
    assert [o.name for o in reply.outputs] == ["label_id"] and list(reply.outputs[0].shape) == [2]
    got = np.frombuffer(reply.raw_output_contents[0], "<i8").tolist()
    assert got == [r["label_id"] for r in _v1(server, "pt", ["new phones", "flat jokes"])]


def test_grpc_shape_of_more_elements_than_int64_holds_is_a_bad_request(server):
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as rpc

    tensor = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1 << 32, 1 << 32])
    with grpc.insecure_channel(server.grpc) as channel, pytest.raises(grpc.RpcError) as e:
        rpc.GRPCInferenceServiceStub(channel).ModelInfer(pb.ModelInferRequest(model_name="pt", inputs=[tensor]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "more than a request carries" in e.value.details()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_versioned_model_routes_serve_version_1(server, clients, protocol):
    module, client = clients[protocol]
    assert client.is_model_ready("mpt/1", model_version="1") and not client.is_model_ready("pt", model_version="2")
    md = client.get_model_metadata("pt", model_version="1", **({"as_json": True} if protocol == "grpc" else {}))
    assert md["name"] == "pt"
    got = client.infer("pt", [_text_input(module, TEXTS[:1])], model_version="1")
    assert got.as_numpy("label_id").shape == (1,)


LOAD = int(os.environ.get("PROMPTMUX_TEST_V2_LOAD", "1000"))  # the size (about 5 s on 2 cores)


def test_mixed_load_over_v2_http_v2_grpc_and_v1_at_once_nothing_misrouted(server, text_deployments):
    """LOAD single-text requests, random task, text and protocol, 32 at a time: each answer is its own task's."""
    import asyncio
    import random

    import tritonclient.grpc.aio as grpc_aio
    import tritonclient.http.aio as http_aio

    tasks = text_deployments["bert"].tasks
    want = {(t, x): r["scores"] for t in tasks for x, r in zip(TEXTS, _v1(server, t, TEXTS))}
    rng = random.Random(0)
    jobs = [(rng.choice(("v1", "http", "grpc")), rng.choice(tasks), rng.choice(TEXTS)) for _ in range(LOAD)]

    async def run():
        http = http_aio.InferenceServerClient(server.url.removeprefix("http://"))
        grpc = grpc_aio.InferenceServerClient(server.grpc)
        gate = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as v1:
            async def one(protocol, task, text):
                async with gate:
                    if protocol == "v1":
                        r = await v1.post("/v1/classify", json={"task": task, "text": text})
                        assert r.status_code == 200, r.text
                        return r.json()["results"][0]["scores"]
                    module = http_aio if protocol == "http" else grpc_aio
                    client = http if protocol == "http" else grpc
                    result = await client.infer(task, [_text_input(module, [text])])
                    return result.as_numpy("scores")[0].tolist()
            try:
                return await asyncio.gather(*(one(*j) for j in jobs), return_exceptions=True)
            finally:
                await http.close()
                await grpc.close()

    answers = asyncio.run(run())
    failed = [(j, a) for j, a in zip(jobs, answers) if isinstance(a, BaseException)]
    assert failed == []
    wrong = [j for j, a in zip(jobs, answers) if np.abs(np.array(a) - want[j[1:]]).max() > 1e-5]
    assert wrong == [] and {p for p, _, _ in jobs} == {"v1", "http", "grpc"}
    # counted per protocol in the same metrics (endpoint: the route, or grpc:METHOD)
    metrics = httpx.get(server.url + "/metrics").text
    for endpoint in ("/v1/classify", "/v2/models/{task:path}/infer", "grpc:ModelInfer"):
        assert f'promptmux_requests_total{{endpoint="{endpoint}"' in metrics, endpoint


def test_v2_http_json_and_errors_in_the_protocols_body(server):
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": TEXTS[:2]}],
            "outputs": [{"name": "label"}, {"name": "scores"}]}
    r = httpx.post(server.url + "/v2/models/pt/infer", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    out = {o["name"]: o for o in r.json()["outputs"]}
    want = _v1(server, "pt", TEXTS[:2])
    assert out["label"]["data"] == [w["label"] for w in want] and set(out) == {"label", "scores"}
    scores = np.array(out["scores"]["data"], np.float32).reshape(out["scores"]["shape"])
    _same_scores(scores, [w["scores"] for w in want])
    for bad, words in (({"inputs": []}, "inputs:"), ({**body, "outputs": [{"name": "logits"}]}, "outputs[0].name"),
                       ({"inputs": [{**body["inputs"][0], "shape": [3]}]}, "2 values for shape [3]"),
                       ({"inputs": [{**body["inputs"][0], "shape": [1 << 32, 1 << 32], "data": []}]},
                        "more than a request carries")):  # numpy's product of that shape wraps to 0
        r = httpx.post(server.url + "/v2/models/pt/infer", json=bad)
        assert r.status_code == 400 and words in r.json()["error"], r.text
    r = httpx.post(server.url + "/v2/models/pt/infer", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"].startswith("body: malformed JSON")


def test_a_task_added_at_run_time_is_a_ready_model_at_once(server, clients):
    _, grpc = clients["grpc"]
    assert httpx.get(server.url + "/v2/models/late/ready").status_code == 404 and not grpc.is_model_ready("late")
    admin = {"Authorization": "Bearer t"}
    r = httpx.post(server.url + "/v1/tasks", headers=admin, json={"name": "late", "adapter": "pt"})
    assert r.status_code in (200, 201), r.text
    try:
        assert httpx.get(server.url + "/v2/models/late/ready").json() == {"name": "late", "ready": True}
        assert grpc.is_model_ready("late")
    finally:
        httpx.delete(server.url + "/v1/tasks/late", headers=admin)


def test_compressed_requests_are_read_and_bounded_once_decompressed(server):
    import gzip
    import zlib

    http = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    want = http.infer("pt", [_text_input(httpclient, TEXTS)]).as_numpy("scores")
    for algorithm in ("gzip", "deflate"):  # tritonclient's request compression
        got = http.infer("pt", [_text_input(httpclient, TEXTS)], request_compression_algorithm=algorithm)
        _same_scores(got.as_numpy("scores"), want)
    http.close()
    body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["new phones"]}]})
    url = server.url + "/v2/models/pt/infer"
    two = gzip.compress(body[:20].encode()) + gzip.compress(body[20:].encode())  # two members (RFC 1952)
    assert httpx.post(url, content=two, headers={"content-encoding": "gzip"}).status_code == 200
    bare = zlib.compressobj(wbits=-zlib.MAX_WBITS)  # deflate without zlib's framing (RFC 1951), as some clients send
    bare = bare.compress(body.encode()) + bare.flush()
    assert httpx.post(url, content=bare, headers={"content-encoding": "deflate"}).json() == \
        httpx.post(url, content=body).json()
    for raw, encoding, status, words in (
            (gzip.compress(body.encode()) + b"GARBAGE", "gzip", 400, "does not decompress"),
            (gzip.compress(body.encode())[:-9], "gzip", 400, "cut short"),
            (b"not gzip", "gzip", 400, "does not decompress"),
            (bare + b"GARBAGE", "deflate", 400, "data after its end"),
            (gzip.compress(b" " * 70000), "gzip", 413, "once decompressed"),  # small as sent, over the 64 KiB cap
            (body.encode(), "br", 415, "'br' is not read")):
        r = httpx.post(url, content=raw, headers={"content-encoding": encoding})
        assert r.status_code == status and words in r.json()["error"], (encoding, r.text)
    r = httpx.get(url)  # a POST route asked with GET: not an unknown model named "pt/infer"
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.text


@pytest.fixture(scope="module")
def lm_server(text_deployments):
    yield from server_fixture(text_deployments["gpt2"].deploy)


def test_generate_extension_gives_the_tokens_of_v1_completions_streaming_and_not(lm_server):
    url = lm_server.url
    for task in ("pt", "prefix", "mpt/1"):
        params = {"max_tokens": 8, "temperature": 0}
        v1 = httpx.post(url + "/v1/completions", json={"model": task, "prompt": "ab c", **params}, timeout=60).json()
        r = httpx.post(url + f"/v2/models/{task}/generate", json={"text_input": "ab c", "parameters": params}, timeout=60)
        assert r.status_code == 200 and r.json() == {"model_name": task, "model_version": "1",
                                                     "text_output": v1["choices"][0]["text"]}, r.text
        with httpx.stream("POST", url + f"/v2/models/{task}/generate_stream", timeout=60,
                          json={"text_input": "ab c", "parameters": params}) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
        assert len(events) == v1["usage"]["completion_tokens"]  # one event per token
        assert "".join(e["text_output"] for e in events) == v1["choices"][0]["text"]
    md = httpx.get(url + "/v2/models/pt").json()
    assert [t["name"] for t in md["inputs"]] == ["text_input"] and [t["name"] for t in md["outputs"]] == ["text_output"]
    for body, status, words in (
            ({"text_input": "ab", "parameters": {"max_tokens": 0}}, 400, "parameters.max_tokens"),
            ({"text_input": "ab", "parameters": {"beam_width": 2}}, 400, "parameters.beam_width: unknown parameter"),
            ({"text_input": ["ab"]}, 400, "text_input"),
            ({"text_input": "ab", "parameters": {"stop": [""]}}, 400, "parameters.stop[0]: "),
            ({"text_input": "ab " * 40}, 400, "text_input: "),  # over the model's positions
            ({"text_input": "ab", "parameters": {"max_tokens": 60}}, 400, "parameters.max_tokens: ")):
        r = httpx.post(url + "/v2/models/pt/generate", json=body)
        assert r.status_code == status and words in r.json()["error"], r.text
    r = httpx.post(url + "/v2/models/pt/versions/1/generate", json={"text_input": "ab c", "parameters": params,
                                                                    "id": "req-7"})
    assert (r.json()["model_name"], r.json()["id"]) == ("pt", "req-7"), r.text  # versioned; the id echoed
    with httpx.stream("POST", url + "/v2/models/pt/versions/1/generate_stream",
                      json={"text_input": "ab c", "id": "req-8"}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert s.status_code == 200 and events and all(e["id"] == "req-8" for e in events)
    r = httpx.post(url + "/v2/models/pt/versions/2/generate", json={"text_input": "ab c"})
    assert r.status_code == 404 and "only version 1" in r.json()["error"], r.text
    r = httpx.post(url + "/v2/models/nope/generate", json={"text_input": "ab"})
    assert r.status_code == 404 and "unknown task 'nope'" in r.json()["error"]
    r = httpx.post(url + "/v2/models/pt/infer", json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                                                  "data": ["ab"]}]})
    assert r.status_code == 400 and "generate" in r.json()["error"]


def test_the_served_name_is_a_ready_model_and_counts_in_a_page_of_models(lm_server, text_deployments):
    """The base model's name (no prompt) is served by the generate extension, so it is ready and has metadata;
    /v1/models puts it first and it counts toward the page's limit, pages of one walking every name once."""
    url = lm_server.url
    served = text_deployments["gpt2"].deploy.resolve().name
    assert httpx.get(url + f"/v2/models/{served}/ready").json() == {"name": served, "ready": True}
    assert [t["name"] for t in httpx.get(url + f"/v2/models/{served}").json()["inputs"]] == ["text_input"]
    seen, after = [], None
    while True:
        page = httpx.get(url + "/v1/models", params={"limit": 1, **({"after": after} if after else {})}).json()
        assert len(page["data"]) == 1 and page["last_id"] == page["data"][0]["id"], page
        seen.append(page["last_id"])
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == [served] + sorted(text_deployments["gpt2"].tasks)
