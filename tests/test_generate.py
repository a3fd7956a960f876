"""Cached generation through the deployment's decoder graphs.

Greedy generation must be token-identical to PEFT's `generate` for every prompt kind x {GPT-2,
Llama (grouped-query attention), T5}, in mixed-task batches (single-task too on Llama) with left padding and
different prompt lengths, and (causal LMs) with and without precomputed prompt key/values; a
seq2seq model has nothing to precompute (its prompts sit in the bidirectional encoder, its
prefixes already are keys/values). PEFT is run with its defaults (use_cache=True): PEFT's
prepare_inputs_for_generation handles the virtual tokens in the cache for every kind here, so no
workaround is needed; eos_token_id=None keeps both sides generating the full length, and
pad_token_id is given because the tiny causal configs have none.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import adapter_configs, copy_deployment, is_seq2seq, peft_generate, random_batch

from promptmux import InputError, Runtime, UnknownTaskError

DECODERS = ["gpt2", "llama"]
GENERATORS = DECODERS + ["t5"]
NEW = 7


def _precompute_modes(arch):
    return [True] if is_seq2seq(arch) else [True, False]


def _cases():
    """Single-task generation on one architecture, for diagnosis: the mixed-task tests below check every task of
    every generator row by row already."""
    return [("llama", name, pre) for name in adapter_configs("llama") for pre in _precompute_modes("llama")]


def _case_id(arch, name, pre):
    return f"{arch}-{name}" + ("" if is_seq2seq(arch) else "-precomputed-kv" if pre else "-inline-prompt")


@pytest.mark.parametrize("deployment,adapter,precompute", _cases(), indirect=["deployment"],
                         ids=[_case_id(*c) for c in _cases()])
def test_single_task_greedy_matches_peft_generate(deployment, adapter, precompute):
    rt = deployment.runtime()
    ids, mask = random_batch(deployment.arch, rows=3, seq=6, seed=21, padding_side="left")
    for task in [t for t in deployment.task_names() if t == adapter or t.startswith(adapter + "/")]:
        got = rt.generate({"input_ids": ids, "attention_mask": mask}, task, max_new_tokens=NEW,
                          eos_token_id=[], precompute=precompute)
        assert [r["token_ids"] for r in got] == peft_generate(deployment, task, ids, mask), task
        assert all(r["finish_reason"] == "length" for r in got)


_MIXED = [(arch, pre) for arch in GENERATORS for pre in _precompute_modes(arch)]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("deployment,precompute", _MIXED, indirect=["deployment"],
                         ids=[_case_id(a, "mixed", p) for a, p in _MIXED])
def test_mixed_task_greedy_matches_peft_generate_row_by_row(deployment, precompute, backend):
    rt = deployment.runtime(backend)
    names = deployment.task_names()
    ids, mask = random_batch(deployment.arch, rows=len(names) + 2, seq=7, seed=4, padding_side="left")
    tasks = [names[i % len(names)] for i in range(len(ids))][::-1]
    got = rt.generate({"input_ids": ids, "attention_mask": mask}, tasks, max_new_tokens=NEW, eos_token_id=[],
                      precompute=precompute)
    for name in names:
        rows = [i for i, t in enumerate(tasks) if t == name]
        assert [got[i]["token_ids"] for i in rows] == peft_generate(deployment, name, ids[rows], mask[rows]), name


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_a_generation_only_export_generates_the_same_tokens_and_refuses_forward(deployment, tmp_path):
    """export_deployment(generation_only=True) writes the cached decoder alone (no model.onnx); its tokens are the
    full deployment's, and forward() says what is missing."""
    import json

    from promptmux import export_deployment

    out = export_deployment(deployment.base, deployment.adapters, tmp_path / "gen", quiet=True, generation_only=True)
    assert not (out / "model.onnx").exists() and json.loads((out / "manifest.json").read_text())["graph"]["file"] is None
    names = deployment.task_names()
    ids, mask = random_batch("gpt2", rows=len(names), seq=5, seed=3, padding_side="left")
    inputs = {"input_ids": ids, "attention_mask": mask}
    rt = Runtime(out)
    got = rt.generate(inputs, names, max_new_tokens=4, eos_token_id=[])
    want = deployment.runtime().generate(inputs, names, max_new_tokens=4, eos_token_id=[])
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in want]
    with pytest.raises(InputError, match="exported for generation only"):
        rt.forward(ids, mask, names)


@pytest.mark.parametrize("deployment", ["llama", "t5"], indirect=True)
def test_openvino_decode_steps_hand_over_their_kv_without_a_copy(deployment):
    """A decode step's presents are written by OpenVINO into arrays the generator then owns (as ONNX Runtime's
    outputs are), not copied out of the request's memory every step."""
    rt = deployment.runtime("openvino")
    names = deployment.task_names()
    ids, mask = random_batch(deployment.arch, rows=2, seq=5, seed=6, padding_side="left")
    calls = []
    session = rt.generator.decoder if hasattr(rt.generator, "decoder") else rt.generator.session
    run_all = session.run_all

    def spy(feeds, bank_key=None):
        out = run_all(feeds)
        request = session._request(feeds)
        calls.append([np.shares_memory(out[i], request.get_output_tensor(i).data) for i in range(len(out))])
        return out

    session.run_all = spy  # on the runtime the module's other tests share: taken off again below
    try:
        rt.generate({"input_ids": ids, "attention_mask": mask}, names[:2], max_new_tokens=3, eos_token_id=[])
    finally:
        del session.run_all
    assert len(calls) >= 2 and all(all(c) for c in calls), calls


@pytest.mark.parametrize("deployment", ["llama", "t5"], indirect=True)
def test_torch_backend_generates_the_same_tokens(deployment):
    names = deployment.task_names()
    ids, mask = random_batch(deployment.arch, rows=len(names), seq=5, seed=8, padding_side="left")
    inputs = {"input_ids": ids, "attention_mask": mask}
    a = deployment.runtime().generate(inputs, names, max_new_tokens=5, eos_token_id=[])
    b = deployment.runtime("torch").generate(inputs, names, max_new_tokens=5, eos_token_id=[])
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_precomputed_prompt_kv_equals_running_the_virtual_tokens(deployment):
    """The bank's precomputed KV is what the virtual tokens produce at the front of any input."""
    rt = deployment.runtime()
    gen = rt.generator
    view = rt.bank.view("ptlstm")
    kv = gen.prompt_kv(view)
    assert kv.shape == (2, 2, 4, 5, 8)  # layers, key/value, heads, virtual tokens, head dim
    ids, mask = random_batch("gpt2", rows=1, seq=4, seed=0, padding_side="left")
    lay = gen._layout(ids, mask, [view])  # inline: virtual tokens run with the text
    _, presents = gen._run(lay.feeds, np.zeros(1, np.int64))
    inline = np.stack([np.stack([presents[2 * i][0], presents[2 * i + 1][0]]) for i in range(2)])[:, :, :, :5]
    assert float(np.abs(inline - kv).max()) < 1e-5


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_prompt_kv_cache_is_bounded_and_cold_tasks_give_the_same_tokens(deployment):
    """A cache with room for about two tasks' key/values: it never holds more, evicts the least recently used, and
    tasks computed again after eviction generate the tokens of a runtime that keeps them all."""
    from promptmux.kinds import kind_of

    everything = Runtime(deployment.deploy)
    names = [n for n in everything.tasks if kind_of(everything.bank.view(n)).kv_prefix(everything.bank.view(n)) is None]
    one = everything.generator.prompt_kv(everything.bank.view(names[0])).nbytes
    small = Runtime(deployment.deploy, kv_cache_mb=2.5 * one / 2**20)
    ids, mask = random_batch("gpt2", rows=len(names), seq=5, seed=2, padding_side="left")
    for order in (names, names[::-1]):  # the second pass finds the first pass's tasks evicted
        got = small.generate({"input_ids": ids, "attention_mask": mask}, order, max_new_tokens=4, eos_token_id=[])
        want = everything.generate({"input_ids": ids, "attention_mask": mask}, order, max_new_tokens=4,
                                   eos_token_id=[])
        assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
        assert 0 < small.prompt_kv_bytes() <= small.kv_cache_bytes
        assert len(small.generator.cached_tasks()) < len(names)
    assert small.generator.cached_tasks()[-1] == order[-1]  # the most recently used stays


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_prompt_kv_is_computed_when_tasks_load(deployment):
    rt = Runtime(deployment.deploy)
    gen = rt.generator
    from promptmux.kinds import kind_of

    cached = {n for n in rt.tasks if kind_of(rt.bank.view(n)).kv_prefix(rt.bank.view(n)) is None}
    assert sorted(gen.cached_tasks()) == sorted(cached)
    rt.add_task("extra", deployment.adapters["pt"])
    assert "extra" in gen.cached_tasks()
    kv = gen.prompt_kv(rt.bank.view("extra"))
    rt.add_task("extra", deployment.adapters["ptmlp"], replace=True)  # replaced: its KV is computed again
    assert gen.prompt_kv(rt.bank.view("extra")) is not kv and "extra" in gen.cached_tasks()
    rt.remove_task("extra")
    assert "extra" not in gen.cached_tasks()


@pytest.mark.parametrize("deployment", ["gpt2", "t5"], indirect=True)
def test_ragged_rows_of_ids_generate_as_if_each_ran_alone(deployment):
    """With own_positions (a causal LM's prompt-tuned rows otherwise follow PEFT's padded batch; a seq2seq row's
    encoder never counts padding)."""
    rt = deployment.runtime()
    rows, tasks = [[5, 6, 7, 8, 9], [11, 12]], deployment.task_names()[:2]
    got = rt.generate(rows, tasks, max_new_tokens=4, eos_token_id=[], own_positions=True)
    alone = [rt.generate([r], t, max_new_tokens=4, eos_token_id=[])[0] for r, t in zip(rows, tasks)]
    assert [g["token_ids"] for g in got] == [a["token_ids"] for a in alone]
    with pytest.raises(InputError, match="empty prompt: a row of input_ids has no tokens"):
        rt.generate([[5, 6], []], tasks, max_new_tokens=2)
    with pytest.raises(InputError, match=r"inputs mix texts and other values \(item 1 is int\)"):
        rt.generate(["hi", 5], tasks, max_new_tokens=2)
    with pytest.raises(InputError, match=r"got shape \(2,\) \(one row of token ids goes in a list of its own"):
        rt.generate([5, 6], tasks[0], max_new_tokens=2)


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_a_right_padded_row_of_ids_continues_its_text_as_alone(deployment):
    """The README's claim: padding after a row's text (a right-padded batch) is read by the mask; the row gets the
    tokens it gets alone, for a prompt kind and a prefix kind."""
    rt = deployment.runtime()
    ids = np.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = np.array([[1] * 6, [1, 1, 1, 0, 0, 0]])
    for task in ("pt", "prefix"):
        got = rt.generate({"input_ids": ids, "attention_mask": mask}, task, max_new_tokens=4, eos_token_id=[])
        alone = rt.generate([[11, 12, 13]], task, max_new_tokens=4, eos_token_id=[])[0]["token_ids"]
        padded_read = rt.generate([[11, 12, 13, 0, 0, 0]], task, max_new_tokens=4, eos_token_id=[])[0]["token_ids"]
        assert got[1]["token_ids"] == alone != padded_read, task  # padding read as text gives other tokens


def _decoder_batches(rt, monkeypatch) -> list[int]:
    """The batch size of every decoder call rt's generator makes from now on."""
    session = getattr(rt.generator, "decoder", None) or rt.generator.session
    seen, run_all = [], session.run_all

    def counted(feeds):
        seen.append(len(feeds["input_ids"]))
        return run_all(feeds)

    monkeypatch.setattr(session, "run_all", counted)
    return seen


@pytest.mark.parametrize("deployment", ["gpt2", "t5"], indirect=True)
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_rows_stop_on_their_own_eos_and_leave_the_decoders_batch(deployment, sample, monkeypatch):
    """A row that ends stops costing decoder work, and the other rows' tokens stay those they get without its end
    (sampled too: the shared seeded generator draws as many numbers whichever rows have ended)."""
    rt = deployment.runtime()
    ids, mask = random_batch(deployment.arch, rows=2, seq=5, seed=2, padding_side="left")
    inputs = {"input_ids": ids, "attention_mask": mask}
    kw = dict(max_new_tokens=6, do_sample=sample, temperature=1.5, seed=7)
    free = rt.generate(inputs, ["pt", "prefix"], eos_token_id=[], **kw)
    first = free[0]["token_ids"].index(free[0]["token_ids"][1])  # one of row 0's first tokens becomes the EOS
    eos = free[0]["token_ids"][first]

    def until_eos(tokens):  # each row stops at its own first EOS, included
        return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens

    batches = _decoder_batches(rt, monkeypatch)
    got = rt.generate(inputs, ["pt", "prefix"], eos_token_id=eos, **kw)
    assert got[0]["token_ids"] == until_eos(free[0]["token_ids"]) and got[0]["finish_reason"] == "eos"
    assert got[1]["token_ids"] == until_eos(free[1]["token_ids"])
    assert got[1]["finish_reason"] == ("eos" if eos in free[1]["token_ids"] else "length")
    steps = len(got[1]["token_ids"])
    if eos not in free[1]["token_ids"]:  # after the call that gave row 0's EOS, the decoder runs row 1 alone
        # call k gives every row's token k (a causal LM's call 0 is its prefill)
        assert batches == [2] * (first + 1) + [1] * (steps - first - 1), (first, batches)


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_sampling_is_seeded_and_top_k_1_is_greedy(deployment):
    rt = deployment.runtime()
    ids, mask = random_batch("gpt2", rows=3, seq=5, seed=6, padding_side="left")
    inputs = {"input_ids": ids, "attention_mask": mask}
    tasks = ["pt", "mpt/1", "prefix"]
    kw = dict(max_new_tokens=12, eos_token_id=[], do_sample=True, temperature=1.5, top_p=0.95)
    a = rt.generate(inputs, tasks, seed=123, **kw)
    b = rt.generate(inputs, tasks, seed=123, **kw)
    c = rt.generate(inputs, tasks, seed=124, **kw)
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]
    assert [r["token_ids"] for r in a] != [r["token_ids"] for r in c]
    greedy = rt.generate(inputs, tasks, max_new_tokens=12, eos_token_id=[])
    top1 = rt.generate(inputs, tasks, max_new_tokens=12, eos_token_id=[], do_sample=True, top_k=1, seed=5)
    assert [r["token_ids"] for r in greedy] == [r["token_ids"] for r in top1]


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_rows_end_on_the_generation_configs_eos_as_transformers_generate_does(deployment, tmp_path):
    """An instruct model's generation_config.json may end rows on more tokens than its config's eos_token_id (Llama
    3's and Qwen2's end of turn): transformers' generate, and so PEFT's, stop on those."""
    import json

    deploy = copy_deployment(deployment.deploy, tmp_path / "deploy")
    prompt = [[5, 9, 11]]
    free = Runtime(deploy).generate(prompt, "pt", max_new_tokens=4, eos_token_id=[])[0]["token_ids"]
    (deploy / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, free[0]]}))
    got = Runtime(deploy).generate(prompt, "pt", max_new_tokens=4)[0]
    assert (got["token_ids"], got["finish_reason"]) == ([free[0]], "eos")


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_generation_settings_promptmux_does_not_apply_are_named_in_a_warning(deployment, tmp_path, caplog):
    import json

    deploy = copy_deployment(deployment.deploy, tmp_path / "deploy")
    (deploy / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "repetition_penalty": 1.1,
                                                                "num_beams": 1, "do_sample": True}))
    with caplog.at_level("WARNING", logger="promptmux.runtime"):
        Runtime(deploy).generator  # noqa: B018 (made on first use)
    assert "sets repetition_penalty=1.1, which promptmux does not apply" in caplog.text
    assert "num_beams" not in caplog.text  # its no-op value


def test_a_character_split_over_tokens_streams_whole():
    from promptmux.runtime.generate import TextStream

    class Bytes:  # a byte-level tokenizer: a token per byte
        def decode(self, tokens, skip_special_tokens=True):
            return bytes(tokens).decode("utf-8", errors="replace")

    for stop in ((), ("zz",)):
        stream = TextStream(Bytes(), stop)
        pieces = [stream.add(b) for b in "é€A".encode()] + [stream.flush()]
        assert "".join(pieces) == "é€A" and "\ufffd" not in "".join(pieces), (stop, pieces)
    stream = TextStream(Bytes())  # a byte sequence that never completes stays replaced when the row ends
    assert stream.add(0xC3) + stream.flush() == "\ufffd"


def test_a_long_rows_text_streams_from_a_window_of_its_last_tokens():
    """Each token decodes the last few tokens, not the whole row (a 4,096-token row cost 1.3 s of decoding on the
    model's thread), and the pieces still add up to the row's text, stop strings found across pieces."""
    from promptmux.runtime.generate import TextStream

    class Words:  # SentencePiece-like: a word's leading space is dropped at the start of a text
        decoded = []

        def decode(self, tokens, skip_special_tokens=True):
            self.decoded.append(len(tokens))
            return "".join(f" w{t}" for t in tokens).lstrip(" ")

    tok = Words()
    tokens = [i % 50 for i in range(2000)]
    stream = TextStream(tok, ("w3 w4 w5",))
    pieces = []
    for t in tokens:
        pieces.append(stream.add(t))
        if stream.stopped:
            break
    assert "".join(pieces) == tok.decode(tokens[:6]).split("w3 w4 w5")[0] and len(pieces) == 6
    stream, tok.decoded = TextStream(tok), []
    pieces = [stream.add(t) for t in tokens] + [stream.flush()]
    assert "".join(pieces) == tok.decode(tokens) and max(tok.decoded[:-1]) <= 2


def test_top_p_keeps_the_smallest_set_reaching_p():
    from promptmux.runtime.generate import SamplingParams, pick

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    picks = {int(pick(logits, SamplingParams(do_sample=True, top_p=0.8), rng)[0]) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 + 0.3 reaches 0.8; tokens 2 and 3 are never drawn


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_stream_yields_each_rows_tokens_then_finish(deployment):
    rt = deployment.runtime()
    ids, mask = random_batch("gpt2", rows=2, seq=5, seed=2, padding_side="left")
    inputs = {"input_ids": ids, "attention_mask": mask}
    events = list(rt.generate_stream(inputs, ["ptmlp", "mpt1/0"], max_new_tokens=4, eos_token_id=[]))
    full = rt.generate(inputs, ["ptmlp", "mpt1/0"], max_new_tokens=4, eos_token_id=[])
    for row in (0, 1):
        mine = [e for e in events if e["row"] == row]
        assert [e["token_id"] for e in mine[:-1]] == full[row]["token_ids"]
        assert mine[-1] == {"row": row, "finish_reason": "length"}


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
@pytest.mark.parametrize("kwargs,error,message", [
    (dict(tasks=["nope"]), UnknownTaskError, "unknown task 'nope'"),
    (dict(max_new_tokens=0), InputError, "max_new_tokens must be a positive integer, got 0"),
    (dict(max_new_tokens=65), InputError, "max_new_tokens=65 exceeds the model's 64 positions"),
    (dict(max_new_tokens=60), InputError, r"5 tokens \+ 4 virtual tokens of task 'pt' \+ max_new_tokens=60 exceed"),
    (dict(temperature=0.0, do_sample=True), InputError, "temperature must be > 0"),
    (dict(top_p=1.5), InputError, r"top_p must be in \(0, 1\]"),
    (dict(stop=["x"]), InputError, "stop strings need text inputs"),
    (dict(max_new_tokens=True), InputError, "max_new_tokens must be a positive integer, got True"),
    (dict(temperature="0.5", do_sample=True), InputError, "temperature must be > 0 and finite, got '0.5'"),
    (dict(eos_token_id="a"), InputError, "eos_token_id must be a token id or a list of them"),
    (dict(stop=[""]), InputError, "a stop string must be a non-empty string"),
    (dict(seed=-1), InputError, r"seed must be an integer >= 0 \(or None\), got -1"),
    (dict(seed=1.5, do_sample=True), InputError, "seed must be an integer >= 0"),
])
def test_bad_generation_requests(deployment, kwargs, error, message):
    rt = deployment.runtime()
    ids, mask = random_batch("gpt2", rows=1, seq=5, seed=2, padding_side="left")
    args = dict(tasks=["pt"], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        rt.generate({"input_ids": ids, "attention_mask": mask}, **args)


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_numpy_integers_are_integers_to_generate(deployment):
    rt = deployment.runtime()
    free = rt.generate([[5, 9]], "pt", max_new_tokens=np.int64(2), eos_token_id=[])[0]["token_ids"]
    assert len(free) == 2
    ends = rt.generate([[5, 9]], "pt", max_new_tokens=2, eos_token_id=np.int64(free[0]))[0]
    assert (ends["token_ids"], ends["finish_reason"]) == ([free[0]], "eos")


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_empty_prompt_is_refused(deployment):
    rt = deployment.runtime()
    with pytest.raises(InputError, match="empty prompt"):
        rt.generate(np.zeros((1, 0), np.int64), "pt")
    with pytest.raises(InputError, match="have no real token"):
        rt.generate({"input_ids": np.ones((1, 3), np.int64), "attention_mask": np.zeros((1, 3), np.int64)}, "pt")


@pytest.mark.parametrize("deployment", ["t5"], indirect=True)
def test_seq2seq_right_padding_gives_each_row_its_unbatched_tokens(deployment):
    """Text inputs to a seq2seq deployment are right-padded, so batching never changes a row's tokens."""
    rt = deployment.runtime()
    ids, mask = random_batch("t5", rows=3, seq=6, seed=9, padding_side="right")
    tasks = ["prefix", "pt", "mpt/2"]
    batched = rt.generate({"input_ids": ids, "attention_mask": mask}, tasks, max_new_tokens=NEW, eos_token_id=[])
    for i, task in enumerate(tasks):
        real = ids[i:i + 1, mask[i].astype(bool)]
        alone = rt.generate(real, task, max_new_tokens=NEW, eos_token_id=[])
        assert alone[0]["token_ids"] == batched[i]["token_ids"], task


@pytest.mark.parametrize("deployment", ["t5"], indirect=True)
def test_a_seq2seq_rows_decoder_prefix_and_new_tokens_must_fit_the_positions(deployment):
    """A prefix-tuning prefix takes the decoder's first positions: with learned positions (BART's) the tokens after
    it past the model's positions failed inside ONNX Runtime; now refused first, saying what to shorten. T5's
    relative positions have no such limit, so the test sets one (on a runtime of its own)."""
    rt = Runtime(deployment.deploy, backend="onnxruntime")
    n = rt.bank.view("prefix").num_virtual_tokens
    rt.max_positions = n + 3
    with pytest.raises(InputError, match=rf"the {n} decoder prefix positions of task 'prefix' \+ max_new_tokens=4 "
                                         rf"exceed the model's {n + 3} positions"):
        rt.generate(np.array([[5]]), "prefix", max_new_tokens=4, eos_token_id=[])
    assert len(rt.generate(np.array([[5]]), "prefix", max_new_tokens=3, eos_token_id=[])[0]["token_ids"]) == 3


@pytest.mark.parametrize("deployment", ["t5"], indirect=True)
def test_seq2seq_forward_points_to_generate(deployment):
    with pytest.raises(InputError, match="use generate"):
        deployment.runtime().forward(np.ones((1, 3), np.int64), None, "pt")


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_generation_needs_a_causal_lm(deployment):
    with pytest.raises(InputError, match="generation needs a causal LM or seq2seq deployment"):
        deployment.runtime().generate(np.ones((1, 3), np.int64), "pt")


@pytest.mark.parametrize("deployment", ["t5"], indirect=True)
def test_verify_compares_seq2seq_tokens_with_peft(deployment):
    from promptmux.export.verify import verify

    worst = verify(deployment.deploy, deployment.base, {n: str(p) for n, p in deployment.adapters.items()},
                   rows_per_task=2, seq=6, quiet=True)
    assert sorted(worst) == sorted(deployment.task_names())
    assert all(v == 0.0 for v in worst.values()), worst
