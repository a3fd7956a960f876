"""Is fidelity unchanged between two commits? Every max difference against PEFT that the fidelity tests compute,
recorded at each commit and compared value by value.

    python -m studies.fidelity_compare OLD [NEW] [--out results/fidelity-OLD-NEW.json]

For each commit: a git worktree, its own tests/test_fidelity.py and tests/test_families.py patched to log every
max difference they assert on (test id, value, in order), the worktree installed editable in place of this
checkout (an install beside it leaks: the editable finder serves the subpackages a worktree lacks from this
checkout), and those two test files run as the README runs the suite. This checkout's editable install is
restored at the end, whatever happens. The tests are the commit's own; values are compared per test id, and
a test only one commit has is listed, not compared.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("tests/test_fidelity.py", "tests/test_families.py")
# The expressions each file asserts on, wrapped in a call that logs the value and returns it.
WRAP = {
    "tests/test_fidelity.py": "    return max(float(np.abs(g - w).max()) for g, w in zip(got, want))",
    "tests/test_families.py": "        worst = max(float(np.abs(got[r] - w).max()) for r, w in zip(rows, want))",
}
LOGGER = '''

def _fidelity_log(value):
    import json, os
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    with open(os.environ["FIDELITY_LOG"], "a") as f:
        f.write(json.dumps({"test": test, "value": value}) + "\\n")
    return value
'''


def patch(tree: Path) -> None:
    for name, expr in WRAP.items():
        f = tree / name
        text = f.read_text()
        if expr not in text:
            raise SystemExit(f"{name} at this commit does not compute `{expr.strip()}`: update WRAP for it")
        head, value = expr.split("max(", 1)
        f.write_text(text.replace(expr, f"{head}_fidelity_log(max({value})") + LOGGER)


def pip_editable(path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(path)], check=True)


def run_at(commit: str, work: Path) -> dict[str, list[float]]:
    tree = work / commit
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), commit], check=True,
                   capture_output=True)
    try:
        patch(tree)
        log = work / f"{commit}.jsonl"
        pip_editable(tree)
        env = dict(os.environ, FIDELITY_LOG=str(log))
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", *FILES, "-n", "auto", "--dist", "loadgroup",
                               "-p", "no:cacheprovider"], cwd=tree, env=env)
        if done.returncode:
            raise SystemExit(f"the fidelity tests failed at {commit}: not comparable")
        values = collections.defaultdict(list)
        for line in log.read_text().splitlines():
            r = json.loads(line)
            values[r["test"]].append(r["value"])
        return dict(values)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.fidelity_compare", description=__doc__.split("\n")[0])
    p.add_argument("old")
    p.add_argument("new", nargs="?", default="HEAD")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    commits = [subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", c], check=True, capture_output=True,
                              text=True).stdout.strip() for c in (args.old, args.new)]
    runs = {}
    try:
        with tempfile.TemporaryDirectory() as work:
            for c in commits:
                runs[c] = run_at(c, Path(work))
    finally:
        pip_editable(ROOT)
    old, new = (runs[c] for c in commits)
    both = sorted(set(old) & set(new))
    changed = [{"test": t, "old": old[t], "new": new[t]} for t in both if old[t] != new[t]]
    from promptmux.bench.machine import machine_info

    result = {"command": "python -m studies.fidelity_compare " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "machine": machine_info(os.cpu_count() or 1), "commits": commits,
              "tests_compared": len(both), "values_compared": sum(len(old[t]) for t in both),
              "changed": changed, "only_old": sorted(set(old) - set(new)), "only_new": sorted(set(new) - set(old)),
              "largest": {c: max(v for vs in runs[c].values() for v in vs) for c in commits}, "values": runs}
    out = args.out or ROOT / "results" / f"fidelity-{commits[0]}-{commits[1]}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['tests_compared']} tests, {result['values_compared']} max differences compared: "
          f"{len(changed)} tests changed; largest {result['largest']}; only at {commits[0]}: "
          f"{len(result['only_old'])}, only at {commits[1]}: {len(result['only_new'])}. {out}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
