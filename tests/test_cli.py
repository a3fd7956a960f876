"""The command line, called as users call it (`promptmux ...`), in-process: `main` is the console script's entry
point; one test runs it as a child process (Ctrl-C)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from conftest import VOCAB, adapter_configs, make_adapter, make_base

from promptmux.cli import build_parser, main


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def promptmux(*args, check=True) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["--quiet", *map(str, args)])
        except SystemExit as e:  # argparse: usage errors, --help, --version
            code = e.code
    proc = Result(code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp("cli")
    base = make_base("bert", root / "base")
    words = ["good", "bad", "film", "plot", "great", "awful", "the", "a", "is", "was"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    vocab += [f"w{i}" for i in range(VOCAB - len(vocab))]
    # vocab= (transformers 5 ignores vocab_file=, leaving a tokenizer that makes every word [UNK])
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(base)
    cfgs = adapter_configs("bert")
    adapters = {name: make_adapter("bert", base, cfgs[name], root / name, seed=i + 1)
                for i, name in enumerate(["pt", "prefix", "mpt", "ptmlp"])}
    return {"root": root, "base": base, "adapters": adapters}


@pytest.fixture(scope="module")
def deployed(setup):
    out = setup["root"] / "deploy"
    proc = promptmux("export", "--base", setup["base"], *sum((["--adapter", f"{n}={p}"]
                     for n, p in setup["adapters"].items()), []), "--out", out)
    return out, json.loads(proc.stdout)


def test_export_reports_every_task(deployed, setup):
    out, report = deployed
    assert report["tasks"] == ["pt", "prefix", "mpt/0", "mpt/1", "mpt/2", "ptmlp"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"]["path"] == str(setup["base"].resolve())
    assert manifest["base"]["model_type"] == "bert" and len(manifest["base"]["config_sha256"]) == 64
    assert "tasks" not in manifest and manifest["bank"] == {"store": "tasks.sqlite", "engine": "sqlite-wal",
                                                              "tasks_at_export": 6}
    assert (out / "model.onnx").is_file() and (out / "model.onnx.data").is_file()
    from transformers import AutoTokenizer  # the base's tokenizer travels with the deployment, unchanged

    text = "the film was good"
    assert (AutoTokenizer.from_pretrained(out)(text)["input_ids"]
            == AutoTokenizer.from_pretrained(setup["base"])(text)["input_ids"] == [2, 11, 7, 14, 5, 3])


def test_tasks_list_json(deployed):
    out, _ = deployed
    rows = json.loads(promptmux("tasks", out, "list", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["prefix"]["shapes"]["prefix"] == [2, 2, 4, 4, 8]
    assert by_name["mpt/1"]["shapes"] == {"shared": [4, 32], "cols": [4, 2], "rows": [2, 32]}


def test_tasks_list_writes_page_by_page_what_one_dump_would(deployed, capsys):
    """`tasks list` reads the bank a page at a time (bounded memory at a million tasks); pages of 2 over the
    deployment's tasks give the JSON and the lines of one listing, in order, each task once."""
    from promptmux.cli.tasks import _list
    from promptmux.core.folder import read_bank

    out, _ = deployed
    bank = read_bank(out)
    rows = bank.describe(sorted(bank.names()))  # listings are in name order
    assert len(rows) > 2
    capsys.readouterr()
    _list(bank, True, page=2)
    assert capsys.readouterr().out == json.dumps(rows, indent=2) + "\n"
    _list(bank, False, page=2)
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == [r["name"] for r in rows]


def test_an_out_folder_that_would_lose_data_is_refused_before_any_work(deployed, setup, tmp_path):
    """--out a file; --overwrite of a folder holding the command's own inputs, of a folder that is no deployment, of
    a deployment by an adapter; --num-labels 0: exit 2 saying why, everything left as it was (export deleted its
    base model and adapters, init-adapter its source deployment)."""
    out, _ = deployed
    adapter = ["--adapter", f"pt={setup['adapters']['pt']}"]
    (tmp_path / "a-file").write_text("keep")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep")
    for args, words in (
            (["export", "--base", setup["base"], *adapter, "--out", tmp_path / "a-file"], "is a file"),
            (["export", "--base", setup["base"], *adapter, "--out", setup["root"], "--overwrite"],
             "holds the base model"),
            (["export", "--base", setup["base"], *adapter, "--out", tmp_path / "home", "--overwrite"],
             "is not a deployment written by promptmux"),
            (["init-adapter", out, "--base", setup["base"], "--from", "pt", "--out", out, "--overwrite"],
             "holds the deployment"),
            (["init-adapter", out, "--base", setup["base"], "--from", "pt", "--out", tmp_path / "x",
              "--num-labels", "0"], "--num-labels must be a whole number of at least 1")):
        proc = promptmux(*args, check=False)
        assert proc.returncode == 2 and words in proc.stderr, (args, proc.stderr)
    assert (tmp_path / "a-file").read_text() == (tmp_path / "home" / "notes.txt").read_text() == "keep"
    assert (out / "manifest.json").is_file() and (setup["base"] / "config.json").is_file()
    # init-adapter --out . in the user's folder (it deleted the folder's files, then failed), over the user's own
    # adapters, or over the --query adapter it reads: refused, all kept; a link to nothing is refused too
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    cwd = os.getcwd()
    os.chdir(tmp_path / "home")
    try:
        for args, words in (
                (["--from", "pt", "--out", ".", "--overwrite"], "is not an adapter folder (or folders) written by"),
                (["--from", "pt", "--out", setup["adapters"]["pt"].parent, "--overwrite"], "that this command reads"),
                (["--top-k", "1", "--query", setup["adapters"]["pt"], "--out", setup["adapters"]["pt"],
                  "--overwrite"], "holds the --query adapter"),
                (["--from", "pt", "--out", tmp_path / "dangling"], "is a link to nothing")):
            proc = promptmux("init-adapter", out, "--base", setup["base"], *args, check=False)
            assert proc.returncode == 2 and words in proc.stderr, (args, proc.stderr)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "home" / "notes.txt").read_text() == "keep"
    assert (setup["adapters"]["pt"] / "adapter_config.json").is_file()


def test_export_from_inside_a_deployment_into_a_link_and_a_folder_made_meanwhile(deployed, setup, tmp_path,
                                                                                 monkeypatch):
    """Run from a folder holding a model.onnx.data (onnx tested the bare name in the current folder and refused);
    --out a link to a folder writes that folder and keeps the link; a folder made at --out while the export runs
    is not replaced without --overwrite (it was, at the end)."""
    from promptmux.export import deploy

    monkeypatch.chdir(deployed[0])
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    adapter = ["--adapter", f"pt={setup['adapters']['pt']}"]
    promptmux("export", "--base", setup["base"], *adapter, "--out", tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "manifest.json").is_file()
    assert (deployed[0] / "model.onnx.data").stat().st_size > 0
    graphs = deploy._export_graphs

    def someone_writes_there(*args, **kwargs):
        (tmp_path / "late").mkdir()
        (tmp_path / "late" / "notes.txt").write_text("keep")
        return graphs(*args, **kwargs)
    monkeypatch.setattr(deploy, "_export_graphs", someone_writes_there)
    proc = promptmux("export", "--base", setup["base"], *adapter, "--out", tmp_path / "late", check=False)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr, proc.stderr
    assert sorted(p.name for p in (tmp_path / "late").iterdir()) == ["notes.txt"]
    assert not list(tmp_path.glob(".late.tmp-*"))


def test_run_prints_json_classification(deployed):
    out, _ = deployed
    [result] = json.loads(promptmux("run", out, "--task", "mpt/2", "--text", "the film was great").stdout)
    assert result["task"] == "mpt/2" and len(result["scores"]) == 3
    assert abs(sum(result["scores"]) - 1) < 1e-5 and result["label_id"] == max(range(3), key=result["scores"].__getitem__)


def test_run_unknown_task_is_a_clear_error(deployed):
    out, _ = deployed
    proc = promptmux("run", out, "--task", "nope", "--text", "good", check=False)
    assert proc.returncode == 2
    assert "unknown task 'nope'; this deployment serves: pt, prefix, mpt/0, mpt/1, mpt/2, ptmlp" in proc.stderr


def test_a_damaged_task_store_is_a_one_line_error(deployed, tmp_path):
    out, _ = deployed
    shutil.copytree(out, tmp_path / "d")
    store = tmp_path / "d" / "tasks.sqlite"
    store.write_bytes(store.read_bytes()[:3000])  # truncated, as by a full disk or a broken copy
    proc = promptmux("tasks", tmp_path / "d", "list", check=False)
    assert proc.returncode == 2 and "cannot be read" in proc.stderr and "restore it from a backup" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("error, words", [
    ("sqlite3.OperationalError('database or disk is full')", "free disk space"),
    ("sqlite3.OperationalError('attempt to write a readonly database')", "tasks.sqlite writable"),
    ("OSError(28, 'No space left on device')", "No space left on device"),
    ("PermissionError('/srv/d is read-only: a persisted task change cannot be written there')", "is read-only"),
    ("TimeoutError('the task store stayed locked')", "stayed locked")])
def test_what_the_machine_refuses_is_a_one_line_error(deployed, monkeypatch, capsys, error, words):
    """A full disk, a read-only folder or store, a store another process holds: exit 2 and what to do, not a
    traceback (seen on `tasks remove` with a full disk, and `tasks add` on a read-only mount)."""
    import sqlite3

    from promptmux.core import folder

    def refuse(*a, **k):
        raise eval(error, {"sqlite3": sqlite3})
    monkeypatch.setattr(folder, "update_tasks", refuse)
    assert main(["tasks", str(deployed[0]), "remove", "pt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptmux: error: ") and words in err and err.count("\n") == 1


def test_tasks_add_then_remove_without_reexport(deployed, setup, monkeypatch):
    """Either order of action and folder; a relative adapter path is recorded absolute; a clash names --replace."""
    out, _ = deployed
    graph_before = (out / "model.onnx").stat().st_mtime_ns
    monkeypatch.chdir(setup["root"])
    assert json.loads(promptmux("tasks", out, "add", "pt2=pt").stdout) == {"added": ["pt2"]}
    [entry] = [t for t in json.loads(promptmux("tasks", out, "list", "--json").stdout) if t["name"] == "pt2"]
    assert entry["source"] == str(setup["adapters"]["pt"].resolve())
    clash = promptmux("tasks", "add", out, "pt2=pt", check=False)
    assert clash.returncode == 2 and "already in the deployment; pass --replace" in clash.stderr
    assert promptmux("tasks", out, "list", "--json").stdout == promptmux("tasks", "list", out, "--json").stdout
    assert "pt2" in [r["name"] for r in json.loads(promptmux("tasks", "list", out, "--json").stdout)]
    assert json.loads(promptmux("tasks", "remove", out, "pt2").stdout) == {"removed": ["pt2"]}
    assert (out / "model.onnx").stat().st_mtime_ns == graph_before


def test_tasks_add_over_an_mpt_adapters_tasks_names_them_and_says_what_it_replaced(deployed, tmp_path):
    """A plain adapter named like an MPT adapter clashes with all its tasks (the message named none), and replacing
    them says which went (they went silently)."""
    copy = shutil.copytree(deployed[0], tmp_path / "d")
    clash = promptmux("tasks", copy, "add", f"mpt={deployed[0].parent / 'pt'}", check=False)
    assert clash.returncode == 2 and "task(s) mpt/0, mpt/1, mpt/2 already in the deployment" in clash.stderr
    done = json.loads(promptmux("tasks", copy, "add", f"mpt={deployed[0].parent / 'pt'}", "--replace").stdout)
    assert done == {"added": ["mpt"], "replaced": ["mpt/0", "mpt/1", "mpt/2"]}


def test_tasks_backup_holds_every_committed_change_while_the_store_is_in_use(deployed, setup, tmp_path):
    """A copy of tasks.sqlite alone misses what is still in its write-ahead log (a running server's changes);
    `tasks DIR backup FILE` (SQLite's backup API) holds them, opens as a store, and never overwrites a file."""
    from promptmux.core.bank import STORE_FILE, PromptBank
    from promptmux.core.folder import read_bank

    copy = shutil.copytree(deployed[0], tmp_path / "d")
    live = read_bank(copy)  # held open, as a server holds it: the change below stays in the log
    promptmux("tasks", copy, "add", f"late={setup['adapters']['pt']}")
    assert (copy / f"{STORE_FILE}-wal").stat().st_size > 0
    done = json.loads(promptmux("tasks", copy, "backup", tmp_path / "bk.sqlite").stdout)
    assert done["tasks"] == len(live)
    (tmp_path / "restored").mkdir()
    shutil.copy(tmp_path / "bk.sqlite", tmp_path / "restored" / STORE_FILE)
    restored = PromptBank.load(tmp_path / "restored", live.spec)
    assert restored.names() == live.names() and "late" in restored
    again = promptmux("tasks", copy, "backup", tmp_path / "bk.sqlite", check=False)
    assert again.returncode == 2 and "exists; name a new file" in again.stderr


def test_tasks_on_a_folder_that_is_no_deployment(tmp_path):
    proc = promptmux("tasks", "list", tmp_path, check=False)
    assert proc.returncode == 2 and f"{tmp_path} is not a promptmux deployment (no manifest.json)" in proc.stderr


def _words(n: int) -> str:
    return " ".join(["good"] * n)  # n + 2 tokens with [CLS] and [SEP]


def test_run_refuses_text_too_long_for_its_own_task_unless_truncate(deployed):
    """64 positions: 61 tokens fit ptmlp's 3 virtual tokens but not pt's 4. The limit is each row's own task's."""
    out, _ = deployed
    args = ["run", out, "--task", "ptmlp", "--task", "pt", "--text", _words(59), "--text", _words(59)]
    refused = promptmux(*args, check=False)
    assert refused.returncode == 2 and refused.stdout == ""
    assert "text 1: 61 tokens + 4 virtual tokens of task 'pt' exceed the model's 64 positions" in refused.stderr
    assert "--truncate" in refused.stderr
    fits, cut = json.loads(promptmux(*args, "--truncate").stdout)
    assert "truncated_tokens" not in fits and cut["truncated_tokens"] == 1
    [same] = json.loads(promptmux("run", out, "--task", "pt", "--text", _words(58)).stdout)  # what was kept
    assert cut["scores"] == pytest.approx(same["scores"], abs=1e-6)


def test_run_answers_every_text_of_repeated_text_and_file(deployed, tmp_path):
    out, _ = deployed
    (tmp_path / "texts.txt").write_text("the plot was awful\n\ngreat film\n")
    rows = json.loads(promptmux("run", out, "--task", "pt", "--text", "good", "--text", "bad film", "--file",
                                tmp_path / "texts.txt").stdout)
    assert [r["text"] for r in rows] == ["good", "bad film", "the plot was awful", "great film"]
    assert all(r["task"] == "pt" and len(r["scores"]) == 3 for r in rows)
    assert rows[0]["scores"] != rows[1]["scores"]
    proc = promptmux("run", out, "--task", "pt", "--task", "mpt/0", "--task", "pt", "--text", "a", "--text", "b",
                     check=False)
    assert proc.returncode == 2 and "got 3 --task for 2 texts" in proc.stderr


def test_quiet_is_taken_before_and_after_the_subcommand():
    export = ["export", "--base", "b", "--adapter", "t=a", "--out", "o"]
    assert build_parser().parse_args(["--quiet", *export]).quiet
    assert build_parser().parse_args([*export, "--quiet"]).quiet
    assert not build_parser().parse_args(export).quiet


def test_version_and_help_on_every_option():
    from promptmux import __version__

    proc = promptmux("--version")
    assert proc.returncode == 0 and proc.stdout == f"promptmux {__version__}\n"
    parser = build_parser()
    [sub] = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help, f"promptmux {name} {'/'.join(action.option_strings) or action.dest} has no help"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_during_export_prints_one_line_exits_130_and_leaves_no_folder(setup, tmp_path, sig):
    """Ctrl-C: one line, 130. SIGTERM (a process manager, `timeout`): 143 as the signal would give (130 where a
    callback swallowed it and the export's next step stopped it). Either way no temporary folder is left."""
    out = tmp_path / "deploy"
    for _ in range(3):  # on a loaded machine this process may look only after the export has finished: again
        shutil.rmtree(out, ignore_errors=True)
        # SIGINT restored in the child: a suite started in the background (nohup, &) passes it on ignored, and
        # Python then installs no KeyboardInterrupt handler
        child = subprocess.Popen([sys.executable, "-m", "promptmux", "export", "--base", setup["base"], "--adapter",
                                  f"pt={setup['adapters']['pt']}", "--out", out, "--quiet"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"),
                                 preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT,
                                                                                                 signal.SIGTERM)])
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".deploy.tmp-*")) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # interrupt once the export writes its temporary folder
        if child.poll() is None:
            break
        child.communicate()
    child.send_signal(sig)
    stdout, stderr = child.communicate(timeout=120)
    if sig == signal.SIGINT or child.returncode == 130:
        assert child.returncode == 130 and stderr == "promptmux: interrupted\n", stderr
    else:
        assert child.returncode == 143 and "Traceback" not in stderr, stderr
    assert stdout == "" and list(tmp_path.iterdir()) == []


def test_ctrl_c_swallowed_by_a_callback_still_stops_the_export(setup, tmp_path):
    """A Ctrl-C that Python delivers inside a callback (an import lock's, a weakref's) is printed as "Exception
    ignored" and lost; the export stops at its next step anyway, with 130 and no folder (it once finished). Run in
    a child process: a Ctrl-C sent to the test's own process could otherwise reach pytest and stop the worker."""
    out = tmp_path / "deploy"
    script = f"""
import os, signal, sys, weakref
from promptmux.cli import main
from promptmux.export import deploy

real = deploy.load_base_model

def load_then_ctrl_c_in_a_callback(*args, **kwargs):
    model = real(*args, **kwargs)

    class Gone:
        pass

    gone = Gone()
    ref = weakref.ref(gone, lambda _: (os.kill(os.getpid(), signal.SIGINT), None))
    del gone  # the callback runs, and with it the KeyboardInterrupt, which Python reports and drops
    return model

deploy.load_base_model = load_then_ctrl_c_in_a_callback
sys.unraisablehook = lambda u: print("dropped:", u.exc_type.__name__, file=sys.stderr)
signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own handler, as in a terminal
code = main(["export", "--base", {str(setup["base"])!r}, "--adapter", {"pt=" + str(setup["adapters"]["pt"])!r},
             "--out", {str(out)!r}, "--quiet"])
sys.stderr.flush()
os._exit(code)
"""
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False,
                           env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert child.returncode == 130, child.stderr
    assert child.stderr.splitlines()[-2:] == ["dropped: KeyboardInterrupt", "promptmux: interrupted"], child.stderr
    assert list(tmp_path.iterdir()) == []


def test_verify_passes_for_the_exported_adapters(deployed, setup):
    out, _ = deployed
    proc = promptmux("verify", out, "--base", setup["base"],
                     *sum((["--adapter", f"{n}={p}"] for n, p in setup["adapters"].items()), []))
    lines = [line.split("\t") for line in proc.stdout.splitlines() if "\t" in line]
    assert [name for name, *_ in lines] == ["pt", "prefix", "mpt/0", "mpt/1", "mpt/2", "ptmlp"]
    assert all(float(diff.split("=")[1]) < 1e-4 for _, diff, _ in lines)


def test_verify_fails_when_the_deployment_differs(deployed, setup):
    out, _ = deployed
    other = make_adapter("bert", setup["base"], adapter_configs("bert")["pt"], setup["root"] / "other", seed=99)
    proc = promptmux("verify", out, "--base", setup["base"], "--adapter", f"pt={other}", check=False)
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "differ from PEFT eager by more than 0.0001" in proc.stderr


def test_verify_with_an_adapter_of_another_kind_says_the_kinds_differ(deployed, setup):
    proc = promptmux("verify", deployed[0], "--base", setup["base"], "--adapter", f"pt={setup['adapters']['prefix']}",
                     check=False)
    assert proc.returncode == 2
    assert "task 'pt' of the deployment is PROMPT_TUNING but adapter" in proc.stderr
    assert "is PREFIX_TUNING: the kinds differ" in proc.stderr


def test_verify_against_another_base_model_says_so(deployed, setup, tmp_path):
    """A GPT-2 base for a BERT deployment: exit 2 naming the base (it was a KeyError traceback inside PEFT)."""
    other = make_base("gpt2", tmp_path / "gpt2")
    proc = promptmux("verify", deployed[0], "--base", other, "--adapter", f"pt={setup['adapters']['pt']}", check=False)
    assert proc.returncode == 2 and "is not the model this deployment was exported from" in proc.stderr, proc.stderr


def test_export_with_strict_leaves_nothing_where_a_contract_misses(setup, tmp_path, monkeypatch, bf16_cpu):
    """export --precision P --strict: a missed contract is a failed export, which leaves nothing behind (it left a
    whole deployment that the same command then refused as "not empty"); without --strict the JSON names the
    contract by the backend and precision that ran."""
    from promptmux.runtime import precision as P

    monkeypatch.setitem(P.THRESHOLDS, "prediction_agreement", 1.01)  # no precision can meet this
    export = ["export", "--base", setup["base"], "--adapter", f"pt={setup['adapters']['pt']}", "--out",
              tmp_path / "deploy", "--precision", "bf16"]
    proc = promptmux(*export, "--strict", check=False)
    assert proc.returncode == 2 and "misses its accuracy contract" in proc.stderr and not (tmp_path / "deploy").exists()
    assert json.loads(promptmux(*export).stdout)["precision_contracts_passed"] == {"openvino/bf16": False}


def test_export_keeps_calibration_given_without_a_precision_for_later_opens(setup, tmp_path):
    (tmp_path / "cal.txt").write_text("the film was good\nthe  plot was awful\n")
    out = tmp_path / "o"
    promptmux("export", "--base", setup["base"], "--adapter", f"pt={setup['adapters']['pt']}", "--out", out,
              "--calibration", tmp_path / "cal.txt")
    assert (out / "calibration.txt").read_text().splitlines() == ["the film was good", "the plot was awful"]
    # rows a later contract would refuse are refused now, not kept to fail every later open: nothing is left
    (tmp_path / "rows.jsonl").write_text(json.dumps({"task": "nope", "text": "a film", "label": 0}) + "\n")
    proc = promptmux("export", "--base", setup["base"], "--adapter", f"pt={setup['adapters']['pt']}", "--out",
                     tmp_path / "o2", "--calibration", tmp_path / "rows.jsonl", check=False)
    assert proc.returncode == 2 and "task(s) 'nope' that this deployment does not serve" in proc.stderr, proc.stderr
    assert not (tmp_path / "o2").exists()


def test_bad_adapter_flag(setup, tmp_path):
    proc = promptmux("export", "--base", setup["base"], "--adapter", "noequals", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "--adapter takes NAME=DIR, got 'noequals'" in proc.stderr


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    """A GPT-2 deployment with a word-level tokenizer that has no pad token (the runtime pads with EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("causal")
    base = make_base("gpt2", root / "base")
    vocab = {"<eos>": 0, "<unk>": 1} | {f"w{i}": i + 2 for i in range(VOCAB - 2)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>").save_pretrained(base)
    cfgs = adapter_configs("gpt2")
    prefix = make_adapter("gpt2", base, cfgs["prefix"], root / "prefix", seed=5)
    pt = make_adapter("gpt2", base, cfgs["pt"], root / "pt", seed=6)
    out = root / "deploy"
    promptmux("export", "--base", base, "--adapter", f"p={prefix}", "--adapter", f"pt={pt}", "--out", out)
    return {"deploy": out, "vocab": vocab}


def test_run_on_a_causal_lm_prints_next_token_candidates(causal):
    [result] = json.loads(promptmux("run", causal["deploy"], "--task", "p", "--text", "w3 w7 w9").stdout)
    top = result["next_token"]
    assert len(top) == 5 and top[0]["logit"] >= top[-1]["logit"]
    assert all(t["token"] in causal["vocab"] for t in top)


def test_generate_prints_the_runtimes_tokens_per_prompt(causal):
    from promptmux import Runtime

    prompts, tasks = ["w3 w7 w9", "w5 w2"], ["p", "pt"]
    proc = promptmux("generate", causal["deploy"], "--task", "p", "--task", "pt", "--prompt", prompts[0],
                     "--prompt", prompts[1], "--max-new-tokens", 6)
    rows = json.loads(proc.stdout)
    want = Runtime(causal["deploy"]).generate(prompts, tasks, max_new_tokens=6)
    assert [(r["task"], r["prompt"], r["token_ids"], r["text"]) for r in rows] == [
        (w["task"], p, w["token_ids"], w["text"]) for w, p in zip(want, prompts)]


def test_generate_with_own_positions_prints_each_prompts_alone_tokens(causal):
    from promptmux import Runtime

    prompts = ["w3 w7 w9 w4 w2", "w5"]
    proc = promptmux("generate", causal["deploy"], "--task", "pt", "--prompt", prompts[0], "--prompt", prompts[1],
                     "--max-new-tokens", 6, "--own-positions")
    rt = Runtime(causal["deploy"])
    alone = [rt.generate(p, "pt", max_new_tokens=6)[0]["token_ids"] for p in prompts]
    assert [r["token_ids"] for r in json.loads(proc.stdout)] == alone


def test_generate_at_temperature_0_is_greedy_as_the_server_reads_it(causal):
    from promptmux import Runtime

    proc = promptmux("generate", causal["deploy"], "--task", "p", "--prompt", "w3 w7 w9", "--max-new-tokens", 8,
                     "--temperature", "0", "--top-k", "50", "--seed", "1")
    greedy = Runtime(causal["deploy"]).generate("w3 w7 w9", "p", max_new_tokens=8)[0]["token_ids"]
    assert json.loads(proc.stdout)[0]["token_ids"] == greedy


def test_a_stop_given_as_one_string_is_one_stop_not_its_characters(causal):
    from promptmux import Runtime

    rt = Runtime(causal["deploy"])
    free = rt.generate("w3 w7 w9", "p", max_new_tokens=6, eos_token_id=[])[0]
    stop = free["text"].lstrip()[0] + "\x01"  # its first character does appear; the whole string never does
    got = rt.generate("w3 w7 w9", "p", max_new_tokens=6, eos_token_id=[], stop=stop)[0]
    assert (got["text"], got["finish_reason"]) == (free["text"], "length")


def test_a_row_its_stop_string_ends_leaves_the_decoders_batch(causal, monkeypatch):
    from promptmux import Runtime

    rt = Runtime(causal["deploy"])
    prompts = ["w3 w7 w9", "w4 w5"]
    free = rt.generate(prompts, "p", max_new_tokens=6, eos_token_id=[])
    stop = free[0]["text"].split()[1]  # row 0's second word
    assert stop not in free[1]["text"]  # it ends row 0 only (the fixture's model is seeded)
    session, seen = rt.generator.session, []
    run_all = session.run_all
    monkeypatch.setattr(session, "run_all", lambda feeds: seen.append(len(feeds["input_ids"])) or run_all(feeds))
    got = rt.generate(prompts, "p", max_new_tokens=6, eos_token_id=[], stop=stop)
    assert got[0]["finish_reason"] == "stop" and got[1] == free[1]
    assert seen[0] == 2 and seen[-1] == 1 and len(seen) == 6, seen  # prefill and 5 steps; row 1 alone at the end


def test_generate_measures_a_language_models_labelled_contract_from_a_calibration_file(causal, tmp_path):
    """--calibration rows.jsonl with answers: the labelled rule, the rows kept in the deployment, measured once."""
    from promptmux import Runtime
    from promptmux.runtime import precision as P

    deploy = tmp_path / "deploy"
    shutil.copytree(causal["deploy"], deploy)  # real copies: int8 graphs and the contract are written into it
    prompts = [f"w{i} w{i + 3} w{2 * i + 1}" for i in range(4, 10)]
    outs = Runtime(deploy).generate(prompts, "pt", max_new_tokens=P.CALIBRATION_NEW_TOKENS)
    rows = [{"task": "pt", "text": p, "label": o["text"].split()[0]}
            for p, o in zip(prompts, outs) if o["text"].split()]
    assert rows  # fp32's own first words: the answers it gives
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    promptmux("generate", deploy, "--task", "pt", "--prompt", "w4 w4 w8", "--max-new-tokens", 2,
              "--precision", "int8", "--calibration", tmp_path / "rows.jsonl")
    entry = json.loads((deploy / "manifest.json").read_text())["precision"]["onnxruntime/int8"]
    report = entry["tasks"]["pt"]
    assert report["labelled"] and report["accuracy_fp32"] == 1.0 and report["rows"] == len(rows)
    assert report["prediction_agreement"] == report["identical_rows"] and "p" in entry["tasks"]  # p: token rule
    assert "labelled" not in entry["tasks"]["p"]
    assert entry["calibration"]["labelled_rows"] == entry["calibration"]["task_rows"] == len(rows)
    assert P.calibration_texts(deploy / P.LABELLED_FILE) == rows  # kept with their answers
    again = Runtime(deploy, precision="int8")
    assert again.contract == entry  # the same rows: measured once
    assert (again.precision, again.forward_precision) == ("int8", "fp32")  # int8 is the decoder's: said, not hidden
    (tmp_path / "long.jsonl").write_text(json.dumps({"task": "pt", "text": "w1 " * 200, "label": "w2"}) + "\n")
    proc = promptmux("generate", deploy, "--task", "pt", "--prompt", "w4", "--max-new-tokens", 2, "--precision",
                     "int8", "--calibration", tmp_path / "long.jsonl", check=False)  # the calibration, not the prompt
    assert proc.returncode == 2 and "a calibration prompt does not fit task 'pt'" in proc.stderr, proc.stderr


def test_given_calibration_stands_when_given_again_and_kept_rows_outlive_a_removed_task(causal, tmp_path,
                                                                                          monkeypatch):
    """The same rows given again (a list, or the file's path) leave the contract standing; removing a task leaves
    its kept rows out of the next measurement instead of failing every open."""
    from promptmux import Runtime
    from promptmux.runtime import precision as P

    deploy = tmp_path / "deploy"
    shutil.copytree(causal["deploy"], deploy)
    rows = [{"task": t, "text": f"w{i} w{i + 2} w{i + 5}"} for t in ("p", "pt") for i in range(3, 7)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    entry = Runtime(deploy, precision="int8", calibration=rows).contract
    assert set(entry["tasks"]) == {"p", "pt"}
    monkeypatch.setattr(P, "calibrate", lambda *a, **k: pytest.fail("measured the same rows again"))
    assert Runtime(deploy, precision="int8", calibration=rows).contract == entry
    assert Runtime(deploy, precision="int8", calibration=str(tmp_path / "rows.jsonl")).contract == entry
    with pytest.raises(ValueError, match="is one string and no file"):
        Runtime(deploy, precision="int8", calibration="w3 w5 w8")
    monkeypatch.undo()
    Runtime(deploy).remove_task("p", persist=True)
    again = Runtime(deploy, precision="int8").contract  # the kept rows of "p" left out, "pt"'s measured
    assert set(again["tasks"]) == {"pt"} and again["tasks"]["pt"]["rows"] == 4


def test_generate_stream_prints_the_same_text(causal):
    from promptmux import Runtime

    proc = promptmux("generate", causal["deploy"], "--task", "pt", "--prompt", "w4 w4 w8", "--max-new-tokens", 5,
                     "--stream")
    want = Runtime(causal["deploy"]).generate("w4 w4 w8", "pt", max_new_tokens=5)[0]["text"]
    assert proc.stdout == want + "\n"


@pytest.mark.parametrize("args,message", [
    (["--task", "nope", "--prompt", "w1"], "unknown task 'nope'"),
    (["--task", "p", "--prompt", "   "], "empty prompt"),
    (["--task", "p", "--prompt", "w1", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 is out of range"),
    (["--task", "p", "--prompt", "w1", "--seed", "-1"], "argument --seed: -1 is out of range: give 0 or more"),
    (["--task", "p", "--task", "pt", "--task", "p", "--prompt", "w1", "--prompt", "w2"], "got 3 --task for 2 --prompt"),
])
def test_generate_bad_input_is_a_clear_error(causal, args, message):
    proc = promptmux("generate", causal["deploy"], *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def _has_tensorrt() -> bool:
    from promptmux.core import trt_compat

    try:
        trt_compat.import_tensorrt()
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_tensorrt(), reason="no TensorRT here (pip install tensorrt-rtx-cu13-bindings "
                                                "tensorrt-rtx-cu13-libs)")
def test_build_engine_on_a_default_export_records_the_engine(deployed):
    """The default export is ONNX Runtime-optimized; build-engine exports a portable graph again on its own."""
    out, _ = deployed
    proc = promptmux("build-engine", out, "--max-batch", 2, "--max-seq", 8, "--max-prompt", 8)
    engines = json.loads(proc.stdout)["engines"]
    assert list(engines) == ["model"] and engines["model"]["plugin"]["layers"] == ["node_mpt_prompt_concat"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engines"]["model"]["sha256"] == engines["model"]["sha256"]
    assert (out / "model.engine").stat().st_size == engines["model"]["bytes"]


def test_build_engine_rejects_an_empty_profile(deployed):
    proc = promptmux("build-engine", deployed[0], "--max-batch", 0, check=False)
    assert proc.returncode == 2 and "argument --max-batch: 0 is out of range: give 1 or more" in proc.stderr


def test_labels_come_from_the_base_configs_id2label_without_labels_json(setup):
    from promptmux.core.adapters import load_adapter
    from promptmux.core.folder import load_base_config

    config = load_base_config(setup["base"])
    assert load_adapter("pt", setup["adapters"]["pt"], config)[0].labels is None  # LABEL_0..2: placeholders
    config.id2label = {0: "negative", 1: "neutral", 2: "positive"}
    assert load_adapter("pt", setup["adapters"]["pt"], config)[0].labels == ["negative", "neutral", "positive"]
    config.id2label = {0: "negative", 1: "positive"}  # does not fit the 3-output head: not used
    assert load_adapter("pt", setup["adapters"]["pt"], config)[0].labels is None


def test_serve_multiplex_tasks_without_ray_is_a_clear_error(deployed):
    r = promptmux("serve", deployed[0], "--multiplex-tasks", "4", check=False)
    assert r.returncode == 2 and "--multiplex-tasks" in r.stderr and "--ray" in r.stderr


def test_serve_grpc_port_with_ray_or_out_of_range_is_a_clear_error(deployed):
    r = promptmux("serve", deployed[0], "--grpc-port", "0", "--ray", check=False)
    assert r.returncode == 2 and "--grpc-port serves from one process" in r.stderr
    r = promptmux("serve", deployed[0], "--grpc-port", "70000", check=False)
    assert r.returncode == 2 and "argument --grpc-port: 70000 is out of range" in r.stderr
