"""Precision as a deployment option, and the accuracy contract of every non-exact precision.

    fp32  exact: within 1e-4 of PEFT (the default)
    bf16  OpenVINO on AMX / AVX512-BF16 CPUs
    int8  ONNX Runtime: a classifier's graphs dynamic int8 (weights per channel, activations per batch); a causal
          LM's cached decoder weight-only int8 (MatMulNBits), LM head included (runtime/quantize.py)

A non-exact precision is never assumed to be good enough: the first time a deployment runs it (or at export
with --precision), its outputs are compared with fp32 on calibration inputs (the user's own texts, rows per task,
labelled or not, or generated token ids) and the result is written into the manifest under "precision". The
user's rows are kept in the deployment (calibration.txt, or calibration.jsonl with labels), so that a
re-measurement after the tasks change uses them again. A contract measures up to CONTRACT_TASKS tasks (the
labelled ones first, contract_tasks): all of a small bank, a sample of a large one; it is measured again when a
task it measured changes or goes, or when a task joins a bank of no more than CONTRACT_TASKS. A contract holds
on the kind of CPU it was measured on (cpu.describe(): the model and its flags): the same int8 graph computes
other numbers where the kernels differ (ONNX Runtime's AVX2 int8 kernel saturates pairs of products at 16 bits,
its VNNI and AMX kernels do not: tests/test_isa_cap.py), so a deployment opened on another kind of CPU measures
it again. Below THRESHOLDS (LABELLED for a task measured on labelled rows) it warns; with strict=True it refuses.
A classifier's rows run in batches of their own task and again in mixed batches of every measured task, as a
server batches mixed traffic (mixed()); each figure the rule reads is the worse of the two, both recorded. Its
contract also records the 95 % interval of its share of predictions kept (from its rows) and how many answers
change when a row runs alone instead of in its batch (batch_changes, on its first ALONE_ROWS rows).
A precision the machine cannot run is an error that says what is missing; nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from promptmux.core.archs import pad_id

from . import accuracy_control, cpu
from .calibration import (  # noqa: F401 (CALIBRATION_ROWS, calibration_texts: read here by callers)
    CALIBRATION_ROWS,
    calibration_texts,
    check_rows,
    classifier_batches,
    generated_ids,
    gives_answer,
    item_lines,
    items_digest,
)
from .contract_record import (  # noqa: F401 (METHOD, recipe, stale, measured_as_now: read here by callers)
    METHOD,
    contract_tasks,
    fp32_layers,
    measured_as_now,
    recipe,
    record_key,
    rows_changed,
    stale,
    write_contract,
)
from .errors import InputError
from .sessions import release_full_sequence

if TYPE_CHECKING:  # the annotations only: runtime.py imports this module
    from promptmux.runtime.runtime import Runtime

log = logging.getLogger("promptmux.runtime")

# The contract: classifiers keep this share of fp32's predictions; decoders this share of fp32's greedy tokens
# (tokens up to a row's first divergence, averaged over rows; a row ends at the model's end-of-sequence token as in
# serving, since the tokens after it are never returned).
THRESHOLDS = {"prediction_agreement": 0.995, "token_agreement": 0.90}
# With labelled calibration rows (a task's own texts and answers), a task instead keeps its accuracy within this of
# fp32's and at least this share of fp32's predictions (so a precision that trades many answers for an equal score
# is not accepted). A language model's prediction is the text it generates for a row (kept: the same tokens as
# fp32's, up to end-of-sequence), right when it starts with the row's label (gives_answer()).
LABELLED = {"accuracy_drop": 0.005, "prediction_agreement": 0.97}
LABELLED_FILE = "calibration.jsonl"  # the deployment's own labelled calibration rows
CALIBRATION_PROMPTS = 32  # generated decoder prompts
CALIBRATION_NEW_TOKENS = 16
CALIBRATION_FILE = "calibration.txt"  # the deployment's own calibration texts, one per line
KEPT_FOR = "calibration_kept"  # manifest: the kept rows' digest and the versions of the tasks they were kept for
ALONE_ROWS = 64  # a classifier task's rows also run alone, for batch_changes
MIXED_BATCH = 32  # rows in a mixed batch of every measured task (mixed())


class PrecisionError(RuntimeError):
    """A non-exact precision missed its accuracy contract and strict mode refuses it."""


# ---- the contract ---------------------------------------------------------------------------

def _label_index(rt: Runtime, row: dict, task_labels: list | None, n_labels: int) -> int:
    label = row["label"]
    if isinstance(label, int):
        index = label
    elif task_labels and label in task_labels:
        index = task_labels.index(label)
    elif not task_labels and isinstance(label, str) and label.isdecimal():  # as classify() names unnamed labels
        index = int(label)
    else:
        raise ValueError(f"calibration row of task {row['task']!r}: label {label!r} is not one of the task's labels "
                         f"({', '.join(map(str, task_labels or [])) or f'indices 0 to {n_labels - 1}'})")
    if not 0 <= index < n_labels:
        raise ValueError(f"calibration row of task {row['task']!r}: label index {index} is outside 0..{n_labels - 1}")
    return index


def measure(fast, exact, texts: list[str] | None = None, labelled: list[dict] | None = None,
            tasks: list[str] | None = None) -> dict:
    """Compare the runtime `fast` with the fp32 runtime `exact` on the calibration inputs, task by task (tasks:
    contract_tasks, by default; a task with rows of its own: on those, with both accuracies where they are labelled:
    a language model's answers scored by gives_answer, its answers kept the rows whose tokens are fp32's). A
    classifier's rows run twice: in batches of one task and in mixed batches of every measured task (mixed()), and
    a task's figures are the worse of the two."""
    classifies = exact.spec.family.classifies
    report, measured = {}, {}
    for task in tasks if tasks is not None else contract_tasks(exact.bank, labelled):
        mine = [r for r in labelled or () if r["task"] == task]
        if classifies:
            batches = classifier_batches(exact, [r["text"] for r in mine] if mine else texts, task)
            want = np.stack([r for ids, mask, types in batches for r in exact.forward(ids, mask, task, types)])
            got = np.stack([r for ids, mask, types in batches for r in fast.forward(ids, mask, task, types)])
            report[task] = {"rows": len(want), "max_abs_diff": float(np.abs(got - want).max()),
                            "prediction_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
                            "agreement_interval_95": interval(got.argmax(-1) == want.argmax(-1)),
                            "batch_changes": batch_changes(fast, batches, task, got)}
            if want.shape[1] == 1:  # a regression head's value: its argmax always agrees (misses() says so)
                report[task]["one_output"] = True
            gold = None
            if mine:  # labelled rows: both accuracies too
                gold = np.array([_label_index(exact, r, exact.bank.entry(task).get("labels"), want.shape[1])
                                 for r in mine])
                report[task].update(labelled=True, accuracy_fp32=float((want.argmax(-1) == gold).mean()),
                                    accuracy=float((got.argmax(-1) == gold).mean()))
            measured[task] = (batches, want.argmax(-1), gold)
        else:  # a language model: the task's own prompts where it has some (rows per task), else the texts
            if mine:
                inputs = [r["text"] for r in mine]
            elif texts is None:
                ids, mask = generated_ids(exact, CALIBRATION_PROMPTS, 16)
                inputs = {"input_ids": ids, "attention_mask": mask}
            else:
                inputs = list(texts)
            # as served: the model's end-of-sequence ends a row, and every row has the positions it has alone
            kw = dict(max_new_tokens=CALIBRATION_NEW_TOKENS, own_positions=True)
            try:
                want = [r for chunk in _chunks(inputs) for r in exact.generate(chunk, task, **kw)]
            except InputError as e:  # said of the calibration, not of the request being served
                raise ValueError(f"a calibration prompt does not fit task {task!r}: {e} (the contract generates "
                                 f"{CALIBRATION_NEW_TOKENS} tokens after each); shorten the calibration prompts"
                                 ) from None
            got = [r for chunk in _chunks(inputs) for r in fast.generate(chunk, task, **kw)]
            same = [g["token_ids"] == w["token_ids"] for g, w in zip(got, want)]
            report[task] = {"rows": len(want), "identical_rows": float(np.mean(same)),
                            "token_agreement": _prefix_agreement([g["token_ids"] for g in got],
                                                                 [w["token_ids"] for w in want])}
            if mine and all("label" in r for r in mine):  # labelled rows (calibrate: all or none): the labelled rule
                gold = [r["label"] for r in mine]
                report[task].update(labelled=True, prediction_agreement=float(np.mean(same)),
                                    agreement_interval_95=interval(np.asarray(same)),
                                    accuracy_fp32=_accuracy(want, gold), accuracy=_accuracy(got, gold))
                if report[task]["accuracy_fp32"] == 0:
                    log.warning("task %s: fp32 gives none of its %d calibration rows' answers; are the labels the "
                                "text the model generates (as \"positive\")?", task, len(mine))
    if len(measured) > 1:
        for task, answers in mixed(fast, exact, {t: b for t, (b, _, _) in measured.items()}).items():
            r, (_, want, gold) = report[task], measured[task]
            r["prediction_agreement_by_task"] = r["prediction_agreement"]
            r["prediction_agreement_mixed"] = float((answers == want).mean())
            if r["prediction_agreement_mixed"] < r["prediction_agreement"]:
                r["prediction_agreement"] = r["prediction_agreement_mixed"]
                r["agreement_interval_95"] = interval(answers == want)
            if gold is not None:
                r["accuracy_by_task"], r["accuracy_mixed"] = r["accuracy"], float((answers == gold).mean())
                r["accuracy"] = min(r["accuracy"], r["accuracy_mixed"])
    return report


def mixed(fast, exact, batches: dict[str, list]) -> dict[str, np.ndarray]:
    """Each task's answers from `fast` with the rows of every task interleaved (one row of each task in turn,
    MIXED_BATCH rows at a time, split where a batch's width would not fit a task's positions), as a server batches
    mixed traffic. Dynamic int8 quantizes a batch's activations with one scale, so its answers depend on the batch:
    the demo's 200 sentiment calibration rows capped to AVX2 kept 97.5 % of fp32's answers in batches of their
    own task (the contract then; results/accuracy-fast-minilm-intel-capped-avx2-after-calibration-rows.md) and
    96.0 % in mixed batches of 32 (results/int8-fp32-layers-minilm-intel-capped-avx2.json)."""
    from .batch import fitting_groups, pad_rows, round_robin

    rows: dict[str, list[dict]] = {}
    for task, task_batches in batches.items():  # each row's own tokens, its padding dropped
        rows[task] = []
        for ids, mask, types in task_batches:
            for i in range(len(ids)):
                cols = np.flatnonzero(mask[i])
                row = {"input_ids": ids[i, cols], "attention_mask": mask[i, cols]}
                if types is not None:
                    row["token_type_ids"] = types[i, cols]
                rows[task].append(row)
    order = round_robin([[(task, j) for j in range(len(r))] for task, r in rows.items()])
    virtual = {task: exact.bank.view(task).num_virtual_tokens for task in rows}
    answers = {task: np.zeros(len(r), np.int64) for task, r in rows.items()}
    for k in range(0, len(order), MIXED_BATCH):
        chunk = order[k:k + MIXED_BATCH]
        for group in fitting_groups([len(rows[t][i]["input_ids"]) for t, i in chunk], [virtual[t] for t, _ in chunk],
                                    exact.max_positions):
            picked = [chunk[g] for g in group]
            keys = set.intersection(*(set(rows[t][i]) for t, i in picked))  # token types only where every row has them
            feed = pad_rows([{k: v for k, v in rows[t][i].items() if k in keys} for t, i in picked],
                            pad_id(exact.config), "right")
            for (t, i), logits in zip(picked, fast.forward(feed["input_ids"], feed["attention_mask"],
                                                           [t for t, _ in picked], feed.get("token_type_ids"))):
                answers[t][i] = int(np.argmax(logits))
    return answers


def interval(kept: np.ndarray, z: float = 1.96) -> list[float]:
    """The 95 % (Wilson) interval of the share of predictions kept, from the rows measured: a contract measures a
    few hundred rows, and 97.5 % kept on 200 is 94.3-98.9 % (the demo's held-out rows after its calibration rows
    kept 96.0-96.9 % where its 200 calibration rows kept 97.5 %: README, "int8 answers and the batch")."""
    n, share = len(kept), float(np.mean(kept))
    centre, spread = share + z * z / (2 * n), z * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return [round(float((centre - spread) / (1 + z * z / n)), 4), round(float((centre + spread) / (1 + z * z / n)), 4)]


def batch_changes(fast, batches, task: str, got: np.ndarray) -> float:
    """The share of the first ALONE_ROWS rows whose answer from `fast` changes when the row runs alone (its own
    tokens, no padding) instead of in its calibration batch (`got`: the batches' outputs, in order). Recorded, not
    a rule: dynamic int8 quantizes a batch's activations with one scale, so a row's answer can depend on the rows
    it is batched with (results/ort-int8-recipes-minilm-intel-amx.json: 39-47 of 800 held-out sentiment answers).
    A sample: one call per row, for each task the contract measures."""
    alone = []
    for ids, mask, types in batches:
        for i in range(min(len(ids), ALONE_ROWS - len(alone))):
            cols = np.flatnonzero(mask[i])
            one = fast.forward(ids[i:i + 1, cols], mask[i:i + 1, cols], task,
                               None if types is None else types[i:i + 1, cols])
            alone.append(int(np.argmax(one[0])))
    return float((np.array(alone) != got.argmax(-1)[:len(alone)]).mean())


def _accuracy(rows: list[dict], labels: list[str]) -> float:
    return float(np.mean([gives_answer(r["text"], y) for r, y in zip(rows, labels)]))


def _chunks(inputs, size: int = 16):
    """Calibration prompts in batches of `size` (texts, or a dict of token-id arrays)."""
    if isinstance(inputs, dict):
        n = len(inputs["input_ids"])
        return [{k: v[i:i + size] for k, v in inputs.items()} for i in range(0, n, size)]
    return [inputs[i:i + size] for i in range(0, len(inputs), size)]


def _prefix_agreement(got: list[list[int]], want: list[list[int]]) -> float:
    """Mean share of each row's greedy tokens that equal fp32's, counted up to the row's first divergence."""
    shares = []
    for g, w in zip(got, want):
        same = 0
        for a, b in zip(g, w):
            if a != b:
                break
            same += 1
        shares.append(same / max(len(w), 1))
    return float(np.mean(shares))


def misses(tasks: dict) -> list[str]:
    """What each task missed of its rule: the labelled one where it was measured on labelled rows."""
    out = []
    for task, r in tasks.items():
        if r.get("one_output"):
            out.append(f"{task}: its head has one output (a regression value, not labels), which no agreement rule "
                       f"here checks (max_abs_diff {r['max_abs_diff']:.3g}); serve it at fp32")
            continue
        if r.get("labelled"):
            drop = r["accuracy_fp32"] - r["accuracy"]
            if drop > LABELLED["accuracy_drop"] + 1e-12:
                out.append(f"{task}: accuracy {r['accuracy']:.4f} is {drop:.4f} below fp32's {r['accuracy_fp32']:.4f} "
                           f"(at most {LABELLED['accuracy_drop']})")
            if r["prediction_agreement"] < LABELLED["prediction_agreement"]:
                what = "labelled rows; rows generating fp32's tokens" if "identical_rows" in r else "labelled rows"
                out.append(f"{task}: prediction_agreement {r['prediction_agreement']:.4f} < "
                           f"{LABELLED['prediction_agreement']} ({what})")
            continue
        for metric, floor in THRESHOLDS.items():
            if metric in r and r[metric] < floor:
                out.append(f"{task}: {metric} {r[metric]:.4f} < {floor}")
    return out


def passed(tasks: dict) -> bool:
    return not misses(tasks)


def calibrate(fast, items: list | None = None, source: str | None = None) -> dict:
    """Measure `fast` (a Runtime at a non-exact precision) against fp32 ONNX Runtime and build its contract.
    items: calibration texts and/or rows per task ({"task", "text", "label"}: a classifier's labelled rows, a
    language model's prompts per task, with the answer's text as label or without one); None: generated inputs."""
    texts = [t for t in items or () if isinstance(t, str)] or None
    labelled = [r for r in items or () if isinstance(r, dict)] or None
    check_rows(fast, items)
    exact = type(fast)(fast.dir, backend="onnxruntime", precision="fp32", threads=fast.threads)  # a Runtime
    started = time.time()
    names = contract_tasks(fast.bank, labelled)
    tasks = measure(fast, exact, texts, labelled, names)
    control = {}
    fixable = not any(r.get("one_output") for r in tasks.values())  # no fp32 layer makes a value agree
    if not passed(tasks) and fixable and accuracy_control.applies(fast):
        if accuracy_control.is_deferred():  # precision fast searches only where this int8 could win (fast.py)
            control = {"accuracy_control": {"deferred": True}}
        else:
            rows = {}
            for task in [t for t in tasks if misses({t: tasks[t]})][:accuracy_control.RANK_TASKS]:
                mine = [r["text"] for r in labelled or () if r["task"] == task]
                rows[task] = classifier_batches(exact, mine or texts, task)
            fast.int8_fp32_layers, tasks, summary = accuracy_control.search(
                fast, exact, lambda: measure(fast, exact, texts, labelled, names), misses, rows,
                all_int8=None if fast.int8_fp32_layers else tasks)
            control = {"accuracy_control": summary}
    if items is None:
        calibration = {"source": "generated token ids"}
    else:
        calibration = {"source": source or ("given rows" if labelled else "given texts"), "rows": len(items),
                       "labelled_rows": sum("label" in r for r in labelled or ()), "sha256": items_digest(items)}
        if not fast.spec.family.classifies:  # a language model's rows may name their task without an answer
            calibration["task_rows"] = len(labelled or ())
    return {
        "backend": fast.backend, "precision": fast.precision, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime()),
        "seconds": round(time.time() - started, 1), "calibration": calibration,
        "thresholds": {**THRESHOLDS, "labelled": dict(LABELLED)},
        "tasks": tasks, "passed": passed(tasks), "digests": {t: fast.bank.digest(t) for t in names},
        "tasks_measured": len(names), "tasks_in_bank": len(fast.bank), "method": METHOD,
        "cpu": cpu.describe(),
        **({"recipe": made} if (made := recipe(fast.backend, fast.precision, fast.spec.family)) else {}),
        **({"fp32_layers": list(fast.int8_fp32_layers)} if accuracy_control.applies(fast) else {}), **control,
    }


def contract(rt: Runtime, strict: bool, calibration=None) -> dict:
    """The runtime's precision contract: the manifest's, or measured now, saying why (stale(), calibration given or
    changed), on `calibration`, else the deployment's calibration.jsonl or calibration.txt, else generated inputs.
    calibration: texts, and/or rows {"task", "text"[, "label"]} (a language model's label: the answer's text), as
    calibration.given_items() gives them back (Runtime normalises them once, before fast's choice reads them too)."""
    from promptmux.core.folder import MANIFEST

    items, source, kept = measured_rows(rt.dir, rt.manifest, rt.bank, calibration)
    rt.calibration_items = items  # what graphs calibrated on data are made from (openvino_int8.py)
    entry = (rt.manifest.get("precision") or {}).get(record_key(rt.backend, rt.precision))
    why = stale(entry, rt.backend, rt.precision, rt.bank, rt.spec.family)
    if why is None and rows_changed(entry, rt.backend, rt.precision, None if items is None else items_digest(items)):
        why = "other calibration rows were given" if calibration is not None else \
            "the calibration rows changed since the contract was measured"  # (came, or went): measured on them
    if why is None and calibration is not None and _kept_digest(rt.dir) != items_digest(calibration):
        with contextlib.suppress(OSError):  # the rows it was measured on, kept again (another's replaced them)
            keep_texts(rt.dir, calibration, rt.bank)
    if why is not None:
        try:
            check_rows(rt, items if kept is not None else None)
            log.warning("measuring precision %s on %s against fp32 on %s, since %s (once per deployment, task set "
                        "and kind of CPU)", rt.precision, rt.backend,
                        source if items is not None else "generated inputs", why)
            entry = calibrate(rt, list(items) if items is not None else None,
                              source=source.removeprefix("the deployment's ") if calibration is None else None)
        except ValueError as e:  # the deployment's own rows may no longer fit it (kept by an earlier promptmux,
            if kept is None:  # edited, or a task replaced since by one with other labels): said of that file
                raise
            raise ValueError(f"{kept}: {e}. Fix or delete that file, or give calibration rows "
                             "(--calibration)") from None
        finally:  # serving starts from fresh engines, not the calibration's caches; and a failed measurement leaves
            release_full_sequence(rt)  # no OpenVINO compile running into the interpreter's exit (it aborted there)
        try:
            if calibration is not None:
                keep_texts(rt.dir, list(calibration), rt.bank)
            write_contract(rt.dir, rt.backend, rt.precision, entry)
        except OSError as e:  # a read-only deployment: the contract still holds for this process
            log.warning("could not record the precision contract in %s: %s", rt.dir / MANIFEST, e)
    try:
        enforce(entry, strict)
    except PrecisionError:
        release_full_sequence(rt)
        raise
    return entry


def measured_rows(deploy_dir: Path, manifest: dict, bank, calibration) -> tuple[list | None, str, Path | None]:
    """(the rows a contract is measured on, where they come from, the deployment's file they were kept in): the
    given calibration, else the deployment's kept rows (less those of tasks removed or, by the manifest's KEPT_FOR,
    replaced since), else None (generated inputs). Precision fast's recorded choice holds only while its contracts
    were measured on these (fast.py)."""
    items, source, kept = calibration, "the given texts", None
    for name in (LABELLED_FILE, CALIBRATION_FILE):
        if items is None and (deploy_dir / name).is_file():
            items, source, kept = calibration_texts(deploy_dir / name), f"the deployment's {name}", deploy_dir / name
    if kept is not None:  # rows the deployment kept for tasks removed since: nothing to measure them on
        tasks = {r["task"] for r in items if isinstance(r, dict)}
        gone = sorted(t for t in tasks if t not in bank)
        if gone:
            log.info("%s: leaving out the rows of task(s) no longer served: %s", kept.name, ", ".join(gone))
        # and those of tasks replaced since the rows were kept: an index label may name another answer now
        record = manifest.get(KEPT_FOR) or {}
        versions = record.get("versions", {}) if record.get("sha256") == items_digest(items) else {}
        replaced = sorted(t for t in tasks - set(gone) if t in versions and versions[t] != bank.digest(t))
        if replaced:
            log.warning("%s: leaving out the rows of task(s) replaced since the rows were kept (their labels may "
                        "mean other answers now): %s; give calibration rows for them again (--calibration)",
                        kept.name, ", ".join(replaced))
        dropped = set(gone) | set(replaced)
        items = [r for r in items if not (isinstance(r, dict) and r["task"] in dropped)] or None
    return items, source, kept


def _kept_digest(deploy_dir: Path) -> str | None:
    for name in (LABELLED_FILE, CALIBRATION_FILE):
        if (deploy_dir / name).is_file():
            try:
                return items_digest(calibration_texts(deploy_dir / name))
            except ValueError:  # unreadable: kept again
                return None
    return None


def keep_texts(deploy_dir: Path, items: list, bank=None) -> None:
    """Store calibration items in the deployment: calibration.jsonl where some are rows per task, else
    calibration.txt (one text per line, as contract() normalises them); the other file is removed. bank: the
    deployment's, whose tasks' versions (digests) the rows are recorded with in the manifest (KEPT_FOR): a task
    replaced since may label its answers otherwise (measured_rows)."""
    from promptmux.core.durable import write_durably
    from promptmux.core.folder import MANIFEST, deployment_lock, write_manifest

    name = LABELLED_FILE if any(isinstance(t, dict) for t in items) else CALIBRATION_FILE
    tasks = sorted({t["task"] for t in items if isinstance(t, dict)})
    versions = {t: bank.digest(t) for t in tasks if t in bank} if bank is not None else {}
    with deployment_lock(deploy_dir):
        write_durably(Path(deploy_dir) / name, "".join(line + "\n" for line in item_lines(items)).encode("utf-8"))
        (Path(deploy_dir) / (CALIBRATION_FILE if name == LABELLED_FILE else LABELLED_FILE)).unlink(missing_ok=True)
        if (Path(deploy_dir) / MANIFEST).is_file():  # (a deployment's: the tests keep rows in bare folders)
            write_manifest(deploy_dir, lambda m: m.__setitem__(KEPT_FOR, {"sha256": items_digest(items),
                                                                          "versions": versions}))


def enforce(entry: dict, strict: bool) -> None:
    """Warn (or, strict, refuse) when a contract was missed, naming the tasks and figures. Judged against today's
    THRESHOLDS, also for a contract recorded under others."""
    missed = misses(entry["tasks"])
    entry["passed"] = not missed
    if entry["passed"]:
        return
    msg = (f"precision {entry['precision']} on {entry['backend']} misses its accuracy contract against fp32 "
           f"({'; '.join(missed)}; calibration: {entry['calibration']['source']})")
    if strict:
        raise PrecisionError(msg + ". Use precision fp32, or drop --strict to accept it")
    if accuracy_control.was_deferred(entry):  # precision fast's candidate: its search comes if it could win
        log.info("%s; accuracy control deferred", msg)
        return
    log.warning("%s", msg)
