"""Does `python -m promptmux export`, interrupted with SIGINT while it writes its temporary folder, always exit
with 130 (and not die by the signal, return code -2)? Runs the interrupt N times, optionally with a busy
process beside it (the flake needed load). --entry main runs `sys.exit(promptmux.cli.main())` as a module
(studies/ctrl_c_old_entry.py), the entry point before the fix in promptmux.cli.entry, to show the failure it
fixed.

    python -m studies.ctrl_c_exit BASE_DIR ADAPTER_DIR [--runs 20] [--load] [--entry entry|main]
        [--out results/ctrl-c-exit-ENTRY.json]

BASE_DIR and ADAPTER_DIR: any small base model and prompt-tuning adapter (the test suite's tiny BERT ones do).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENTRIES = {"entry": ["-m", "promptmux"],
           "main": ["-m", "studies.ctrl_c_old_entry"]}  # sys.exit(main()), run as a module as before


def interrupt_once(base: str, adapter: str, entry: str = "entry") -> tuple[int, str]:
    tmp = Path(tempfile.mkdtemp())
    try:
        child = subprocess.Popen([sys.executable, *ENTRIES[entry], "export", "--base", base, "--adapter",
                                  f"pt={adapter}", "--out", str(tmp / "deploy"), "--quiet"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        deadline = time.monotonic() + 120
        while not list(tmp.glob(".deploy.tmp-*")) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=120)
        return child.returncode, stderr
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base")
    p.add_argument("adapter")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--load", action="store_true", help="keep one core busy meanwhile")
    p.add_argument("--entry", choices=sorted(ENTRIES), default="entry")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.load else None
    try:
        results = [interrupt_once(args.base, args.adapter, args.entry) for _ in range(args.runs)]
    finally:
        if burner:
            burner.kill()
    codes = collections.Counter(code for code, _ in results)
    record = {"command": "python -m studies.ctrl_c_exit " + " ".join(argv if argv is not None else sys.argv[1:]),
              "entry": args.entry, "runs": args.runs, "load": args.load,
              "return_codes": {str(k): v for k, v in codes.items()},
              "stderr_other_than_one_line": sorted({err for _, err in results if err != "promptmux: interrupted\n"})}
    (args.out or Path(f"results/ctrl-c-exit-{args.entry}.json")).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))
    return 0 if set(codes) == {130} else 1


if __name__ == "__main__":
    sys.exit(main())
