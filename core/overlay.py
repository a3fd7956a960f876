"""Changes a runtime keeps to itself, over a deployment's store that stays as it is.

`Runtime.add_task(persist=False)` and `promptmux serve` without --persist-tasks change only the running process.
Copying the store into memory for that (what the first version did) costs the whole store: 16 GB at a million
demo-sized tasks. BankOverlay instead keeps the process's own tasks in a bank in memory and the names it removed or
replaced from the store in a set; everything else is read from the store as before (a task written there by another
process is still seen). Its tasks' versions start at 2**40, so none equals a store version: what was built from a
task is keyed by (name, version) (core/task.py same_prompt).
"""

from __future__ import annotations

import numpy as np

from .bank import PromptBank
from .bank_errors import UnknownTaskError, already_in_bank, unknown_cursor, unknown_task
from .task import Task, task_name

OWN_VERSIONS_FROM = 1 << 40
_ID_SHIFT = 1 << 40  # the overlay's retrieval ids, apart from the store's


class BankOverlay:
    path = None  # changes are the process's own (Runtime._change)

    def __init__(self, store: PromptBank):
        self.store = store
        self.spec = store.spec
        self.base_head = store.base_head
        self.own = PromptBank(store.spec, store.base_head, cache_bytes=store.cache_bytes)
        self.own.db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('tasks', ?)", (OWN_VERSIONS_FROM,))
        self.hidden: set[str] = set()  # store tasks this process removed or replaced

    def _where(self, name: str) -> PromptBank | None:
        if name in self.own:
            return self.own
        if name not in self.hidden and name in self.store:
            return self.store
        return None

    # ---- queries -------------------------------------------------------------------------
    def names(self) -> list[str]:
        return [n for n in self.store.names() if n not in self.hidden and n not in self.own] + self.own.names()

    def __contains__(self, name) -> bool:
        return self._where(task_name(name)) is not None

    def __len__(self) -> int:
        shadowed = self.store.count_of(self.hidden)  # a server without --persist-tasks may hide 100,000
        return len(self.store) - shadowed + len(self.own)

    def unknown(self, name: str) -> UnknownTaskError:
        return unknown_task(name, len(self), self.names)

    def page(self, limit: int, after: str | None = None) -> tuple[list[str], bool]:
        """The store's tasks (without the hidden ones), then this process's own, `limit` at a time."""
        out: list[str] = []
        if after is None or after not in self.own:
            if after is not None and after not in self.store:
                raise unknown_cursor(after)
            out, after = self._stored(self.store.page, limit, after), None
        own, _ = self.own.page(limit + 1, after) if len(out) <= limit else ([], False)
        out += own
        return out[:limit], len(out) > limit

    def listing(self, limit: int, after: str | None = None) -> tuple[list[str], bool]:
        """The store's tasks (without the hidden ones) and this process's own, in name order (PromptBank.listing):
        the first limit + 1 of each, merged, are the first limit + 1 of all."""
        stored = self._stored(self.store.listing, limit, after)
        out = sorted(stored[:limit + 1] + self.own.listing(limit + 1, after)[0])
        return out[:limit], len(out) > limit

    def _stored(self, fetch, limit: int, cursor: str | None) -> list[str]:
        """At least limit + 1 of the store's names after `cursor` (or all there are) from fetch (its page or
        listing), less those this process hid or holds as its own."""
        out: list[str] = []
        while len(out) < limit + 1:
            names, more = fetch(limit + 1, cursor)
            out += [n for n in names if n not in self.hidden and n not in self.own]
            if not more:
                break
            cursor = names[-1]
        return out

    def entry(self, name: str) -> dict:
        bank = self._where(task_name(name))
        if bank is None:
            raise self.unknown(name)
        return bank.entry(name)

    def view(self, name: str) -> Task:
        bank = self._where(task_name(name))
        if bank is None:
            raise self.unknown(name)
        return bank.view(name)

    def holds(self, view: Task) -> bool:
        bank = self._where(view.name)
        return bank is not None and bank.holds(view)

    def digest(self, name: str) -> str:
        bank = self._where(task_name(name))
        if bank is None:
            raise self.unknown(name)
        return bank.digest(name)

    def describe(self, names: list[str] | None = None) -> list[dict]:
        names = self.names() if names is None else names
        return [row for n in names for row in (self._where(n) or self.store).describe([n])]

    @property
    def stats(self) -> dict:
        return {k: self.store.stats[k] + self.own.stats[k] for k in self.store.stats}

    def cache_used(self) -> int:
        return self.store.cache_used() + self.own.cache_used()

    def size_bytes(self) -> int:
        return self.store.size_bytes()

    def shared_count(self) -> int:
        return self.store.shared_count() + self.own.shared_count()

    # ---- changes -------------------------------------------------------------------------
    def adapter_names(self, name: str) -> list[str]:
        """The tasks of the adapter NAME here (PromptBank.adapter_names): the store's not hidden, then our own."""
        own = self.own.adapter_names(name)
        return [n for n in self.store.adapter_names(name) if n not in self.hidden and n not in own] + own

    def add(self, tasks: list[Task], replace: bool = False) -> list[str]:
        bases = dict.fromkeys(t.name.split("/")[0] for t in tasks)  # the adapters: an MPT one's tasks are NAME/i
        clash = [n for base in bases for n in self.adapter_names(base)]
        if clash and not replace:
            raise already_in_bank(clash)
        added = self.own.add(tasks, replace=True)  # checked and written first: a refused task changes nothing
        self.hidden.update(n for n in clash if n in self.store)
        for n in set(clash) - set(added):  # an MPT adapter replaced by one of fewer tasks: the others go
            if n in self.own:
                self.own.remove(n)
        return added

    def show_store(self, names: list[str]) -> None:
        """The store's tasks of these names' adapters show here again, this process's own copies dropped: a change
        persisted to the store (Runtime._change)."""
        for base in {n.split("/")[0] for n in names}:
            for n in self.own.adapter_names(base):
                self.own.remove(n)
            self.hidden -= {n for n in self.hidden if n == base or n.startswith(base + "/")}

    def remove(self, name: str) -> list[str]:
        name = task_name(name)
        names = [name] if name in self else self.adapter_names(name)  # NAME: an MPT adapter's NAME/0 ... NAME/K-1
        if not names:
            raise self.unknown(name)
        for n in names:
            if n in self.own:
                self.own.remove(n)
            if n in self.store:
                self.hidden.add(n)
        return names

    def copy(self) -> BankOverlay:
        other = BankOverlay(self.store)
        other.own = self.own.copy()
        other.hidden = set(self.hidden)
        return other

    def vector_index(self):
        return _OverlayIndex(self)

    def close(self) -> None:
        self.own.close()


class _OverlayIndex:
    """Retrieval over the store's index and the process's own tasks; hidden names are dropped by names()."""

    def __init__(self, overlay: BankOverlay):
        self.overlay = overlay
        self.store, self.own = overlay.store.vector_index(), overlay.own.vector_index()

    @property
    def dim(self) -> int:
        return self.store.dim or self.own.dim

    def scores(self, method: str, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, scores = self.store.scores(method, query)
        own_ids, own_scores = self.own.scores(method, query)
        return np.concatenate([ids, own_ids + _ID_SHIFT]), np.concatenate([scores, own_scores])

    def names(self, ids) -> dict[int, str]:
        ids = [int(i) for i in ids]
        out = {i: n for i, n in self.store.names([i for i in ids if i < _ID_SHIFT]).items()
               if n not in self.overlay.hidden and n not in self.overlay.own}
        out.update({i + _ID_SHIFT: n for i, n in self.own.names([i - _ID_SHIFT for i in ids if i >= _ID_SHIFT]).items()})
        return out


def change_tasks(bank, deploy_dir, spec, change, persist: bool):
    """(bank, change(bank)'s result) for a runtime's task change. With persist on the deployment's store (one
    transaction; other processes' changes are kept, and every runtime on the store sees it at its next lookup of
    the task). Without, the change stays in the runtime: its own tasks in memory over the store (BankOverlay),
    which is left as it is. A runtime with changes of its own that persists one changes the store first, so that a
    refusal there changes nothing, and then shows the store's tasks of that adapter."""
    from .folder import update_tasks

    if persist and bank.path is not None:
        return bank, change(bank)  # the runtime reads the deployment's store itself
    if persist and isinstance(bank, BankOverlay):
        result = update_tasks(deploy_dir, spec, change)
        bank.show_store(result)
        return bank, result
    if bank.path is not None:
        bank = BankOverlay(bank)
    result = change(bank)
    if persist:  # an old deployment read into memory: its store is written (migrated) too
        update_tasks(deploy_dir, spec, change)
    return bank, result
