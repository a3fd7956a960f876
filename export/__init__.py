"""PEFT prompt adapters + base model in; prompt bank + ONNX graph out."""
