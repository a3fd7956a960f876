"""Prompt tuning and P-tuning (PEFT PROMPT_TUNING, P_TUNING): T virtual input embeddings in front of the tokens.

For P-tuning PEFT saves the prompt encoder's *output*, so both reparameterisations arrive as plain embeddings.
"""

from .base import InputPromptKind


class Prompt(InputPromptKind):
    name = "prompt"
    peft_types = ("PROMPT_TUNING", "P_TUNING")


KIND = Prompt()
