"""Calibration items: the user's file as read (calibration_texts), a language model's answers (gives_answer), and
the batches of a classifier: the rows a precision's contract is measured on (precision.py) and the rows NNCF
calibrates OpenVINO's int8 on (openvino_int8.py), made the same way for both."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the annotations only: runtime.py imports this module
    from promptmux.runtime.runtime import Runtime

CALIBRATION_ROWS = 256  # generated classifier inputs when the user gives none (one flip in 256 stays above 0.995)


def item_lines(items: list) -> list[str]:
    """Calibration items as the deployment keeps them: a text per line, or, where some are rows per task, every item
    a JSON line (a text among them as {"text": ...}, so that the file reads back as it was given)."""
    rows = any(isinstance(t, dict) for t in items)
    return [t if not rows else json.dumps(t if isinstance(t, dict) else {"text": t}, ensure_ascii=False, sort_keys=True)
            for t in items]


def items_digest(items: list) -> str:
    """The identity of calibration items: what a contract, and an int8 IR calibrated on them, were made from."""
    return hashlib.sha256("\n".join(item_lines(items)).encode()).hexdigest()


def generated_ids(rt: Runtime, rows: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids (avoiding the first ids, where special tokens live) when no texts are given."""
    rng = np.random.default_rng(seed)
    vocab = rt.dims.vocab_size
    low = min(1000, vocab // 2)
    ids = rng.integers(low, vocab, size=(rows, length))
    return ids, np.ones_like(ids)


def classifier_batches(rt: Runtime, texts, task: str, size: int = 32):
    """(ids, mask, token types) batches of the calibration texts for one task (cut to fit its positions), or of
    generated ids."""
    if texts is None:
        ids, mask = generated_ids(rt, CALIBRATION_ROWS, 24)
        return [(ids[i:i + size], mask[i:i + size], None) for i in range(0, len(ids), size)]
    batches = []
    for i in range(0, len(texts), size):
        enc = rt.encode(texts[i:i + size], task, truncation=True)
        batches.append((enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")))
    return batches


def calibration_texts(path: str | Path) -> list:
    """The user's calibration file: one text per line (blank lines skipped), or JSON Lines of rows per task,
    {"task": NAME, "text": TEXT, "label": LABEL}: a classifier's labelled rows (LABEL: one of the task's labels, or
    its index), or a language model's prompts per task (LABEL, optional: the answer's text, gives_answer())."""
    path = Path(path)
    try:
        # utf-8-sig: a BOM (Notepad, PowerShell) must not hide the first row's "{"; lines end at "\n" alone, since
        # splitlines() also breaks at U+2028 and U+0085, which JSON keeps raw inside a row's text
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").split("\n") if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the calibration file {path}: {e}") from None
    if not lines:
        raise ValueError(f"the calibration file {path} has no text (one text per line)")
    if lines[0].startswith("["):  # one JSON array of rows (json.dump's way), else texts of which the first starts "["
        try:
            whole = json.loads("\n".join(lines))
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            return [_item(row, f"{path} item {i}") for i, row in enumerate(whole, 1)]
    if not lines[0].startswith("{"):
        return lines
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i}: not JSON ({e.msg}); a calibration file of rows per task has one "
                             '{"task": ..., "text": ..., "label": ...} per line (its first line starts with "{"; '
                             'texts of which the first starts with "{" go one {"text": ...} per line)') from None
        rows.append(_item(row, f"{path} line {i}"))
    return rows


def _item(row, where: str):
    """One calibration item as promptmux keeps it: a text ({"text"} alone, whitespace-normalised) or a row per task
    {"task" (as the bank names tasks: NFC), "text" (as written: JSON keeps a prompt's line breaks, which a language
    model reads), "label"}; anything else is refused, saying where and what to give."""
    from promptmux.core.task import task_name

    if isinstance(row, str):
        return " ".join(row.split())
    if isinstance(row, dict) and set(row) == {"text"} and isinstance(row["text"], str):
        return " ".join(row["text"].split())  # a text kept among rows per task (item_lines)
    label = row.get("label") if isinstance(row, dict) else None
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("task", "text")) \
            or ("label" in row and (not isinstance(label, (str, int)) or isinstance(label, bool))):
        raise ValueError(f"{where}: give a text, or a row with \"task\" and \"text\" as strings and \"label\" as a "
                         "label name or index (a language model's: the answer's text, or no label)")
    return {"task": task_name(row["task"]), "text": row["text"], **({"label": label} if "label" in row else {})}


def given_items(calibration) -> list | None:
    """Calibration as given to Runtime(calibration=...), as the deployment's file gives it back: a text
    whitespace-normalised (calibration.txt holds one per line), a row per task as written (JSON keeps a prompt's line
    breaks, which a language model reads: the SmolLM2 demo's prompts end in "\\nAnswer:"). A path (str or Path)
    is read as the CLI's --calibration reads it; a lone string naming no file is refused, not measured character
    by character."""
    if calibration is None:
        return None
    if isinstance(calibration, (str, os.PathLike)):
        try:
            is_file = Path(calibration).is_file()
        except (OSError, ValueError):  # a text too long, or odd, for a path
            is_file = False
        if not is_file:
            raise ValueError(f"calibration {str(calibration)[:60]!r} is one string and no file: give a list of texts "
                             "or rows, or the path of a calibration file")
        calibration = calibration_texts(calibration)
    out = [_item(t, f"calibration item {i}") for i, t in enumerate(calibration, 1)]
    out = [t for t in out if not isinstance(t, str) or t]
    if not out:
        raise ValueError("the calibration texts are all empty; give at least one text (one per line)")
    return out


def gives_answer(text: str, label: str) -> bool:
    """Whether a language model's generated text gives the answer `label`: the text, leading whitespace dropped,
    starts with the label (case ignored) and the label ends a word there (" Positive." answers "positive",
    " positively" does not). The answer must come within the contract's new tokens
    (precision.CALIBRATION_NEW_TOKENS)."""
    text, label = text.lstrip().casefold(), label.strip().casefold()
    return text.startswith(label) and (len(text) == len(label) or not text[len(label)].isalnum())


def check_answers(rows: list[dict]) -> None:
    """A language model's labels are answers' texts (gives_answer()), given for all of a task's rows or for none."""
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    for task, mine in by_task.items():
        bad = [r["label"] for r in mine if "label" in r and (not isinstance(r["label"], str) or not r["label"].strip())]
        if bad:
            raise ValueError(f"calibration rows of task {task!r}: a language model's label is the text of the answer "
                             f"its row should generate (as \"positive\"), not {bad[0]!r}")
        if 0 < sum("label" in r for r in mine) < len(mine):
            raise ValueError(f"calibration rows of task {task!r}: {sum('label' in r for r in mine)} of {len(mine)} "
                             "have a label; give every row of a task its answer (the labelled rule), or none")


def check_rows(rt: Runtime, items: list | None) -> None:
    """Refuse calibration rows per task that cannot be measured on this deployment, saying what to give."""
    rows = [r for r in items or () if isinstance(r, dict)]
    if not rows:
        return
    if rt.spec.family.classifies and any("label" not in r for r in rows):
        raise ValueError("a classifier's calibration rows need a label each ({\"task\", \"text\", \"label\"}); "
                         "for the unlabelled contract give texts, one per line")
    if not rt.spec.family.classifies:
        check_answers(rows)
    unknown = sorted(t for t in {r["task"] for r in rows} if t not in rt.bank)  # one bank lookup a task
    if unknown:
        raise ValueError(f"calibration rows name task(s) {', '.join(map(repr, unknown))} that this "
                         f"deployment does not serve ({len(rt.bank)} tasks)")
