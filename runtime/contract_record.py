"""A recorded accuracy contract (manifest.json's "precision", one entry per backend/precision): its key, the
tasks it measures (contract_tasks), and whether it still holds (stale(): covers the bank's tasks, this kind of CPU,
graphs of this recipe, measured the way contracts are measured now). precision.py measures and enforces contracts;
fast.py reuses its choice while the contracts it was made from hold."""

from __future__ import annotations

import hashlib
import heapq
from pathlib import Path

from promptmux.core.families import Family

from . import accuracy_control, cpu

# How contracts are measured: 2 = a classifier's rows also in mixed batches (measure()); 3 = a decoder's rows end at
# end-of-sequence (before, each generated 16 tokens past it: on the SmolLM2 demo's prompts int8 kept 68 % of topic's
# tokens so and 97 % of those a user gets, results/decoder-contract-eos-smollm2-amd-zen4.json); 4 = a language
# model's labelled rows are scored by the labelled rule (before, their labels were not read); 5 = a language model's
# rows are generated with the positions each has alone, as the server answers them (before, in padded chunks by
# PEFT's rule, where a prompt-tuned row's padding counts among its positions: on the SmolLM2 demo 7 and 6 of 100
# exact answers moved between a mixed batch of 16 and alone, results/accuracy-smollm2-exact-peft-int8-amd-zen4.md).
# A contract recorded another way is measured again at open (measured_as_now: a classifier's of method 3 stands,
# measured as now).
METHOD = 5
CLASSIFIERS_SINCE = 3  # the method since which a classifier's contract is measured as now
CONTRACT_TASKS = 32  # tasks a contract measures (contract_tasks): all of a bank up to this size, else a sample
SAMPLE_PAGE = 10_000  # names read from the bank at a time while sampling


def record_key(backend: str, precision: str) -> str:
    return f"{backend}/{precision}"


def contract_tasks(bank, labelled: list[dict] | None = None) -> list[str]:
    """The tasks a contract measures: every task with labelled rows, then a sample of the others, up to
    CONTRACT_TASKS in all, in the bank's order. A bank of per-user prompts holds up to a million tasks of one kind:
    measuring each (and fingerprinting each at every open) did not finish in 4 minutes on 5,000 tasks, so a large
    bank's contract is measured on a sample of its tasks, and says so (tasks_measured, tasks_in_bank). The sample
    is the tasks whose names hash lowest (a bottom-k sample): spread over the whole bank, old prompts and new
    alike, and the same sample again while its tasks stay (a task joining enters it only by a lower hash)."""
    named = list(dict.fromkeys(r["task"] for r in labelled or ()))
    skip, room = set(named), max(0, CONTRACT_TASKS - len(named))
    lowest: list[tuple[int, int, str]] = []  # a max-heap of the `room` lowest hashes: (-hash, position, name)
    after, more, position = None, True, 0
    while more and room:
        names, more = bank.page(SAMPLE_PAGE, after)
        for name in names:
            position += 1
            if name in skip:
                continue
            key = -int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "big")
            if len(lowest) < room:
                heapq.heappush(lowest, (key, position, name))
            elif key > lowest[0][0]:
                heapq.heapreplace(lowest, (key, position, name))
        after = names[-1] if names else None
    return named + [name for _, _, name in sorted(lowest, key=lambda e: e[1])]


def covers(entry: dict, bank) -> bool:
    """Whether a recorded contract still holds for the bank's tasks: every task it measured is there unchanged, and
    a bank of no more than CONTRACT_TASKS tasks was measured whole (a task added there is measured)."""
    digests = entry.get("digests") or {}
    if len(bank) <= CONTRACT_TASKS and set(digests) != set(bank.names()):
        return False
    return bool(digests) and all(t in bank and bank.digest(t) == d for t, d in digests.items())


def stale(entry: dict | None, backend: str, precision: str, bank, family: Family, searched: bool = True) -> str | None:
    """Why the manifest's contract for this backend and precision (`entry`) must be measured again, None where it
    holds: it covers the bank's tasks (covers), was measured on this kind of CPU, on graphs of this recipe and the way
    contracts are measured now (METHOD), and, outside precision fast's deferral, did not skip accuracy control's
    search (accuracy_control.deferred; searched=False: not asked). Said at open, since measuring takes minutes."""
    if not entry:
        return "no contract is recorded"
    was = "the recorded contract was"
    checks = ((lambda: entry.get("recipe") == recipe(backend, precision, family), f"{was} made on other graphs"),
              (lambda: entry.get("cpu") == cpu.describe(), f"{was} measured on another CPU ({entry.get('cpu')})"),
              (lambda: measured_as_now(entry, family.classifies),
               f"{was} measured by an earlier promptmux's method ({entry.get('method')}, now {METHOD})"),
              (lambda: covers(entry, bank), "the tasks changed since the contract was measured"),
              (lambda: not searched or accuracy_control.is_deferred() or not accuracy_control.was_deferred(entry),
               "accuracy control's search was deferred when the contract was measured"))
    return next((why for holds, why in checks if not holds()), None)


def rows_changed(entry: dict, backend: str, precision: str, digest: str | None) -> bool:
    """Whether a contract was measured on other rows than those it would be measured on now (digest: theirs; None:
    generated inputs). Where the deployment's rows are gone, a contract measured on them still stands, but for
    OpenVINO's int8, whose model is calibrated on those rows (openvino_int8.py): made again from generated inputs,
    it is not the model the contract measured."""
    was = entry["calibration"].get("sha256")
    if digest is not None:
        return was != digest
    return bool(was) and (backend, precision) == ("openvino", "int8")


def measured_as_now(entry: dict, classifies: bool) -> bool:
    """Whether a recorded contract was measured the way contracts are measured now (METHOD; a classifier's since
    CLASSIFIERS_SINCE, so that a change to how language models are measured does not measure classifiers again)."""
    method = entry.get("method")
    return method == METHOD or (classifies and isinstance(method, int) and CLASSIFIERS_SINCE <= method <= METHOD)


def fp32_layers(manifest: dict) -> tuple[int, ...]:
    """The weight MatMuls the recorded int8 contract keeps fp32 (accuracy_control.py): the graphs are made so
    again, and a contract measured again starts from them."""
    entry = (manifest.get("precision") or {}).get(record_key("onnxruntime", "int8")) or {}
    return tuple(int(i) for i in entry.get("fp32_layers", ()))


def recipe(backend: str, precision: str, family: Family) -> str | None:
    """How the precision's graphs are made, where promptmux makes them (int8): a contract measured on graphs made
    otherwise does not hold for these."""
    if precision != "int8":
        return None
    if backend == "openvino":
        from .openvino_int8 import recipe as nncf_recipe

        return nncf_recipe()
    from .quantize import RECIPES

    return RECIPES["dynamic" if family.int8_full_sequence else "weight_only"]


def write_contract(deploy_dir: Path, backend: str, precision: str, entry: dict) -> None:
    """Merge one contract into manifest.json's "precision" (under the deployment's lock)."""
    from promptmux.core.folder import deployment_lock, write_manifest

    with deployment_lock(deploy_dir):
        write_manifest(deploy_dir, lambda m: m.setdefault("precision", {}).__setitem__(record_key(backend, precision),
                                                                                        entry))
