"""Prompt bank, layout of mixed-task batches, sessions (ONNX Runtime, PyTorch reference) and the Runtime."""
