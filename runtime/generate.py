"""Cached generation for prompt-tuned causal LMs, with a task per row.

One graph (`decoder.onnx`, see core/graph.py PromptedDecoder) runs the prefill and every
decoding step. Two prefill strategies give the same tokens:

- precomputed prompt KV (default): each task's virtual tokens sit in front of the input in a
  causal model, so their per-layer keys/values never depend on the text. They are computed once
  per task (prefix tuning's prefixes already are keys/values) and the prefill runs only the real
  tokens with that KV as the past.
- inline prompts: the prefill runs the virtual tokens with the text, as PEFT does.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from promptmux.core.archs import pad_id, position_offset
from promptmux.core.io_spec import decode_step_feeds
from promptmux.core.layout import build_layout
from promptmux.core.task import Task
from promptmux.kinds import as_cache, kind_of

from .errors import InputError
from .kv_cache import DEFAULT_KV_CACHE_BYTES, PromptKVCache
from .sampling import SamplingParams, pick  # noqa: F401 (callers import them from here too)
from .sessions import host
from .text import generation_defaults


def _stop_cut(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string begins in text, or None."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


class RuntimeBound:
    """A runtime's generator: the runtime keeps it, so it holds the runtime weakly (a reference back would be a
    cycle, whose engines only Python's cycle collector would free; sessions.for_runtime)."""

    def __init__(self, runtime):
        self._rt = weakref.ref(runtime)

    @property
    def rt(self):
        rt = self._rt()
        if rt is None:
            raise RuntimeError("this generator's Runtime is gone; open the deployment again")
        return rt


class Generator(RuntimeBound):
    """Runs generation over a Runtime's decoder session and prompt bank."""

    def __init__(self, runtime, session):
        super().__init__(runtime)
        self.session = session
        # what prefill counts in runtime.graph_runs: the file that runs (decoder.int8.onnx at int8)
        self.graph_file = getattr(session, "graph_file", None) or runtime.manifest["decoder"]["file"]
        self.layers = runtime.dims.num_layers
        self._offset = position_offset(runtime.config)
        self.model_eos = generation_defaults(runtime.dir, runtime.config)
        self.kv = PromptKVCache(getattr(runtime, "kv_cache_bytes", DEFAULT_KV_CACHE_BYTES))

    # ---- prompt key/values ----------------------------------------------------------------
    def precompute(self, names, until_full: bool = False) -> None:
        """Compute the prompt key/values of these tasks now (the runtime calls this when tasks are loaded;
        until_full: stop once the cache is full), and drop removed and replaced tasks' (by version)."""
        bank = self.rt.bank
        for name in names:
            if until_full and self.kv.full():
                break
            self.prompt_kv(bank.view(name))
        self.kv.keep(bank.holds)

    def cached_tasks(self) -> list[str]:
        """The tasks whose prompt key/values are cached, least recently used first."""
        return self.kv.names()

    def cached_bytes(self) -> int:
        return self.kv.bytes

    def prompt_kv(self, view: Task) -> np.ndarray:
        """The task's per-layer keys/values [layers, 2, kv_heads, T, head_dim], computed once per task version
        while it stays in the cache."""
        kv = kind_of(view).kv_prefix(view)
        if kv is not None:
            return kv
        if view.num_virtual_tokens == 0:  # no prompt (the bare base model): an empty cache, nothing to run
            d = self.rt.dims
            return np.zeros((self.layers, 2, d.num_kv_heads, 0, d.head_dim), np.float32)
        if not self.rt.bank.holds(view):
            # The request captured a task that was removed or replaced since: its own KV, not cached.
            return self._compute_kv(view)
        kv = self.kv.get(view)
        if kv is None:
            kv = self._compute_kv(view)  # outside the cache's lock: other rows go on meanwhile
            self.kv.put(view, kv)
        return kv

    def _compute_kv(self, view: Task) -> np.ndarray:
        empty = np.zeros((1, 0), np.int64)
        lay = self._layout(empty, empty, [view])
        _, presents = self._run(lay.feeds, np.zeros(1, np.int64))
        return np.stack([np.stack([host(presents[2 * i])[0], host(presents[2 * i + 1])[0]])
                         for i in range(self.layers)])

    def _layout(self, ids, mask, views):
        rt = self.rt
        from promptmux.core.archs import position_offset

        return build_layout(rt.spec, position_offset(rt.config), rt.config.pad_token_id, ids, mask, None, views,
                            rt.dims, min_slots=0)

    def _run(self, feeds: dict[str, np.ndarray], logits_index: np.ndarray):
        feeds = dict(feeds, logits_index=logits_index.astype(np.int64))
        keys, values = feeds.pop("prefix_keys"), feeds.pop("prefix_values")
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"] = np.ascontiguousarray(keys[i])
            feeds[f"past_key_values.{i}.value"] = np.ascontiguousarray(values[i])
        out = self.session.run_all(feeds)
        return out[0], out[1:]

    # ---- generation -----------------------------------------------------------------------
    def prefill(self, ids: np.ndarray, mask: np.ndarray, views: list[Task], precompute: bool = True,
                own_positions: bool = False):
        """Run the prompts: (logits of each row's last real token [B, V], presents (per layer key, value),
        cache mask [B, past], next position per row [B]).

        own_positions: every row's positions follow its own mask, as if it ran alone, so that padding changes
        no row (continuous batching). Otherwise PEFT's rules for a padded batch (below)."""
        batch, seq = ids.shape
        # In generate, transformers derives position ids from the attention mask (cumsum - 1) and PEFT shifts
        # them by n for key/value prefixes; input-level kinds drop them, so positions count every slot (the
        # layout's rule).
        from_mask = [i for i, v in enumerate(views) if own_positions or kind_of(v).positions_from_mask]
        if precompute:
            views = [self._as_prefix(v) for v in views]
        lay = self._layout(ids, mask, views)
        positions = lay.feeds["position_ids"]
        for i in from_mask:
            start = lay.token_start[i]  # virtual tokens in the sequence (inline prompts) come first
            cached = int(lay.feeds["attention_mask"][i, : -lay.feeds["order"].shape[1]].sum())  # the row's prefix
            before = start + cached
            from_mask = np.where(mask[i] == 1, np.cumsum(mask[i]) - 1, 1)
            positions[i, start:start + seq] = before + from_mask + self._offset
        # Index of each row's last real token in the reordered sequence.
        last_token = np.array([np.flatnonzero(m)[-1] for m in mask])
        logits, presents = self._run(lay.feeds, lay.token_start + last_token)
        self.rt.graph_runs[self.graph_file] += 1  # so a benchmark or study sees which graph decoded
        # Positions continue after the last real token of each row.
        next_pos = lay.feeds["position_ids"][np.arange(batch), lay.token_start + last_token] + 1
        return logits, list(presents), lay.feeds["attention_mask"], next_pos

    def step(self, token: np.ndarray, cache_mask: np.ndarray, next_pos: np.ndarray, presents):
        """One decoding step for every row: token [B] at position next_pos [B] over the cache (cache_mask
        already includes the new token's slot). Returns (logits [B, V], presents)."""
        feeds = decode_step_feeds(token.shape[0], self.rt.dims)
        feeds.update(input_ids=token[:, None].astype(np.int64), attention_mask=cache_mask,
                     position_ids=next_pos[:, None].astype(np.int64))
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"] = presents[2 * i]
            feeds[f"past_key_values.{i}.value"] = presents[2 * i + 1]
        out = self.session.run_all(feeds)
        return out[0], list(out[1:])

    def stream(self, ids: np.ndarray, mask: np.ndarray, views: list[Task], params: SamplingParams,
               precompute: bool = True, own_positions: bool = False,
               done: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Yield the next token of every row ([B] int64) once per decoding step (own_positions: prefill's).

        done ([B] bool, optional): the caller sets a row's entry to end it early (a stop string); a row also ends
        on an EOS id. Ended rows yield the pad id and leave the decoder's batch, so they cost nothing more."""
        batch = ids.shape[0]
        logits, presents, cache_mask, next_pos = self.prefill(ids, mask, views, precompute, own_positions)
        logits = host(logits)
        rng = np.random.default_rng(params.seed)
        # own_positions: each row as alone, its samples too (a generator of its own, as the server's rows have)
        rngs = [np.random.default_rng(params.seed) for _ in range(batch)] if own_positions and params.do_sample else ()
        eos = self.eos_for(params)
        done = np.zeros(batch, bool) if done is None else done
        pad = pad_id(self.rt.config)
        running = np.arange(batch)  # the rows in the decoder's batch, in order
        for step in range(params.max_new_tokens):
            # Sampling sees every row's logits (an ended row's are its last), so the shared rng draws as many
            # numbers whichever rows have ended: a row's samples do not depend on when the others end.
            token = np.concatenate([pick(logits[i:i + 1], params, r) for i, r in enumerate(rngs)]) if rngs else \
                pick(logits, params, rng)
            token = np.where(done, pad, token)
            yield token
            done |= np.isin(token, eos)
            if done.all() or step + 1 == params.max_new_tokens:
                return
            keep = np.flatnonzero(~done[running])
            if len(keep) < len(running):  # rows ended: slice them out, and the past columns no row left attends to
                running = running[keep]
                presents = [host(x)[keep] for x in presents]
                cache_mask, next_pos = cache_mask[keep], next_pos[keep]
                first = int(cache_mask.any(0).argmax())
                if first:
                    presents = [x[:, :, first:] for x in presents]
                    cache_mask = cache_mask[:, first:]
            cache_mask = np.concatenate([cache_mask, np.ones((len(running), 1), np.int64)], axis=1)
            step_logits, presents = self.step(token[running], cache_mask, next_pos, presents)
            logits = ended_rows_kept(logits, running, host(step_logits))
            next_pos = next_pos + 1

    def _as_prefix(self, view: Task) -> Task:
        if kind_of(view).kv_prefix(view) is not None:
            return view
        return as_cache(view, self.prompt_kv(view))

    def eos_for(self, params: SamplingParams) -> np.ndarray:
        return eos_ids(params, self.model_eos)


def ended_rows_kept(logits: np.ndarray, running: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Every row's next-token logits after a step that ran only the rows `running` (their logits `step`): an ended
    row keeps its last (a copy: a session's output may be read-only); while every row runs, the step's own."""
    if len(running) == len(logits):
        return step
    out = np.array(logits, copy=True)
    out[running] = step
    return out


def eos_ids(params: SamplingParams, model_eos) -> np.ndarray:
    """The token ids that end a row: the request's, else the model's (text.generation_defaults; none: generate to
    max_new_tokens)."""
    eos = params.eos_token_id if params.eos_token_id is not None else model_eos
    if eos is None:
        return np.array([], np.int64)
    return np.atleast_1d(np.asarray(eos, np.int64))


# ---- continuous batching ------------------------------------------------------------------------
@dataclass(eq=False)
class Row:
    """One sequence of a continuous batch: its own task, sampling parameters, rng and stop condition."""

    view: Task
    params: SamplingParams
    eos: frozenset
    rng: np.random.Generator
    tag: object = None  # the caller's handle (a server request)
    tokens: list = field(default_factory=list)
    finish_reason: str | None = None  # "eos", "length", "error", or what the caller set with finish()
    picked: bool = False  # a token was chosen since the last decoding step
    error: Exception | None = None  # why the row finished with "error"

    def finish(self, reason: str) -> None:
        """End the row early (a stop string, a cancelled request); it leaves the batch at the next advance()."""
        if self.finish_reason is None:
            self.finish_reason = reason

    def fail(self, error: Exception) -> None:
        """End this row only (its sampling or its text handling failed); the other rows go on."""
        self.error = error
        self.finish_reason = "error"  # over "eos"/"length" too: a row whose last token failed did not finish well

    def take(self, token: int) -> None:
        """Append the chosen token; the row finishes on one of its EOS ids or at max_new_tokens."""
        self.tokens.append(token)
        if token in self.eos:
            self.finish_reason = "eos"
        elif len(self.tokens) >= self.params.max_new_tokens:
            self.finish_reason = "length"


def _pad_past(x: np.ndarray, length: int, axis: int) -> np.ndarray:
    """Left-pad one axis with zeros: the shorter caches of a merged batch, masked out by the attention mask."""
    missing = length - x.shape[axis]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[axis] = missing
    return np.concatenate([np.zeros(shape, x.dtype), x], axis=axis)


class ContinuousBatch:
    """Causal-LM generation where rows join and leave at every decoding step.

    Joining rows are prefilled together (positions from each row's own mask, see add_many) and their cache
    merged into the running batch: the past axis is left-padded with masked zeros so that every row shares
    one past length; position ids are explicit per row, so padding never shifts a row.
    Finished rows are sliced out of the batch axis; past columns no remaining row attends to are trimmed.

    Call order per decoding step: add() any new rows, pick() the next token of every row, finish() rows
    the caller stops (stop strings, cancellation), advance() runs the decoder once for the rows still on.
    """

    def __init__(self, generator: Generator):
        self.gen = generator
        self.rows: list[Row] = []
        self.presents: list[np.ndarray] = []  # per layer key, value: [B, kv_heads, past, head_dim]
        self.mask = None  # [B, past]
        self.next_pos = None  # [B]
        self.logits = None  # [B, vocab]: every row's next-token logits

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, ids, view: Task, params: SamplingParams, precompute: bool = True, tag=None) -> Row:
        """Prefill one prompt (1-D token ids, no padding) and merge it into the running batch."""
        return self.add_many([(ids, view, params, precompute, tag)])[0]

    def add_many(self, items) -> list[Row]:
        """Prefill several prompts ((ids, view, params, precompute, tag) each) and merge them into the batch.

        The rows share one prefill (one per precompute setting), left-padded, with every row's positions taken
        from its own mask: a row's result is then the one it gets alone, whatever the padding. All or nothing:
        the batch is changed only once every prefill has succeeded."""
        groups: dict[bool, list[int]] = {}
        for k, item in enumerate(items):
            if len(item[0]) == 0:
                raise InputError("empty prompt: a row needs at least one token")
            groups.setdefault(bool(item[3]), []).append(k)
        pad = pad_id(self.gen.rt.config)
        rows: list[Row | None] = [None] * len(items)
        prefilled = []
        for key, members in groups.items():
            seqs = [np.asarray(items[k][0], np.int64) for k in members]
            width = max(len(x) for x in seqs)
            ids = np.full((len(seqs), width), pad, np.int64)
            mask = np.zeros((len(seqs), width), np.int64)
            for j, x in enumerate(seqs):
                ids[j, width - len(x):] = x
                mask[j, width - len(x):] = 1
            logits, presents, cache_mask, next_pos = self.gen.prefill(
                ids, mask, [items[k][1] for k in members], key, own_positions=True)
            new = [Row(view=items[k][1], params=items[k][2], eos=frozenset(self.gen.eos_for(items[k][2]).tolist()),
                       rng=np.random.default_rng(items[k][2].seed), tag=items[k][4]) for k in members]
            prefilled.append(([host(x) for x in presents], cache_mask, next_pos, logits, new))
            for k, row in zip(members, new):
                rows[k] = row
        for merged in prefilled:
            self._merge(*merged)
        return rows

    def _merge(self, presents, mask, next_pos, logits, rows: list[Row]) -> None:
        if not self.rows:
            self.presents, self.mask, self.next_pos, self.logits = presents, mask, next_pos, logits
        else:
            length = max(self.mask.shape[1], mask.shape[1])
            self.presents = [np.concatenate([_pad_past(a, length, 2), _pad_past(b, length, 2)])
                             for a, b in zip(self.presents, presents)]
            self.mask = np.concatenate([_pad_past(self.mask, length, 1), _pad_past(mask, length, 1)])
            self.next_pos = np.concatenate([self.next_pos, next_pos])
            self.logits = np.concatenate([self.logits, logits])
        self.rows.extend(rows)

    def pick(self) -> list[tuple[Row, int]]:
        """Choose each running row's next token with its own sampling parameters and rng. A row that reaches
        one of its EOS ids or its max_new_tokens is finished ("eos" / "length"); one whose sampling fails is
        finished with "error" (row.error) and the others go on."""
        out = []
        for i, row in enumerate(self.rows):
            if row.finish_reason is not None:
                continue
            try:
                token = int(pick(self.logits[i:i + 1], row.params, row.rng)[0])
            except Exception as e:
                row.fail(e)
                continue
            row.take(token)
            row.picked = True
            out.append((row, token))
        return out

    def advance(self) -> None:
        """Drop finished rows, then run one decoding step for the others on the tokens pick() chose."""
        keep = [i for i, r in enumerate(self.rows) if r.finish_reason is None]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            if not self.rows:
                self.presents, self.mask, self.next_pos, self.logits = [], None, None, None
                return
            self.presents = [x[keep] for x in self.presents]
            self.mask, self.next_pos = self.mask[keep], self.next_pos[keep]
            first = int(self.mask.any(0).argmax())  # past columns masked for every remaining row go
            if first:
                self.presents = [x[:, :, first:] for x in self.presents]
                self.mask = self.mask[:, first:]
        if not self.rows:
            return
        if not all(r.picked for r in self.rows):
            raise RuntimeError("advance() before pick(): a row joined after its step's tokens were chosen")
        token = np.array([r.tokens[-1] for r in self.rows], np.int64)
        self.mask = np.concatenate([self.mask, np.ones((len(self.rows), 1), np.int64)], axis=1)
        self.logits, presents = self.gen.step(token, self.mask, self.next_pos, self.presents)
        self.presents = [host(x) for x in presents]
        self.next_pos = self.next_pos + 1
        for r in self.rows:
            r.picked = False


class StreamedRows:
    """The same interface as ContinuousBatch over per-row generators (seq2seq deployments): each row runs its
    own cached encoder-decoder stream, one step per pick(). Rows interleave step by step but do not share
    decoder batches."""

    def __init__(self, generator):
        self.gen = generator
        self.rows: list[Row] = []
        self._streams: dict[int, Iterator[np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def add_many(self, items) -> list[Row]:
        return [self.add(*item) for item in items]

    def add(self, ids, view: Task, params: SamplingParams, precompute: bool = True, tag=None) -> Row:
        ids = np.asarray(ids, np.int64)[None]
        row = Row(view=view, params=params, eos=frozenset(self.gen.eos_for(params).tolist()),
                  rng=np.random.default_rng(params.seed), tag=tag)
        self._streams[id(row)] = self.gen.stream(ids, np.ones_like(ids), [view], params, precompute)
        self.rows.append(row)
        return row

    def pick(self) -> list[tuple[Row, int]]:
        out = []
        for row in self.rows:
            if row.finish_reason is not None:
                continue
            try:  # each row runs its own model calls: one that fails ends that row only
                token = int(next(self._streams[id(row)])[0])
            except Exception as e:
                row.fail(e)
                continue
            row.take(token)
            out.append((row, token))
        return out

    def advance(self) -> None:
        for row in [r for r in self.rows if r.finish_reason is not None]:
            self._streams.pop(id(row)).close()
        self.rows = [r for r in self.rows if r.finish_reason is None]


class TextStream:
    """A row's text as its tokens come (what Runtime.generate_stream yields for a text row): the new piece per
    token, held back while it could be the start of a stop string or ends in part of a character, cut where the
    first stop string begins.

    Each token decodes a window of the last few tokens, not the whole row (which made a 4,096-token row cost 1.3 s
    of decoding on the thread that runs the model): the window's text less the text of its tokens before the new
    one is what the new token adds. The window starts one token back at least, so that a token whose leading space a
    tokenizer drops at the start of a text (SentencePiece) keeps it; while its text ends in part of a character
    (U+FFFD: byte-level BPE splits accents and emoji over tokens) the window grows until the character is whole."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tok = tokenizer
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""  # the text of the tokens up to self.read
        self.start = self.read = 0  # the window: tokens[start:] is decoded; tokens[start:read] are accounted for
        self.shown = 0  # characters already given out
        self.stopped = False

    def _decode(self, tokens) -> str:
        return self.tok.decode(tokens, skip_special_tokens=True)

    def _grow(self, final: bool = False) -> None:
        """Add the text the window's new tokens make (final: even in part of a character, as the row ends)."""
        before = self._decode(self.tokens[self.start:self.read])
        after = self._decode(self.tokens[self.start:])
        if (len(after) > len(before) and not after.endswith("\ufffd")) or final:
            self.text += after[len(before):]
            self.start, self.read = self.read, len(self.tokens)

    def add(self, token: int) -> str:
        self.tokens.append(token)
        searched = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self._grow()
        cut = _stop_cut(self.text[searched:], self.stop)  # a new stop string ends in what this token added
        cut = cut + searched if cut is not None else None
        end = cut if cut is not None else max(self.shown, len(self.text) - self.hold)
        piece = self.text[self.shown:end]
        self.shown = end
        self.stopped = cut is not None
        return piece

    def flush(self) -> str:
        """The held-back tail once the row ends on EOS or its length (nothing after a stop string)."""
        if self.stopped:
            return ""
        self._grow(final=True)
        piece = self.text[self.shown:]
        self.shown = len(self.text)
        return piece
