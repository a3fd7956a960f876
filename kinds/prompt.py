"""Prompt tuning and P-tuning (PEFT PROMPT_TUNING, P_TUNING): T virtual input embeddings in front of the tokens.

For P-tuning PEFT saves the prompt encoder's *output*, so both reparameterisations arrive as plain embeddings.
"""

import numpy as np

from promptmux.core.task import Task

from .base import InputPromptKind


class Prompt(InputPromptKind):
    name = "prompt"
    peft_types = ("PROMPT_TUNING", "P_TUNING")

    def from_prompt(self, name: str, prompt: np.ndarray, **meta) -> Task:
        """A prompt-tuning task of its virtual token embeddings [T, d], made rather than read from an adapter
        (meta: Task's head, labels, source)."""
        return Task(name, self.name, "PROMPT_TUNING", prompt.shape[0], {"prompt": prompt}, **meta)


KIND = Prompt()
