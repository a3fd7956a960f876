"""Backend "onnxruntime+openvino": both exact CPU engines behind one session, each batch on the one that is faster
for its size (fp32 classifiers; what `auto` picks for them where OpenVINO is installed).

Measured on the MiniLM demo, 2 threads (studies/cpu_hybrid.py, bench/results/cpu-hybrid.json; the benchmark
rows in bench/results/cpu-hybrid-rerun.md): ONNX Runtime is about 10 % faster on one short text (its worker
threads spinning between calls is the likely reason), the two tie at 8 x 64 tokens, and OpenVINO is 5 % faster
at 16 x 64, 11 % at 32 x 64 and 14 % at 8 x 256. Both compute fp32 and pass the same fidelity tests against PEFT. A
batch goes by its positions (rows x width, virtual tokens included). Each engine is made on its first batch, so
a process that only sees small batches never compiles OpenVINO. The price: in traffic that alternates between
sizes, a large batch right after a small one runs about 15 % slower (238 against 208 ms at 32 x 64,
bench/results/cpu-hybrid.json; most likely ONNX Runtime's threads are still spinning).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .batch import OnFirstUse

# Up to this many positions per batch ONNX Runtime runs it (B=8 at 64 tokens is 608 with the demo's 12 virtual
# tokens: a tie; B=32, 2432, and B=8 at 256 tokens, 2144, are clearly OpenVINO's).
SMALL_BATCH_POSITIONS = 1024


class RoutedSession:
    """run()/run_all() on ONNX Runtime or OpenVINO by batch size; `runs` counts the batches each engine ran."""

    def __init__(self, make_small, make_large, small_positions: int = SMALL_BATCH_POSITIONS):
        self.engines = {"onnxruntime": OnFirstUse(make_small), "openvino": OnFirstUse(make_large)}
        self.small_positions = small_positions
        self.runs: Counter = Counter()

    def engine_for(self, feeds: dict[str, np.ndarray]) -> str:
        rows, width = feeds["attention_mask"].shape[:2]
        return "onnxruntime" if rows * width <= self.small_positions else "openvino"

    def run(self, feeds: dict[str, np.ndarray], bank_key=None) -> np.ndarray:
        name = self.engine_for(feeds)
        self.runs[name] += 1
        return self.engines[name].run(feeds, bank_key)

    def run_all(self, feeds: dict[str, np.ndarray], bank_key=None) -> list[np.ndarray]:
        name = self.engine_for(feeds)
        self.runs[name] += 1
        return self.engines[name].run_all(feeds, bank_key)

    @property
    def input_names(self) -> list[str]:
        return self.engines["onnxruntime"].input_names
