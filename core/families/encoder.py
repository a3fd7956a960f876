"""Encoder sequence classifiers (BERT, RoBERTa, ...; also a causal LM's checkpoint deployed as a classifier)."""

from .base import Family

FAMILY = Family(
    name="encoder", words="classifiers", task_type="SEQ_CLS", auto_model="AutoModelForSequenceClassification",
    classifies=True, generation=None, graph_output="features", prompt_padding="right",
    new_tokens_take_positions=False, forward_rows=True, encoder_decoder=False,
    noprefix_graph=True, decoder_graph=False, bench_seq_len=64, int8_full_sequence=True,
)
