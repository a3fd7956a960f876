"""The `promptmux` command line: `main` runs it (parser: cli.parser; commands: cli.commands, cli.bank)."""

from __future__ import annotations

import logging
import os
import sys

from promptmux.cli.common import CliError, check_text_args
from promptmux.cli.parser import build_parser

__all__ = ["USER_ERRORS", "build_parser", "entry", "main"]

# Errors a user causes (wrong flags, folders, adapters, inputs): one line and exit 2. Named by module so that checking
# imports nothing: an exception of a class whose module was never imported cannot have been raised.
USER_ERRORS = (("promptmux.core.adapters", "AdapterError"), ("promptmux.core.archs", "UnsupportedModelError"),
               ("promptmux.core.trt_compat", "EngineError"), ("promptmux.core.bank", "UnknownTaskError"),
               ("promptmux.runtime.errors", "InputError"), ("promptmux.runtime.errors", "BackendUnavailable"),
               ("promptmux.runtime.precision", "PrecisionError"))


def _is_user_error(e: BaseException) -> bool:
    kinds = [CliError, FileNotFoundError, FileExistsError, ValueError]
    kinds += [getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules]
    return isinstance(e, tuple(kinds))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # promptmux never downloads: everything is local folders
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING, format="promptmux: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        check_text_args(args)
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: an export removes its temporary folder on the way out
        print("promptmux: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"promptmux: error: {e}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `promptmux` command and `python -m promptmux`: main(), then exit with its code.

    After Ctrl-C it leaves at once with 130 (stdio flushed; the export's clean-up has run on the way out). A normal
    interpreter exit could turn that into death by SIGINT: when the KeyboardInterrupt surfaced inside code that a C
    extension ran through PyRun_* (seen during exports), CPython records it as unhandled, even though main() caught
    it, and re-raises SIGINT at exit."""
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)
