"""Text in and out: the deployment's tokenizer, the one rule for text that does not fit the model's positions, and
the token ids that end a row by default (generation_defaults)."""

from __future__ import annotations

import json
import logging
from pathlib import Path


def load_tokenizer(deploy_dir: str | Path):
    """The deployment's tokenizer, set up once for every use: its "Token indices sequence length is longer than
    ..." warning is turned off (promptmux checks every row against the model's positions itself, see too_long, with
    the row's task), and a tokenizer without a pad token (GPT-2 style) pads with its end-of-sequence token (padded
    positions are masked out). The padding side is each caller's: it is passed per call, never set here."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(deploy_dir))
    tok.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True  # "already warned"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def too_long(tokens: int, virtual_tokens: int, task: str, limit: int | None, new_tokens: int = 0,
             new_name: str = "max_new_tokens") -> str | None:
    """Why a row does not fit `limit` positions, or None when it fits: the one fit check of the runtime, the
    server and the benchmarks. A row uses its tokens, its task's virtual tokens and, when it generates after them,
    `new_tokens` more (named `new_name` in the message, as the caller's request names them)."""
    if not limit or tokens + virtual_tokens + new_tokens <= limit:
        return None
    new = f" + {new_name}={new_tokens}" if new_tokens else ""
    return (f"{tokens} tokens + {virtual_tokens} virtual tokens of task {task!r}{new} exceed the model's {limit} "
            "positions")


# generation_config.json settings that change greedy tokens in transformers' generate, with their no-op values:
# promptmux does not apply them, so where one is set its tokens differ from PEFT's generate (the generator warns)
UNAPPLIED = {"repetition_penalty": 1.0, "num_beams": 1, "no_repeat_ngram_size": 0, "min_new_tokens": None,
             "min_length": 0, "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None}


def generation_defaults(deploy_dir: str | Path, config):
    """The token id(s) that end a row by default, as transformers' generate reads them: the generation config's
    (copied from the base model at export; an instruct model's may add its end of turn, as Llama 3's and Qwen2's
    do), else the model config's. Read once per generator, which is also when a warning names the settings of the
    generation config that promptmux does not apply (UNAPPLIED)."""
    path = Path(deploy_dir) / "generation_config.json"
    gen = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    unapplied = {k: gen[k] for k, neutral in UNAPPLIED.items() if gen.get(k, neutral) not in (neutral, None, [])}
    if unapplied:
        logging.getLogger("promptmux.runtime").warning(
            "generation_config.json sets %s, which promptmux does not apply: tokens will differ from transformers' "
            "(and PEFT's) generate", ", ".join(f"{k}={v!r}" for k, v in unapplied.items()))
    eos = gen.get("eos_token_id")
    return eos if eos is not None else getattr(config, "eos_token_id", None)
