"""Context-aware Prompt Tuning (PEFT CPT, causal LMs only): an input-level prompt built from the token embeddings
of example text (cpt_token_ids) plus learned deltas, each delta's norm capped during training.

What reaches the model at inference is one fixed matrix: PEFT saves `prompt_embeddings` [T, d] already equal to
embedding(cpt_token_ids) + the capped delta, and its inference forward puts it in front of the token embeddings
with T ones in front of the mask and no position ids (positions count every slot), exactly as prompt tuning does.
The cpt_* and opt_* fields of the config only shape training (the loss weights, the delta caps).
"""

from .base import InputPromptKind


class ContextAwarePrompt(InputPromptKind):
    name = "cpt"
    peft_types = ("CPT",)
    families = ("decoder",)  # CPTConfig accepts task_type CAUSAL_LM only

    def check_config(self, ctx):
        # PEFT fills num_layers / num_attention_heads from the model and sets num_virtual_tokens to
        # len(cpt_token_ids); the sizes that matter are the hidden size and the token count.
        token_ids = ctx.cfg.get("cpt_token_ids")
        if isinstance(token_ids, list) and len(token_ids) != ctx.n:
            raise ctx.fail(f"has {len(token_ids)} cpt_token_ids but num_virtual_tokens={ctx.n}; PEFT keeps them equal: "
                           "re-save the adapter with PEFT")
        super().check_config(ctx)


KIND = ContextAwarePrompt()
