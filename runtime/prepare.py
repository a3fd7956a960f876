"""`Runtime.prepare()`: build every engine and graph that the runtime's routing can pick and run one small batch
through each, before the first request, so that no request pays for a build, a compile or a first run.

A Runtime on its own makes its sessions on first use (a process that only generates never loads the
full-sequence graph; one that sees only small batches never compiles OpenVINO). A server cannot afford that:
on a 2-core CPU, compiling OpenVINO inside the serving path held the queue past max_queue_wait and answered
503 to requests that nothing slow had caused. So the server prepares everything before it reports ready, and a
task added later needs no new engine (tasks are graph inputs).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from promptmux.core.folder import FOLDED_GRAPH, GRAPH, NOPREFIX_GRAPH
from promptmux.kinds import kind_of

from .errors import InputError

if TYPE_CHECKING:  # the annotations only: runtime.py imports this module
    from promptmux.runtime.runtime import Runtime

log = logging.getLogger("promptmux.runtime")


def engines_of(session, backend: str) -> list[tuple[str, object]]:
    """(engine name, engine) behind a session: those of a routed session its split can pick, else the session
    itself. A session made on first use is made here."""
    inner = getattr(session, "engines", None)
    if not isinstance(inner, dict):
        return [(backend, session)]
    return [(name, engine) for name, engine in inner.items() if name in session.routing.picks()]


def _probe_ids(rt: Runtime) -> tuple[np.ndarray, np.ndarray]:
    """One row of one ordinary token id (past the first ids, where special tokens live): it fits beside any task's
    virtual tokens."""
    ids = np.full((1, 1), min(5, rt.dims.vocab_size - 1), dtype=np.int64)
    return ids, np.ones_like(ids)


PROBED = 256  # tasks looked at for one that runs each graph


def _full_sequence_graphs(rt: Runtime) -> list[tuple[str, object, object]]:
    """(graph, session, a task whose row that graph serves, or None) for each full-sequence graph of an encoder."""
    views = [rt.bank.view(t) for t in rt.bank.page(PROBED)[0]]  # not all: a bank may hold a million tasks
    plain = next((v for v in views if kind_of(v).kv_prefix(v) is None), None)
    graphs = [(GRAPH, rt.session, next(iter(views), None))]
    if rt.noprefix_session is not None:
        graphs.append((NOPREFIX_GRAPH, rt.noprefix_session, plain))
    if rt.folded_session is not None and rt.folded_task in rt.bank:
        graphs.append((FOLDED_GRAPH, rt.folded_session, rt.bank.view(rt.folded_task)))
    return graphs


def prepare(rt: Runtime, progress=None) -> list[dict]:
    """Build and run once everything rt's routing can pick; returns what was prepared, with the seconds each took.
    progress(line): told before each step (the server logs it)."""
    say = progress or (lambda line: log.info("%s", line))
    done = []
    if rt.spec.family.classifies:
        ids, mask = _probe_ids(rt)
        for graph, session, view in _full_sequence_graphs(rt):
            for name, engine in engines_of(session, rt.backend):
                say(f"preparing {graph} on {name}")
                start = time.perf_counter()
                if view is None:  # no task of the deployment runs this graph yet: build it, nothing to run
                    engine.input_names  # noqa: B018 - makes the engine
                else:
                    engine.run(rt.layout(graph, ids, mask, None, [view]).feeds)
                done.append({"graph": getattr(engine, "graph_file", graph),  # the file it runs: an int8 copy's
                             "engine": name, "seconds": round(time.perf_counter() - start, 3), "ran": view is not None})
    else:  # causal LMs and seq2seq serve by generation: the decoder graph, every task's prompt KV, one step
        say(f"preparing the cached decoder on {rt.backend}")
        start = time.perf_counter()
        rt.generator  # noqa: B018 - builds the decoder session (and, for causal LMs, the first tasks' prompt KV)
        ran = False
        first = rt.bank.page(1)[0]
        if first:
            ids, mask = _probe_ids(rt)
            try:
                rt.generate({"input_ids": ids, "attention_mask": mask}, first[0], max_new_tokens=1,
                            eos_token_id=[])
                ran = True
            except InputError:  # the task's virtual tokens leave no room for a step: built, not run
                pass
        done.append({"graph": "decoder", "engine": rt.backend, "seconds": round(time.perf_counter() - start, 3),
                     "ran": ran})
    return done
