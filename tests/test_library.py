"""The prompt bank as a prompt library: SPoT retrieval and MPT/SPoT target initialisation (promptmux.library).

The bank is built so that the right answers are known: `near` is a scaled, noised copy of the query
adapter's prompt tiled to twice its length, `twin` a noised copy of the bank task `pt`. Written
adapters are loaded back with PEFT and compared with the intended initialisation exactly.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import adapter_configs, make_adapter, make_base
from test_cli import promptmux

from promptmux.library.adapter_writer import init_adapter
from promptmux.library.prompts import LibraryError, combine_prompts, prompt_similarity, resample_tokens
from promptmux.library.retrieval import similar_tasks, skipped_tasks

METHODS = ["avg-cosine", "per-token-cosine"]


def _rewrite_prompt(src, dest, fn):
    """Copy an adapter folder with its prompt_embeddings replaced by fn(prompt)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    weights = load_file(str(src / "adapter_model.safetensors"))
    weights["prompt_embeddings"] = torch.from_numpy(np.ascontiguousarray(fn(weights["prompt_embeddings"].numpy())))
    save_file(weights, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg["num_virtual_tokens"] = int(weights["prompt_embeddings"].shape[0])
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    from promptmux import export_deployment

    root = tmp_path_factory.mktemp("library")
    base = make_base("bert", root / "base")
    cfgs = adapter_configs("bert")
    ad = {name: make_adapter("bert", base, cfgs[name], root / name, seed=i + 1)
          for i, name in enumerate(["pt", "ptlstm", "mpt", "prefix"])}
    query = make_adapter("bert", base, cfgs["pt"], root / "query", seed=11)
    rng = np.random.default_rng(0)

    def noised(p, scale):
        return scale * p + 0.05 * p.std() * rng.standard_normal(p.shape).astype(np.float32)

    ad["near"] = _rewrite_prompt(query, root / "near", lambda p: noised(np.concatenate([p, p]), 2.5))
    ad["twin"] = _rewrite_prompt(ad["pt"], root / "twin", lambda p: noised(p, 0.7))
    deploy = export_deployment(base, ad, root / "deploy", quiet=True, optimize=False)
    return {"root": root, "base": base, "adapters": ad, "query": query, "deploy": deploy}


def _peft(base, adapter_dir, trainable=False):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    labels = json.loads((adapter_dir / "promptmux_init.json").read_text()).get("num_labels", 3) \
        if (adapter_dir / "promptmux_init.json").is_file() else 3
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=labels, ignore_mismatched_sizes=True)
    if trainable:  # plain PEFT: get_peft_model from the saved config, then the saved weights
        from promptmux.library.adapter_writer import trainable_peft_model

        return trainable_peft_model(model, adapter_dir), cfg
    return PeftModel.from_pretrained(model, adapter_dir), cfg


def _bank_prompt(lib, task):
    from promptmux.core.adapters import load_adapter
    from promptmux.core.folder import load_base_config

    name, _, t = task.partition("/")
    tasks = load_adapter(name, lib["adapters"][name], load_base_config(lib["base"]))
    return tasks[int(t) if t else 0]


# ---- retrieval -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_both_methods_rank_the_known_answer_first(lib, method):
    ranked = similar_tasks(lib["deploy"], str(lib["query"]), top_k=None, method=method)
    assert ranked[0]["task"] == "near" and ranked[0]["rank"] == 1
    assert ranked[0]["num_virtual_tokens"] == 8  # twice the query's 4 tokens: lengths differ
    assert ranked[0]["score"] > ranked[1]["score"] + 0.1
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    # a bank task as the query: itself left out, its noised copy first
    by_name = similar_tasks(lib["deploy"], "pt", top_k=3, method=method)
    assert by_name[0]["task"] == "twin" and "pt" not in [r["task"] for r in by_name] and len(by_name) == 3


def test_ranking_covers_input_level_kinds_and_skips_prefix(lib):
    ranked = similar_tasks(lib["deploy"], "near", top_k=None)
    assert {r["task"] for r in ranked} == {"pt", "ptlstm", "mpt/0", "mpt/1", "mpt/2", "twin"}
    assert {r["kind"] for r in ranked} == {"prompt", "mpt"}
    assert skipped_tasks(lib["deploy"]) == ["prefix"]
    with pytest.raises(LibraryError, match="per-layer attention keys/values"):
        similar_tasks(lib["deploy"], str(lib["adapters"]["prefix"]))
    with pytest.raises(LibraryError, match="prefix tuning"):
        similar_tasks(lib["deploy"], "prefix")
    with pytest.raises(LibraryError, match="neither a task"):
        similar_tasks(lib["deploy"], "no-such-task")
    with pytest.raises(LibraryError, match="Multitask Prompt Tuning adapter with 3 tasks"):
        similar_tasks(lib["deploy"], str(lib["adapters"]["mpt"]))
    with pytest.raises(LibraryError, match="unknown similarity method"):
        similar_tasks(lib["deploy"], "pt", method="dot")


def test_similarity_definitions_for_different_lengths():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 16)), rng.standard_normal((5, 16))
    # avg-cosine: cosine of the mean tokens; repeating a prompt's tokens changes nothing
    assert prompt_similarity(a, np.concatenate([a, a, a]) * 4.0) == pytest.approx(1.0)
    mean_cos = a.mean(0) @ b.mean(0) / np.linalg.norm(a.mean(0)) / np.linalg.norm(b.mean(0))
    assert prompt_similarity(a, b) == pytest.approx(mean_cos)
    # per-token-cosine: the mean over all 3 x 5 token pairs
    pairs = [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x in a for y in b]
    assert prompt_similarity(a, b, "per-token-cosine") == pytest.approx(np.mean(pairs))
    assert prompt_similarity(b, a, "per-token-cosine") == pytest.approx(np.mean(pairs))


def test_resample_tokens():
    p = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert resample_tokens(p, 4) is p
    r = resample_tokens(p, 7)  # positions 0, .5, 1, ..., 3
    np.testing.assert_array_equal(r[::2], p)
    np.testing.assert_allclose(r[1], (p[0] + p[1]) / 2)
    np.testing.assert_array_equal(resample_tokens(p, 2), p[[0, 3]])
    np.testing.assert_array_equal(resample_tokens(p[:1], 3), np.repeat(p[:1], 3, axis=0))


# ---- initialisation --------------------------------------------------------------------------------


def _one_training_step(model, **kw):
    ids = torch.randint(5, 100, (2, 6))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = model.prompt_encoder["default"].embedding.weight.detach().clone()
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1]), **kw).loss.backward()
    opt.step()
    assert not torch.equal(before, model.prompt_encoder["default"].embedding.weight)


def test_init_from_task_writes_a_peft_adapter_with_that_prompt(lib, tmp_path):
    out = tmp_path / "from-near"
    (rec,) = init_adapter(lib["deploy"], lib["base"], out, from_task="near", num_labels=2, seed=3)
    assert rec["path"] == str(out) and rec["num_virtual_tokens"] == 8 and rec["peft_type"] == "PROMPT_TUNING"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    from promptmux.core.durable import _umask

    assert (out / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()  # not safetensors' 0600
    model, cfg = _peft(lib["base"], out, trainable=True)
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 8
    want = torch.from_numpy(_bank_prompt(lib, "near").tensors["prompt"])
    assert torch.equal(model.prompt_encoder["default"].embedding.weight.detach(), want)
    assert torch.equal(model.get_prompt(batch_size=1)[0].detach(), want)
    _one_training_step(model)  # trains as usual: prompt and head are trainable
    assert json.loads((out / "promptmux_init.json").read_text())["sources"] == [
        {"task": "near", "score": None, "weight": 1.0}]
    # promptmux serves it as is
    from promptmux.core.adapters import load_adapter
    from promptmux.core.folder import load_base_config

    (task,) = load_adapter("target", out, load_base_config(lib["base"]))
    np.testing.assert_array_equal(task.tensors["prompt"], want.numpy())
    with pytest.raises(FileExistsError):
        init_adapter(lib["deploy"], lib["base"], out, from_task="near")


def test_init_from_an_mpt_task_is_its_composed_prompt(lib, tmp_path):
    out = tmp_path / "from-mpt1"
    init_adapter(lib["deploy"], lib["base"], out, from_task="mpt/1", num_labels=3)
    model, _ = _peft(lib["base"], out)
    source, _ = _peft(lib["base"], lib["adapters"]["mpt"])
    want = source.get_prompt(batch_size=1, task_ids=torch.tensor([1]))[0].detach()
    assert torch.equal(model.get_prompt(batch_size=1)[0].detach(), want)


def test_best_of_top_k_writes_one_adapter_per_source(lib, tmp_path):
    out = tmp_path / "best-of"
    recs = init_adapter(lib["deploy"], lib["base"], out, top_k=3, query=str(lib["query"]), num_labels=2)
    ranked = similar_tasks(lib["deploy"], str(lib["query"]), top_k=3)
    assert [r["sources"][0]["task"] for r in recs] == [r["task"] for r in ranked]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{r['rank']}-{r['task'].replace('/', '_')}"
                                                           for r in ranked)
    for rec in recs:
        model, _ = _peft(lib["base"], out / rec["path"].rsplit("/", 1)[1])
        want = _bank_prompt(lib, rec["sources"][0]["task"])
        from promptmux.library.prompts import task_prompt

        assert torch.equal(model.get_prompt(batch_size=1)[0].detach(), torch.from_numpy(task_prompt(want)))


@pytest.mark.parametrize("method", METHODS)
def test_weighted_top_k_is_the_score_weighted_average(lib, tmp_path, method):
    out = tmp_path / f"weighted-{method}"
    (rec,) = init_adapter(lib["deploy"], lib["base"], out, top_k=2, weighted=True, query=str(lib["query"]),
                          method=method, num_labels=2)
    ranked = similar_tasks(lib["deploy"], str(lib["query"]), top_k=2, method=method)
    assert [s["task"] for s in rec["sources"]] == [r["task"] for r in ranked]
    pos = np.maximum([r["score"] for r in ranked], 0)
    weights = pos / pos.sum()
    assert [s["weight"] for s in rec["sources"]] == pytest.approx(list(weights))
    from promptmux.library.prompts import task_prompt

    prompts = [task_prompt(_bank_prompt(lib, r["task"])) for r in ranked]
    length = prompts[0].shape[0]  # the best source's length: 8
    assert rec["num_virtual_tokens"] == length == 8
    model, _ = _peft(lib["base"], out)
    got = model.get_prompt(batch_size=1)[0].detach().numpy()
    np.testing.assert_array_equal(got, combine_prompts(prompts, list(weights), length))
    # the same, written out independently: each source linearly resampled to 8 tokens, then weighted
    def interp(p):
        pos = np.linspace(0, p.shape[0] - 1, length)
        return np.stack([np.interp(pos, np.arange(p.shape[0]), p[:, j]) for j in range(p.shape[1])], 1)
    np.testing.assert_allclose(got, sum(w * interp(p) for w, p in zip(weights, prompts)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("source,peft_init,task", [("mpt", "AVERAGE_SOURCE_TASKS", 0), ("mpt/2", "EXACT_SOURCE_TASK", 2)])
def test_mpt_target_equals_peft_own_target_initialisation(lib, tmp_path, source, peft_init, task):
    """--kind mpt-target gives exactly what PEFT's MultitaskPromptTuningInit computes from the source file."""
    from peft import MultitaskPromptTuningConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "mpt-target"
    (rec,) = init_adapter(lib["deploy"], lib["base"], out, from_task=source, kind="mpt-target", num_labels=2)
    assert rec["peft_type"] == "MULTITASK_PROMPT_TUNING" and rec["num_ranks"] == 2
    model, cfg = _peft(lib["base"], out, trainable=True)
    assert cfg["num_tasks"] == 1 and cfg["num_ranks"] == 2 and cfg["num_virtual_tokens"] == 4
    reference = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(lib["base"], num_labels=2, ignore_mismatched_sizes=True),
        MultitaskPromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, num_tasks=1, num_ranks=2,
                                    prompt_tuning_init=peft_init, prompt_tuning_init_task=task,
                                    prompt_tuning_init_state_dict_path=str(lib["adapters"]["mpt"] /
                                                                           "adapter_model.safetensors")))
    ours, theirs = model.prompt_encoder["default"], reference.prompt_encoder["default"]
    for attr in ("prefix_task_cols", "prefix_task_rows"):
        assert torch.equal(getattr(ours, attr).detach(), getattr(theirs, attr).detach()), attr
    assert torch.equal(ours.embedding.weight.detach(), theirs.embedding.weight.detach())
    t0 = torch.tensor([0])
    assert torch.equal(model.get_prompt(1, task_ids=t0).detach(), reference.get_prompt(1, task_ids=t0).detach())
    _one_training_step(model, task_ids=torch.tensor([0, 0]))


def test_mpt_target_by_retrieval_and_refusals(lib, tmp_path):
    (rec,) = init_adapter(lib["deploy"], lib["base"], tmp_path / "t", top_k=2, weighted=True, kind="mpt-target",
                          query="near", num_labels=2)
    assert all(s["task"].startswith("mpt/") for s in rec["sources"]) and len(rec["sources"]) == 2
    with pytest.raises(LibraryError, match="Multitask Prompt Tuning source"):
        init_adapter(lib["deploy"], lib["base"], tmp_path / "x", from_task="pt", kind="mpt-target")
    with pytest.raises(LibraryError, match="prefix tuning"):
        init_adapter(lib["deploy"], lib["base"], tmp_path / "y", from_task="prefix")
    with pytest.raises(LibraryError, match="--query"):
        init_adapter(lib["deploy"], lib["base"], tmp_path / "z", top_k=2)
    with pytest.raises(LibraryError, match="exactly one source"):
        init_adapter(lib["deploy"], lib["base"], tmp_path / "z", from_task="pt", top_k=2, query="near")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # nothing half-written left behind


def test_mpt_target_averages_only_sources_with_the_best_sources_shared_prompt():
    """Sources with another shared prompt (equal arrays count as one, however the bank stores them) are dropped,
    and the factors are the plain mean of those kept."""
    from promptmux.kinds import get
    from promptmux.library.adapter_writer import _initial_tensors, _Source

    rng = np.random.default_rng(0)
    shared, other = rng.normal(size=(2, 4, 8)).astype(np.float32)
    mpt = get("mpt")
    tasks = {n: mpt.from_factors(n, s.copy(), rng.normal(size=(4, 2)), rng.normal(size=(2, 8)))
             for n, s in (("a", shared), ("b", shared), ("c", other))}
    bank = type("Bank", (), {"view": lambda self, n: tasks[n]})()
    plan, record = [_Source(n, None, 1 / 3) for n in "abc"], {}
    out = _initial_tensors("mpt-target", bank, plan, False, None, record)
    assert record["dropped"]["tasks"] == ["c"] and [s.task for s in plan] == ["a", "b"]
    np.testing.assert_array_equal(out["shared"], shared)
    np.testing.assert_allclose(out["cols"], (tasks["a"].tensors["cols"] + tasks["b"].tensors["cols"]) / 2, rtol=1e-6)


def test_causal_lm_bank_without_onnx(tmp_path):
    """A bank folder (bank.safetensors + config.json) is enough; decoders get an adapter without a head."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from promptmux.core.adapters import load_adapter
    from promptmux.core.archs import arch_for
    from promptmux.core.bank import PromptBank
    from promptmux.core.folder import load_base_config

    base = make_base("gpt2", tmp_path / "base")
    cfgs = adapter_configs("gpt2")
    config = load_base_config(base)
    bank = PromptBank(arch_for("gpt2"))
    for i, name in enumerate(["pt", "ptmlp", "mpt1", "cpt", "cartridge"]):
        bank.add(load_adapter(name, make_adapter("gpt2", base, cfgs[name], tmp_path / name, seed=i + 1), config))
    folder = tmp_path / "bank"
    folder.mkdir()
    bank.save(folder)
    config.save_pretrained(folder)
    # CPT's prompt is input-level (ranked, and a starting point); a cartridge is key/values (skipped, said so)
    assert {r["task"] for r in similar_tasks(folder, "pt", top_k=None)} == {"ptmlp", "mpt1/0", "cpt"}
    assert skipped_tasks(folder) == ["cartridge"]
    (rec,) = init_adapter(folder, base, tmp_path / "out", top_k=1, query="ptmlp", num_virtual_tokens=7)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "out")
    from promptmux.library.prompts import task_prompt

    src = task_prompt(bank.view(rec["sources"][0]["task"]))
    got = model.get_prompt(batch_size=1)[0].detach().numpy()
    assert got.shape == (7, 32) and "num_labels" not in rec
    np.testing.assert_array_equal(got, resample_tokens(src, 7))


# ---- command line ----------------------------------------------------------------------------------


def _cli(capsys, *args):
    """The command line in this process (one subprocess run below checks the real entry point)."""
    from promptmux.cli import main

    capsys.readouterr()
    code = main(["--quiet", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_similar_and_init_adapter(lib, tmp_path, capsys):
    deploy = lib["deploy"]
    rows = json.loads(promptmux("tasks", deploy, "similar", lib["query"], "--top-k", "2", "--json",
                                "--method", "per-token-cosine").stdout)
    assert rows["results"][0]["task"] == "near" and len(rows["results"]) == 2
    assert rows["method"] == "per-token-cosine" and rows["skipped"] == ["prefix"]
    code, text, err = _cli(capsys, "tasks", "similar", deploy, "pt")  # the word order works too
    assert code == 0 and text.splitlines()[0].split("\t")[:2] == ["1", "twin"] and "prefix" in err
    out = tmp_path / "cli-adapter"
    code, text, _ = _cli(capsys, "init-adapter", deploy, "--base", lib["base"], "--out", out, "--top-k", "1",
                         "--query", lib["query"], "--num-labels", "2")
    rec = json.loads(text)
    assert code == 0 and rec[0]["sources"][0]["task"] == "near" and (out / "adapter_model.safetensors").is_file()
    code, _, err = _cli(capsys, "init-adapter", deploy, "--base", lib["base"], "--out", tmp_path / "x",
                        "--from", "prefix")
    assert code == 2 and "prefix tuning" in err
    code, _, err = _cli(capsys, "init-adapter", deploy, "--base", lib["base"], "--out", tmp_path / "x",
                        "--from", "pt", "--weighted")
    assert code == 2 and "--weighted goes with --top-k" in err


@pytest.mark.parametrize("method", ["avg-cosine", "per-token-cosine"])
def test_top_k_from_the_stores_vectors_equals_ranking_every_prompt(method, tmp_path):
    """similar_tasks with top_k ranks by the store's float16 retrieval vectors and rescores the best exactly: the
    same tasks, order and scores as scoring every prompt, for a query array and for a task of the bank."""
    from promptmux.core.archs import arch_for
    from promptmux.core.bank import PromptBank
    from promptmux.core.task import Task
    from promptmux.library.retrieval import rank_tasks, top_tasks

    rng = np.random.default_rng(0)
    centre = rng.standard_normal((1, 32)).astype(np.float32)
    bank = PromptBank(arch_for("llama"))
    bank.add([Task(f"t{i}", "prompt", "PROMPT_TUNING", 2 + i % 5,
                   {"prompt": (centre + rng.standard_normal((2 + i % 5, 32)) * (0.2 + i / 100)).astype(np.float32)})
              for i in range(300)])
    bank.save(tmp_path)
    stored = PromptBank.load(tmp_path, arch_for("llama"))  # the vectors as the store keeps them
    for query in (centre + rng.standard_normal((3, 32)).astype(np.float32) * 0.3, "t7"):
        want = rank_tasks(stored, None, query, method)[:10]
        got = top_tasks(stored, None, query, method, 10)
        assert [r["task"] for r in got] == [r["task"] for r in want]
        assert [r["score"] for r in got] == [r["score"] for r in want]
        assert "t7" not in [r["task"] for r in got] or not isinstance(query, str)


def _vector_bank(n, seed, start=0):
    from promptmux.core.task import Task

    rng = np.random.default_rng(seed)
    return [Task(f"u{i}", "prompt", "PROMPT_TUNING", 2, {"prompt": rng.standard_normal((2, 16)).astype(np.float32)})
            for i in range(start, start + n)]


def _store_with_a_snapshot_index(folder, monkeypatch, rows: int):
    """(spec, a writer bank) on a store of `rows` vector tasks in folder, the retrieval index's thresholds lowered so
    that it keeps a snapshot from 50 rows (rewritten after 30 changes)."""
    from promptmux.core import vector_index
    from promptmux.core.archs import arch_for
    from promptmux.core.bank import PromptBank

    monkeypatch.setattr(vector_index, "SNAPSHOT_MIN", 50)
    monkeypatch.setattr(vector_index, "REWRITE_MIN", 30)
    spec = arch_for("llama")
    PromptBank(spec).save(folder)
    writer = PromptBank.load(folder, spec)
    writer.add(_vector_bank(rows, 0))
    return spec, writer


def test_retrieval_index_snapshot_follows_other_processes_changes(tmp_path, monkeypatch, caplog):
    """The retrieval index kept beside the store (thresholds lowered so 120 tasks get one): a fresh bank ranks from
    the memory-mapped snapshot, catches up with adds, removals and replacements made through another bank, folds
    them into a new snapshot once they are many, ignores a snapshot of another store or a damaged one, and always
    answers as scoring every prompt does."""
    from promptmux.core.bank import PromptBank
    from promptmux.library.retrieval import rank_tasks, top_tasks

    spec, writer = _store_with_a_snapshot_index(tmp_path, monkeypatch, 120)
    query = np.random.default_rng(9).standard_normal((2, 16)).astype(np.float32)

    def same(bank):
        for method in ("avg-cosine", "per-token-cosine"):
            want = [(r["task"], r["score"]) for r in rank_tasks(bank, None, query, method)[:5]]
            assert [(r["task"], r["score"]) for r in top_tasks(bank, None, query, method, 5)] == want

    same(PromptBank.load(tmp_path, spec))  # builds the index and writes the snapshot
    snap = tmp_path / "retrieval"
    first = json.loads((snap / "index.json").read_text())
    assert first["rows"] == 120
    reader = PromptBank.load(tmp_path, spec)
    same(reader)
    assert isinstance(reader.vector_index().mats["avg"], np.memmap)  # ranked from the snapshot, not the store

    best = rank_tasks(reader, None, query, "avg-cosine")[0]["task"]
    writer.remove(best)
    writer.add(_vector_bank(3, 1, start=5), replace=True)  # u5..u7 replaced: new ids, old ones logged as gone
    writer.add(_vector_bank(10, 2, start=500))
    same(reader)  # caught up in memory: fewer changes than the rewrite threshold
    assert json.loads((snap / "index.json").read_text())["generation"] == first["generation"]
    assert best not in [r["task"] for r in top_tasks(reader, None, query, "avg-cosine", 5)]

    writer.add(_vector_bank(40, 3, start=1000))
    same(reader)  # 54 changes since the snapshot: folded into a new one, the old files deleted
    second = json.loads((snap / "index.json").read_text())
    assert second["generation"] != first["generation"] and second["rows"] == 120 - 1 + 10 + 40
    assert sorted(p.name for p in snap.glob("*.npy")) == sorted(f"{second['generation']}-{c}.npy"
                                                                for c in ("ids", "avg", "tok"))
    same(PromptBank.load(tmp_path, spec))

    (snap / "index.json").write_text(json.dumps({**second, "store_id": "another"}))
    (snap / ".index.json-killed").write_text("{")  # what a snapshot write killed midway leaves
    same(PromptBank.load(tmp_path, spec))
    assert json.loads((snap / "index.json").read_text())["store_id"] != "another"  # rebuilt from the store
    assert not list(snap.glob(".index.json-*"))  # and the debris went with the rewrite
    (snap / f"{json.loads((snap / 'index.json').read_text())['generation']}-avg.npy").write_bytes(b"damaged")
    with caplog.at_level("WARNING", logger="promptmux"):
        same(PromptBank.load(tmp_path, spec))
    assert "ignoring the retrieval index" in caplog.text


def test_a_small_banks_retrieval_index_folds_its_changes_in_memory(tmp_path, monkeypatch):
    """Below the snapshot's size, many changes are folded into the in-memory base too (each query stacked every row
    added since the bank opened), and no snapshot is written."""
    from promptmux.core import vector_index
    from promptmux.core.bank import PromptBank
    from promptmux.library.retrieval import rank_tasks, top_tasks

    spec, writer = _store_with_a_snapshot_index(tmp_path, monkeypatch, 20)
    monkeypatch.setattr(vector_index, "SNAPSHOT_MIN", 1000)
    query = np.random.default_rng(9).standard_normal((2, 16)).astype(np.float32)
    reader = PromptBank.load(tmp_path, spec)
    top_tasks(reader, None, query, "avg-cosine", 3)
    writer.add(_vector_bank(40, 3, start=1000))
    got = [r["task"] for r in top_tasks(reader, None, query, "avg-cosine", 5)]
    assert got == [r["task"] for r in rank_tasks(reader, None, query, "avg-cosine")[:5]]
    index = reader.vector_index()
    assert not index.extra and len(index.ids) == 60 and not (tmp_path / "retrieval").exists()


def test_a_snapshot_replaced_while_it_is_opened_is_read_again_not_rebuilt(tmp_path, monkeypatch, caplog):
    """Another process may point index.json at a new generation and delete the old one between this one's reading
    index.json and mapping its files: the new generation is read instead of the whole store."""
    from promptmux.core.bank import PromptBank
    from promptmux.library.retrieval import top_tasks

    spec, writer = _store_with_a_snapshot_index(tmp_path, monkeypatch, 60)
    query = np.random.default_rng(9).standard_normal((2, 16)).astype(np.float32)
    want = [r["task"] for r in top_tasks(PromptBank.load(tmp_path, spec), None, query, "avg-cosine", 3)]
    snap = tmp_path / "retrieval"
    real_load, moved = np.load, []

    def load_after_a_rewrite(path, *args, **kwargs):  # the other process's rewrite lands just before the first map
        if not moved:
            state = json.loads((snap / "index.json").read_text())
            for col in ("ids", "avg", "tok"):
                (snap / f"{state['generation']}-{col}.npy").rename(snap / f"newgen-{col}.npy")
            (snap / "index.json").write_text(json.dumps({**state, "generation": "newgen"}))
            moved.append(state["generation"])
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", load_after_a_rewrite)
    reader = PromptBank.load(tmp_path, spec)
    caplog.clear()
    with caplog.at_level("WARNING", logger="promptmux"):
        assert [r["task"] for r in top_tasks(reader, None, query, "avg-cosine", 3)] == want
    assert moved and "ignoring the retrieval index" not in caplog.text and "building" not in caplog.text
    assert isinstance(reader.vector_index().mats["avg"], np.memmap)


def test_a_first_snapshot_waits_for_the_stores_write_lock_without_stopping_lookups(tmp_path, monkeypatch):
    """The first snapshot names the store (a write): while another process holds the store's write lock, it waits
    as changes do, without the bank's lock, so the bank's lookups go on meanwhile."""
    import sqlite3
    import threading

    from promptmux.core.bank import PromptBank
    from promptmux.library.retrieval import top_tasks

    spec, writer = _store_with_a_snapshot_index(tmp_path, monkeypatch, 60)
    writer.close()
    other = sqlite3.connect(tmp_path / "tasks.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's long change
    reader = PromptBank.load(tmp_path, spec)
    query = np.random.default_rng(9).standard_normal((2, 16)).astype(np.float32)
    ranked = threading.Thread(target=top_tasks, args=(reader, None, query, "avg-cosine", 3))
    ranked.start()
    try:
        ranked.join(0.5)
        assert ranked.is_alive()  # the snapshot waits for the write lock
        assert reader.lock.acquire(timeout=1.0)  # but not holding the bank's
        reader.lock.release()
        assert "u1" in reader
    finally:
        other.execute("COMMIT")
        ranked.join(30)
    assert json.loads((tmp_path / "retrieval" / "index.json").read_text())["store_id"]


@pytest.mark.parametrize("added_after_restore, first_name", [(1, 500), (80, 500), (40, 100)])
def test_a_store_restored_from_a_backup_has_its_retrieval_index_rebuilt(tmp_path, monkeypatch, added_after_restore,
                                                                      first_name):
    """A backup keeps the store's id, and the rows added after the restore reuse ids the snapshot (written before
    the restore) already holds: a query ranked from it missed them. Fewer or more of them than were lost, or the
    lost tasks' very names in their order with new prompts (the row at the snapshot's last id then has its name)."""
    import shutil

    from promptmux.core import vector_index
    from promptmux.core.bank import PromptBank
    from promptmux.library.retrieval import top_tasks

    spec, writer = _store_with_a_snapshot_index(tmp_path, monkeypatch, 60)
    query = np.random.default_rng(9).standard_normal((2, 16)).astype(np.float32)
    reader = PromptBank.load(tmp_path, spec)
    top_tasks(reader, None, query, "avg-cosine", 3)  # the first snapshot, and the store's id
    writer.close()
    reader.close()
    shutil.copy(tmp_path / "tasks.sqlite", tmp_path / "backup.sqlite")  # the backup, its log checkpointed
    writer, reader = PromptBank.load(tmp_path, spec), PromptBank.load(tmp_path, spec)
    top_tasks(reader, None, query, "avg-cosine", 3)
    writer.add(_vector_bank(40, 1, start=100))
    top_tasks(reader, None, query, "avg-cosine", 3)  # 40 changes: folded into a new snapshot of 100 rows
    assert json.loads((tmp_path / "retrieval" / "index.json").read_text())["last_id"] == 100
    writer.close()
    reader.close()
    for suffix in ("", "-wal", "-shm"):  # restored
        (tmp_path / f"tasks.sqlite{suffix}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "backup.sqlite", tmp_path / "tasks.sqlite")
    writer = PromptBank.load(tmp_path, spec)
    added = _vector_bank(added_after_restore, 2, start=first_name)
    writer.add(added)
    bank = PromptBank.load(tmp_path, spec)
    top_tasks(bank, None, added[0].tensors["prompt"], "avg-cosine", 1)
    index = bank.vector_index()  # what every query ranks from: the store's rows, each with its own vector
    rows = {int(i): np.asarray(index.mats["avg"][k]) for k, i in enumerate(index.ids) if index.alive[k]}
    rows.update({int(i): v[0] for i, v in index.extra.items()})
    store = {i: vector_index._f32(avg) for i, avg in bank.db.execute("SELECT id, avg FROM vectors")}
    assert sorted(rows) == sorted(store) and all(np.allclose(rows[i], store[i]) for i in store)


def test_store_of_the_first_store_version_gets_its_retrieval_vectors_migrated(tmp_path):
    """A store written before retrieval vectors had ids (their table was `summaries`) opens with them moved, and
    ranks as before."""
    import sqlite3

    from promptmux.core.archs import arch_for
    from promptmux.core.bank import PromptBank
    from promptmux.library.retrieval import rank_tasks, top_tasks

    spec = arch_for("llama")
    bank = PromptBank(spec)
    bank.add(_vector_bank(20, 4))
    path = bank.save(tmp_path)
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("CREATE TABLE summaries (name TEXT PRIMARY KEY, avg BLOB NOT NULL, tok BLOB NOT NULL) "
                     "WITHOUT ROWID; INSERT INTO summaries SELECT name, avg, tok FROM vectors; DROP TABLE vectors;"
                     "DROP TABLE vectors_gone;")
    db.close()
    old = PromptBank.load(tmp_path, spec)
    assert old.db.execute("SELECT count(*) FROM vectors").fetchone()[0] == 20
    assert old.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'summaries'").fetchone() is None
    query = "u3"
    assert [r["task"] for r in top_tasks(old, None, query, "avg-cosine", 4)] == \
        [r["task"] for r in rank_tasks(old, None, query, "avg-cosine")[:4]]


def test_an_unknown_query_or_source_in_a_large_bank_is_counted_not_listed(lib, tmp_path):
    from conftest import copy_deployment

    from promptmux import Runtime

    deploy = copy_deployment(lib["deploy"], tmp_path / "deploy")
    rt = Runtime(deploy)
    for i in range(4):  # 12 tasks: past the 10 an error lists
        rt.add_task(f"user{i}", lib["adapters"]["pt"], persist=True)
    with pytest.raises(LibraryError, match=r"neither a task of this bank \(this deployment serves 12 tasks") as e:
        similar_tasks(deploy, "typo")
    assert "user0" not in str(e.value)
    with pytest.raises(LibraryError, match=r"--from 'typo' names no task of this bank \(this deployment serves 12"):
        init_adapter(deploy, lib["base"], tmp_path / "t", from_task="typo")
