"""The prompt bank as a prompt library: the opposite direction of export, from a deployment back to PEFT.

* `retrieval`: rank a bank's tasks by how similar their prompts are to a query (SPoT, Vu et al., 2022:
  a task's prompt is a task embedding).
* `adapter_writer`: write a new PEFT adapter folder initialised from chosen bank prompts (SPoT's best of
  top-k or weighted top-k; Multitask Prompt Tuning's averaged source factors, Wang et al., 2023).
* `prompts`: the prompt arithmetic both use (composed prompts, similarity, resampling, weighted sums).

Separate from `promptmux.export` and the runtime: this is training-time tooling that reads the bank as
export wrote it and writes adapters PEFT trains; only `adapter_writer` needs PEFT and the base weights.
"""
