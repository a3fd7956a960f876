"""--fold deployments, and adding/removing tasks without re-exporting the graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import adapter_configs, built_once, copy_deployment, make_adapter, random_batch

from promptmux import Runtime, UnknownTaskError, export_deployment
from promptmux.core.task import Task
from promptmux.kinds import kind_of

TOL = 1e-4


def _folded(deployment, task: str, tmp_path_factory):
    """The deployment exported again with `task` folded, once per run (tests that change it copy it first)."""
    def build(folder):
        export_deployment(deployment.base, deployment.adapters, folder / "deploy", fold=task, quiet=True)

    return built_once(tmp_path_factory, f"folded-{deployment.arch}-{task.replace('/', '-')}", build) / "deploy"


@pytest.mark.parametrize("deployment,task", [("bert", "pt"), ("gpt2", "prefix"), ("llama", "mpt/2")],
                         indirect=["deployment"])
def test_folded_deployment_matches_unfolded(deployment, task, tmp_path_factory):
    folded_dir = _folded(deployment, task, tmp_path_factory)
    manifest = json.loads((folded_dir / "manifest.json").read_text())
    assert manifest["folded"]["task"] == task and manifest["folded"]["file"] == "model_folded.onnx"
    folded = Runtime(folded_dir)
    plain = Runtime(deployment.deploy)
    ids, mask = random_batch(deployment.arch, rows=3, seq=7, seed=8, padding_side="left")
    got = folded.forward(ids, mask, [task] * 3)
    want = plain.forward(ids, mask, [task] * 3)
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want)) < TOL
    # The folded graph really is the one that ran, and only for batches of its task alone.
    assert folded.graph_runs == {"model_folded.onnx": 1}
    other = next(t for t in plain.tasks if t != task)
    folded.forward(ids, mask, [task, other, task])
    # The mixed batch runs the main graph, or the one without prefix inputs where it exists and no row has a prefix.
    no_prefix_row = all(kind_of(folded.bank.view(t)).kv_prefix(folded.bank.view(t)) is None for t in (task, other))
    mixed = "model_noprefix.onnx" if folded.noprefix_session is not None and no_prefix_row else "model.onnx"
    assert folded.graph_runs == {"model_folded.onnx": 1, mixed: 1}


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_folded_graph_bakes_the_prompt_as_constant(deployment, tmp_path_factory):
    import onnx

    d = _folded(deployment, "pt", tmp_path_factory)
    graph = onnx.load(str(d / "model_folded.onnx"))
    assert "prompt_embeds" not in [i.name for i in graph.graph.input]
    main = onnx.load(str(d / "model.onnx"), load_external_data=False)
    assert "prompt_embeds" in [i.name for i in main.graph.input]


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_add_and_remove_task_on_loaded_runtime(deployment, tmp_path):
    rt = Runtime(deployment.deploy)
    extra = make_adapter("gpt2", deployment.base, adapter_configs("gpt2")["pt"], tmp_path / "extra", seed=77)
    ids, mask = random_batch("gpt2", rows=2, seq=6, seed=3, padding_side="left")
    with pytest.raises(UnknownTaskError, match="unknown task 'extra'"):
        rt.forward(ids, mask, ["extra", "pt"])
    assert rt.add_task("extra", extra) == ["extra"]
    got = rt.forward(ids, mask, ["extra", "pt"])
    from conftest import peft_rows

    want = peft_rows("gpt2", deployment.base, extra, ids[:1], mask[:1])
    assert float(np.abs(got[0] - want[0]).max()) < TOL
    assert rt.remove_task("extra") == ["extra"]
    with pytest.raises(UnknownTaskError):
        rt.forward(ids, mask, ["extra", "pt"])
    # Not persisted: the folder still has the original tasks.
    assert "extra" not in Runtime(deployment.deploy).tasks


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_changes_a_runtime_keeps_to_itself_leave_the_store_as_it_is(deployment, tmp_path):
    """Non-persisted changes go to an overlay over the store (core/overlay.py), not to a copy of it: the store's
    file is untouched, a replaced task gets a version no store task has, a removed MPT adapter hides all its tasks,
    listing pages through both, and a task another process persists meanwhile is still served."""

    from promptmux.core.folder import read_bank
    from promptmux.core.overlay import OWN_VERSIONS_FROM, BankOverlay

    def stored():
        import sqlite3

        db = sqlite3.connect(folder / "tasks.sqlite")
        try:
            return db.execute("SELECT seq, name, data FROM tasks ORDER BY seq").fetchall()
        finally:
            db.close()

    folder = tmp_path / "copy"
    copy_deployment(deployment.deploy, folder)
    store = stored()
    rt = Runtime(folder)
    before = rt.tasks
    ids, mask = random_batch("bert", rows=2, seq=6, seed=3, padding_side="right")
    want_pt = rt.forward(ids, mask, ["pt", "pt"])
    rt.add_task("pt", deployment.adapters["prefix"], replace=True)  # replaced: the prefix adapter's prompt
    rt.add_task("own", deployment.adapters["pt"])
    rt.remove_task("mpt")
    assert isinstance(rt.bank, BankOverlay) and stored() == store
    assert rt.bank.view("pt").version > OWN_VERSIONS_FROM and rt.bank.view("pt").kind == "prefix"
    assert np.allclose(rt.forward(ids, mask, ["own", "own"]), want_pt, atol=1e-6)
    expected = [t for t in before if not t.startswith("mpt/") and t != "pt"] + ["pt", "own"]
    assert rt.tasks == expected and len(rt.bank) == len(expected)
    pages, after = [], None
    while True:
        names, more = rt.bank.page(2, after)
        pages += names
        if not more:
            break
        after = names[-1]
    assert pages == expected
    with pytest.raises(UnknownTaskError, match="unknown task 'mpt/0'"):
        rt.bank.view("mpt/0")
    other = read_bank(folder)  # another process persists a task: still served by this runtime
    other.add([Task("theirs", "prompt", "PROMPT_TUNING", 2,
                    {"prompt": np.ones((2, rt.dims.hidden_size), np.float32)},
                    head={k: v for k, v in rt.bank.view("own").head.items()})])
    assert "theirs" in rt.bank and rt.tasks[-3:] == ["theirs", "pt", "own"]


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_a_read_only_deployment_folder_opens_and_serves(deployment, tmp_path, monkeypatch):
    """A folder the process cannot write (os.access says so; CI runs as root, which chmod does not stop): the store
    opens read-only and serves the same outputs, live while a writer has it open elsewhere (a serving pod's
    read-only mount of a folder an admin writes: it served removed prompts and failed as "malformed" when opened
    immutable); a persisted change is refused saying why, one kept in the process works. Where no -shm file can be
    made (no writer has the store open), it opens immutable, and a log still holding changes is refused, saying how
    to merge them."""
    import os
    import sqlite3
    import subprocess
    import sys
    from pathlib import Path

    from promptmux.core import bank_db
    from promptmux.core.bank import PromptBank

    folder = tmp_path / "ro"
    copy_deployment(deployment.deploy, folder)
    ids, mask = random_batch("bert", rows=2, seq=6, seed=3, padding_side="right")
    want = Runtime(folder).forward(ids, mask, ["pt", "prefix"])
    writer = PromptBank.load(folder, Runtime(folder).spec)
    writer.add([Task("late", "prompt", "PROMPT_TUNING", 2, {"prompt": np.ones((2, 32), np.float32)},
                     head=writer.view("pt").head)])  # committed, still in the log while the writer is open
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK and Path(p) == folder
                        else real(p, mode, **kw))
    live = Runtime(folder)
    assert "late" in live.bank and live.bank.view("pt").version == writer.view("pt").version

    def elsewhere(change: str):  # another process, which can write the folder (the admin's read-write path)
        code = ("import dataclasses, sys; from promptmux.core.folder import read_bank; b = read_bank(sys.argv[1]); "
                + change)
        subprocess.run([sys.executable, "-c", code, str(folder)], check=True, timeout=120)
    elsewhere("b.remove('late'); b.add([dataclasses.replace(b.view('pt'), labels=['x', 'y', 'z'])], replace=True)")
    assert "late" not in live.bank and live.bank.view("pt").labels == ["x", "y", "z"]  # seen as committed
    elsewhere("b.add([dataclasses.replace(b.view('pt'), name='late')])")
    assert "late" in live.bank
    del live

    def no_shm(path):  # a read-only volume where no writer has the store open: no -shm file, none can be made
        raise sqlite3.OperationalError("unable to open database file")
    live_read = bank_db._open_live_read_only
    monkeypatch.setattr(bank_db, "_open_live_read_only", no_shm)
    with pytest.raises(PermissionError, match="changes not yet merged into it"):
        Runtime(folder)
    import gc

    writer.close()
    gc.collect()  # the runtimes made above hold connections too: the last one to close merges the log
    # SQLite on a read-only volume: live only where a writer made the -shm file, else immutable until files change
    monkeypatch.setattr(bank_db, "_open_live_read_only",
                        lambda path: live_read(path) if Path(f"{path}-shm").exists() else no_shm(path))
    rt = Runtime(folder)
    assert np.allclose(rt.forward(ids, mask, ["pt", "prefix"]), want, atol=1e-6) and "late" in rt.tasks
    rt.bank.view("late")  # cached
    elsewhere("b.remove('late'); b.add([dataclasses.replace(b.view('pt'), name='later')])")  # opened, changed, closed
    assert "late" not in rt.bank and "later" in rt.bank and rt.bank.view("later").name == "later"
    with pytest.raises(UnknownTaskError):
        rt.bank.view("late")  # not the cached view of a task removed on disk
    with pytest.raises(PermissionError, match="is read-only: a persisted task change cannot be written"):
        rt.add_task("again", deployment.adapters["pt"], persist=True)
    assert rt.add_task("again", deployment.adapters["pt"]) == ["again"] and "again" in rt.tasks


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_persisted_bank_change_reaches_the_folder(deployment, tmp_path):

    folder = tmp_path / "copy"
    copy_deployment(deployment.deploy, folder)
    rt = Runtime(folder)
    rt.add_task("pt2", deployment.adapters["pt"], persist=True)
    assert "pt2" in Runtime(folder).tasks
    rt.remove_task("mpt", persist=True)  # an MPT adapter name removes all its tasks
    again = Runtime(folder)
    assert not [t for t in again.tasks if t.startswith("mpt/")]
    assert "mpt1/0" in again.tasks
    assert not list(folder.glob(".tasks-*")) and not list(folder.glob(".manifest-*"))  # no temp files left behind


@pytest.mark.parametrize("deployment", ["llama"], indirect=True)
def test_mpt_tasks_share_one_stored_prompt(deployment):
    rt = Runtime(deployment.deploy)
    assert rt.bank.shared_count() == 2  # two MPT adapters: mpt (3 tasks) and mpt1 (1 task)
    assert {rt.bank.entry(f"mpt/{k}")["tensors"]["shared"] for k in range(3)} != {None}
    assert len({rt.bank.entry(f"mpt/{k}")["tensors"]["shared"] for k in range(3)}) == 1
    view = rt.bank.view("mpt/1")
    assert view.tensors["cols"].shape == (4, 2) and view.tensors["rows"].shape == (2, 32)  # rank-2 factors, not a composed prompt


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_folded_graph_is_not_used_once_its_task_is_replaced(deployment, tmp_path, tmp_path_factory):

    d = copy_deployment(_folded(deployment, "pt", tmp_path_factory), tmp_path / "f")  # changed below: a copy
    assert Runtime(d).folded_task == "pt"
    rt = Runtime(d)
    rt.add_task("pt", deployment.adapters["ptmlp"], persist=True, replace=True)  # same name, other prompt
    again = Runtime(d)
    assert again.folded_task is None
    ids, mask = random_batch("bert", rows=2, seq=5, seed=1, padding_side="right")
    want = Runtime(deployment.deploy).forward(ids, mask, ["ptmlp"] * 2)
    got = again.forward(ids, mask, ["pt"] * 2)
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want)) < TOL


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_replacing_the_folded_task_serves_the_new_prompt(deployment, tmp_path, tmp_path_factory):
    from conftest import peft_rows

    folded = Runtime(_folded(deployment, "pt", tmp_path_factory))  # the change below is not persisted
    other = make_adapter("bert", deployment.base, adapter_configs("bert")["pt"], tmp_path / "other", seed=91)
    ids, mask = random_batch("bert", rows=2, seq=6, seed=4, padding_side="right")
    before = folded.forward(ids, mask, ["pt", "pt"])
    folded.add_task("pt", other, replace=True)
    got = folded.forward(ids, mask, ["pt", "pt"])  # a whole batch of the folded task
    want = peft_rows("bert", deployment.base, other, ids, mask)
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want)) < TOL
    assert max(float(np.abs(g - b).max()) for g, b in zip(got, before)) > 10 * TOL  # the prompt did change


@pytest.mark.parametrize("deployment", ["roberta"], indirect=True)
def test_batches_without_prefix_rows_run_the_graph_without_prefix_inputs(deployment):
    """Encoders carry model_noprefix.onnx (weights shared with model.onnx): a batch with no key/value prefix row
    runs it, one with a prefix row runs model.onnx, and both give PEFT's rows."""
    import onnx

    manifest = json.loads((deployment.deploy / "manifest.json").read_text())
    assert manifest["graph"]["noprefix"]["file"] == "model_noprefix.onnx"
    graph = onnx.load(str(deployment.deploy / "model_noprefix.onnx"), load_external_data=False)
    assert not {"prefix_keys", "prefix_values"} & {i.name for i in graph.graph.input}
    assert not (deployment.deploy / "model_noprefix.onnx.data").exists()  # the weights are model.onnx's
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    shared = [ExternalDataInfo(t) for t in graph.graph.initializer if uses_external_data(t)]
    assert {i.location for i in shared} == {"model.onnx.data"}
    assert sum(i.length for i in shared) >= 0.9 * (deployment.deploy / "model.onnx.data").stat().st_size
    ids, mask = random_batch(deployment.arch, rows=3, seq=7, seed=21, padding_side="right")
    for backend in ("onnxruntime", "openvino"):
        rt = Runtime(deployment.deploy, backend=backend)
        for tasks, graph_file in ((["pt", "mpt/1", "ptmlp"], "model_noprefix.onnx"),
                                  (["pt", "cartridge", "mpt/1"], "model.onnx")):
            got = rt.forward(ids, mask, tasks)
            assert rt.graph_runs[graph_file] == 1, (backend, tasks, rt.graph_runs)
            for i, t in enumerate(tasks):
                want = deployment.reference(t, ids[i:i + 1], mask[i:i + 1])[0]
                assert float(np.abs(got[i] - want).max()) < TOL, (backend, t)
            rt.graph_runs.clear()


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_replacing_an_adapter_replaces_all_its_tasks(deployment, tmp_path):
    """An MPT adapter's tasks are NAME/0 ... NAME/K-1: replaced by one of fewer tasks, the others go too (they
    stayed, mixed with the new adapter's); a plain adapter of that name clashes with them."""
    folder = copy_deployment(deployment.deploy, tmp_path / "copy")
    rt = Runtime(folder)
    with pytest.raises(ValueError, match=r"mpt/0, mpt/1, mpt/2 already in the bank"):
        rt.add_task("mpt", deployment.adapters["pt"], persist=True)
    rt.add_task("mpt", deployment.adapters["mpt1"], persist=True, replace=True)
    assert [t for t in Runtime(folder).tasks if t.split("/")[0] == "mpt"] == ["mpt/0"]
    mine = Runtime(folder)  # the same in a runtime's own (unpersisted) tasks
    mine.add_task("mine", deployment.adapters["mpt"])
    mine.add_task("mine", deployment.adapters["mpt1"], replace=True)
    assert [t for t in mine.tasks if t.split("/")[0] == "mine"] == ["mine/0"]


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_a_name_typed_with_a_combining_accent_names_the_same_task(deployment, tmp_path):
    """Task names are compared as a user reads them (Unicode NFC): "cafe" + U+0301 and "caf\u00e9" are one task, in the
    store and in a runtime's own tasks, for adding (a clash), lookup and removal."""
    decomposed, composed = "cafe\u0301", "caf\u00e9"
    folder = copy_deployment(deployment.deploy, tmp_path / "copy")
    rt = Runtime(folder)
    rt.add_task(decomposed, deployment.adapters["pt"], persist=True)
    assert composed in Runtime(folder).tasks and decomposed in rt.bank and composed in rt.bank
    with pytest.raises(ValueError, match="already in the bank"):
        rt.add_task(composed, deployment.adapters["pt"], persist=True)
    ids, mask = random_batch("bert", rows=2, seq=6, seed=3, padding_side="right")
    a, b = rt.forward(ids[[0, 0]], mask[[0, 0]], [decomposed, composed])  # one text, the task by either name
    assert np.abs(a - b).max() < 1e-6
    mine = Runtime(folder)
    mine.add_task("th\u00e9", deployment.adapters["pt"])
    assert mine.remove_task("the\u0301") == ["th\u00e9"] and mine.remove_task(decomposed) == [composed]


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_a_persisted_change_after_changes_of_its_own_is_all_or_nothing(deployment, tmp_path):
    folder = copy_deployment(deployment.deploy, tmp_path / "copy")
    rt = Runtime(folder)
    rt.add_task("x", deployment.adapters["pt"])  # this runtime's own
    with pytest.raises(UnknownTaskError):
        rt.remove_task("x", persist=True)  # the store has no x: refused there, and nothing changed here
    assert "x" in rt.tasks
    rt.remove_task("pt")
    with pytest.raises(ValueError, match="already in the bank"):
        rt.add_task("pt", deployment.adapters["prefix"], persist=True)
    assert "pt" not in rt.tasks and Runtime(folder).bank.entry("pt")["kind"] == "prompt"
    rt.add_task("pt", deployment.adapters["prefix"], persist=True, replace=True)
    assert rt.bank.entry("pt")["kind"] == Runtime(folder).bank.entry("pt")["kind"] != "prompt"
