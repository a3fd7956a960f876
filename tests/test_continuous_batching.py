"""Continuous batching (runtime/generate.py ContinuousBatch): rows join and leave the running batch at every
decoding step, each with its own task, length, sampling and stop condition, and every row's tokens equal
that row generated alone."""

from __future__ import annotations

import numpy as np
import pytest

from promptmux import Runtime
from promptmux.runtime.generate import ContinuousBatch, SamplingParams, StreamedRows


def _alone(rt, ids, task, params, precompute=True):
    kw = dict(eos_token_id=params.eos_token_id, do_sample=params.do_sample, temperature=params.temperature,
              top_k=params.top_k, top_p=params.top_p, seed=params.seed, precompute=precompute)
    out = rt.generate(np.asarray(ids)[None], task, max_new_tokens=params.max_new_tokens, **kw)[0]
    return out["token_ids"], out["finish_reason"]


def _drive(batch, joins):
    """joins: {step: [(ids, view, params, precompute)]}. Runs until every row has finished; returns the rows in
    join order and the batch sizes seen at each decoding step."""
    rows, sizes, step = [], [], 0
    while step <= max(joins) or len(batch):
        # Rows joining at one step share their prefill (left-padded), inline-prompt rows only with equal lengths.
        rows += batch.add_many([(*j, None) for j in joins.get(step, [])])
        batch.pick()
        sizes.append(len(batch))
        batch.advance()
        step += 1
        assert step < 500
    return rows, sizes


@pytest.mark.parametrize("deployment", ["gpt2", "llama"], indirect=True)
def test_rows_joining_and_leaving_each_step_get_their_alone_tokens(deployment):
    rt = deployment.runtime()
    names = deployment.task_names()
    rng = np.random.default_rng(3)
    joins, expect = {}, {}
    for k in range(24):
        task = names[k % len(names)]
        ids = rng.integers(3, 120, size=int(rng.integers(2, 7)))  # different prompt lengths, some equal
        params = SamplingParams(max_new_tokens=int(rng.integers(1, 9)), eos_token_id=[])
        pre = k % 3 != 2  # some rows run their virtual tokens inline
        join = (ids, rt.bank.view(task), params, pre)
        joins.setdefault(int(rng.integers(0, 10)), []).append(join)
        expect[id(join[0])] = _alone(rt, ids, task, params, pre)
    rows, sizes = _drive(ContinuousBatch(rt.generator), joins)
    joined = [j for step in sorted(joins) for j in joins[step]]
    assert [(r.tokens, r.finish_reason) for r in rows] == [expect[id(j[0])] for j in joined]
    assert max(sizes) > 3 and len(set(sizes)) > 3  # the batch really grew and shrank


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_generate_with_own_positions_gives_every_padded_row_its_alone_tokens(deployment):
    """Runtime.generate(own_positions=True): a padded batch answers as the server does, every row as alone; by
    default it follows PEFT's generate, where a prompt-tuned row's padding shifts its (absolute) positions."""
    rt = deployment.runtime()
    names = deployment.task_names()
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 120, size=n).tolist() for n in (2, 7, 3, 5, 4, 6)]
    tasks = ["pt"] * 3 + [names[k % len(names)] for k in range(3)]
    params = SamplingParams(max_new_tokens=6, eos_token_id=[])
    alone = [_alone(rt, ids, task, params)[0] for ids, task in zip(prompts, tasks)]
    own = rt.generate(prompts, tasks, max_new_tokens=6, eos_token_id=[], own_positions=True)
    assert [r["token_ids"] for r in own] == alone
    peft_rule = rt.generate(prompts, tasks, max_new_tokens=6, eos_token_id=[])
    assert any(r["token_ids"] != a for r, a in zip(peft_rule[:3], alone))  # the option changes padded pt rows


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_seeded_samples_with_own_positions_are_each_rows_samples_alone(deployment):
    rt = deployment.runtime()
    prompts, tasks = [[5, 9, 11, 3], [7, 2], [4, 4, 8]], ["pt", "prefix", "pt"]
    kw = dict(max_new_tokens=6, eos_token_id=[], do_sample=True, temperature=1.5, seed=5)
    own = rt.generate(prompts, tasks, own_positions=True, **kw)
    assert [r["token_ids"] for r in own] == [rt.generate([p], t, **kw)[0]["token_ids"] for p, t in zip(prompts, tasks)]


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_rows_that_fit_alone_fit_a_batch_with_own_positions(deployment):
    """The fit check counts a row's own tokens where its positions skip the padding (own_positions): a short row of
    a task with many virtual tokens beside a long row was refused for the long row's width."""
    rt = deployment.runtime()
    n = {t: rt.bank.view(t).num_virtual_tokens for t in deployment.task_names()}
    few, many = min(n, key=n.get), max(n, key=n.get)
    assert n[many] > n[few]
    new = 2
    prompts = [list(range(3, 3 + rt.max_positions - n[few] - new)), [5, 7]]  # the long row just fits
    own = rt.generate(prompts, [few, many], max_new_tokens=new, eos_token_id=[], own_positions=True)
    assert [r["token_ids"] for r in own] == [rt.generate([p], t, max_new_tokens=new, eos_token_id=[])[0]["token_ids"]
                                             for p, t in zip(prompts, [few, many])]


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_eos_sampling_and_early_finish_are_per_row(deployment):
    rt = deployment.runtime()
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 120, size=n) for n in (4, 9, 6, 3)]
    tasks = ["pt", "prefix", "mpt/1", "ptlstm"]
    free = _alone(rt, prompts[0], "pt", SamplingParams(max_new_tokens=8, eos_token_id=[]))[0]
    params = [SamplingParams(max_new_tokens=8, eos_token_id=free[3]),  # stops on its 4th token
              SamplingParams(max_new_tokens=8, do_sample=True, temperature=1.3, top_p=0.9, seed=11, eos_token_id=[]),
              SamplingParams(max_new_tokens=6, do_sample=True, top_k=5, seed=2, eos_token_id=[]),
              SamplingParams(max_new_tokens=8, eos_token_id=[])]
    joins = {0: [(prompts[0], rt.bank.view(tasks[0]), params[0], True)],
             1: [(prompts[1], rt.bank.view(tasks[1]), params[1], True),
                 (prompts[2], rt.bank.view(tasks[2]), params[2], True)],
             3: [(prompts[3], rt.bank.view(tasks[3]), params[3], True)]}
    batch = ContinuousBatch(rt.generator)
    rows, step = [], 0
    while step < 4 or len(batch):
        for ids, view, p, pre in joins.get(step, []):
            rows.append(batch.add(ids, view, p, pre))
        batch.pick()
        if step == 4:
            rows[3].finish("stop")  # the caller ends a row (stop string, cancelled request)
        batch.advance()
        step += 1
    for row, ids, task, p in zip(rows[:3], prompts, tasks, params):
        assert (row.tokens, row.finish_reason) == _alone(rt, ids, task, p), task
    assert rows[0].finish_reason == "eos" and len(rows[0].tokens) <= 4
    alone = _alone(rt, prompts[3], tasks[3], params[3])[0]
    assert rows[3].finish_reason == "stop" and rows[3].tokens == alone[:len(rows[3].tokens)]
    assert len(rows[3].tokens) == 2
    assert batch.mask is None and batch.presents == []


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_past_is_trimmed_when_long_rows_leave(deployment):
    rt = deployment.runtime()
    batch = ContinuousBatch(rt.generator)
    long = batch.add(np.arange(3, 40), rt.bank.view("pt"), SamplingParams(max_new_tokens=2, eos_token_id=[]))
    batch.add(np.arange(3, 6), rt.bank.view("pt"), SamplingParams(max_new_tokens=6, eos_token_id=[]))
    wide = batch.mask.shape[1]
    for _ in range(3):
        batch.pick()
        batch.advance()
    assert long.finish_reason == "length" and len(batch) == 1
    assert batch.mask.shape[1] < wide - 30 and batch.mask[0, 0] == 1
    assert all(x.shape[2] == batch.mask.shape[1] for x in batch.presents)


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_a_removed_tasks_admitted_rows_still_generate_its_tokens(deployment):
    rt = Runtime(deployment.deploy)
    ids = np.arange(5, 12)
    params = SamplingParams(max_new_tokens=5, eos_token_id=[])
    expect = _alone(rt, ids, "ptmlp", params)
    rt.add_task("extra", deployment.adapters["ptmlp"])
    view = rt.bank.view("extra")  # a request captured the task ...
    rt.remove_task("extra")  # ... which is removed before its prefill
    batch = ContinuousBatch(rt.generator)
    row = batch.add(ids, view, params)
    while len(batch):
        batch.pick()
        batch.advance()
    assert (row.tokens, row.finish_reason) == expect
    assert "extra" not in rt.generator.cached_tasks()


@pytest.mark.parametrize("deployment", ["t5"], indirect=True)
def test_seq2seq_rows_interleave_with_their_alone_tokens(deployment):
    rt = deployment.runtime()
    rng = np.random.default_rng(1)
    joins, want = {}, []
    for k, task in enumerate(["pt", "prefix", "mpt/2", "ptmlp"]):
        ids = rng.integers(3, 120, size=4 + k)
        p = SamplingParams(max_new_tokens=3 + k, eos_token_id=[])
        joins.setdefault(k // 2 * 2, []).append((ids, rt.bank.view(task), p, True))
        want.append(_alone(rt, ids, task, p))
    rows, _ = _drive(StreamedRows(rt.generator), joins)
    assert [(r.tokens, r.finish_reason) for r in rows] == want
