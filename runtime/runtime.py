"""`promptmux.Runtime`: load a deployment and answer mixed-task batches (helpers: batch.py)."""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from promptmux.core.archs import arch_for, dims_of, position_offset, usable_positions
from promptmux.core.bank import UnknownTaskError
from promptmux.core.folder import (
    FOLDED_GRAPH,
    GRAPH,
    NOPREFIX_GRAPH,
    load_base_config,
    read_bank,
    read_manifest,
)
from promptmux.core.layout import build_layout
from promptmux.core.light_config import LightConfig, runtime_config
from promptmux.core.overlay import change_tasks
from promptmux.core.task import Task, same_prompt, task_name
from promptmux.kinds import kind_of

from .backends import BACKENDS, CPU_ENGINES, choose_backend
from .batch import apply_head, fitting_groups, label_scores, pad_ragged, pad_rows, run_batch, task_names
from .calibration import given_items
from .contract_record import fp32_layers
from .errors import BackendUnavailable, InputError
from .fast import resolve as fastest_precision
from .kv_cache import DEFAULT_KV_CACHE_BYTES
from .precision import contract
from .routing import Routing
from .routing import resolve as measured_routing
from .seq2seq_generate import decoder_too_long
from .text import load_tokenizer, too_long

PRECOMPUTED_AT_START = 4096  # tasks whose prompt KV is computed as generation starts (while the cache has room)
_ORT_DEVICE = "cuda"  # where backend "onnxruntime-cuda" binds its tensors (tests run the binding path on "cpu")
log = logging.getLogger("promptmux.runtime")


def _causal_generator(rt: Runtime, decoder):
    from .generate import Generator

    generator = Generator(rt, decoder)
    # The first tasks' prompt KV now, until the cache is full; the others' on first use.
    generator.precompute(rt.bank.page(PRECOMPUTED_AT_START)[0], until_full=True)
    return generator


def _seq2seq_generator(rt: Runtime, decoder):
    from .seq2seq_generate import Seq2SeqGenerator

    return Seq2SeqGenerator(rt, rt.session, decoder)


GENERATORS = {"causal": _causal_generator, "seq2seq": _seq2seq_generator}  # by Family.generation (core/families)
__all__ = ["InputError", "Runtime", "UnknownTaskError", "apply_head"]


class Runtime:
    """Serve every task of a deployment folder from one graph.

    backend: "auto" (the default: the fastest backend installed here that runs `precision`; `backend_reason`
    says why), "onnxruntime" (the exported graph on the CPU), "openvino" (the same graph compiled by OpenVINO's
    CPU plugin; fp32 or bf16), "onnxruntime+openvino" (fp32 classifiers: small batches on ONNX Runtime, large
    ones on OpenVINO, split where measured once per CPU kind, or at `route_positions`; routing.py),
    "onnxruntime-cuda" (CUDA execution provider with IO binding, the prompt bank resident on the GPU; needs
    onnxruntime-gpu), "tensorrt" (the engine written by `promptmux build-engine`; needs TensorRT and a GPU it
    accepts) or "torch" (eager PyTorch, the reference; it needs the base model folder recorded at export, or `base=`).

    precision: "fp32" (exact, the default), "bf16" (OpenVINO on AMX/AVX512-BF16 CPUs), "int8" (ONNX Runtime:
    int8 weights and products, for classifiers and causal-LM decoding) or "fast" (the fastest of them that meets
    its contract on this CPU, measured once per CPU kind; `fast` holds the record; runtime/fast.py). A non-exact
    precision is measured against fp32 the first time it runs on a deployment (on `calibration`: texts, rows
    per task, or a calibration file's path; generated inputs when None); the result is kept in the manifest
    (`contract`); a miss warns, or raises PrecisionError with strict=True. See runtime/precision.py.

    bank_cache_mb: the task views kept in RAM (least recently used go first; default 256 MB). Tasks are read from
    the deployment's store when first used, so a deployment of a million tasks opens as fast as one of two.
    kv_cache_mb: causal LMs: the precomputed prompt key/values kept (least recently used go first; default 512 MB),
    computed for the first tasks as generation starts and for the others on first use.
    """

    def __init__(self, deploy_dir: str | Path, backend: str = "auto", threads: int | None = None,
                 base: str | Path | None = None, use_folded: bool = True, device_id: int = 0,
                 precision: str = "fp32", strict: bool = False, calibration: Sequence | str | Path | None = None,
                 bank_cache_mb: float | None = None, kv_cache_mb: float | None = None,
                 route_positions: int | None = None):
        self.dir = Path(deploy_dir)
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
        self.manifest = read_manifest(self.dir)
        self.config = runtime_config(self.dir, self.manifest)  # without transformers where it can (light_config.py)
        self.spec = arch_for(self.config)
        self.dims = dims_of(self.config)
        self.fast = None
        cache = None if bank_cache_mb is None else int(bank_cache_mb * 2**20)
        self.bank = read_bank(self.dir, self.manifest, cache)  # opening reads no task (core/bank.py)
        calibration = given_items(calibration)  # texts or rows (a file's path: read)
        if precision == "fast":
            precision, self.fast = fastest_precision(self.dir, self.manifest, threads, calibration, type(self),
                                                     self.bank, self.spec.family)
            chosen = self.fast.get("backend")  # the backend of the precision that won (its int8: two of them)
            if backend == "auto" and chosen:
                backend = chosen
            elif chosen and backend != chosen:
                raise BackendUnavailable(
                    f"precision fast chose {precision} on {chosen} on this CPU ({self.fast['reason']}); pass "
                    f"--backend auto or {chosen} to run it, or a precision (--precision {precision}) for {backend}")
            self.manifest = read_manifest(self.dir)  # with the contracts and the choice just recorded
            calibration = None  # the chosen precision's contract was measured on it (and the deployment keeps it)
        self.backend, self.backend_reason = choose_backend(backend, precision, self.spec.family.name)
        if self.fast and self.fast.get("backend") and self.backend_reason == "requested":  # fast's, not the user's
            self.backend_reason = f"precision fast chose {precision} on it on this CPU"
        self.precision = precision
        self.int8_fp32_layers = fp32_layers(self.manifest) if precision == "int8" else ()  # accuracy_control.py
        self.device_id = device_id
        self.kv_cache_bytes = DEFAULT_KV_CACHE_BYTES if kv_cache_mb is None else int(kv_cache_mb * 2**20)
        self._lock = threading.Lock()  # serializes task changes, not requests
        self._tokenizer = None
        self.noprefix_session = None  # encoders: the graph without prefix inputs (backends.py noprefix_graph)
        # full-sequence batches run per graph file that ran (model.onnx, ...; a language model's prompt batches)
        self.graph_runs: Counter = Counter()
        self.max_positions = usable_positions(self.config)  # virtual and real tokens together (core/archs.py)
        folded = self.manifest.get("folded") if use_folded else None
        if folded and (folded["task"] not in self.bank or self.bank.digest(folded["task"]) != folded.get("digest")):
            log.warning("task %r changed since it was folded; serving it from the main graph", folded["task"])
            folded = None
        self.folded_task = folded["task"] if folded else None
        self.threads = threads
        self.routing = Routing(route_positions, given=True) if route_positions is not None else Routing()
        self.backend_state: dict = {}  # what the backend keeps for later sessions (backends.py)
        self.folded_session = None
        BACKENDS[self.backend].open(self, base)  # session, folded_session, noprefix_session (backends.py)
        # The folded graph has this task's prompt baked in: it serves only batches whose every view holds these
        # very arrays, so a task replaced or removed since goes back to the main graph by itself.
        self._folded_view = self.bank.view(self.folded_task) if self.folded_session is not None else None
        self._generator = None
        self.prepared: list[dict] = []  # what prepare() built, if it ran
        self.contract = None  # a non-exact precision's measured agreement with fp32 (manifest "precision")
        self.calibration_items = None  # the rows the contract is measured on (None: generated inputs; precision.py)
        self.routing_record = measured_routing(self, threads) if self.backend == "onnxruntime+openvino" else None
        if precision != "fp32":
            self.contract = contract(self, strict, calibration)

    def graph_session(self, path: Path, precision: str | None = None, keep_fp32: tuple[int, ...] | None = None):
        """A session over one ONNX graph of the deployment on this runtime's graph backend (backends.py), at its
        precision unless one is given (accuracy control opens fp32 twins)."""
        return BACKENDS[self.backend].graph_session(
            self, path, precision or self.precision, self.int8_fp32_layers if keep_fp32 is None else keep_fp32,
            _ORT_DEVICE)

    def prepare(self, progress=None) -> list[dict]:
        """Build every engine and graph this runtime's routing can pick, and run one small batch through each, so
        that no request pays for a build (runtime/prepare.py; the server calls it before it reports ready).
        Returns, and keeps in `prepared`, one {"graph", "engine", "seconds", "ran"} per engine."""
        from .prepare import prepare

        self.prepared = prepare(self, progress)
        return self.prepared

    @property
    def forward_precision(self) -> str:
        """The precision forward() runs: a language model's int8 is its cached decoder's (quantize.int8_graph)."""
        return "fp32" if self.precision == "int8" and not self.spec.family.int8_full_sequence else self.precision

    # ---- tasks ---------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return self.bank.names()

    def add_task(self, name: str, adapter_dir: str | Path, persist: bool = False, replace: bool = False,
                 root: str | Path | None = None) -> list[str]:
        """Load a PEFT adapter into the bank of this runtime (and the deployment folder if persist). root: every
        file read for the adapter must resolve inside this folder (see load_adapter)."""
        from promptmux.core.adapters import load_adapter

        return self.add_tasks(load_adapter(name, adapter_dir, self.hf_config, root=root), persist, replace)

    def add_tasks(self, tasks: list[Task], persist: bool = False, replace: bool = False) -> list[str]:
        """Add tasks already read (load_adapter) in one change: all of them, or none if one is refused."""
        self._change(lambda bank: bank.add(tasks, replace=replace), persist)
        if hasattr(self._generator, "precompute"):  # a running causal-LM generator: the new tasks' KV now
            self._generator.precompute([t.name for t in tasks])
        return [t.name for t in tasks]

    def remove_task(self, name: str, persist: bool = False) -> list[str]:
        removed = self._change(lambda bank: bank.remove(name), persist)
        if hasattr(self._generator, "precompute"):
            self._generator.precompute([])  # drops the removed tasks' key/values
        return removed

    def _change(self, change, persist: bool):
        """change(bank), as core/overlay.py change_tasks says: on the deployment's store with persist, else in this
        runtime only. A request holds the views it looked up, so it sees each of its tasks as it was or as it is."""
        with self._lock:
            self.bank, result = change_tasks(self.bank, self.dir, self.spec, change, persist)
        return result

    @functools.cached_property
    def hf_config(self):
        """The transformers config (reading adapters, the PyTorch model; loaded once); self.config may be a
        LightConfig."""
        return self.config if not isinstance(self.config, LightConfig) else load_base_config(self.dir)

    # ---- inference -----------------------------------------------------------------------
    @property
    def tokenizer(self):
        try:
            self._tokenizer = self._tokenizer or load_tokenizer(self.dir)
        except (OSError, ValueError, ImportError) as e:  # ImportError: its tokenizer class needs sentencepiece
            raise RuntimeError(f"{self.dir} has no tokenizer ({e}); pass token ids to forward()") from None
        return self._tokenizer

    def graph_for(self, views: list[Task]) -> tuple[object, str]:
        """(session, graph file name) of the full-sequence graph that serves a batch of these views: the folded
        graph when every row is the folded task, unchanged; the graph without prefix inputs (encoders) when no row
        has a key/value prefix (no empty cache concatenated in every layer); else the full graph."""
        fv = self._folded_view
        if fv is not None and all(same_prompt(v, fv) for v in views):
            return self.folded_session, FOLDED_GRAPH
        if self.noprefix_session is not None and all(kind_of(v).kv_prefix(v) is None for v in views):
            return self.noprefix_session, NOPREFIX_GRAPH
        return self.session, GRAPH

    def layout(self, graph: str, ids: np.ndarray, mask: np.ndarray, types: np.ndarray | None, views: list[Task]):
        """The feeds of one batch for one of the deployment's full-sequence graphs. The CPU engines (ONNX Runtime,
        OpenVINO) get zero-length MPT, prompt and prefix axes for the slot groups no row uses, instead of one masked
        dummy slot each: every layer then attends over the batch's real positions only (the dummy slots cost up to
        16 % of a MiniLM forward at B=32 on ONNX Runtime; results/graph-overhead.md). The folded graph (its prompt
        sizes are constants) and the GPU engines (TensorRT profiles, CUDA; untested with empty axes) keep one
        slot."""
        min_slots = 0 if self.backend in CPU_ENGINES and graph != FOLDED_GRAPH else 1
        return build_layout(self.spec, position_offset(self.config), self.config.pad_token_id, ids, mask, types,
                            views, self.dims, min_slots=min_slots, prefix=False if graph == NOPREFIX_GRAPH else None)

    def _check_inputs(self, input_ids, attention_mask, tasks, token_type_ids, pad_side: str = "right"):
        input_ids, attention_mask = pad_ragged(input_ids, attention_mask, self.config.pad_token_id, pad_side)
        try:
            ids = np.asarray(input_ids)
        except ValueError:
            raise InputError("input_ids is not a [batch, tokens] array of token ids: its rows hold something other "
                             "than integers, or have different lengths and come with an attention_mask (pad them to "
                             "one length, or give the rows alone and promptmux pads them)") from None
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            one_row = " (one row of token ids goes in a list of its own: [[...]])" if ids.ndim == 1 else ""
            raise InputError(f"input_ids must be a non-empty 2-D array [batch, tokens], got shape {ids.shape}{one_row}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids must be integers, got {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.dims.vocab_size:
            raise InputError(f"input_ids must lie in [0, {self.dims.vocab_size}), got values {ids.min()}..{ids.max()}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask has shape {mask.shape} but input_ids has {ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise InputError("attention_mask must contain only 0 and 1")
        if (mask.sum(1) == 0).any():
            raise InputError(f"rows {np.where(mask.sum(1) == 0)[0].tolist()} have no real token (attention_mask all 0)")
        tasks = task_names(tasks, ids.shape[0], "rows")
        types = None
        if token_type_ids is not None:
            types = np.asarray(token_type_ids)
            if types.shape != ids.shape:
                raise InputError(f"token_type_ids has shape {types.shape} but input_ids has {ids.shape}")
        return ids.astype(np.int64), mask.astype(np.int64), tasks, types

    def forward(self, input_ids, attention_mask=None, tasks: str | Sequence[str] = (), token_type_ids=None, *,
                views: dict | None = None) -> list[np.ndarray]:
        """Run a batch where row i uses task tasks[i]: input_ids [batch, tokens] with attention_mask, or rows of
        token ids of any lengths (then padded on the right here, with their mask). views: the tasks as the caller
        read them ({name: Task}), so that what it reads of them after matches what ran.

        Returns one array per row: classification -> the logits of that task's head [num_labels];
        causal LM -> logits for the row's real tokens [real_tokens, vocab] (virtual tokens excluded)."""
        if not self.spec.family.forward_rows:
            raise InputError("forward() serves classifiers and causal LMs; use generate() with a seq2seq deployment")
        if not self.manifest["graph"].get("file"):
            raise InputError(f"{self.dir} was exported for generation only (--generation-only): it has no "
                             "full-sequence graph for forward(); use generate(), or export again without it")
        ids, mask, tasks, types = self._check_inputs(input_ids, attention_mask, tasks, token_type_ids)
        views = [views[t] if views else self.bank.view(t) for t in tasks]
        for i, v in enumerate(views):
            refused = too_long(ids.shape[1], v.num_virtual_tokens, v.name, self.max_positions)
            if refused:
                raise InputError(f"row {i}: {refused}; shorten the input")
        # The prompt inputs depend only on the batch's tasks as written: device sessions keep them resident under
        # this key (a task's version changes with every write, by any process).
        return run_batch(self, ids, mask, types, views, bank_key=tuple((v.name, v.version) for v in views))

    # ---- generation ----------------------------------------------------------------------
    @property
    def generator(self):
        """The cached-decoding engine (causal LMs and seq2seq), created on first use."""
        if self._generator is None:
            if self.spec.family.generation is None:
                raise InputError("generation needs a causal LM or seq2seq deployment; this one is sequence "
                                 "classification")
            if not self.manifest.get("decoder"):
                raise InputError(f"{self.dir} has no cached decoder graph; re-export it with this promptmux version")
            self._generator = GENERATORS[self.spec.family.generation](self, self._decoder_session())
        return self._generator

    def prompt_kv_bytes(self) -> int:
        """Bytes of precomputed prompt key/values held now (0 before generation starts)."""
        return self._generator.cached_bytes() if hasattr(self._generator, "cached_bytes") else 0

    def _decoder_session(self):
        return BACKENDS[self.backend].decoder_session(self)

    def _generation_inputs(self, inputs, tasks):
        """Text (list of str), token ids (2-D, left padding for batches) or rows of token ids of any lengths
        (padded here) -> ids, mask, task names, is_text."""
        is_text = isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs
                                              and all(isinstance(x, str) for x in inputs))
        side = self.spec.family.prompt_padding  # ragged rows of ids too (core/families)
        if not is_text and isinstance(inputs, (list, tuple)):
            other = next(((i, x) for i, x in enumerate(inputs) if not isinstance(x, str)), None)
            if other and any(isinstance(x, str) for x in inputs):
                raise InputError(f"inputs mix texts and other values (item {other[0]} is {type(other[1]).__name__}): "
                                 "give a list of texts, or a list of rows of token ids")
        if is_text:
            texts = [inputs] if isinstance(inputs, str) else list(inputs)
            if any(not t.strip() for t in texts):
                raise InputError("empty prompt: every input text must contain something to continue")
            enc = self.tokenizer(texts, padding=True, padding_side=side, return_tensors="np")
            ids, mask = enc["input_ids"], enc["attention_mask"]
        else:
            ids, mask = (inputs["input_ids"], inputs.get("attention_mask")) if isinstance(inputs, dict) else (inputs,
                                                                                                            None)
            if any(hasattr(r, "__len__") and len(r) == 0 for r in (ids if isinstance(ids, (list, tuple)) else [])):
                raise InputError("empty prompt: a row of input_ids has no tokens")
            if isinstance(ids, np.ndarray) and ids.ndim == 2 and ids.shape[1] == 0:
                raise InputError("empty prompt: input_ids has no tokens")
        ids, mask, tasks, _ = self._check_inputs(ids, mask, tasks, None, pad_side=side)
        return ids, mask, tasks, is_text

    def generate_stream(self, inputs, tasks, max_new_tokens: int = 32, *, do_sample: bool = False,
                        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                        stop: Sequence[str] = (), eos_token_id=None, precompute: bool = True,
                        own_positions: bool = False):
        """Yield {"row", "token_id", "text"} as tokens come (text: the newly decoded piece, text inputs only),
        then one {"row", "finish_reason"} per row when it finishes ("eos", "stop" or "length")."""
        from .generate import SamplingParams

        params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed,
                                stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),  # one string: one stop
                                eos_token_id=eos_token_id)
        params.check(self.max_positions)
        ids, mask, tasks, is_text = self._generation_inputs(inputs, tasks)
        if stop and not is_text:
            raise InputError("stop strings need text inputs (token-id inputs stop on EOS or max_new_tokens)")
        bank = self.bank
        views = [bank.view(t) for t in tasks]
        new_tokens = self.spec.family.new_token_room(max_new_tokens)  # seq2seq: new tokens go to the decoder
        own, lengths = own_positions or self.spec.family.encoder_decoder, mask.sum(1)  # positions skip padding
        for i, v in enumerate(views):  # a row's positions: its own tokens, or (PEFT's padded rule) the batch's width
            used = int(lengths[i]) if own or kind_of(v).positions_from_mask else int(ids.shape[1])
            why = too_long(used, v.num_virtual_tokens, v.name, self.max_positions, new_tokens)
            dec = not why and self.spec.family.encoder_decoder and decoder_too_long(v, max_new_tokens,
                                                                                     self.max_positions)
            if why or dec:
                raise InputError(f"row {i}: {why or dec}; " + ("shorten the prompt" if why else "lower max_new_tokens"))
        yield from self._stream_rows(ids, mask, views, params, precompute, is_text, own_positions)

    def _stream_rows(self, ids, mask, views, params, precompute, is_text, own_positions=False):
        """The generator's tokens as per-row events; text through generate.TextStream (the one streaming rule the
        server's scheduler uses too)."""
        from .generate import TextStream

        eos = set(self.generator.eos_for(params).tolist())
        batch = ids.shape[0]
        texts = [TextStream(self.tokenizer, params.stop) for _ in range(batch)] if is_text else None
        finished = [None] * batch
        ended = np.zeros(batch, bool)  # rows a stop string ends leave the decoder's batch (generate.Generator.stream)
        for step_tokens in self.generator.stream(ids, mask, views, params, precompute, own_positions, ended):
            for row, token in enumerate(step_tokens.tolist()):
                if finished[row]:
                    continue
                event = {"row": row, "token_id": token}
                if is_text:
                    event["text"] = texts[row].add(token)
                    if texts[row].stopped:
                        finished[row] = "stop"
                        ended[row] = True
                yield event
                if token in eos and not finished[row]:
                    finished[row] = "eos"
                if finished[row]:
                    yield from self._finish(row, finished[row], texts)
            if all(finished):
                return
        for row in range(batch):
            if not finished[row]:
                yield from self._finish(row, "length", texts)

    @staticmethod
    def _finish(row, reason, texts):
        tail = texts[row].flush() if texts else ""  # nothing after a stop string
        if tail:
            yield {"row": row, "token_id": None, "text": tail}
        yield {"row": row, "finish_reason": reason}

    def generate(self, inputs, tasks, max_new_tokens: int = 32, **kwargs) -> list[dict]:
        """Generate for a batch where row i uses task tasks[i]. Text in, text out (through the deployment's
        tokenizer), or token ids in and out. Returns one {"task", "token_ids", "finish_reason"[, "text"]}
        per row. Keyword arguments: do_sample, temperature, top_k, top_p, seed, stop, eos_token_id,
        precompute (use each task's precomputed prompt key/values; default True), own_positions (default False: a
        padded batch follows PEFT's generate, which counts a prompt-tuned row's padding among its positions, so
        a row's tokens depend on the lengths it is batched with; True: every row gets the positions it has alone,
        as the server's continuous batching gives them; a seq2seq row's never count its padding)."""
        rows: dict[int, dict] = {}
        for event in self.generate_stream(inputs, tasks, max_new_tokens, **kwargs):
            name = task_name(tasks if isinstance(tasks, str) else tasks[event["row"]])
            row = rows.setdefault(event["row"], {"task": name, "token_ids": [], "text": ""})
            if event.get("token_id") is not None:
                row["token_ids"].append(event["token_id"])
            row["text"] += event.get("text", "")
            if "finish_reason" in event:
                row["finish_reason"] = event["finish_reason"]
        text_in = isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and all(isinstance(x, str) for x in inputs))
        out = [rows[i] for i in sorted(rows)]
        if not text_in:
            for r in out:
                r.pop("text")
        return out

    def encode(self, texts: Sequence[str], tasks: str | Sequence[str] | None = None, truncation: bool = False):
        """Token ids of texts, padded into one batch ({"input_ids", "attention_mask"[, "token_type_ids"]}, numpy).
        A text that does not fit the model's positions together with its row's task's virtual tokens is refused
        (as the server refuses it), or with truncation=True cut to fit. Without tasks, rows are checked against the
        positions alone (forward checks them again with their tasks)."""
        rows, _ = self._token_rows(texts, tasks, truncation)
        return pad_rows(rows, self.tokenizer.pad_token_id, self.tokenizer.padding_side)

    def _token_rows(self, texts, tasks, truncation: bool) -> tuple[list[dict], list[int]]:
        """Each text's tokens (unpadded) and how many tokens truncation cut from it."""
        texts = [texts] if isinstance(texts, str) else texts
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise InputError("texts must be a non-empty list of non-empty strings")
        names = task_names(tasks, len(texts)) if tasks is not None else None
        tok = self.tokenizer
        batch = tok(list(texts))
        rows = [{k: batch[k][i] for k in batch} for i in range(len(texts))]
        dropped = [0] * len(rows)
        for i, row in enumerate(rows):
            virtual = self.bank.view(names[i]).num_virtual_tokens if names is not None else 0
            refused = too_long(len(row["input_ids"]), virtual, names[i] if names else "", self.max_positions)
            if refused and not truncation:
                raise InputError(f"text {i}: {refused}; shorten it, or pass truncation=True (CLI: --truncate) to cut it")
            if refused:  # tokenized again with the cut, so that end tokens such as [SEP] stay
                rows[i] = tok(texts[i], truncation=True, max_length=max(self.max_positions - virtual, 1))
                dropped[i] = len(row["input_ids"]) - len(rows[i]["input_ids"])
        return rows, dropped

    def forward_text(self, texts: Sequence[str], tasks: str | Sequence[str], truncation: bool = False, *,
                     views: dict | None = None) -> tuple[list[np.ndarray], list[int]]:
        """forward() on text: each row's output, and how many tokens truncation cut from each text (see encode).

        A row's positions run through its task's virtual tokens and the batch's padded width, so rows that fit
        alone may not fit padded to a longer row of another task: such rows run in separate batches."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        names = task_names(tasks, len(texts))
        views = views or {n: self.bank.view(n) for n in dict.fromkeys(names)}  # one read of each task for all rows
        rows, dropped = self._token_rows(texts, names, truncation)
        virtual = [views[t].num_virtual_tokens for t in names]
        out: list[np.ndarray | None] = [None] * len(rows)
        for group in fitting_groups([len(r["input_ids"]) for r in rows], virtual, self.max_positions):
            enc = pad_rows([rows[i] for i in group], self.tokenizer.pad_token_id, self.tokenizer.padding_side)
            for i, result in zip(group, self.forward(enc["input_ids"], enc["attention_mask"], [names[i] for i in group],
                                                     enc.get("token_type_ids"), views=views)):
                out[i] = result
        return out, dropped

    def classify(self, texts: Sequence[str], tasks: str | Sequence[str], truncation: bool = False) -> list[dict]:
        """Text classification: one {task, label, label_id, scores} per text. A text too long for the model's
        positions with its task's virtual tokens is refused; with truncation=True it is cut to fit, and its result
        says how many tokens were dropped ("truncated_tokens")."""
        if not self.spec.family.classifies:
            raise InputError(f"classify() needs a sequence-classification deployment; this one is a {self.spec.family}"
                             " language model: use generate()")
        texts = [texts] if isinstance(texts, str) else texts
        if isinstance(texts, dict) or not all(isinstance(t, str) for t in texts):  # a dict's keys are no texts
            raise InputError("classify() takes texts (a string or a list of strings); give token ids to forward()")
        names = task_names(tasks, len(texts))
        views = {n: self.bank.view(n) for n in dict.fromkeys(names)}  # labels of the very version that scored
        logits, dropped = self.forward_text(texts, names, truncation, views=views)
        out = []
        for name, row, cut in zip(names, logits, dropped):
            out.append({"task": name, **label_scores(views[name], row)})
            if cut:
                out[-1]["truncated_tokens"] = cut
        return out
