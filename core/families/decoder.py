"""Causal LMs (decoder-only: GPT-2, Llama, SmolLM2, ...)."""

from .base import Family

FAMILY = Family(
    name="decoder", words="causal LMs", task_type="CAUSAL_LM", auto_model="AutoModelForCausalLM",
    classifies=False, generation="causal", graph_output="logits", prompt_padding="left",
    new_tokens_take_positions=True, forward_rows=True, encoder_decoder=False,
    noprefix_graph=False, decoder_graph=True, bench_seq_len=32, int8_full_sequence=False,
)
