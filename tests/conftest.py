"""Tiny random base models and PEFT prompt adapters, saved and loaded back the way users do."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore")


def _share_the_cores() -> None:
    """pytest-xdist workers share the cores: each runs its engines and torch on its share (at least one thread), as
    PROMPTMUX_THREADS tells processes sharing a machine to; the servers and CLI processes tests start inherit it.
    Left at the engines' defaults (a thread per core in every worker, ONNX Runtime's spinning), two workers on the
    2-core Intel Xeon of 2026-12-04 took 627 and 657 s with every core oversubscribed; one thread each, 535 s.
    A PROMPTMUX_THREADS already set is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or os.environ.get("PROMPTMUX_THREADS"):
        return
    share = str(max(1, len(os.sched_getaffinity(0)) // workers))
    os.environ["PROMPTMUX_THREADS"] = share
    os.environ.setdefault("OMP_NUM_THREADS", share)
    torch.set_num_threads(int(share))


_share_the_cores()

VOCAB = 120


def tiny_config(arch: str):
    from transformers import BertConfig, DistilBertConfig, GPT2Config, LlamaConfig, RobertaConfig, T5Config

    if arch == "bert":
        return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=37, max_position_embeddings=64, num_labels=3, pad_token_id=0)
    if arch == "roberta":
        return RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=37, max_position_embeddings=66, num_labels=3, pad_token_id=1,
                             bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    if arch == "distilbert":
        return DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                max_position_embeddings=64, num_labels=3, pad_token_id=0)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                          eos_token_id=0)
    if arch == "llama":  # grouped-query attention: 4 heads, 2 key/value heads
        return LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "t5":  # initializer_factor > 1: a tiny random T5 otherwise repeats one token forever
        return T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2,
                        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                        initializer_factor=2.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    if arch in FAMILIES:
        from transformers import AutoConfig

        model_type, sizes = FAMILIES[arch]
        return AutoConfig.for_model(model_type, **sizes)
    raise ValueError(arch)


# The other families users prompt-tune, each a tiny random model (tests/test_families.py): model type and config.
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=37, max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
_MHA = {k: v for k, v in _DECODER.items() if k != "num_key_value_heads"}
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                num_labels=3)
_BART = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
             init_std=0.5, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
FAMILIES = {
    "qwen2": ("qwen2", _DECODER),
    "qwen3": ("qwen3", dict(_DECODER, head_dim=8)),
    "mistral": ("mistral", dict(_DECODER, sliding_window=32)),  # the tests' sequences fit the window
    "gemma": ("gemma", dict(_DECODER, head_dim=8)),
    "gemma2": ("gemma2", dict(_DECODER, head_dim=8, sliding_window=32, query_pre_attn_scalar=8)),
    "phi3": ("phi3", _DECODER),
    "olmo": ("olmo", _DECODER),
    "granite": ("granite", _DECODER),
    "gpt_neox": ("gpt_neox", _MHA),
    # Falcon-40B's layout: the new decoder architecture, grouped key/values broadcast to every head in the cache
    "falcon": ("falcon", dict(_MHA, new_decoder_architecture=True, num_kv_heads=2, alibi=False, bias=False)),
    # OPT-350m's and ELECTRA-small's layout: token embeddings narrower than the hidden size, projected up inside
    # the model (OPT's also back down before the head); input-level prompts are that narrow (PEFT's token_dim)
    "opt": ("opt", dict(_MHA, ffn_dim=37, word_embed_proj_dim=16)),
    "xlm-roberta": ("xlm-roberta", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=37, max_position_embeddings=66, num_labels=3,
                                        pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)),
    "electra": ("electra", dict(_ENCODER, embedding_size=16, max_position_embeddings=64, pad_token_id=0)),
    "mpnet": ("mpnet", dict(_ENCODER, max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    "deberta-v2": ("deberta-v2", dict(_ENCODER, max_position_embeddings=64, pad_token_id=0, relative_attention=True,
                                      pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=16,
                                      position_biased_input=False)),
    "modernbert": ("modernbert", dict(_ENCODER, max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                                      eos_token_id=3, cls_token_id=2, sep_token_id=3, global_attn_every_n_layers=2,
                                      local_attention=4)),  # local layers: rows longer than the window
    # Encoder classifiers without a row: their rules read from the class (core/archs.py generic_encoder), verified
    # against PEFT at export. ERNIE: BERT's pooler and linear head; Data2Vec-text: RoBERTa's positions and head.
    "ernie": ("ernie", dict(_ENCODER, max_position_embeddings=64, pad_token_id=0)),
    "data2vec-text": ("data2vec-text", dict(_ENCODER, max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                                            eos_token_id=2, type_vocab_size=1)),
    # A causal LM trained as a sequence classifier (PEFT SEQ_CLS on AutoModelForSequenceClassification), from the
    # causal-LM checkpoint users start from: the export takes the classifier from the adapters' task type.
    "qwen2-cls": ("qwen2", dict(_DECODER, num_labels=3)),
    # init_std > 0.02: a tiny random BART otherwise repeats one token; generate forces EOS last (its default config)
    "bart": ("bart", _BART),
    "mbart": ("mbart", dict(_BART, scale_embedding=True)),
    # BART's descendants: sinusoidal positions (Marian, Pegasus; M2M100's from padding_idx + 1), pre-LayerNorm
    # (Pegasus, M2M100, Blenderbot), the embedding LayerNorm before the positions (BlenderbotSmall); scale_embedding
    # on where the real checkpoints have it (Marian, Pegasus and BlenderbotSmall scale in the encoder's forward)
    "marian": ("marian", dict(_BART, scale_embedding=True, decoder_start_token_id=1)),
    "pegasus": ("pegasus", dict(_BART, scale_embedding=True, decoder_start_token_id=1)),
    "m2m_100": ("m2m_100", dict(_BART, scale_embedding=True)),
    "blenderbot": ("blenderbot", dict(_BART, decoder_start_token_id=1)),
    "blenderbot-small": ("blenderbot-small", dict(_BART, scale_embedding=True, decoder_start_token_id=1)),
    # Seq2seq families without a row, verified against PEFT at export: PLBart (BART's decoder, read from the
    # modules), UMT5 (T5's, a relative position bias in every block)
    "plbart": ("plbart", _BART),
    "umt5": ("umt5", dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2,
                          num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                          initializer_factor=2.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
    "mt5": ("mt5", dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2,
                        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                        initializer_factor=2.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
}


def is_encoder(arch: str) -> bool:
    """A sequence classifier (an encoder's, or a causal LM's: `-cls`)."""
    return arch in ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "mpnet", "deberta-v2", "modernbert",
                    "ernie", "data2vec-text") or is_causal_classifier(arch)


def is_causal_classifier(arch: str) -> bool:
    return arch.endswith("-cls")


def is_seq2seq(arch: str) -> bool:
    return arch in ("t5", "mt5", "bart", "mbart", "marian", "pegasus", "m2m_100", "blenderbot", "blenderbot-small",
                    "plbart", "umt5")


def base_class(arch: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    if is_seq2seq(arch):
        return AutoModelForSeq2SeqLM
    return AutoModelForSequenceClassification if is_encoder(arch) else AutoModelForCausalLM


def make_base(arch: str, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cls = AutoModelForCausalLM if is_causal_classifier(arch) else base_class(arch)
    model = cls.from_config(tiny_config(arch)).eval()
    model.save_pretrained(folder)
    return folder


# name -> (factory(task_type, dims) -> PeftConfig). Sizes differ on purpose: mixed batches then
# hold tasks with different numbers of virtual tokens and ranks.
def adapter_configs(arch: str) -> dict:
    from peft import (
        CartridgeConfig,
        CPTConfig,
        MultitaskPromptTuningConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
    )

    tt = "SEQ_CLS" if is_encoder(arch) else "SEQ_2_SEQ_LM" if is_seq2seq(arch) else "CAUSAL_LM"
    # DistilBERT's config uses other attribute names than PEFT looks for: give the sizes explicitly.
    dims = dict(token_dim=32, num_layers=2, num_attention_heads=4) if arch == "distilbert" else \
        dict(token_dim=16) if arch in NARROW_EMBEDDINGS else {}
    cfgs = {
        "pt": PromptTuningConfig(task_type=tt, num_virtual_tokens=4, **dims),
        "ptmlp": PromptEncoderConfig(task_type=tt, num_virtual_tokens=3, encoder_hidden_size=16,
                                     encoder_reparameterization_type="MLP", **dims),
        "ptlstm": PromptEncoderConfig(task_type=tt, num_virtual_tokens=5, encoder_hidden_size=16,
                                      encoder_reparameterization_type="LSTM", **dims),
        "mpt": MultitaskPromptTuningConfig(task_type=tt, num_virtual_tokens=4, num_tasks=3, num_ranks=2, **dims),
        "mpt1": MultitaskPromptTuningConfig(task_type=tt, num_virtual_tokens=6, num_tasks=1, num_ranks=1, **dims),
    }
    if arch not in NO_PREFIX:
        cfgs["prefix"] = PrefixTuningConfig(task_type=tt, num_virtual_tokens=4)
        cfgs["prefixproj"] = PrefixTuningConfig(task_type=tt, num_virtual_tokens=2, prefix_projection=True,
                                                encoder_hidden_size=24)
        # Cartridges: PEFT serves them like prefix tuning for every task type
        cfgs["cartridge"] = CartridgeConfig(task_type=tt, num_virtual_tokens=3, num_frozen_tokens=1)
    if tt == "CAUSAL_LM" and arch not in NARROW_EMBEDDINGS:  # CPT: causal LMs only; its prompt starts from these
        # tokens' embeddings (PEFT's CPT resets token_dim to the hidden size: it cannot run on narrow embeddings)
        cfgs["cpt"] = CPTConfig(task_type=tt, cpt_token_ids=[5, 6, 7, 8, 9], cpt_mask=[1] * 5,
                                cpt_tokens_type_mask=[1, 2, 2, 3, 4])
    return cfgs


# Families whose token embeddings are narrower than the hidden size (FAMILIES): PEFT's input-level prompts need
# token_dim set to that width (its default is the hidden size); prefixes stay at the attention's width.
NARROW_EMBEDDINGS = ("opt", "electra")

# Families whose attention takes no past key/values: PEFT cannot prefix-tune them (nor serve cartridges).
NO_PREFIX = ("distilbert", "mpnet", "deberta-v2", "modernbert")

# PEFT methods whose virtual tokens are a key/value prefix (no positions of their own in the outputs)
KV_PREFIX_METHODS = ("PREFIX_TUNING", "CARTRIDGE")


def make_adapter(arch: str, base_dir: Path, peft_config, folder: Path, seed: int, train_steps: int = 2) -> Path:
    """Train a few steps, then randomise the trainable weights so every task is clearly distinct."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    base = base_class(arch).from_pretrained(base_dir)
    model = get_peft_model(base, peft_config)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(3, VOCAB, (2, 6))
    kw = {"task_ids": torch.tensor([0, 0])} if peft_config.peft_type == "MULTITASK_PROMPT_TUNING" else {}
    if peft_config.peft_type == "CPT":  # CPT's training loss weighs tokens by their type
        kw = {"input_type_mask": torch.tensor([[1, 2, 2, 3, 4, 4]] * 2)}
    labels = torch.tensor([0, 1]) if is_encoder(arch) else ids
    if arch == "m2m_100":  # transformers' M2M100 makes decoder ids from the labels beside PEFT's decoder embeddings,
        train_steps = 0  # then refuses both: only the randomised weights below (what every fixture serves anyway)
    for _ in range(train_steps):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **kw).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(folder)
    return folder


def random_batch(arch: str, rows: int, seq: int, seed: int, padding_side: str):
    """Token ids and a mask with varied padding; pads carry the model's pad id like a tokenizer's output."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(rows, seq))
    mask = np.ones_like(ids)
    for i in range(rows):
        pad = i % min(4, seq - 1)
        if pad:
            if padding_side == "left":
                mask[i, :pad] = 0
            else:
                mask[i, -pad:] = 0
    pad_id = tiny_config(arch).pad_token_id or 0
    ids = np.where(mask == 1, ids, pad_id)
    return ids, mask


def peft_rows(arch: str, base_dir: Path, adapter_dir: Path, ids: np.ndarray, mask: np.ndarray,
              mpt_task: int | None = None) -> list[np.ndarray]:
    """PEFT eager output per row, in the runtime's format (virtual tokens and pads removed for LMs)."""
    from peft import PeftConfig, PeftModel

    base = base_class(arch).from_pretrained(base_dir).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()

    def run(ids, mask):
        kw = {"task_ids": torch.full((ids.shape[0],), mpt_task)} if mpt_task is not None else {}
        with torch.inference_mode():
            return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kw).logits.numpy()

    if is_causal_classifier(arch):  # each row alone: PEFT pools the last position, a pad in a right-padded batch
        return [run(ids[i:i + 1, mask[i] == 1], mask[i:i + 1, mask[i] == 1])[0] for i in range(ids.shape[0])]
    logits = run(ids, mask)
    if is_encoder(arch):
        return list(logits)
    cfg = PeftConfig.from_pretrained(adapter_dir)
    skip = 0 if cfg.peft_type in KV_PREFIX_METHODS else cfg.num_virtual_tokens
    return [logits[i, skip:][mask[i].astype(bool)] for i in range(ids.shape[0])]


def peft_generate(fx, task: str, ids: np.ndarray, mask: np.ndarray, new_tokens: int = 7) -> list[list[int]]:
    """PEFT's greedy generate for one task (MPT: NAME/t), the new tokens per row. PEFT runs with its defaults
    (use_cache=True); eos_token_id=None keeps it generating the full length; pad_token_id is given because some
    tiny causal configs have none."""
    from peft import PeftModel

    adapter, _, t = task.partition("/")
    base = base_class(fx.arch).from_pretrained(fx.base).eval()
    model = PeftModel.from_pretrained(base, fx.adapters[adapter]).eval()
    kw = {"task_ids": torch.full((ids.shape[0],), int(t))} if t else {}
    with torch.inference_mode():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
    # Causal LMs return the prompt then the new tokens; seq2seq returns the decoder start token then the new ones.
    return out[:, 1 if is_seq2seq(fx.arch) else ids.shape[1]:].tolist()


class Fixture:
    def __init__(self, arch: str, root: Path, adapters: tuple[str, ...] | None = None, build: bool = True):
        """adapters: which of adapter_configs(arch) the deployment holds (default: all of them). build=False: the
        files are already in root (a shared build, `built_once`)."""
        from promptmux import export_deployment

        self.arch = arch
        self.base = root / "base"
        cfgs = {n: c for n, c in adapter_configs(arch).items() if adapters is None or n in adapters}
        self.adapters: dict[str, Path] = {name: root / "adapters" / name for name in cfgs}
        self.deploy = root / "deploy"
        self._runtimes: dict[str, object] = {}
        if build:
            make_base(arch, self.base)
            for seed, (name, cfg) in enumerate(cfgs.items()):
                make_adapter(arch, self.base, cfg, self.adapters[name], seed=seed + 1)
            export_deployment(self.base, self.adapters, self.deploy, quiet=True)

    @classmethod
    def shared(cls, tmp_path_factory, arch: str, adapters: tuple[str, ...] | None = None, name: str = "") -> Fixture:
        """One build per test run, whichever pytest-xdist worker asks first."""
        root = built_once(tmp_path_factory, name or f"fx-{arch}", lambda folder: cls(arch, folder, adapters))
        return cls(arch, root, adapters, build=False)

    def runtime(self, backend: str = "onnxruntime"):
        """A Runtime on the deployment, one per backend, kept for the tests of this process that only read it."""
        from promptmux import Runtime

        if backend not in self._runtimes:
            self._runtimes[backend] = Runtime(self.deploy, backend=backend)
        return self._runtimes[backend]

    def task_names(self) -> list[str]:
        from peft import PeftConfig

        names = []
        for name, path in self.adapters.items():
            cfg = PeftConfig.from_pretrained(path)
            if cfg.peft_type == "MULTITASK_PROMPT_TUNING":
                names += [f"{name}/{t}" for t in range(cfg.num_tasks)]
            else:
                names.append(name)
        return names

    def reference(self, task: str, ids, mask) -> list[np.ndarray]:
        adapter, _, t = task.partition("/")
        return peft_rows(self.arch, self.base, self.adapters[adapter], ids, mask, int(t) if t else None)


# ---- builds shared by the whole run ------------------------------------------------------------------------------
# The README's test command runs the suite on pytest-xdist workers (one process each). An export is the slow part
# of most tests, so each deployment the tests share is built once per run, not once per worker: the first worker
# to need it builds it under a file lock while any other waits, then all of them read the same files. Tests must
# therefore never change a shared deployment (copy it first), as another process may be reading it.
@pytest.hookimpl(wrapper=True, tryfirst=True)  # around pytest-xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """A module's tests on one worker, unless a test names its own group (test_families.py: one per family): a
    module's own fixtures (servers, module-scoped builds) are then started once. Once every other hook has ordered
    the items (pytest orders them by their shared fixtures), the groups are put longest first (GROUP_SECONDS)."""
    for item in items:
        if not any(item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    result = yield
    items.sort(key=lambda item: -_seconds(_group(item)))  # stable: a group's own order is kept
    return result


def _group(item) -> str:
    return next(item.iter_markers("xdist_group")).args[0]


def _seconds(group: str) -> float:
    return GROUP_SECONDS.get(group, FAMILY_SECONDS if group.startswith("family-") else 0)


# Seconds each slow group took (setup + call, summed from `--durations=0` on a 2-core Intel Xeon with AMX, 2026-12-04,
# one engine thread per worker). Only the order matters: pytest-xdist hands the groups out in collection order (with
# its reordering by test count turned off below), and a long group handed out last keeps one worker busy while the
# other has finished. The families (one group each) come next; the shortest groups fill in the end.
GROUP_SECONDS = {"test_bench": 129, "test_folding_and_bank": 88, "test_serve": 80, "test_smollm2_demo": 61,
                 "test_tensorrt": 51, "test_serve_ray": 48, "test_generate": 32, "test_precision": 31,
                 "test_serve_fuzz": 31, "test_cli": 27, "test_hardening": 22, "test_demo": 18, "test_fidelity": 13,
                 "test_errors": 13, "kserve": 12}
FAMILY_SECONDS = 12


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.6 sorts groups by test count by default
        config.option.loadscopereorder = False


def pytest_sessionfinish(session):
    """Each test process (pytest-xdist's workers too) removes its servers' logs (servekit.SCRATCH) at its end."""
    import shutil
    import sys

    servekit = sys.modules.get("servekit")
    if servekit is not None:
        shutil.rmtree(servekit.SCRATCH, ignore_errors=True)


def pytest_xdist_auto_num_workers(config):
    """-n auto: one worker more than cores, at most 4 (each holds its own models and graphs, and the builds they
    share are made once whatever the count), each on one engine thread (_share_the_cores). Many tests wait on a
    server or a process they started, which leaves a core idle; the extra worker fills it. On the 2-core Intel
    Xeon of 2026-12-04, one thread per worker: 3 workers ran the suite in 485 s, 2 in 535 s."""
    return max(1, min(len(os.sched_getaffinity(0)) + 1, 4))


def shared_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()  # a worker's is <run>/popen-gwN: builds go beside, in <run>/shared
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"


def copy_deployment(src: Path, dst: Path) -> Path:
    """A copy of a shared deployment to change. Without the task store's write-ahead log and shared-memory index:
    another worker's Runtime reading the store holds them open and removes them when it closes, possibly midway
    through the copy; nothing writes to a shared deployment, so they hold no change of their own."""
    import shutil

    return Path(shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*-wal", "*-shm")))


def built_once(tmp_path_factory, name: str, build) -> Path:
    """build(folder) once per test run; returns the folder. A build that failed midway is started again."""
    import shutil

    from filelock import FileLock

    root = shared_root(tmp_path_factory)
    root.mkdir(parents=True, exist_ok=True)
    folder, done = root / name, root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


_FIXTURES: dict[str, Fixture] = {}


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The embedded default as `promptmux demo` writes and runs it (the real MiniLM, both demo tasks), exported
    once for every test that reads it. Tests must not change the deployment."""
    import json

    def build(folder: Path):
        from promptmux.demo import run_demo

        (folder / "result.json").write_text(json.dumps(run_demo(folder / "deploy", quiet=True)))

    return json.loads((built_once(tmp_path_factory, "demo", build) / "result.json").read_text())


@pytest.fixture(scope="session")
def text_deployments(tmp_path_factory):
    """Tiny BERT and GPT-2 deployments that take text (tests/servekit.py), for the server tests."""
    import servekit

    return servekit.text_deployments(tmp_path_factory)


@pytest.fixture(scope="session")
def deployment(request, tmp_path_factory):
    """One exported deployment per architecture, shared by the tests of that architecture."""
    arch = request.param
    if arch not in _FIXTURES:
        _FIXTURES[arch] = Fixture.shared(tmp_path_factory, arch)
    return _FIXTURES[arch]


# ---- the CPU: no test assumes which one it runs on --------------------------------------------------------------
# Machines differ (Intel with AMX, AMD with or without AVX512-BF16). PROMPTMUX_TEST_CPU=no-bf16 runs the suite as
# on a CPU without bf16 (an AMD Zen 3): OpenVINO's reported capability is forced off in every test, so each bf16
# test takes its refusal branch or skips saying why. .ci/run runs the precision tests that way too.
FORCED_CPU = os.environ.get("PROMPTMUX_TEST_CPU", "")
if FORCED_CPU not in ("", "no-bf16"):
    raise pytest.UsageError(f"PROMPTMUX_TEST_CPU={FORCED_CPU!r}: the only forced CPU is 'no-bf16'")


@pytest.fixture(autouse=FORCED_CPU == "no-bf16")
def _cpu_without_bf16(monkeypatch):
    from promptmux.runtime import backends

    monkeypatch.setattr(backends, "cpu_has_bf16", lambda: False)


@pytest.fixture
def bf16_cpu():
    """For tests of the bf16 path itself: skips, naming this CPU, where OpenVINO computes no bf16. The refusal
    there is tested on every CPU (test_precision.py: test_bf16_is_refused_where_the_cpu_has_none)."""
    from promptmux.runtime import backends
    from promptmux.runtime.cpu import describe

    if FORCED_CPU == "no-bf16":
        pytest.skip("bf16 forced off (PROMPTMUX_TEST_CPU=no-bf16: as on a CPU without AMX / AVX512-BF16)")
    if not backends.cpu_has_bf16():
        pytest.skip(f"this CPU has no bf16 (AMX / AVX512-BF16): {describe()}")
