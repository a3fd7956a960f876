"""Seq2seq LMs (T5, BART and the families derived from them)."""

from .base import Family

FAMILY = Family(
    name="seq2seq", words="seq2seq models", task_type="SEQ_2_SEQ_LM", auto_model="AutoModelForSeq2SeqLM",
    classifies=False, generation="seq2seq", graph_output="present.{i}.encoder.key/value", prompt_padding="right",
    new_tokens_take_positions=False, forward_rows=False, encoder_decoder=True,
    noprefix_graph=False, decoder_graph=True, bench_seq_len=32, int8_full_sequence=False,
)
