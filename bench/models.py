"""Benchmark models, adapters and deployments that need no download, built once and cached (keyed by their
recipe and the export code's source): random-weight GPT-2 / Llama configs, the SmolLM2 checkpoint, PEFT
prompt-tuning adapters at the scale of the embeddings, and their exported deployments."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

CACHE_FORMAT = 1


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Skip(Exception):
    """A model that cannot be benchmarked here (the reason is printed and recorded)."""


def default_cache() -> Path:
    """Where built models, adapters and deployments are kept: $PROMPTMUX_BENCH_CACHE or ~/.cache/promptmux/bench."""
    return Path(os.environ.get("PROMPTMUX_BENCH_CACHE") or Path.home() / ".cache" / "promptmux" / "bench")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def export_code_hash() -> str:
    """Digest of the export code: a cached deployment is rebuilt when the exporter changes."""
    import promptmux.export as ex
    import promptmux.kernels as kn

    h = hashlib.sha256()
    for pkg in (ex, kn):
        for f in sorted(Path(pkg.__file__).parent.glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _cached(folder: Path, fresh: bool, build) -> Path:
    """Build into folder once (atomically: a temporary sibling renamed into place)."""
    done = folder / ".complete"
    if done.is_file() and not fresh:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    build(tmp)
    os.replace(tmp, folder)
    (folder / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    return folder


def model_config(name: str, quick: bool):
    """The transformers config of a random-weight model (None: a real checkpoint)."""
    from transformers import GPT2Config, LlamaConfig

    if name == "gpt2-small":
        if quick:
            return GPT2Config(vocab_size=500, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0,
                              eos_token_id=0)
        return GPT2Config()  # 12 layers, 768 hidden, 12 heads, vocab 50257, 1024 positions
    if name == "smollm2" and quick:  # a tiny model of SmolLM2's family (Llama, grouped-query attention)
        return LlamaConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=48, max_position_embeddings=256,
                           bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    return None


def base_model(name: str, quick: bool, cache: Path, fresh: bool, seed: int) -> tuple[Path, str]:
    """The base model folder and a line describing it."""
    config = model_config(name, quick)
    if config is not None:
        import torch
        from transformers import AutoModelForCausalLM

        key = _hash({"format": CACHE_FORMAT, "config": config.to_dict(), "seed": seed, "kind": "random"})

        def build(tmp: Path):
            log(f"{name}: creating random base model ({config.model_type}, seed {seed})")
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config).eval()
            model.save_pretrained(tmp)

        folder = _cached(cache / f"base-{name}{'-quick' if quick else ''}-{key}", fresh, build)
        return folder, f"random weights (torch seed {seed}), {describe_config(config)}"
    try:
        from promptmux.demo.smollm2 import smollm2_base_dir
    except ImportError as e:
        raise Skip(f"promptmux.demo.smollm2 is not importable ({e})") from None
    try:
        folder = Path(smollm2_base_dir())
    except Exception as e:  # noqa: BLE001 - whatever keeps the checkpoint from being there
        raise Skip(f"smollm2_base_dir() failed: {type(e).__name__}: {e}") from None
    if not (folder / "config.json").is_file():
        raise Skip(f"smollm2_base_dir() returned {folder}, which has no config.json")
    from transformers import AutoConfig

    return folder, f"checkpoint {folder}, {describe_config(AutoConfig.from_pretrained(str(folder)))}"


def describe_config(config) -> str:
    from promptmux.core.archs import dims_of

    d = dims_of(config)
    return (f"{config.model_type}: {d.num_layers} layers, hidden {d.hidden_size}, {d.num_heads} heads "
            f"({d.num_kv_heads} kv), vocab {d.vocab_size}")


def make_adapter(base_dir: Path, num_virtual_tokens: int, seed: int, cache: Path, fresh: bool) -> Path:
    """A PEFT prompt-tuning adapter (CAUSAL_LM), random init at the scale of the model's embeddings."""
    import torch
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    key = _hash({"format": CACHE_FORMAT, "base": base_dir.resolve(), "config": _config_text(base_dir),
                 "p": num_virtual_tokens, "seed": seed})

    def build(tmp: Path):
        log(f"creating PEFT prompt-tuning adapter ({num_virtual_tokens} virtual tokens, seed {seed})")
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                                        prompt_tuning_init="RANDOM"))
        scale = float(base.get_input_embeddings().weight.detach().float().std())
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
        model.save_pretrained(str(tmp))

    return _cached(cache / f"adapter-p{num_virtual_tokens}-{key}", fresh, build)


def _config_text(base_dir: Path) -> str:
    return (base_dir / "config.json").read_text()


def make_deployment(base_dir: Path, adapters: dict[str, Path], cache: Path, fresh: bool) -> Path:
    from promptmux.export.deploy import export_deployment

    key = _hash({"format": CACHE_FORMAT, "base": base_dir.resolve(), "config": _config_text(base_dir),
                 "adapters": {k: str(v.resolve()) for k, v in adapters.items()}, "export": export_code_hash()})

    def build(tmp: Path):
        log(f"exporting deployment ({', '.join(adapters)}) from {base_dir.name}")
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_deployment(base_dir, adapters, tmp, quiet=True, overwrite=True)
        log(f"export took {time.perf_counter() - t:.1f} s")

    folder = _cached(cache / f"deploy-{base_dir.name}-{key}", fresh, build)
    for stale in cache.glob(f"deploy-{base_dir.name}-*"):  # deployments of older export code (about 1 GB each)
        if stale != folder and stale.is_dir() and not stale.name.endswith(".tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    return folder
