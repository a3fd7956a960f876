"""Backends that run the exported computation: ONNX Runtime, and eager PyTorch as the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class OrtSession:
    """One ONNX Runtime CPU session over a graph of the deployment."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output_name], {n: feeds[n] for n in self.input_names})[0]

    def run_all(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {n: feeds[n] for n in self.input_names})


class TorchSession:
    """The same computation in eager PyTorch (the reference backend)."""

    def __init__(self, module, names: list[str], threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.module = module.eval()
        self.input_names = names

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.run_all(feeds)[0]

    def run_all(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names])
        return [t.float().numpy() for t in (out if isinstance(out, tuple) else (out,))]
