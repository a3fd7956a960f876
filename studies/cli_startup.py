"""How long the command line takes to answer what needs no model: `promptmux --help`, `--version`, `tasks DIR list`.

    python -m studies.cli_startup [--repeats 7] [--deploy DIR]

Each command runs as a fresh process (what a user waits for, interpreter start included); prints the median and
the fastest of --repeats runs per command as JSON. --deploy adds `tasks DIR list` (any deployment folder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def time_command(args: list[str], repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "promptmux", *args], check=True, capture_output=True)
        runs.append(time.perf_counter() - start)
    return {"command": "promptmux " + " ".join(args), "median_s": round(statistics.median(runs), 3),
            "min_s": round(min(runs), 3), "repeats": repeats}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m studies.cli_startup", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="runs per command (default 7)")
    p.add_argument("--deploy", help="a deployment folder: also time `promptmux tasks DIR list`")
    args = p.parse_args(argv)
    commands = [["--help"], ["--version"]] + ([["tasks", args.deploy, "list"]] if args.deploy else [])
    results = [time_command(c, args.repeats) for c in commands]
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
