"""Backends and precisions: OpenVINO exact mode is really f32, non-exact precisions carry a measured contract,
`auto` picks a backend and says why, and what cannot run here is refused with a message saying what to do."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from conftest import copy_deployment, random_batch

from promptmux import Runtime
from promptmux.runtime import backends as B
from promptmux.runtime import precision as P
from promptmux.runtime.errors import BackendUnavailable


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_openvino_exact_mode_compiles_in_f32_on_a_bf16_cpu(deployment):
    """OpenVINO's CPU plugin defaults to bf16 where AMX exists: the exact backend must have asked for f32."""
    import openvino as ov

    rt = Runtime(deployment.deploy, backend="openvino")
    assert rt.precision == "fp32"
    assert rt.session.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    # The trap this guards against: where OpenVINO computes bf16, a plain compile picks it (elsewhere, f32).
    core = ov.Core()
    plain = core.compile_model(str(next((deployment.deploy / "openvino").glob("model.xml"))), "CPU")
    bf16_here = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert plain.get_property("INFERENCE_PRECISION_HINT") == (ov.Type.bf16 if bf16_here else ov.Type.f32)


@pytest.mark.parametrize("deployment", ["llama"], indirect=True)
def test_openvino_stays_exact_when_the_deployment_is_loaded_again(deployment):
    """A second load in the same process (a server reloading, a benchmark worker) must compute what the first did:
    OpenVINO 2026.4's compiled-blob cache broke this (see runtime/openvino_session.py)."""
    ids, mask = random_batch("llama", rows=4, seq=8, seed=5, padding_side="left")
    exact = Runtime(deployment.deploy, backend="onnxruntime").forward(ids, mask, "pt")
    for _ in range(2):
        rt = Runtime(deployment.deploy, backend="openvino")
        rt.generator  # noqa: B018 - the decoder graph compiled too, as generation does
        got = rt.forward(ids, mask, "pt")
        assert max(float(np.abs(a - b).max()) for a, b in zip(got, exact)) < 1e-5


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_openvino_restart_converts_nothing(deployment, monkeypatch):
    """The ONNX -> IR conversion (the slow part of a first start) is done once per deployment; a restart only
    compiles the IR (studies/openvino_cache.py: importing a compiled blob is no faster, and wrong on RoPE graphs)."""
    import openvino as ov

    ids, mask = random_batch("bert", rows=2, seq=6, seed=3, padding_side="right")
    first = Runtime(deployment.deploy, backend="openvino")
    tasks = [first.tasks[0], first.tasks[-1]]
    want = first.forward(ids, mask, tasks)

    def no_conversion(*args, **kwargs):
        raise AssertionError("a restart converted a graph again")

    monkeypatch.setattr(ov, "convert_model", no_conversion)
    got = Runtime(deployment.deploy, backend="openvino").forward(ids, mask, tasks)
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, want)) == 0.0


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_bf16_contract_is_measured_recorded_and_reused(deployment, tmp_path, bf16_cpu):

    deploy = copy_deployment(deployment.deploy, tmp_path / "deploy")
    rt = Runtime(deploy, precision="bf16")
    assert (rt.backend, rt.precision) == ("openvino", "bf16")
    entry = json.loads((deploy / "manifest.json").read_text())["precision"]["openvino/bf16"]
    assert set(entry["tasks"]) == set(rt.tasks)
    for r in entry["tasks"].values():
        assert r["rows"] == P.CALIBRATION_ROWS and 0 < r["max_abs_diff"] < 0.5
        assert 0.9 <= r["prediction_agreement"] <= 1.0
    assert entry["passed"] == P.passed(entry["tasks"])
    # bf16 really ran: outputs differ from fp32 by more than fp32 reordering would, yet stay close
    ids, mask = random_batch("bert", rows=4, seq=8, seed=2, padding_side="right")
    exact = Runtime(deploy, backend="onnxruntime")
    diff = max(float(np.abs(a - b).max()) for a, b in zip(rt.forward(ids, mask, "pt"), exact.forward(ids, mask, "pt")))
    assert 1e-5 < diff < 0.5
    # the second load reuses the manifest's contract instead of measuring again
    again = Runtime(deploy, precision="bf16")
    assert again.contract["measured"] == entry["measured"]


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_strict_refuses_a_missed_contract_and_default_warns(deployment, monkeypatch, caplog, tmp_path, bf16_cpu):

    deploy = copy_deployment(deployment.deploy, tmp_path / "deploy")
    monkeypatch.setitem(P.THRESHOLDS, "prediction_agreement", 1.01)  # no precision can meet this
    with pytest.raises(P.PrecisionError, match=r"misses its accuracy contract .*prediction_agreement .* < 1.01.*--strict"):
        Runtime(deploy, precision="bf16", strict=True)
    with caplog.at_level("WARNING", logger="promptmux.runtime"):
        rt = Runtime(deploy, precision="bf16")
    assert rt.contract["passed"] is False
    assert "misses its accuracy contract" in caplog.text


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_calibration_texts_are_used_and_recorded(deployment, tmp_path, bf16_cpu):

    deploy = copy_deployment(deployment.deploy, tmp_path / "deploy")
    path = tmp_path / "calibration.txt"
    _with_tokenizer(deploy, tmp_path)  # the tiny test model has none
    path.write_text("\n".join(" ".join(_word((i * 7 + j) % 115) for j in range(6)) for i in range(40)) + "\n\n")
    texts = P.calibration_texts(path)
    assert len(texts) == 40
    rt = Runtime(deploy, precision="bf16", calibration=texts)
    assert rt.contract["calibration"]["rows"] == 40 and rt.contract["calibration"]["source"] == "given texts"
    assert all(r["rows"] == 40 for r in rt.contract["tasks"].values())
    # The texts stay with the deployment: a later re-measurement (tasks changed, contract gone) uses them again.
    assert P.calibration_texts(deploy / "calibration.txt") == texts
    from promptmux.core.folder import write_manifest

    write_manifest(deploy, lambda m: m.pop("precision"))
    again = Runtime(deploy, precision="bf16").contract
    assert again["calibration"] == dict(rt.contract["calibration"], source="calibration.txt")


def _with_tokenizer(deploy, tmp_path):
    """The tiny test deployment with a word-level tokenizer, so that calibration texts can be encoded (the export
    saves what transformers makes of a folder without one: a tokenizer with no vocabulary)."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [_word(i) for i in range(115)]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(str(deploy))
    return deploy


def _word(i: int) -> str:  # letters only: each is one token of the tiny vocabulary
    return chr(97 + i // 26) + chr(97 + i % 26)


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_labelled_contract_keeps_accuracy_and_most_predictions(deployment, tmp_path):
    """With labelled rows a task passes when its accuracy stays within 0.5 point of fp32's and 97 % of fp32's
    predictions are kept: a precision that loses one right answer in 100 misses on accuracy, one that trades two
    right answers for two others misses on the answers kept, though its accuracy is fp32's."""

    deploy = _with_tokenizer(copy_deployment(deployment.deploy, tmp_path / "deploy"), tmp_path)
    exact = Runtime(deploy, backend="onnxruntime")
    texts = [" ".join(_word((i * 7 + j * 3) % 115) for j in range(6)) for i in range(100)]
    enc = exact.encode(texts, "pt")
    want = np.stack(exact.forward(enc["input_ids"], enc["attention_mask"], "pt", enc.get("token_type_ids")))
    pred = want.argmax(-1)
    labels = [int(p) if i >= 10 else int((p + 1) % want.shape[1]) for i, p in enumerate(pred)]  # fp32: 90 % right
    rows = [{"task": "pt", "text": t, "label": label} for t, label in zip(texts, labels)]

    class Flipped:  # fp32 with the answers of some rows (by text) moved to another label
        def __init__(self, flips):
            self.flips = flips

        def forward(self, ids, mask, task, types=None):
            out = [np.array(r) for r in exact.forward(ids, mask, task, types)]
            for r, row_ids, row_mask in zip(out, ids, mask):
                target = self.flips.get(tuple(int(x) for x, m in zip(row_ids, row_mask) if m))
                if target is not None:
                    r[:] = -10.0
                    r[target] = 10.0
            return out

    def key(i):  # a row's own tokens
        return tuple(int(x) for x in exact.encode([texts[i]], "pt")["input_ids"][0])

    def report(flips):
        return P.measure(Flipped({key(i): t for i, t in flips.items()}), exact, None, rows)["pt"]

    same = report({})
    as_named = [dict(r, label=str(r["label"])) for r in rows]  # unnamed labels as classify() names them: "2"
    assert P.measure(exact, exact, None, as_named)["pt"]["accuracy_fp32"] == same["accuracy_fp32"] == 0.9
    assert same["labelled"] and same["accuracy_fp32"] == 0.9 and same["accuracy"] == 0.9 and P.misses({"pt": same}) == []
    assert same["batch_changes"] == 0
    one_lost = report({20: (labels[20] + 1) % want.shape[1]})
    assert one_lost["prediction_agreement"] == 0.99 and one_lost["accuracy"] == pytest.approx(0.89)
    assert same["agreement_interval_95"][1] == 1.0 and one_lost["agreement_interval_95"] == [0.9455, 0.9982]
    assert one_lost["batch_changes"] == 0  # the flip is the row's own, batched or alone

    class FlippedAlone(Flipped):  # fp32 in a batch; a row run alone gets its flip (an answer that depends on its batch)
        def forward(self, ids, mask, task, types=None):
            return super().forward(ids, mask, task, types) if len(ids) == 1 else exact.forward(ids, mask, task, types)

    alone = P.measure(FlippedAlone({key(20): (labels[20] + 1) % want.shape[1]}), exact, None, rows)["pt"]
    assert alone["prediction_agreement"] == 1.0 and alone["batch_changes"] == 1 / P.ALONE_ROWS  # row 20 of 64
    assert [m.split(":")[1].split()[0] for m in P.misses({"pt": one_lost})] == ["accuracy"]

    class FlippedMixed(Flipped):  # fp32 in batches of one task; in a batch with another task's rows, the flip
        def forward(self, ids, mask, task, types=None):
            mixed = not isinstance(task, str) and len(set(task)) > 1
            return super().forward(ids, mask, task, types) if mixed else exact.forward(ids, mask, task, types)

    first = (enc["input_ids"][:1], enc["attention_mask"][:1])
    other = next(t for t in exact.tasks if t != "pt" and len(exact.forward(*first, t)[0]) == want.shape[1])
    two = rows + [{**r, "task": other} for r in rows]  # served mixed, as a server batches the two tasks' traffic
    mixed = P.measure(FlippedMixed({key(20): (labels[20] + 1) % want.shape[1]}), exact, None, two)["pt"]
    assert mixed["prediction_agreement_by_task"] == 1.0 and mixed["prediction_agreement_mixed"] == 0.99
    assert mixed["prediction_agreement"] == 0.99 and mixed["agreement_interval_95"] == [0.9455, 0.9982]
    assert mixed["accuracy_by_task"] == 0.9 and mixed["accuracy"] == mixed["accuracy_mixed"] == pytest.approx(0.89)
    assert [m.split(":")[1].split()[0] for m in P.misses({"pt": mixed})] == ["accuracy"]
    traded = report({20: (labels[20] + 1) % want.shape[1], 21: (labels[21] + 1) % want.shape[1], 0: labels[0],
                     1: labels[1]})
    assert traded["accuracy"] == 0.9 and traded["prediction_agreement"] == 0.96
    assert [m.split(":")[1].split()[0] for m in P.misses({"pt": traded})] == ["prediction_agreement"]
    with pytest.raises(P.PrecisionError, match=r"prediction_agreement 0.9600 < 0.97 \(labelled rows\).*--strict"):
        P.enforce({"precision": "int8", "backend": "onnxruntime", "tasks": {"pt": traded},
                   "calibration": {"source": "calibration.jsonl"}}, strict=True)


def test_labelled_calibration_files_are_read_and_checked(tmp_path):
    path = tmp_path / "cal.jsonl"
    path.write_text('{"task": "sentiment", "text": "A  fine film", "label": "positive"}\n\n'
                    '{"task": "topic", "text": "Rates rose", "label": 0}\n')
    assert P.calibration_texts(path) == [{"task": "sentiment", "text": "A  fine film", "label": "positive"},
                                         {"task": "topic", "text": "Rates rose", "label": 0}]
    # a language model's prompt: no label, its line break kept (the prompt the adapter was trained on)
    path.write_text('{"task": "sentiment", "text": "A review\\nAnswer:"}\n')
    assert P.calibration_texts(path) == [{"task": "sentiment", "text": "A review\nAnswer:"}]
    path.write_text('{"task": "sentiment", "text": "ok", "label": true}\n')
    with pytest.raises(ValueError, match="line 1: give"):
        P.calibration_texts(path)
    mixed = [{"task": "sentiment", "text": "A review\nAnswer:"}, "a text for every task"]  # kept, read back as given
    P.keep_texts(tmp_path, mixed)
    assert P.calibration_texts(tmp_path / P.LABELLED_FILE) == mixed
    path.write_text('{"task": "sentiment", "text": "ok", "label": "positive"}\n{"task": "topic", "text": 3}\n')
    with pytest.raises(ValueError, match="line 2: give a text, or a row with \"task\" and \"text\" as strings"):
        P.calibration_texts(path)
    path.write_text('{"task": "sentiment", "text": "ok", "label": "positive"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not JSON"):
        P.calibration_texts(path)
    # one JSON array (json.dump's way) reads as its rows, not as lines of text such as "[" and '"task": "pt",'
    rows = [{"task": "caf\u00e9", "text": "ok", "label": 1}, {"task": "cafe\u0301", "text": "fine", "label": 0}]
    path.write_text(json.dumps(rows, indent=1))
    assert P.calibration_texts(path) == [dict(r, task="caf\u00e9") for r in rows]  # names as the bank keeps them (NFC)
    path.write_text("[CLS] a text\n[1] another\n")  # texts that start with "[" stay texts
    assert P.calibration_texts(path) == ["[CLS] a text", "[1] another"]
    # through the API as through a file: a {"text"} item is a text, a row's fields are checked the same way
    from promptmux.runtime.calibration import given_items

    assert given_items([{"text": " a  text "}, rows[1]]) == ["a text", dict(rows[1], task="caf\u00e9")]
    for bad in ({"task": "pt", "text": "ok", "label": True}, 3):
        with pytest.raises(ValueError, match="calibration item 1: give a text, or a row"):
            given_items([bad])


def test_calibration_files_with_a_bom_or_unicode_line_separators_read_as_written(tmp_path):
    path = tmp_path / "cal.jsonl"
    row = {"task": "t", "text": "one\u2028two\u0085three", "label": "yes"}  # JSON keeps these raw
    path.write_text("\ufeff" + json.dumps(row, ensure_ascii=False) + "\r\n", encoding="utf-8")  # as Notepad saves
    assert P.calibration_texts(path) == [row]
    P.keep_texts(tmp_path, [row])  # the deployment's own copy reads back too
    assert P.calibration_texts(tmp_path / P.LABELLED_FILE) == [row]
    path.write_text("\ufeffa text\r\nanother\r\n", encoding="utf-8")
    assert P.calibration_texts(path) == ["a text", "another"]


def test_a_classifiers_calibration_rows_without_labels_are_refused_saying_what_to_give():
    from types import SimpleNamespace

    classifier = SimpleNamespace(spec=SimpleNamespace(family=SimpleNamespace(classifies=True)))
    with pytest.raises(ValueError, match=r"need a label each.*give texts, one per line"):
        P.calibrate(classifier, [{"task": "sentiment", "text": "A fine film"}])


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_labelled_calibration_is_measured_with_bf16_and_kept(deployment, tmp_path, bf16_cpu):

    deploy = _with_tokenizer(copy_deployment(deployment.deploy, tmp_path / "deploy"), tmp_path)
    rows = [{"task": "pt", "text": " ".join(_word((i * 5 + j) % 115) for j in range(5)), "label": i % 3}
            for i in range(60)]
    rt = Runtime(deploy, precision="bf16", calibration=rows)
    report = rt.contract["tasks"]
    assert report["pt"]["labelled"] and report["pt"]["rows"] == 60 and "accuracy_fp32" in report["pt"]
    assert not report["prefix"].get("labelled") and report["prefix"]["rows"] == P.CALIBRATION_ROWS
    assert P.calibration_texts(deploy / "calibration.jsonl") == rows and not (deploy / "calibration.txt").exists()
    with pytest.raises(ValueError, match="label index 7 is outside 0..2"):
        Runtime(deploy, precision="bf16", calibration=[{"task": "pt", "text": "aa ab", "label": 7}])


def test_precision_errors_say_what_is_wrong(monkeypatch):
    with pytest.raises(ValueError, match="unknown precision 'fp8'; choose one of fp32, bf16, int8"):
        B.choose_backend("auto", "fp8", "encoder")
    with pytest.raises(BackendUnavailable, match="precision bf16 runs on backend openvino, not 'onnxruntime'"):
        B.choose_backend("onnxruntime", "bf16", "encoder")
    with pytest.raises(BackendUnavailable, match="precision int8 runs classifiers and causal LMs; a seq2seq"):
        B.choose_backend("auto", "int8", "seq2seq")
    with pytest.raises(BackendUnavailable, match="precision int8 runs on backend onnxruntime or openvino, not 'torch'"):
        B.choose_backend("torch", "int8", "encoder")
    with pytest.raises(BackendUnavailable, match="precision int8 on backend openvino runs classifiers, not causal LMs; "
                                                  "pass --backend onnxruntime"):
        B.choose_backend("openvino", "int8", "decoder")
    monkeypatch.setattr(B, "cpu_has_bf16", lambda: False)
    with pytest.raises(BackendUnavailable, match="bf16 needs a CPU with AMX or AVX512-BF16"):
        B.choose_backend("auto", "bf16", "encoder")


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_bf16_is_refused_where_the_cpu_has_none(deployment, monkeypatch, tmp_path):
    """On a CPU without AMX or AVX512-BF16 (an AMD Zen 3), on any machine: bf16 is refused before anything is
    compiled or measured, with what to use instead, and the deployment is left as it was."""

    deploy = copy_deployment(deployment.deploy, tmp_path / "deploy")
    before = (deploy / "manifest.json").read_bytes()
    monkeypatch.setattr(B, "cpu_has_bf16", lambda: False)
    for backend in ("auto", "openvino"):
        with pytest.raises(BackendUnavailable, match=r"precision bf16 needs a CPU with AMX or AVX512-BF16 .*use "
                                                     r"precision fp32"):
            Runtime(deploy, backend=backend, precision="bf16")
    assert (deploy / "manifest.json").read_bytes() == before
    assert Runtime(deploy).precision == "fp32"  # the exact path is unaffected


def test_openvino_missing_is_a_clear_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(BackendUnavailable, match=r"needs the OpenVINO runtime, which is not installed: pip install"):
        B.choose_backend("openvino", "fp32", "encoder")
    # auto without OpenVINO: ONNX Runtime, saying how to get the faster one
    backend, why = B.choose_backend("auto", "fp32", "encoder")
    assert backend == "onnxruntime" and "OpenVINO is not installed (pip install 'promptmux[openvino]'" in why


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_auto_picks_the_cpu_engines_by_batch_size_and_says_so(deployment, monkeypatch):
    """fp32 classifiers: small batches on ONNX Runtime, large ones on OpenVINO, both exact (runtime/routed_session)."""
    rt = Runtime(deployment.deploy, route_positions=1024)  # the split by hand (where it is measured: below)
    assert rt.backend == "onnxruntime+openvino" and "whichever this CPU ran faster" in rt.backend_reason
    assert "up to 1024 positions on ONNX Runtime (given)" in rt.backend_reason
    exact = Runtime(deployment.deploy, backend="onnxruntime")
    names = rt.tasks

    def engine_runs():
        return sum((s.runs for s in (rt.session, rt.noprefix_session) if s is not None), Counter())

    for rows, engine in ((2, "onnxruntime"), (24, "openvino")):  # 2 x ~50 positions; 24 x ~50 > 1024
        ids, mask = random_batch("bert", rows=rows, seq=40, seed=rows, padding_side="right")
        tasks = [names[i % len(names)] for i in range(rows)]
        before = engine_runs()
        got, want = rt.forward(ids, mask, tasks), exact.forward(ids, mask, tasks)
        assert max(float(np.abs(a - b).max()) for a, b in zip(got, want)) < 1e-5
        assert engine_runs() - before == Counter({engine: 1})
    with pytest.raises(BackendUnavailable, match="onnxruntime\\+openvino runs fp32 classifiers"):
        B.choose_backend("onnxruntime+openvino", "fp32", "decoder")
    assert B.choose_backend("auto", "fp32", "decoder")[0] == "onnxruntime"  # decoding: ORT measured faster
    monkeypatch.setattr(B, "cpu_has_bf16", lambda: True)  # the routing is the subject here, not this CPU
    assert B.choose_backend("auto", "bf16", "decoder")[0] == "openvino"
    assert B.choose_backend("auto", "int8", "decoder")[0] == "onnxruntime"
    assert B.choose_backend("torch", "fp32", "encoder") == ("torch", "requested")


def test_routing_split_costs_least_relative_to_the_faster_engine_at_each_size():
    from promptmux.runtime.routing import split

    def sizes(*pairs):  # (ONNX Runtime ms, OpenVINO ms) at 76, 304, 608, 1216 and 2432 positions
        return [{"positions": p, "onnxruntime_ms": o, "openvino_ms": v}
                for p, (o, v) in zip((76, 304, 608, 1216, 2432), pairs)]

    # as on the Intel machine: ONNX Runtime ahead on small batches, a tie at 8 x 64 (ONNX Runtime keeps ties); the
    # cut between 608 and 1216 (their geometric mean), so a task with a longer prompt at 8 rows stays on ORT too
    assert split(sizes((3, 4), (10, 11), (20, 20), (40, 37), (80, 72))) == 860
    assert split(sizes((3, 4), (10, 11), (20, 20), (40, 38.5), (80, 72))) == 1720  # 4 % ahead: within the noise
    # as on Zen 3: ONNX Runtime still ahead at 8 and 16 rows
    assert split(sizes((3, 4), (10, 11), (20, 25), (40, 42), (80, 72))) == 1720
    assert split(sizes((3, 3.5), (10, 9), (20, 18), (40, 36), (80, 72))) == 152  # ORT at 1 row only: 76 and 304
    assert split(sizes((3, 4), (10, 11), (20, 25), (40, 42), (80, 81))) is None  # ONNX Runtime everywhere
    assert split(sizes((4, 3), (11, 10), (25, 20), (42, 40), (81, 80))) == 0  # OpenVINO everywhere
    # one noisy size does not move the split past where OpenVINO wins by more
    assert split(sizes((3, 4), (10, 11), (20, 19.9), (40, 46), (80, 72))) == 1720

    def won(rows, ahead, rounds=5):  # OpenVINO faster in `ahead` of `rounds` rounds at 608 positions (8 rows)
        rows[2].update(rounds=rounds, openvino_ahead=ahead)
        return rows

    # 4 % ahead at 8 rows: within MARGIN, but in every round of 5 it is OpenVINO's (the AMX machine's 8 x 64)
    assert split(won(sizes((3, 4), (10, 11), (20, 19.2), (40, 37), (80, 72)), 5)) == 430
    assert split(won(sizes((3, 4), (10, 11), (20, 19.2), (40, 37), (80, 72)), 4)) == 860  # one round lost: a tie
    assert split(won(sizes((3, 4), (10, 11), (20, 19.2), (40, 37), (80, 72)), 3, rounds=3)) == 860  # too few


def test_routing_times_only_the_sizes_its_first_rounds_leave_open_again(monkeypatch):
    """Each size gets routing.FIRST_ROUNDS; one where OpenVINO won each of them by less than MARGIN gets the other
    rounds, and the split then counts all of that size's rounds (time_apart faked: seconds per engine and round)."""
    from types import SimpleNamespace

    from promptmux.runtime import routing

    # per shape: ONNX Runtime's and OpenVINO's seconds in each of 5 rounds
    plan = {(1, 64): ([10] * 5, [11] * 5),  # ONNX Runtime ahead: decided
            (8, 64): ([50] * 5, [48, 49, 48, 47, 48]),  # OpenVINO 4 % ahead in every round: open after 3
            (16, 64): ([100] * 5, [90] * 5), (32, 64): ([200] * 5, [170] * 5), (8, 256): ([200] * 5, [160] * 5)}
    calls, served = [], dict.fromkeys(plan, 0)

    def fake(_dir, configs, shapes, rounds):
        shapes = [tuple(x) for x in shapes]
        calls.append((shapes, rounds))
        out = {e: {"rounds": [[t / 1e3 for t in plan[sh][k][served[sh]:served[sh] + rounds]] for sh in shapes],
                   "positions": [r * (t + 8) for r, t in shapes]} for k, e in enumerate(routing.ENGINES)}
        served.update({sh: served[sh] + rounds for sh in shapes})
        return out

    monkeypatch.setattr(routing, "time_apart", fake)
    view = SimpleNamespace(num_virtual_tokens=8)
    rt = SimpleNamespace(bank=SimpleNamespace(view=lambda _task: view, page=lambda n: (["a"], False)),
                         max_positions=None, threads=1, dir=".")
    record = routing.measure(rt)
    assert calls == [(list(routing.SIZES), routing.FIRST_ROUNDS), ([(8, 64)], routing.ROUNDS - routing.FIRST_ROUNDS)]
    eight = next(s for s in record["sizes"] if (s["rows"], s["tokens"]) == (8, 64))
    assert eight["rounds"] == routing.ROUNDS == eight["openvino_ahead"] and eight["openvino_ms"] == 48
    assert all(s["rounds"] == routing.FIRST_ROUNDS for s in record["sizes"] if s is not eight)
    assert record["small_positions"] == round((72 * 576) ** 0.5)  # 8 x 64 is OpenVINO's: it won every round


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_timing_runs_each_configuration_in_its_own_process(deployment):
    """fast.py and routing.py time in child processes (one process's thread pools distort another engine's times):
    every configuration gets a time per shape, a routed one kept to its engine reports its batches' positions, and a
    configuration that cannot open fails with its own message."""
    from promptmux.runtime import timing
    from promptmux.runtime.timing import time_apart

    rt = Runtime(deployment.deploy, backend="onnxruntime", threads=1)
    virtual = rt.bank.view(rt.tasks[0]).num_virtual_tokens
    configs = {"ort": {"backend": "onnxruntime", "threads": 1},
               "ov": {"backend": "onnxruntime+openvino", "route_positions": 0, "threads": 1, "force": "openvino"}}
    timed = time_apart(deployment.deploy, configs, [(1, 4), (2, 6)], rounds=1)
    assert all(s > 0 for t in timed.values() for s in t["seconds"]) and timed["ort"]["tokens"] == [4, 6]
    assert all(t["rounds"] == [[s] for s in t["seconds"]] for t in timed.values())  # one round: its own median
    assert timed["ov"]["positions"] == [4 + virtual, 2 * (6 + virtual)] and timed["ort"]["positions"] == [0, 0]
    assert sum(timed["ort"]["graph_runs"].values()) == 2 * (1 + timing.BLOCK)  # the batches the timing ran
    with pytest.raises(RuntimeError, match="timing bad: ValueError: unknown backend 'nope'"):
        time_apart(deployment.deploy, {"bad": {"backend": "nope"}}, [(1, 4)], rounds=1)
    with pytest.raises(RuntimeError, match="timing elsewhere: .*/not-a-deployment"):  # a configuration's own folder
        time_apart(deployment.deploy, {"elsewhere": {"deploy": deployment.deploy / "not-a-deployment"}}, [(1, 4)],
                   rounds=1)


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_routing_split_is_measured_once_per_cpu_and_kept_in_the_manifest(deployment, tmp_path, monkeypatch):
    """onnxruntime+openvino times both engines on its first open on a kind of CPU, keeps the split in the manifest
    per CPU (and thread count), and later opens on that CPU read it."""

    from promptmux.core.folder import read_manifest
    from promptmux.runtime import routing

    deploy = copy_deployment(deployment.deploy, tmp_path / "deploy")
    rt = Runtime(deploy, threads=1)
    keys = set(read_manifest(deploy)["routing"])  # this CPU's (and any the shared deployment had before)
    record = read_manifest(deploy)["routing"][routing.key(1)]
    task = rt.tasks[0]
    virtual = rt.bank.view(task).num_virtual_tokens
    tokens = [min(t, rt.max_positions - virtual) for _, t in routing.SIZES]
    assert [(s["rows"], s["tokens"]) for s in record["sizes"]] == list(dict.fromkeys(
        (r, t) for (r, _), t in zip(routing.SIZES, tokens)))
    assert record["sizes"][0]["positions"] == tokens[0] + virtual  # rows x width, the virtual tokens included
    assert all(s["onnxruntime_ms"] > 0 and s["openvino_ms"] > 0 for s in record["sizes"])
    assert all(s["rounds"] in (routing.FIRST_ROUNDS, routing.ROUNDS) and 0 <= s["openvino_ahead"] <= s["rounds"]
               for s in record["sizes"])
    assert rt.routing.small_positions == record["small_positions"] == routing.split(record["sizes"])
    assert "measured on this CPU" in rt.backend_reason and rt.graph_runs == Counter()  # timing is not traffic
    ids, mask = random_batch("bert", rows=2, seq=8, seed=3, padding_side="right")
    want = Runtime(deploy, backend="onnxruntime").forward(ids, mask, task)
    assert max(float(np.abs(a - b).max()) for a, b in zip(rt.forward(ids, mask, task), want)) < 1e-5
    # The engines were timed in other processes: after a batch, an engine the split never picks is not built here
    unused = set(routing.ENGINES) - set(rt.routing.picks())
    assert rt.routing.sessions and not any(s.engines[e].made for s in rt.routing.sessions for e in unused)

    def measured(_rt):
        raise AssertionError("measured again")

    monkeypatch.setattr(routing, "measure", measured)
    assert Runtime(deploy, threads=1).routing.small_positions == record["small_positions"]  # kept
    # another kind of CPU measures its own split; the first one's stays
    monkeypatch.setattr(routing, "key", lambda threads: "another CPU")
    monkeypatch.setattr(routing, "measure", lambda _rt: {**record, "small_positions": 7})
    assert Runtime(deploy, threads=1).routing.small_positions == 7
    assert set(read_manifest(deploy)["routing"]) == keys | {"another CPU"}


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_prepare_builds_every_engine_the_routing_can_pick(deployment, monkeypatch):
    """After prepare() (the server calls it before it reports ready) no batch builds an engine: small and large,
    with and without key/value prefix rows, and a task added afterwards."""
    from promptmux.runtime import openvino_session, sessions

    rt = Runtime(deployment.deploy, route_positions=1024)  # a split that picks both engines
    assert rt.backend == "onnxruntime+openvino"
    prepared = rt.prepare()
    assert {(p["graph"], p["engine"]) for p in prepared} == {
        (g, e) for g in ("model.onnx", "model_noprefix.onnx") for e in ("onnxruntime", "openvino")}
    assert all(p["ran"] and p["seconds"] > 0 for p in prepared)
    exact = Runtime(deployment.deploy, backend="onnxruntime")
    assert {(p["graph"], p["engine"]) for p in exact.prepare()} == {
        ("model.onnx", "onnxruntime"), ("model_noprefix.onnx", "onnxruntime")}

    def no_build(*args, **kwargs):
        raise AssertionError("a batch built an engine after prepare()")

    monkeypatch.setattr(sessions.OrtSession, "__init__", no_build)
    monkeypatch.setattr(openvino_session.OpenVinoSession, "__init__", no_build)
    rt.add_task("pt_again", deployment.adapters["pt"])
    for rows, tasks in ((2, ["pt", "pt_again"]), (2, ["prefix", "pt"]), (24, ["pt", "mpt/1"]), (24, ["prefix"])):
        ids, mask = random_batch("bert", rows=rows, seq=40, seed=rows, padding_side="right")
        row_tasks = [tasks[i % len(tasks)] for i in range(rows)]
        got = rt.forward(ids, mask, row_tasks)
        want = exact.forward(ids, mask, [t.replace("pt_again", "pt") for t in row_tasks])
        assert max(float(np.abs(a - b).max()) for a, b in zip(got, want)) < 1e-5
    assert rt.graph_runs == Counter({"model.onnx": 2, "model_noprefix.onnx": 2})
    # a split that sends every batch to ONNX Runtime prepares (and keeps) no OpenVINO engine
    monkeypatch.undo()
    ort_only = Runtime(deployment.deploy, route_positions=1024)
    ort_only.routing.small_positions = None
    assert {p["engine"] for p in ort_only.prepare()} == {"onnxruntime"}


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_int8_decoding_quantizes_every_matmul_and_the_tied_lm_head(deployment, tmp_path):
    from collections import Counter

    import onnx

    deploy = copy_deployment(deployment.deploy, tmp_path / "deploy")
    rt = Runtime(deploy, precision="int8")
    assert (rt.backend, rt.precision) == ("onnxruntime", "int8")
    entry = rt.contract
    assert set(entry["tasks"]) == set(rt.tasks)
    for r in entry["tasks"].values():
        assert 0.0 <= r["token_agreement"] <= 1.0 and r["rows"] == P.CALIBRATION_PROMPTS
    assert set(rt.graph_runs) == {"decoder.int8.onnx"}  # the contract's prompts ran the int8 copy
    graph = onnx.load(str(deploy / "decoder.int8.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in graph.graph.node)
    stamp = json.loads((deploy / "decoder.int8.json").read_text())
    # GPT-2: 4 projections per layer (exported as Gemm, rewritten) and the LM head tied to the embeddings
    assert ops["MatMulNBits"] == stamp["matmuls_quantized"] == 4 * rt.dims.num_layers + 1
    assert stamp["gemms_rewritten"] == 4 * rt.dims.num_layers and ops["Gemm"] == 0
    # no fp32 weight product left (attention's are inside the Attention op, MPT's inside its function)
    assert ops["MatMul"] == 0
    head = [n for n in graph.graph.node if n.op_type == "MatMulNBits" and n.input[0] != n.input[1]]
    assert any(dict((a.name, a.i) for a in n.attribute).get("N") == rt.dims.vocab_size for n in head)


def test_decoder_contract_compares_tokens_up_to_end_of_sequence_as_served():
    from types import SimpleNamespace

    EOS = 2

    class Decoder:  # answers [1, EOS]; past its end-of-sequence (never returned when served) `after` tokens
        spec = SimpleNamespace(family=SimpleNamespace(classifies=False))

        def __init__(self, after: int):
            self.after = after

        def generate(self, prompts, task, max_new_tokens, eos_token_id=None, own_positions=False):
            ends = eos_token_id is None  # the model's end-of-sequence applies
            row = [1, EOS] if ends else ([1, EOS] + [self.after] * max_new_tokens)[:max_new_tokens]
            return [{"token_ids": list(row)} for _ in prompts]

    report = P.measure(Decoder(after=9), Decoder(after=3), texts=["a", "b", "c"], tasks=["t"])
    assert report["t"]["token_agreement"] == 1.0 and report["t"]["identical_rows"] == 1.0


@pytest.mark.parametrize("deployment", ["gpt2"], indirect=True)
def test_decoder_contract_compares_each_rows_answer_as_served_alone(deployment):
    """The server answers every prompt with the positions it has alone; so does the contract, though it batches
    prompts of different lengths (PEFT's padded-batch rule would shift a prompt-tuned row's positions)."""
    rt = deployment.runtime()

    class Alone:  # the server's answers: one prompt at a time
        spec = rt.spec

        def generate(self, prompts, task, max_new_tokens, **kw):
            return [rt.generate([p], task, max_new_tokens)[0] for p in prompts]

    rng = np.random.default_rng(7)  # token ids (the tiny model has no tokenizer)
    prompts = [rng.integers(3, 120, size=n).tolist() for n in (2, 7, 3, 5, 4, 6, 9, 1)]
    report = P.measure(Alone(), rt, texts=prompts, tasks=["pt"])["pt"]
    assert report["rows"] == len(prompts) and report["identical_rows"] == 1.0


def test_decoder_contract_measures_each_task_on_its_own_prompts():
    from types import SimpleNamespace

    class Decoder:  # the two engines answer alike on "a" prompts, differently on "b" ones
        spec = SimpleNamespace(family=SimpleNamespace(classifies=False))

        def __init__(self, b_answer: int):
            self.b_answer = b_answer

        def generate(self, prompts, task, max_new_tokens, own_positions=False):
            return [{"token_ids": [1 if p.startswith("a") else self.b_answer]} for p in prompts]

    rows = [{"task": "ta", "text": "a1"}, {"task": "ta", "text": "a2"}, {"task": "tb", "text": "b1"}]
    report = P.measure(Decoder(5), Decoder(6), labelled=rows, tasks=["ta", "tb"])
    assert report["ta"]["token_agreement"] == 1.0 and report["ta"]["rows"] == 2
    assert report["tb"]["token_agreement"] == 0.0 and report["tb"]["rows"] == 1


def test_a_language_models_answer_is_the_text_it_starts_with():
    assert P.gives_answer(" Positive.", "positive") and P.gives_answer("negative", " negative ")
    assert P.gives_answer(" sci/tech news", "sci/tech")
    assert not P.gives_answer(" positively", "positive") and not P.gives_answer(" not positive", "positive")


def test_a_language_models_labelled_rows_are_held_to_the_labelled_rule():
    from types import SimpleNamespace

    class Decoder:  # answers "positive" to every prompt but those it gets `wrong`
        spec = SimpleNamespace(family=SimpleNamespace(classifies=False))

        def __init__(self, wrong: set):
            self.wrong = wrong

        def generate(self, prompts, task, max_new_tokens, own_positions=False):
            return [{"token_ids": [7] if p in self.wrong else [5], "text": " neutral" if p in self.wrong else
                     " positive"} for p in prompts]

    rows = [{"task": "t", "text": f"p{i}", "label": "positive" if i < 90 else "negative"} for i in range(100)]
    report = P.measure(Decoder({"p0", "p1"}), Decoder(set()), labelled=rows, tasks=["t"])["t"]
    assert report["labelled"] and (report["accuracy_fp32"], report["accuracy"]) == (0.9, 0.88)
    assert report["prediction_agreement"] == report["identical_rows"] == 0.98
    assert [m.split(":")[1].split()[0] for m in P.misses({"t": report})] == ["accuracy"]
    # wrong where fp32 was wrong too: the same accuracy, yet 3 % of answers changed
    report = P.measure(Decoder({"p95", "p96", "p97"}), Decoder(set()), labelled=rows, tasks=["t"])["t"]
    assert report["accuracy"] == report["accuracy_fp32"] == 0.9 and report["prediction_agreement"] == 0.97
    assert P.passed({"t": report})
    # a task without answers, measured beside a labelled one, keeps the token rule
    both = P.measure(Decoder({"p0", "p1"}), Decoder(set()), labelled=rows + [{"task": "u", "text": "p0"}],
                     tasks=["t", "u"])
    assert both["t"]["labelled"] and "labelled" not in both["u"] and both["u"]["token_agreement"] == 0.0
    assert [m.split(":")[1].split()[0] for m in P.misses(both)] == ["accuracy", "token_agreement"]


def test_a_classifiers_contract_of_the_previous_method_stands_a_language_models_is_measured_again():
    for method, classifies, stands in ((P.METHOD, False, True), (P.METHOD, True, True), (3, True, True),
                                       (4, True, True), (4, False, False), (3, False, False), (2, True, False),
                                       (None, True, False)):
        assert P.measured_as_now({"method": method}, classifies) == stands, (method, classifies)


def test_a_deployments_kept_rows_that_no_longer_fit_are_refused_naming_the_file(tmp_path, monkeypatch):
    from types import SimpleNamespace

    # a language model's rows kept by an earlier promptmux, when labels were not read: an index is no answer
    (tmp_path / P.LABELLED_FILE).write_text('{"task": "t", "text": "a", "label": 1}\n')
    lm = SimpleNamespace(dir=tmp_path, spec=SimpleNamespace(family=SimpleNamespace(classifies=False)), manifest={},
                         backend="onnxruntime", precision="int8", bank={"t"})  # no contract recorded: measured now
    with pytest.raises(ValueError, match=rf"{P.LABELLED_FILE}: calibration rows of task 't'.*Fix or delete that "
                                         r"file, or give calibration rows \(--calibration\)"):
        P.contract(lm, strict=False)
    # a classifier's rows whose labels the task no longer has (replaced since by an adapter of other labels): refused
    # when measured, naming the file as well (every later open failed without saying which file to fix)
    (tmp_path / P.LABELLED_FILE).write_text('{"task": "t", "text": "a", "label": "positive"}\n')
    lm.spec.family.classifies = True
    monkeypatch.setattr(P, "calibrate", lambda *a, **k: P._label_index(None, {"task": "t", "label": "positive"},
                                                                        ["business", "tech"], 2))
    with pytest.raises(ValueError, match=rf"{P.LABELLED_FILE}: calibration row of task 't': label 'positive' is not "
                                         r"one of the task's labels .*Fix or delete that file"):
        P.contract(lm, strict=False)


def test_fast_choosing_fp32_names_what_each_candidate_missed(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from promptmux.runtime import fast

    (tmp_path / "manifest.json").write_text("{}")
    tasks = {"sentiment": {"labelled": True, "accuracy_fp32": 0.8, "accuracy": 0.78, "prediction_agreement": 0.99}}

    class Missing:  # every candidate runs and misses its contract
        def __init__(self, deploy_dir, precision, backend, threads, calibration):
            self.spec, self.backend = SimpleNamespace(family=SimpleNamespace(classifies=True)), backend
            self.contract = {"passed": False, "tasks": tasks, "backend": backend, "precision": precision}

    monkeypatch.setattr(fast, "time_apart", lambda *a, **k: pytest.fail("timed a candidate that missed"))
    record = fast.choose(tmp_path, None, None, Missing)
    assert record["precision"] == "fp32" and all(f["missed"] for f in record["candidates"].values())
    assert record["reason"].count("missed its contract (sentiment: accuracy 0.7800 is 0.0200 below fp32's 0.8000") \
        == len(fast.CANDIDATES)


def test_a_language_models_labels_are_answers_given_for_all_of_a_tasks_rows_or_none():
    from types import SimpleNamespace

    lm = SimpleNamespace(spec=SimpleNamespace(family=SimpleNamespace(classifies=False)))
    with pytest.raises(ValueError, match=r"task 't'.*the text of the answer.*not 1"):
        P.calibrate(lm, [{"task": "t", "text": "a", "label": 1}])
    with pytest.raises(ValueError, match=r"task 't': 1 of 2 have a label; give every row"):
        P.calibrate(lm, [{"task": "t", "text": "a", "label": "yes"}, {"task": "t", "text": "b"}])

@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_int8_copies_are_made_once_across_racing_openers_readable_by_others_and_leave_no_debris(deployment, tmp_path,
                                                                                                  monkeypatch):
    """Two openers that quantize one graph at once: one makes it, the other waits and finds it made. A stage folder
    left by a quantization killed midway goes at the next one; the files are 0666 less the umask, as a plain
    open() makes them (onnx writes weights 0600), and so are the exported deployment's own."""
    import stat
    import threading

    from promptmux.core.durable import _umask
    from promptmux.runtime import quantize as Q

    deploy = copy_deployment(deployment.deploy, tmp_path / "deploy")
    graph = deploy / "model_noprefix.onnx"
    debris = deploy / ".model_noprefix.int8.onnx.stage-killed"
    debris.mkdir()
    (debris / "model_noprefix.int8.onnx.data").write_bytes(b"half")
    made, make = [], Q._make_dynamic
    monkeypatch.setattr(Q, "_make_dynamic", lambda *a: made.append(1) or make(*a))
    got = []
    racers = [threading.Thread(target=lambda: got.append(Q.dynamic_int8(graph))) for _ in range(2)]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert made == [1] and got == [deploy / "model_noprefix.int8.onnx"] * 2
    assert not list(deploy.glob(".model_noprefix.int8.onnx.stage-*"))
    mode = 0o666 & ~_umask()
    for f in ("model_noprefix.int8.onnx", "model_noprefix.int8.onnx.data", "model.onnx.data"):
        assert stat.S_IMODE((deploy / f).stat().st_mode) == mode, f
    assert stat.S_IMODE(deployment.deploy.stat().st_mode) == 0o777 & ~_umask()



@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_int8_classifiers_run_dynamic_int8_copies_of_every_graph_under_a_contract(deployment, tmp_path, monkeypatch):
    """precision int8 on a classifier: each full-sequence graph gets a dynamic int8 copy (every weight MatMul a
    MatMulInteger), the batches run those copies (graph_runs names the file that ran), the contract is measured and
    kept for this kind of CPU, and opening the deployment again quantizes nothing."""
    import shutil
    from collections import Counter

    import onnx

    deploy = copy_deployment(deployment.deploy, tmp_path / "deploy")
    rt = Runtime(deploy, precision="int8")
    assert (rt.backend, rt.precision) == ("onnxruntime", "int8") and set(rt.contract["tasks"]) == set(rt.tasks)
    assert all(r["rows"] == P.CALIBRATION_ROWS for r in rt.contract["tasks"].values())
    assert rt.contract["cpu"] == P.cpu.describe()
    assert {p["graph"] for p in rt.prepare()} == {"model.int8.onnx", "model_noprefix.int8.onnx"}  # /health's names
    for graph in ("model", "model_noprefix"):
        fp32 = onnx.load(str(deploy / f"{graph}.onnx"), load_external_data=False).graph
        weights = {t.name for t in fp32.initializer}
        assert sum(n.op_type == "MatMul" and n.input[1] in weights for n in fp32.node) == 6 * rt.dims.num_layers
        int8 = onnx.load(str(deploy / f"{graph}.int8.onnx"), load_external_data=False).graph
        ops = Counter(n.op_type for n in int8.node)
        stamp = json.loads((deploy / f"{graph}.int8.json").read_text())
        assert ops["MatMulInteger"] == stamp["matmuls_quantized"] >= 6 * rt.dims.num_layers
        assert not [n.name for n in int8.node if n.op_type == "MatMul" and n.input[1] in weights]  # none left fp32
    ids, mask = random_batch("bert", rows=4, seq=8, seed=1, padding_side="right")
    exact, before = Runtime(deploy, backend="onnxruntime"), Counter(rt.graph_runs)  # the contract's runs too
    for tasks in (["pt", "mpt/1", "pt", "ptmlp"], ["prefix", "pt", "mpt/0", "cartridge"]):
        got, want = rt.forward(ids, mask, tasks), exact.forward(ids, mask, tasks)
        assert 0 < max(float(np.abs(a - b).max()) for a, b in zip(got, want)) < 0.05  # int8: close, not equal
    assert rt.graph_runs - before == Counter({"model_noprefix.int8.onnx": 1, "model.int8.onnx": 1})
    made = {p.name: p.stat().st_mtime_ns for p in deploy.glob("*.int8.*")}
    again = Runtime(deploy, precision="int8")
    again.forward(ids, mask, ["prefix", "pt", "mpt/0", "prefix"])
    assert {p.name: p.stat().st_mtime_ns for p in deploy.glob("*.int8.*")} == made and again.contract == rt.contract
    # A copy that gives the files new mtimes (cp -r, an object-store sync) keeps its int8 graphs: the stamps name the
    # graphs' contents
    moved = shutil.copytree(deploy, tmp_path / "moved", copy_function=shutil.copy)  # contents and modes, not mtimes
    copied = {p.name: p.stat().st_mtime_ns for p in moved.glob("*.int8.*")}
    assert copied and all(copied[n] != made[n] for n in made)
    Runtime(moved, precision="int8").forward(ids, mask, ["prefix", "pt", "mpt/0", "prefix"])
    assert {p.name: p.stat().st_mtime_ns for p in moved.glob("*.int8.*")} == copied
    # Graphs and a contract made another way (an earlier promptmux's recipe) are made and measured again.
    stamp = deploy / "model_noprefix.int8.json"
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "graph_key": "made-otherwise"}))
    manifest = json.loads((deploy / "manifest.json").read_text())
    manifest["precision"]["onnxruntime/int8"]["recipe"] = "made-otherwise"
    (deploy / "manifest.json").write_text(json.dumps(manifest))
    third = Runtime(deploy, precision="int8")
    assert third.contract["recipe"] == P.recipe("onnxruntime", "int8", third.spec.family)  # measured again (made otherwise)
    assert (deploy / "model_noprefix.int8.onnx").stat().st_mtime_ns != made["model_noprefix.int8.onnx"]
    # Opened on another kind of CPU (whose kernels may compute other numbers: an AVX2 int8 kernel saturates), the
    # contract is measured again there, once.
    measured, calibrate = [], P.calibrate
    monkeypatch.setattr(P, "calibrate", lambda *a, **k: measured.append(1) or calibrate(*a, **k))
    monkeypatch.setattr(P.cpu, "describe", lambda: "Another CPU: avx2=yes avx512f=no")
    assert Runtime(deploy, precision="int8").contract["cpu"] == "Another CPU: avx2=yes avx512f=no" and measured == [1]
    assert Runtime(deploy, precision="int8").contract["cpu"] == "Another CPU: avx2=yes avx512f=no" and measured == [1]


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_int8_on_openvino_runs_nncf_static_int8_calibrated_on_the_contract_rows_and_keeps_it(deployment, tmp_path,
                                                                                            monkeypatch, capsys):
    """precision int8 on the openvino backend: NNCF quantizes each graph a batch needs, calibrated on the contract's
    rows; the batches run the int8 IR (graph_runs names it, OpenVINO runs int8 operations), the contract is kept
    under openvino/int8 with NNCF's recipe, and opening again quantizes nothing while the rows and tasks stay."""

    import nncf

    from promptmux.kinds import kind_of
    from promptmux.runtime import openvino_int8

    deploy = copy_deployment(deployment.deploy, tmp_path / "deploy")
    texts = [f"calibration text number {i} about {w}" for i, w in enumerate(["films", "news", "sport", "music"] * 8)]
    rt = Runtime(deploy, precision="int8", backend="openvino", calibration=texts)
    assert capsys.readouterr().out == ""  # NNCF's progress bars go to stderr: stdout is the CLI's JSON
    assert (rt.backend, rt.precision) == ("openvino", "int8") and rt.contract["recipe"] == openvino_int8.recipe()
    manifest = json.loads((deploy / "manifest.json").read_text())
    assert manifest["precision"]["openvino/int8"] == rt.contract and rt.contract["calibration"]["rows"] == len(texts)
    ids, mask = random_batch("bert", rows=4, seq=8, seed=1, padding_side="right")
    exact, before = Runtime(deploy, backend="onnxruntime"), Counter(rt.graph_runs)
    for tasks in (["pt", "mpt/1", "pt", "ptmlp"], ["prefix", "pt", "mpt/0", "cartridge"]):
        got, want = rt.forward(ids, mask, tasks), exact.forward(ids, mask, tasks)
        assert max(float(np.abs(a - b).max()) for a, b in zip(got, want)) > 0  # int8 ran, not the fp32 graph
    # how close is the contract's to say (on random tiny models the MPT tasks' logits move most: 0.76 at most here),
    # in batches of one task and mixed: there a prompt task's rows run beside prefix tasks, through the other
    # graph's int8 (model.int8.xml), which is calibrated on such batches too (calibrated on prefix tasks alone, it
    # flipped every "pt" answer in mixed batches: this tokenizer reads each text as the same tokens, a near-tie)
    assert rt.contract["passed"], P.misses(rt.contract["tasks"])
    assert all("prediction_agreement_mixed" in r for r in rt.contract["tasks"].values())
    assert rt.graph_runs - before == Counter({"model_noprefix.int8.xml": 1, "model.int8.xml": 1})
    assert rt.noprefix_session.int8_ops > 0 and rt.session.int8_ops > 0
    stamp = json.loads((deploy / "openvino" / "model_noprefix.int8.json").read_text())
    assert stamp["recipe"] == openvino_int8.recipe()
    # each graph calibrated on the first tasks whose batches run it: prompt-only ones here, key/value prefixes there
    # and, beside them, some prompt-only ones (mixed batches run there)
    order = rt.bank.page(len(rt.tasks))[0]
    prefixed = [t for t in order if kind_of(rt.bank.view(t)).kv_prefix(rt.bank.view(t)) is not None]
    plain = [t for t in order if t not in prefixed]
    assert list(stamp["tasks"]) == plain[:openvino_int8.MAX_TASKS]
    assert list(json.loads((deploy / "openvino" / "model.int8.json").read_text())["tasks"]) == \
        prefixed[:openvino_int8.MAX_TASKS] + plain[:openvino_int8.MAX_TASKS // 2]
    monkeypatch.setattr(nncf, "quantize", lambda *a, **k: pytest.fail("quantized again"))
    again = Runtime(deploy, precision="int8", backend="openvino")
    assert again.forward(ids, mask, ["prefix", "pt", "mpt/0", "prefix"]) and again.contract == rt.contract


def _int8_missing_a_tighter_rule(deploy, monkeypatch, share: float) -> float:
    """Measure int8 with every layer int8, then add a rule it misses (outputs within `share` of its own largest
    error) and forget the contract, so that the next Runtime measures again under that rule."""
    from promptmux.core.folder import write_manifest

    worst = max(r["max_abs_diff"] for r in Runtime(deploy, precision="int8").contract["tasks"].values())
    real = P.misses
    monkeypatch.setattr(P, "misses", lambda tasks: real(tasks) + [
        f"{t}: max_abs_diff {r['max_abs_diff']}" for t, r in tasks.items() if r["max_abs_diff"] > share * worst])
    write_manifest(deploy, lambda m: m.pop("precision"))
    return worst


def _fp32_weight_matmuls(path) -> int:
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in g.initializer}
    return sum(n.op_type in ("MatMul", "Gemm") and n.input[1] in weights for n in g.node)


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_int8_accuracy_control_keeps_the_fewest_sensitive_layers_fp32_that_meet_the_contract(deployment, tmp_path,
                                                                                              monkeypatch):

    from promptmux.runtime import accuracy_control

    deploy = copy_deployment(deployment.deploy, tmp_path / "deploy")
    _int8_missing_a_tighter_rule(deploy, monkeypatch, 0.7)
    monkeypatch.setattr(accuracy_control, "MAX_FP32_SHARE", 1.0)
    rt = Runtime(deploy, precision="int8", strict=True)  # strict: a miss would raise
    layers = _fp32_weight_matmuls(deploy / "model.onnx")  # 6 a transformer layer, and the pooler
    assert layers > 6 * rt.dims.num_layers
    c = rt.contract
    keep = c["fp32_layers"]
    assert c["passed"] and 0 < len(keep) < layers and tuple(keep) == rt.int8_fp32_layers
    control = c["accuracy_control"]
    assert control["passed"] and sorted(control["ranking"]) == list(range(layers))
    assert [t["missed"] == [] for t in control["tried"]] == [False] * (len(control["tried"]) - 1) + [True]
    assert set(keep) == set(control["ranking"][:len(keep)])  # the most sensitive ones
    for graph in ("model", "model_noprefix"):
        assert _fp32_weight_matmuls(deploy / f"{graph}.int8.onnx") == len(keep)
    ids, mask = random_batch("bert", rows=4, seq=8, seed=1, padding_side="right")
    before = Counter(rt.graph_runs)
    rt.forward(ids, mask, ["pt", "prefix", "pt", "mpt/0"])
    assert rt.graph_runs - before == Counter({"model.int8.onnx": 1})
    # Opened again: the recorded layers make the same graphs, nothing is quantized or searched.
    made = {p.name: p.stat().st_mtime_ns for p in deploy.glob("*.int8.*")}
    again = Runtime(deploy, precision="int8", strict=True)
    again.forward(ids, mask, ["pt", "prefix", "pt", "mpt/0"])
    assert again.int8_fp32_layers == tuple(keep) and again.contract == c
    assert {p.name: p.stat().st_mtime_ns for p in deploy.glob("*.int8.*")} == made


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_int8_accuracy_control_that_finds_nothing_leaves_every_layer_int8_and_reports_the_miss(deployment, tmp_path,
                                                                                                monkeypatch):

    from promptmux.runtime import accuracy_control

    deploy = copy_deployment(deployment.deploy, tmp_path / "deploy")
    _int8_missing_a_tighter_rule(deploy, monkeypatch, 0.0)  # only exact outputs pass
    monkeypatch.setattr(accuracy_control, "MAX_FP32_SHARE", 0.1)
    rt = Runtime(deploy, precision="int8")
    c = rt.contract
    assert not c["passed"] and c["fp32_layers"] == [] and rt.int8_fp32_layers == ()
    assert not c["accuracy_control"]["passed"]
    limit = c["accuracy_control"]["max_fp32_layers"]
    assert [t["fp32_layers"] for t in c["accuracy_control"]["tried"]][-1] == limit
    assert all(t["missed"] for t in c["accuracy_control"]["tried"])
    assert _fp32_weight_matmuls(deploy / "model_noprefix.int8.onnx") == 0
    with pytest.raises(P.PrecisionError, match="max_abs_diff"):
        Runtime(deploy, precision="int8", strict=True)


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_fast_runs_the_fastest_precision_that_meets_its_contract_and_records_it_per_cpu(deployment, tmp_path,
                                                                                         monkeypatch):

    from promptmux.runtime import cpu, fast

    deploy = copy_deployment(deployment.deploy, tmp_path / "deploy")
    rt = Runtime(deploy, precision="fast")
    record, here = rt.fast, cpu.describe()
    assert json.loads((deploy / "manifest.json").read_text())["fast"][here] == record
    assert rt.precision == record["precision"] and set(record["candidates"]) == set(fast.CANDIDATES)
    if record["shapes"]:  # as they ran: 256 tokens do not fit this tiny model's 64 positions
        assert all(tokens < rt.max_positions for _, tokens in record["shapes"]) and "x256" not in record["reason"]
    for f in record["candidates"].values():
        assert f["runs"] or "bf16" in f["why"] or "NNCF" in f["why"]  # a CPU without bf16; NNCF not installed
        assert not f["runs"] or bool(f.get("missed")) == (not f["contract_passed"])  # a miss names its figures
    passing = {p: f["speedup_vs_fp32"] for p, f in record["candidates"].items() if f.get("contract_passed")}
    if record["precision"] == "fp32":
        assert all(s <= 1 for s in passing.values()) and "no non-exact precision" in record["reason"]
    else:  # the fastest, or one within fast.TIE of it that kept more of fp32's answers
        tied = [p for p, x in passing.items() if x > 1 and x >= max(passing.values()) * (1 - fast.TIE)]
        assert record["choice"] in tied and rt.contract["passed"]
        assert record["candidates"][record["choice"]]["kept"] == max(record["candidates"][p]["kept"] for p in tied)
    for name, f in record["candidates"].items():  # each candidate's timing ran its own graph, fp32 an fp32 one
        if "graph_runs" in f:
            assert f["graph_runs"] and all(("int8" in g) == name.startswith("int8") for g in f["graph_runs"]), f
    assert not record["fp32_graph_runs"] or not any("int8" in g for g in record["fp32_graph_runs"])
    # the benchmark reports the system under what fast chose, and the record (bench JSON "fast_choices")
    from promptmux.bench.baseline import PromptmuxSystem

    system = PromptmuxSystem(rt)
    assert system.fast == record and system.backend == "fast:" + (
        rt.backend if rt.precision == "fp32" else f"{rt.backend}/{rt.precision}")
    if record["backend"]:  # a backend other than the one fast chose is refused, saying what to pass
        other = "onnxruntime" if record["backend"] == "openvino" else "openvino"
        with pytest.raises(BackendUnavailable, match=f"precision fast chose {record['precision']} on "
                                                     f"{record['backend']} on this CPU"):
            Runtime(deploy, precision="fast", backend=other)
    # The same CPU again: the recorded choice, nothing measured; another kind of CPU: chosen again there.
    monkeypatch.setattr(fast, "choose", lambda *a, **k: pytest.fail("chose again on the same CPU"))
    assert Runtime(deploy, precision="fast").fast == record
    monkeypatch.undo()
    monkeypatch.setattr(cpu, "describe", lambda: "Another CPU: avx2=yes")
    # Timed there as: int8 twice as fast as fp32, bf16 1.25x, OpenVINO's int8 1.6x (where they run): ONNX Runtime's
    # int8 wins if its contract holds.
    speed = {"fp32": 1.0, "int8": 0.5, "bf16": 0.8, "int8/openvino": 0.6}
    monkeypatch.setattr(fast, "time_apart", lambda _dir, configs, shapes: {
        p: {"seconds": [speed[p]] * len(shapes), "graph_runs": {}} for p in configs})
    other = Runtime(deploy, precision="fast")
    passed = [c for c in sorted(speed, key=speed.get) if other.fast["candidates"].get(c, {}).get("contract_passed")]
    want = passed[0] if passed else "fp32"
    assert other.fast["choice"] == want
    assert (other.precision, other.backend) == fast.CANDIDATES[want] if passed else other.precision == "fp32"
    assert not other.fast["backend"] or other.backend_reason.startswith("precision fast chose")  # not "requested"
    assert set(json.loads((deploy / "manifest.json").read_text())["fast"]) == {here, "Another CPU: avx2=yes"}
    # Timed there within fast.TIE of each other (int8 fastest), the candidate that kept most of fp32's answers wins;
    # with equal shares, the fastest (chosen again on that CPU, its contracts as recorded).
    speed = {"fp32": 1.0, "int8": 0.50, "int8/openvino": 0.51, "bf16": 0.52}  # the same order as above
    monkeypatch.setattr(fast, "time_apart", lambda _dir, configs, shapes: {
        p: {"seconds": [speed[p]] * len(shapes), "graph_runs": {}} for p in configs})
    share = {"onnxruntime/int8": 0.97, "openvino/int8": 0.99, "openvino/bf16": 0.999}
    monkeypatch.setattr(fast, "kept", lambda contract: share[f"{contract['backend']}/{contract['precision']}"])
    tying = fast.choose(deploy, None, None, Runtime)
    if passed:
        assert tying["choice"] == max(passed, key=lambda c: share["/".join(fast.CANDIDATES[c][::-1])])
        assert ("a tie" in tying["reason"]) == (tying["choice"] != passed[0])
    monkeypatch.setattr(fast, "kept", lambda contract: 0.99)
    assert fast.choose(deploy, None, None, Runtime)["choice"] == (passed[0] if passed else "fp32")
    # where no candidate beats fp32, fp32 runs on the exact backend auto picks (routed between engines)
    monkeypatch.setattr(cpu, "describe", lambda: "A third CPU: avx2=yes")
    monkeypatch.setattr(fast, "time_apart", lambda _dir, configs, shapes: {
        p: {"seconds": [1.0 if p == "fp32" else 2.0] * len(shapes), "graph_runs": {}} for p in configs})
    third = Runtime(deploy, precision="fast")
    assert third.precision == "fp32" and "no non-exact precision" in third.fast["reason"]
    for f in third.fast["candidates"].values():  # fp32 chosen: the reason says what each candidate missed
        assert "accuracy_control" in f or all(m in third.fast["reason"] for m in f.get("missed", ()))
    assert third.backend == "onnxruntime+openvino" and third.routing_record is not None


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_fast_searches_int8_layers_only_where_int8_could_win(deployment, tmp_path, monkeypatch):
    """fast opens its candidates with accuracy control deferred: an int8 that misses with every layer int8 is timed
    so, and searched only if that speed (the most it can reach) could win or tie. Its recorded miss says so, and a
    plain int8 open later measures it again, searching."""
    from promptmux.core.folder import write_manifest
    from promptmux.runtime import accuracy_control, cpu, fast
    from promptmux.runtime.timing import time_apart

    deploy = copy_deployment(deployment.deploy, tmp_path / "deploy")
    measure = P.measure

    def int8_misses(rt, *a, **k):  # ONNX Runtime's int8 misses with every layer int8, meets it with one fp32
        tasks = measure(rt, *a, **k)  # (whatever this CPU's int8 kernels give: capped to AVX2 it can miss)
        if (rt.backend, rt.precision) == ("onnxruntime", "int8"):
            for r in tasks.values():
                r["prediction_agreement"] = 1.0 if rt.int8_fp32_layers else 0.5
        return tasks

    searched = []

    def search(rt, exact, measure_contract, misses, rows, all_int8=None):  # keeps layer 0 fp32
        searched.append(rt.backend)
        rt.int8_fp32_layers = (0,)
        return (0,), measure_contract(), {"passed": True}

    monkeypatch.setattr(P, "measure", int8_misses)
    monkeypatch.setattr(accuracy_control, "search", search)
    configs_timed = []

    def timing(speed):
        def fake(_dir, configs, shapes):
            configs_timed.append(configs)
            return {p: {"seconds": [speed[p]] * len(shapes), "graph_runs": {}} for p in configs}
        return fake

    # int8 all-int8 at 1.1x fp32, OpenVINO's int8 2x: nothing to search for
    monkeypatch.setattr(fast, "time_apart", timing({"fp32": 1.0, "int8": 0.9, "bf16": 0.7, "int8/openvino": 0.5}))
    record = fast.choose(deploy, None, None, Runtime)
    int8 = record["candidates"]["int8"]
    assert searched == [] and not int8["contract_passed"] and int8["missed"]  # what it missed, figures and all
    assert int8["all_int8_speedup_vs_fp32"] == pytest.approx(1 / 0.9, abs=1e-3)
    assert int8["accuracy_control"].startswith("not searched") and "speedup_vs_fp32" not in int8
    assert configs_timed[0]["int8"]["defer_accuracy_control"] and record["choice"] != "int8"
    stored = json.loads((deploy / "manifest.json").read_text())["precision"]["onnxruntime/int8"]
    assert accuracy_control.was_deferred(stored) and not stored["passed"]
    # A timing child opens the deferred candidate as it stands: no search there either (it would record a pass).
    time_apart(deploy, {"int8": {"precision": "int8", "backend": "onnxruntime", "threads": 1,
                                 "defer_accuracy_control": True}}, [(1, 8)], rounds=1)
    assert json.loads((deploy / "manifest.json").read_text())["precision"]["onnxruntime/int8"] == stored
    # A plain int8 open measures it again, searching.
    rt = Runtime(deploy, backend="onnxruntime", precision="int8")
    assert searched == ["onnxruntime"] and rt.contract["passed"] and rt.int8_fp32_layers == (0,)
    assert not accuracy_control.was_deferred(rt.contract)
    # On another CPU, int8 all-int8 is the fastest: searched within the choice, timed again with its layer fp32.
    monkeypatch.setattr(cpu, "describe", lambda: "Another CPU: avx2=yes")
    write_manifest(deploy, lambda m: m["precision"].pop("onnxruntime/int8"))  # measured from every layer int8
    searched.clear()
    configs_timed.clear()
    monkeypatch.setattr(fast, "time_apart", timing({"fp32": 1.0, "int8": 0.4, "bf16": 0.7, "int8/openvino": 0.5}))
    record = fast.choose(deploy, None, None, Runtime)
    assert searched == ["onnxruntime"] and record["choice"] == "int8" and len(configs_timed) == 2
    assert "defer_accuracy_control" not in configs_timed[1]["int8"]
    assert record["candidates"]["int8"]["accuracy_control"].startswith("searched")


@pytest.mark.parametrize("deployment", ["bert"], indirect=True)
def test_a_large_banks_contract_measures_a_sample_of_its_tasks(deployment, tmp_path, monkeypatch):
    """A bank larger than CONTRACT_TASKS (per-user prompts: up to a million) is measured on a sample of its tasks,
    the ones whose names hash lowest, and says so; a task added leaves the contract standing, a measured task
    replaced has it measured again. A bank no larger than CONTRACT_TASKS is measured whole (the int8 test above: a
    task added there is measured)."""
    import hashlib

    deploy = copy_deployment(deployment.deploy, tmp_path / "deploy")
    from promptmux.runtime import contract_record

    monkeypatch.setattr(contract_record, "CONTRACT_TASKS", 2)
    monkeypatch.setattr(contract_record, "SAMPLE_PAGE", 2)  # the sample read page by page
    calls = []
    calibrate = P.calibrate
    monkeypatch.setattr(P, "calibrate", lambda *a, **k: calls.append(1) or calibrate(*a, **k))
    rt = Runtime(deploy, backend="onnxruntime", precision="int8")
    names = rt.bank.names()
    lowest = sorted(names, key=lambda n: hashlib.blake2b(n.encode(), digest_size=8).digest())[:2]
    sample = [n for n in names if n in lowest]  # in the bank's order
    assert sample != names[:2]  # this bank's sample is not its oldest tasks (so the check below can tell)
    contract = rt.contract
    assert len(names) > 3 and contract["tasks_in_bank"] == len(names) and contract["tasks_measured"] == 2
    assert list(contract["tasks"]) == sample and set(contract["digests"]) == set(sample) and calls == [1]
    assert P.contract_tasks(rt.bank, [{"task": names[-1], "text": "x", "label": 0}]) == [names[-1]] + [
        n for n in names if n in sorted(set(names) - {names[-1]}, key=lambda n: hashlib.blake2b(
            n.encode(), digest_size=8).digest())[:1]]  # labelled tasks first, then the sample fills the rest
    rt.add_task("a_user", deployment.adapters["pt"], persist=True)
    assert Runtime(deploy, backend="onnxruntime", precision="int8").contract == contract and calls == [1]
    rt.add_task(sample[0], deployment.adapters["prefix"], persist=True, replace=True)  # a measured task replaced
    again = Runtime(deploy, backend="onnxruntime", precision="int8").contract
    assert calls == [1, 1] and again["digests"] != contract["digests"] and again["tasks_measured"] == 2


class _OneTaskBank:
    """A bank of one task, "a", whose prompt has this digest (what a recorded contract's `covers` reads)."""

    def __init__(self, digest: str):
        self.d = digest

    def __len__(self):
        return 1

    def __contains__(self, task):
        return task == "a"

    def names(self):
        return ["a"]

    def digest(self, task):
        return self.d


def test_fasts_choice_is_made_again_when_a_contract_it_was_made_from_no_longer_holds():
    """Not only the chosen precision's contract being recorded as passed: a task changed (or other calibration
    given) would have it measured again at open, and maybe miss while fast ran it; where fp32 was chosen for a
    candidate's miss, that miss no longer stands either. A candidate left unsearched (its miss deferred) counts."""
    from types import SimpleNamespace

    from promptmux.runtime import cpu, fast

    family = SimpleNamespace(classifies=True, int8_full_sequence=True)

    def entry(backend, precision, passed, **more):
        return {"recipe": P.recipe(backend, precision, family), "cpu": cpu.describe(), "method": P.METHOD,
                "digests": {"a": "d1"}, "passed": passed, "calibration": {"sha256": "rows1"}, **more}

    manifest = {"precision": {"onnxruntime/int8": entry("onnxruntime", "int8", True),
                              "openvino/int8": entry("openvino", "int8", False, accuracy_control={"deferred": True})}}
    record = {"precision": "int8", "choice": "int8",
              "candidates": {"int8": {"runs": True, "backend": "onnxruntime"},
                             "int8/openvino": {"runs": True, "backend": "openvino"}, "bf16": {"runs": False}}}
    assert fast._still_holds(manifest, record, _OneTaskBank("d1"), family, "rows1")
    assert not fast._still_holds(manifest, record, _OneTaskBank("d2"), family, "rows1")  # the task changed
    assert not fast._still_holds(manifest, record, _OneTaskBank("d1"), family, "rows2")  # other calibration given
    assert not fast._still_holds(manifest, record, _OneTaskBank("d1"), family, None)  # rows gone: OpenVINO's int8
    fp32 = {**record, "precision": "fp32", "choice": "fp32"}
    assert fast._still_holds(manifest, fp32, _OneTaskBank("d1"), family, "rows1")
    assert not fast._still_holds(manifest, fp32, _OneTaskBank("d2"), family, "rows1")


def test_a_contract_measured_again_at_open_says_why():
    from types import SimpleNamespace

    from promptmux.runtime import cpu

    family = SimpleNamespace(classifies=False, int8_full_sequence=False)

    holds = {"recipe": P.recipe("onnxruntime", "int8", family), "cpu": cpu.describe(), "method": P.METHOD,
             "digests": {"a": "d1"}}
    assert P.stale(holds, "onnxruntime", "int8", _OneTaskBank("d1"), family) is None  # "a" unchanged
    for entry, why in ((None, "no contract is recorded"), ({**holds, "recipe": "older"}, "made on other graphs"),
                       ({**holds, "cpu": "Other CPU"}, "on another CPU (Other CPU)"),
                       ({**holds, "method": P.METHOD - 1}, f"method ({P.METHOD - 1}, now {P.METHOD})"),
                       ({**holds, "digests": {"a": "d0"}}, "the tasks changed"),
                       ({**holds, "accuracy_control": {"deferred": True}}, "search was deferred")):
        assert why in P.stale(entry, "onnxruntime", "int8", _OneTaskBank("d1"), family), why


def test_a_one_output_head_scores_its_value_and_no_label_contract_passes_it(tmp_path):
    """A regression head (transformers' num_labels=1; a cross-encoder's relevance): classify gives the raw value, as
    PEFT computes it (a softmax over one output is always 1); agreement rules compare labels, which a single output
    always 'keeps', so a non-exact precision misses its contract on it, saying why."""
    import torch
    from conftest import make_adapter, peft_rows, tiny_config
    from peft import PromptTuningConfig
    from transformers import AutoModelForSequenceClassification

    from promptmux import export_deployment
    from promptmux.runtime.batch import label_scores

    torch.manual_seed(0)
    config = tiny_config("bert")
    config.num_labels = 1
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "base")
    adapter = make_adapter("bert", tmp_path / "base", PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
                           tmp_path / "rel", seed=1, train_steps=0)
    export_deployment(tmp_path / "base", {"rel": adapter}, tmp_path / "deploy")
    ids, mask = random_batch("bert", rows=3, seq=6, seed=2, padding_side="right")
    want = peft_rows("bert", tmp_path / "base", adapter, ids, mask)
    exact = Runtime(tmp_path / "deploy", backend="onnxruntime")
    got = [label_scores(exact.bank.view("rel"), row) for row in exact.forward(ids, mask, "rel")]  # what classify gives
    assert np.allclose([r["scores"] for r in got], want, atol=1e-5) and len({r["scores"][0] for r in got}) == 3
    assert all(r["label_id"] == 0 for r in got)
    rt = Runtime(tmp_path / "deploy", precision="int8")
    assert rt.contract["tasks"]["rel"]["one_output"] and not rt.contract["passed"]
    assert "accuracy_control" not in rt.contract  # no layer kept fp32 can make it pass: no search
    assert "its head has one output" in P.misses(rt.contract["tasks"])[0]


def test_fasts_choice_is_made_again_when_its_contracts_were_measured_on_other_rows(tmp_path, monkeypatch):
    """The recorded choice holds only while its contracts were measured on the rows they would be measured on at
    this open: the deployment's kept rows, replaced since by another precision's --calibration, made fast run a
    precision whose contract then missed (and --strict refuse it, where the next open chose again). And where the
    kept rows are gone, OpenVINO's int8 (its model calibrated on them, made again from generated inputs) must be
    measured again; a contract of a graph that does not depend on them still stands."""
    from promptmux.runtime import fast
    from promptmux.runtime.calibration import items_digest

    rows = [{"task": "pt", "text": "a warm film", "label": 1}]
    (tmp_path / P.LABELLED_FILE).write_text(json.dumps(rows[0]) + "\n")
    measured_on = items_digest(P.measured_rows(tmp_path, {}, {"pt"}, None)[0])
    entries = {f"{b}/{p}": {"calibration": {"sha256": measured_on}, "passed": True}
               for p, b in fast.CANDIDATES.values()}
    record = {"precision": "bf16", "choice": "bf16", "candidates": {n: {"runs": True, "backend": b}
                                                                    for n, (_, b) in fast.CANDIDATES.items()}}
    manifest = {"precision": entries, fast.FAST_KEY: {fast.cpu.describe(): record}}
    monkeypatch.setattr(fast, "stale", lambda *a, **k: None)
    monkeypatch.setattr(fast, "choose", lambda *a: {"precision": "chosen again"})

    def resolved():
        return fast.resolve(tmp_path, manifest, 1, None, None, {"pt"}, None)[0]

    assert resolved() == "bf16"  # measured on the kept rows: it holds
    (tmp_path / P.LABELLED_FILE).write_text(json.dumps({**rows[0], "text": "another film"}) + "\n")
    assert resolved() == "chosen again"
    (tmp_path / P.LABELLED_FILE).unlink()
    assert resolved() == "chosen again"  # OpenVINO's int8 model is not the one measured
    record["candidates"]["int8/openvino"]["runs"] = False
    assert resolved() == "bf16"


def test_kept_rows_of_a_task_replaced_since_are_left_out_saying_so(tmp_path, caplog):
    """Rows kept with a task's labels (an index, as the demo keeps them) would be read as another adapter's labels
    after the task is replaced: the contract measured then recorded fp32 at 27.5 % and passed, with no warning. The
    kept rows carry the versions of the tasks they were kept for; a replaced task's rows are left out, saying so."""
    import dataclasses

    from promptmux.core.archs import arch_for
    from promptmux.core.bank import PromptBank
    from promptmux.core.task import Task

    (tmp_path / "manifest.json").write_text("{}")
    bank = PromptBank(arch_for("llama"))
    rng = np.random.default_rng(0)
    bank.add([Task(n, "prompt", "PROMPT_TUNING", 2, {"prompt": rng.standard_normal((2, 16)).astype(np.float32)})
              for n in ("a", "b")])
    rows = [{"task": t, "text": f"text {i}", "label": 1} for i, t in enumerate("abab")]
    P.keep_texts(tmp_path, rows, bank)

    def manifest():
        return json.loads((tmp_path / "manifest.json").read_text())

    assert P.measured_rows(tmp_path, manifest(), bank, None)[0] == rows  # nothing changed: all kept rows
    bank.add([dataclasses.replace(bank.view("a"), tensors={"prompt": np.ones((2, 16), np.float32)})], replace=True)
    with caplog.at_level("WARNING", logger="promptmux.runtime"):
        items, _, kept = P.measured_rows(tmp_path, manifest(), bank, None)
    assert items == [r for r in rows if r["task"] == "b"] and kept.name == P.LABELLED_FILE
    assert "replaced since the rows were kept" in caplog.text and ": a;" in caplog.text
