"""The `promptmux` command line: `main` runs it (parser: cli.parser; commands: cli.commands, cli.tasks)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading

from promptmux import progress
from promptmux.cli.common import CliError, check_text_args
from promptmux.cli.parser import build_parser

__all__ = ["USER_ERRORS", "build_parser", "entry", "main"]

# Errors a user causes (wrong flags, folders, adapters, inputs): one line and exit 2. Named by module so that checking
# imports nothing: an exception of a class whose module was never imported cannot have been raised.
USER_ERRORS = (("promptmux.core.adapters", "AdapterError"), ("promptmux.core.archs", "UnsupportedModelError"),
               ("promptmux.core.trt_compat", "EngineError"), ("promptmux.core.bank", "UnknownTaskError"),
               ("promptmux.runtime.errors", "InputError"), ("promptmux.runtime.errors", "BackendUnavailable"),
               ("promptmux.runtime.precision", "PrecisionError"))


# What the machine refuses (a full disk, a read-only folder, a store another process holds): the user's to fix, not
# a bug to trace.
MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _is_user_error(e: BaseException) -> bool:
    kinds = [CliError, FileNotFoundError, FileExistsError, ValueError, PermissionError, TimeoutError]
    kinds += [getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules]
    return isinstance(e, tuple(kinds)) or (isinstance(e, OSError) and e.errno in MACHINE_ERRNOS) or _store_refused(e)


def _store_refused(e: BaseException) -> bool:
    sqlite3 = sys.modules.get("sqlite3")
    return sqlite3 is not None and isinstance(e, sqlite3.OperationalError) and any(
        words in str(e) for words in ("disk is full", "readonly database", "database is locked", "unable to open"))


def _message(e: BaseException) -> str:
    if _store_refused(e):
        return (f"the task store refused the change ({e}); free disk space, make the deployment folder and its "
                "tasks.sqlite writable, or wait for the other process's change")
    return str(e)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # promptmux never downloads: everything is local folders
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING, format="promptmux: %(message)s")
    previous, previous_term = _catch_ctrl_c(), None
    try:
        args = build_parser().parse_args(argv)
        if getattr(getattr(args, "func", None), "__name__", "") != "cmd_serve":  # serve drains, then re-raises it
            previous_term = _catch_sigterm()
        check_text_args(args)
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: an export removes its temporary folder on the way out
        print("promptmux: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `promptmux tasks DIR list | head`: the reader has gone, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error flushing stdout at exit
        return 1
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"promptmux: error: {_message(e)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        progress.interrupted.clear()


def _catch_sigterm():
    """SIGTERM (a process manager stopping the command, `timeout`) unwinds like Ctrl-C, so an export removes its
    temporary folder; it exits 143 as the signal would. Not for `serve`, whose own handler drains, then re-raises
    the signal (the process managers' exit status -15)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None

    def on_term(signum, frame):
        progress.interrupted.set()
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, on_term)


def _catch_ctrl_c():
    """Ctrl-C raises KeyboardInterrupt as Python's own handler does, and is also recorded, so that the long steps
    raise it again if a callback swallowed it (promptmux/progress.py). Returns the handler to restore, or None
    where none was set (not the main thread, or Ctrl-C ignored, as for a job started in the background)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        return None

    def on_ctrl_c(signum, frame):
        progress.interrupted.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_ctrl_c)
    return previous


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
