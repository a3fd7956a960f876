"""Median Runtime.forward time on the MiniLM demo at B = 1, 8, 32 (64 tokens, two tasks mixed), and which graph ran:
a quick check that a change to the layout, batch or head code did not slow the hot path. Run it for two commits in
turn (each in its own process), e.g. from a clone with `git checkout REV && python -m studies.hot_path_check`.
The deployment is the serving benchmark's cached export (~/.cache/promptmux/serve-bench-minilm)."""

import json
import os
import time

import numpy as np

from promptmux import Runtime

rt = Runtime(os.path.expanduser("~/.cache/promptmux/serve-bench-minilm"), backend="onnxruntime", threads=2)
out = {}
for b in (1, 8, 32):
    ids = np.full((b, 64), 1000, np.int64); mask = np.ones_like(ids)
    tasks = [("sentiment", "topic")[i % 2] for i in range(b)]
    for _ in range(3): rt.forward(ids, mask, tasks)
    ts = []
    for _ in range(15 if b < 32 else 8):
        t = time.perf_counter(); rt.forward(ids, mask, tasks); ts.append(time.perf_counter() - t)
    out[b] = round(1e3 * float(np.median(ts)), 2)
print(json.dumps({"graphs": dict(rt.graph_runs), "ms": out}))
