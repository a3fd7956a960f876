"""What a Runtime call hands its engine: the feeds each session call receives, for studies that time or profile
the engine alone on exactly those inputs."""

from __future__ import annotations

import collections
import contextlib
import json
from pathlib import Path


@contextlib.contextmanager
def session_calls(session_class, method: str = "run"):
    """Inside the block, every call of session_class.<method> is recorded as (session, feeds) in the list yielded."""
    calls = []
    original = getattr(session_class, method)

    def spy(self, feeds, bank_key=None):
        calls.append((self, dict(feeds)))
        return original(self, feeds, bank_key)

    setattr(session_class, method, spy)
    try:
        yield calls
    finally:
        setattr(session_class, method, original)


def node_times(profile_file: str, key=lambda args: args["op_name"]) -> tuple[collections.Counter, collections.Counter]:
    """ONNX Runtime's profile (session.end_profiling()) read as (microseconds, calls) per key of each node's args
    (default: its operator type)."""
    total, count = collections.Counter(), collections.Counter()
    for e in json.loads(Path(profile_file).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[key(e["args"])] += e["dur"]
            count[key(e["args"])] += 1
    return total, count
