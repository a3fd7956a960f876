"""The systems of a `promptmux bench` run, built before anything is measured (each in its own process by
default, see isolated.py) and closed after, and the PEFT reference outputs the others are checked against."""

from __future__ import annotations

from .baseline import PEFT_BASELINES
from .isolated import IsolatedSystem, SystemSpec, build
from .measure import MB, rss
from .settings import BenchSettings, peft_device, system_pairs
from .workload import Workload


def build_systems(s: BenchSettings, meta) -> tuple[list, dict, object | None]:
    """Every system (each backend at each precision, then the baselines) before anything is measured: one that
    cannot run here is refused at once with the runtime's own message (what is missing, what to install).
    meta: a Runtime of the deployment (tasks, bank, config) for the baselines. Returns (systems, load deltas in
    MB, the PEFT fp32 system or None)."""
    tasks = tuple(s.tasks or meta.tasks)
    specs = [SystemSpec("promptmux", s.deploy, s.threads, backend=b, precision=p, base=s.base)
             for b, p in system_pairs(s)]
    specs += [SystemSpec("peft", s.deploy, s.threads, precision=PEFT_BASELINES[b][0], tasks=tasks, base=s.base,
                         adapters=tuple(s.adapters.items()), device=peft_device(s)) for b in s.baselines]
    systems, load_mb = [], {}
    try:
        for spec in specs:
            if s.isolate:
                system = IsolatedSystem(spec)
                load_mb[system.name] = system.load_rss_mb
            else:
                before = rss()
                system = build(spec, meta)
                load_mb[system.name] = round((rss() - before) / MB, 1)
            systems.append(system)
    except BaseException:
        close_systems(systems)
        raise
    peft = next((sy for sy in systems if sy.backend == "peft-eager"), None)
    return systems, load_mb, peft


def close_systems(systems: list) -> None:
    for sy in systems:
        if hasattr(sy, "close"):
            sy.close()


def peft_outputs(peft, w: Workload, rows: list[int]) -> list:
    """PEFT's outputs for rows of a workload, in the order of rows (PEFT serves one task per batch: the rows are
    grouped by task, each group one call)."""
    out: list = [None] * len(rows)
    groups: dict[str, list[int]] = {}
    for j, i in enumerate(rows):
        groups.setdefault(w.tasks[i], []).append(j)
    for task, js in groups.items():
        idx = [rows[j] for j in js]
        for j, o in zip(js, peft.run(w.ids[idx], w.mask[idx], [task] * len(idx), w.new_tokens)):
            out[j] = o
    return out
