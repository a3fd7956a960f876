"""`Family`: what a model family (encoder classifier, causal LM, seq2seq LM) means to promptmux.

A family is data: each field says how one part of promptmux treats the family's models, so that code asks the
family (`spec.family.classifies`, `.prompt_padding`, ...) instead of comparing its name. One module per family
in this package (`encoder.py`, `decoder.py`, `seq2seq.py`), as the prompt kinds are one module each.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, eq=False)  # one object per family: equal only to itself
class Family:
    name: str  # as the manifest records it (base.family) and the tables of runtime/backends.py name it
    words: str  # the family in messages ("classifiers")
    task_type: str  # the PEFT task_type its adapters carry
    auto_model: str  # the transformers Auto class that loads its base model
    # A classification head per task: classify(), labels, heads in the bank, /v1/classify, KServe v2 infer.
    classifies: bool
    # How tokens are generated: "causal" (runtime/generate.py), "seq2seq" (runtime/seq2seq_generate.py) or None.
    generation: str | None
    graph_output: str  # the full-sequence graph's output as the manifest describes it
    # The side prompts are padded on: a causal LM continues each row's last token (left); a seq2seq encoder is
    # bidirectional with relative positions, and right padding keeps every row independent of the batch.
    prompt_padding: str
    # Whether generated tokens share the prompt's positions (a causal LM) or go to a decoder of their own.
    new_tokens_take_positions: bool
    # Whether forward() gives each row's outputs over its tokens (a seq2seq full-sequence graph is its encoder).
    forward_rows: bool
    # An encoder-decoder: encoder graph plus decoder step (export/seq2seq_export.py, core/seq2seq_graph.py), eager
    # attention, PEFT prefixes over the decoder's self and cross attention (num_transformer_submodules 2).
    encoder_decoder: bool
    # Graphs the exporter writes beside the full-sequence one: the graph without prefix inputs (an encoder's
    # prompt-only batches) and the cached decoder step (language models).
    noprefix_graph: bool
    decoder_graph: bool
    bench_seq_len: int  # the benchmark's default sequence length
    # int8 at run time: the full-sequence graph quantized (a classifier's), or only the cached decoder step.
    int8_full_sequence: bool

    def __str__(self) -> str:
        return self.name

    def __eq__(self, other) -> bool:
        if isinstance(other, str):  # `spec.family == "encoder"`: always False, so refused rather than wrong
            raise TypeError(f"a Family compared with {other!r}: ask the family (its fields, core/families) instead")
        return self is other

    __hash__ = object.__hash__

    def new_token_room(self, max_new_tokens: int) -> int:
        """The positions a prompt must leave free for max_new_tokens generated after it."""
        return max_new_tokens if self.new_tokens_take_positions else 0

    def submodules_message(self, subs: int) -> str | None:
        """Why num_transformer_submodules=subs is refused for an adapter of this family, or None."""
        if self.encoder_decoder:
            return None if subs in (1, 2) else (
                f"has num_transformer_submodules={subs}; PEFT builds seq2seq adapters with 2 (1 is also accepted "
                "for input-level prompts). Recreate it with PEFT's default")
        return None if subs == 1 else (f"has num_transformer_submodules={subs}; encoder-only and decoder-only "
                                       "models use 1")

    def auto_class(self):
        """The transformers class that loads this family's base model."""
        import transformers

        return getattr(transformers, self.auto_model)
