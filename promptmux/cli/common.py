"""What the command modules share: the user-error class, the backend and precision choices, argument helpers."""

from __future__ import annotations

import sys
from pathlib import Path


class CliError(Exception):
    """A mistake in the command line: `main` prints it on one line and exits 2."""


BACKEND_CHOICES = ["auto", "onnxruntime", "openvino", "onnxruntime+openvino", "onnxruntime-cuda", "tensorrt",
                   "torch"]  # "auto" and runtime/backends.py BACKENDS (tests/test_core_units.py checks they agree)
PRECISION_CHOICES = ["fp32", "bf16", "int8", "fast"]  # runtime/backends.py PRECISIONS, and fast (runtime/fast.py)


def open_runtime(args, forward: bool = False, **kwargs):
    """The Runtime the command line asked for; says on stderr which backend and precision run (forward: the
    full-sequence graph's, which a language model runs at fp32 where its generation runs int8)."""
    from promptmux.runtime.precision import calibration_texts
    from promptmux.runtime.runtime import Runtime

    texts = calibration_texts(args.calibration) if getattr(args, "calibration", None) else None
    rt = Runtime(args.deploy, backend=args.backend, precision=args.precision, strict=args.strict,
                 calibration=texts, **kwargs)
    if not getattr(args, "quiet", False):
        ran = rt.forward_precision if forward else rt.precision
        note = f" (its generation's is {rt.precision}; the full-sequence graph runs fp32)" if ran != rt.precision else ""
        print(f"promptmux: backend {rt.backend} ({rt.backend_reason}), precision {ran}{note}", file=sys.stderr)
    return rt


def parse_pairs(values: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise CliError(f"{flag} takes NAME=DIR, got {v!r}")
        if name in out:
            raise CliError(f"{flag} {name!r} given twice")
        out[name] = path
    return out


TEXT_ARGS = ("text", "prompt", "stop", "task")  # flags whose values go to a tokenizer or are matched as text


def check_text_args(args) -> None:
    """Bytes that are not UTF-8 reach argv as lone surrogates (Python's surrogateescape): paths may hold them,
    text for a tokenizer may not."""
    for flag in TEXT_ARGS:
        value = getattr(args, flag, None)
        for v in [value] if isinstance(value, str) else value or []:
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise CliError(f"--{flag} {v!r} is not valid UTF-8 text; pass it in UTF-8") from None


def read_texts(args) -> list[str]:
    """--text (repeatable) and --file (one text per line, blank lines skipped), in that order."""
    texts = list(args.text or [])
    if any(not t.strip() for t in texts):
        raise CliError("a --text is empty: give each one something to read")
    if args.file:
        try:
            lines = Path(args.file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise CliError(f"--file {args.file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise CliError(f"--file {args.file} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        texts += [line for line in lines if line.strip()]
    if not texts:
        raise CliError("give at least one --text TEXT or a --file with one text per line")
    return texts


def tasks_per_row(tasks: list[str], rows: int, what: str) -> list[str]:
    """One --task for every row, or one per row."""
    if len(tasks) == 1:
        return tasks * rows
    if len(tasks) != rows:
        raise CliError(f"got {len(tasks)} --task for {rows} {what}; give one task, or one per {what.rstrip('s')}")
    return tasks
