"""The commands on a deployment's prompt bank: `tasks` (list, add, remove, similar) and `init-adapter`."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
import textwrap
from pathlib import Path

from promptmux.cli.common import CliError, parse_pairs

TASK_ACTIONS = ("list", "add", "remove", "similar", "backup")


def _tasks_action(args) -> list[str]:
    """`tasks DIR ACTION ...` or `tasks ACTION DIR ...`: the action list, with args.deploy set to the folder."""
    if args.deploy in TASK_ACTIONS and args.action and not Path(args.deploy).exists():
        args.deploy, args.action = args.action[0], [args.deploy, *args.action[1:]]
    if not (Path(args.deploy) / "manifest.json").is_file():
        raise CliError(f"{args.deploy} is not a promptmux deployment (no manifest.json); usage: promptmux tasks DIR "
                       "[list | add NAME=DIR | remove NAME | similar QUERY | backup FILE]")
    return args.action or ["list"]


def cmd_tasks(args) -> int:
    from promptmux.core.folder import read_bank, update_tasks

    action = _tasks_action(args)
    verb = action[0]
    if verb == "similar":
        return _tasks_similar(args, action)
    bank = read_bank(args.deploy)  # no model config: fast
    if verb == "list":
        if len(action) != 1:
            raise CliError("usage: promptmux tasks DIR list")
        _list(bank, args.json)
        return 0
    if verb == "add":
        if len(action) != 2:
            raise CliError("usage: promptmux tasks DIR add NAME=ADAPTER_DIR")
        from promptmux.core.adapters import load_adapter
        from promptmux.core.folder import load_base_config

        (name, path), = parse_pairs([action[1]], "add").items()
        new = load_adapter(name, path, load_base_config(args.deploy))

        def add(b):  # on the store as it is now, in one transaction
            # the tasks of the same adapter name go (an MPT adapter's NAME/i too, however many the new one has)
            replaced = [n for base in dict.fromkeys(t.name.split("/")[0] for t in new) for n in b.adapter_names(base)]
            try:
                b.add(new, replace=args.replace)
            except ValueError as e:
                if "already in the bank" not in str(e):
                    raise
                raise CliError(f"task(s) {', '.join(replaced)} already in the deployment; pass --replace to replace "
                               "them, or remove them first") from None
            return replaced

        replaced = update_tasks(args.deploy, bank.spec, add)
        print(json.dumps({"added": [t.name for t in new], **({"replaced": replaced} if replaced else {})}))
        return 0
    if verb == "backup":
        if len(action) != 2:
            raise CliError("usage: promptmux tasks DIR backup FILE")
        return _backup(bank, Path(action[1]))
    if verb == "remove":
        if len(action) != 2:
            raise CliError("usage: promptmux tasks DIR remove NAME")
        removed = update_tasks(args.deploy, bank.spec, lambda b: b.remove(action[1]))
        print(json.dumps({"removed": removed}))
        return 0
    raise CliError(f"unknown tasks action {verb!r}; use list, add NAME=DIR, remove NAME, similar QUERY or backup FILE")


def _backup(bank, dest: Path) -> int:
    """The store as one file, consistent while servers and other commands change it: SQLite's online backup API
    (a copy of tasks.sqlite alone misses the changes still in its write-ahead log, tasks.sqlite-wal)."""
    if dest.exists():
        raise CliError(f"{dest} exists; name a new file for the backup")
    if not dest.parent.is_dir():
        raise CliError(f"{dest.parent} is not a folder")
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        bank.save_as(tmp)
        with contextlib.closing(sqlite3.connect(str(tmp))) as copy:  # what the file holds, not the live count
            count = copy.execute("SELECT count(*) FROM tasks").fetchone()[0]
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    print(json.dumps({"backup": str(dest), "tasks": count}))
    return 0


def _list(bank, as_json: bool, page: int = 1000) -> None:
    """Every task, a page of rows at a time: a million tasks list in bounded memory. The JSON is the one
    json.dumps(rows, indent=2) would write, written as it goes."""
    after, first = None, True
    while True:
        names, more = bank.listing(page, after)
        for r in bank.describe(names):
            if as_json:
                sys.stdout.write(("[\n" if first else ",\n") + textwrap.indent(json.dumps(r, indent=2), "  "))
            else:
                extra = f" labels={r.get('num_labels')}" if "num_labels" in r else ""
                print(f"{r['name']}\t{r['kind']}\t{r['peft_type']}\tvirtual_tokens={r['num_virtual_tokens']}{extra}")
            first = False
        if not more:
            break
        after = names[-1]
    if as_json:
        print("[]" if first else "\n]")


def _tasks_similar(args, action) -> int:
    from promptmux.library.retrieval import similar_tasks, skipped_tasks

    if len(action) != 2:
        raise CliError("usage: promptmux tasks DIR similar QUERY (a task of DIR or a PEFT adapter folder)")
    rows = similar_tasks(args.deploy, action[1], top_k=args.top_k, method=args.method)
    skipped = skipped_tasks(args.deploy)
    if args.json:
        print(json.dumps({"query": action[1], "method": args.method, "results": rows, "skipped": skipped}, indent=2))
    else:
        for r in rows:
            print(f"{r['rank']}\t{r['task']}\t{r['score']:.4f}\t{r['kind']}\tvirtual_tokens={r['num_virtual_tokens']}")
        if skipped:
            print(f"not ranked (prefix tuning: per-layer key/values, not input-level prompts): {', '.join(skipped)}",
                  file=sys.stderr)
    return 0


def cmd_init_adapter(args) -> int:
    from promptmux.library.adapter_writer import init_adapter

    if args.weighted and args.top_k is None:
        raise CliError("--weighted goes with --top-k K")
    if args.query is not None and args.top_k is None:
        raise CliError("--query goes with --top-k K")
    written = init_adapter(args.deploy, args.base, args.out, from_task=args.from_task, top_k=args.top_k,
                           weighted=args.weighted, kind=args.kind, query=args.query, method=args.method,
                           num_virtual_tokens=args.num_virtual_tokens, num_labels=args.num_labels, seed=args.seed,
                           overwrite=args.overwrite)
    print(json.dumps(written, indent=2))
    return 0
