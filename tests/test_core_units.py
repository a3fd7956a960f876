"""The core on its own, without an export: the batch layout per kind and the prompt bank's storage. A failure here
points at core/ or kinds/, not at the graphs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from promptmux.core.archs import Dims, arch_for
from promptmux.core.bank import STORE_FILE, PromptBank
from promptmux.core.layout import build_layout
from promptmux.core.task import Task, same_prompt

DIMS = Dims(hidden_size=4, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=2, vocab_size=50)


def _tasks():
    rng = np.random.default_rng(0)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    shared = f(3, 4)
    return {
        "pt": Task("pt", "prompt", "PROMPT_TUNING", 2, {"prompt": f(2, 4)}),
        "cpt": Task("cpt", "cpt", "CPT", 1, {"prompt": f(1, 4)}),
        "prefix": Task("prefix", "prefix", "PREFIX_TUNING", 3, {"prefix": f(2, 2, 1, 3, 2)}),
        "cart": Task("cart", "cartridge", "CARTRIDGE", 2, {"prefix": f(2, 2, 1, 2, 2)}),
        "m/0": Task("m/0", "mpt", "MULTITASK_PROMPT_TUNING", 3, {"shared": shared, "cols": f(3, 1), "rows": f(1, 4)}),
        "m/1": Task("m/1", "mpt", "MULTITASK_PROMPT_TUNING", 3, {"shared": shared, "cols": f(3, 1), "rows": f(1, 4)}),
    }


def _layout(names, model_type="llama", min_slots=1):
    tasks = _tasks()
    ids = np.arange(3 * len(names)).reshape(len(names), 3) + 5
    mask = np.ones_like(ids)
    mask[0, 2] = 0  # one padded row
    return build_layout(arch_for(model_type), 0, 0, ids, mask, None, [tasks[n] for n in names], DIMS,
                        min_slots=min_slots), tasks


def test_each_kind_puts_its_virtual_tokens_first_and_masks_unused_slots():
    lay, tasks = _layout(["pt", "cpt", "prefix", "cart", "m/0", "m/1"])
    f = lay.feeds
    tm, p, n = 3, 2, 3  # slot groups sized by the longest row of each: MPT 3, input 2, prefix 3
    assert f["order"].shape == (6, tm + p + 3) and f["attention_mask"].shape == (6, n + tm + p + 3)
    assert lay.token_start.tolist() == [2, 1, 0, 0, 3, 3]
    # input-level rows: their prompt rows in the input slots, ordered first, positions counting through them
    np.testing.assert_array_equal(f["prompt_embeds"][0], tasks["pt"].tensors["prompt"])
    assert f["order"][0, :2].tolist() == [tm, tm + 1] and f["order"][0, 2:5].tolist() == [tm + p + j for j in range(3)]
    assert f["attention_mask"][0].tolist() == [0] * n + [1, 1, 1, 1, 0] + [0] * (tm + p - 2)
    assert f["position_ids"][1, :4].tolist() == [0, 1, 2, 3]
    # key/value rows: the prefix in the cache slots (a shorter one masked after it), tokens first, positions after n
    np.testing.assert_array_equal(f["prefix_keys"][:, 3, :, :2], tasks["cart"].tensors["prefix"][:, 0])
    assert f["attention_mask"][3, :n].tolist() == [1, 1, 0]
    assert f["position_ids"][2, :3].tolist() == [3, 4, 5] and f["position_ids"][3, :3].tolist() == [2, 3, 4]
    # MPT rows: one shared prompt for both tasks, one factor row each
    assert f["mpt_shared"].shape[0] == 1 and f["mpt_task_ids"][4:].tolist() == [0, 1]


def test_groups_no_row_uses_are_empty_with_min_slots_0():
    lay, _ = _layout(["pt", "pt"], min_slots=0)
    f = lay.feeds
    assert f["mpt_shared"].shape[1] == 0 and f["prefix_keys"].shape[3] == 0
    assert f["attention_mask"].shape == (2, 2 + 3)


def test_encoder_side_of_a_seq2seq_model_has_no_prefix_slots():
    from promptmux.core.layout import encoder_layout

    tasks = _tasks()
    ids, mask = np.full((2, 3), 7), np.ones((2, 3), np.int64)
    lay = encoder_layout(arch_for("t5"), 0, ids, mask, [tasks["prefix"], tasks["pt"]], DIMS)
    assert "prefix_keys" not in lay.feeds and lay.token_start.tolist() == [0, 2]


def test_bank_stores_shared_roles_once_and_round_trips(tmp_path):
    bank = PromptBank(arch_for("llama"))
    tasks = _tasks()
    bank.add(list(tasks.values()))
    assert bank.shared_count() == 1  # MPT's shared prompt, once for both tasks
    bank.save(tmp_path)
    again = PromptBank.load(tmp_path, arch_for("llama"))
    assert again.names() == list(tasks)
    for name, t in tasks.items():
        v = again.view(name)
        assert (v.kind, v.peft_type, v.num_virtual_tokens) == (t.kind, t.peft_type, t.num_virtual_tokens)
        for role, value in t.tensors.items():
            np.testing.assert_array_equal(v.tensors[role], value)
        assert again.digest(name) == bank.digest(name)


def test_unknown_task_errors_list_a_few_tasks_and_count_many():
    from promptmux.core.bank import LISTED_IN_ERRORS, UnknownTaskError

    bank = PromptBank(arch_for("llama"))
    pt = _tasks()["pt"]
    bank.add([dataclasses.replace(pt, name=f"user-{i}") for i in range(LISTED_IN_ERRORS)])
    with pytest.raises(UnknownTaskError, match="unknown task 'nope'; this deployment serves: user-0, user-1, "):
        bank.view("nope")
    bank.add([dataclasses.replace(pt, name="one-more")])
    with pytest.raises(UnknownTaskError) as e:
        bank.view("nope")
    assert str(e.value) == ("unknown task 'nope'; this deployment serves 11 tasks (`promptmux tasks DIR list` or "
                            "GET /v1/models lists them)")
    assert bank.page(4) == (["user-0", "user-1", "user-2", "user-3"], True)
    assert bank.page(4, after="user-7") == (["user-8", "user-9", "one-more"], False)


def test_a_listing_walks_every_task_once_while_tasks_are_replaced_and_removed(tmp_path):
    """Listings page in name order with a cursor that may be gone: a replaced task (a new write, last in write order)
    and a removed cursor move nothing. In a runtime's overlay too, its own tasks merged into the store's."""
    from promptmux.core.overlay import BankOverlay

    pt = _tasks()["pt"]
    bank = PromptBank(arch_for("llama"), path=tmp_path / STORE_FILE)
    bank.add([dataclasses.replace(pt, name=n) for n in ("e", "c", "a", "d", "b")])
    assert bank.listing(2) == (["a", "b"], True)
    bank.add([dataclasses.replace(pt, name="b")], replace=True)  # the cursor task moves to the end of write order
    bank.remove("c")
    assert bank.listing(2, after="b") == (["d", "e"], False)
    bank.remove("b")
    assert bank.listing(9, after="b") == (["d", "e"], False)
    mine = BankOverlay(bank)
    mine.add([dataclasses.replace(pt, name=n) for n in ("f", "bb")])
    mine.remove("d")
    walked, after = [], None
    while True:
        names, more = mine.listing(1, after)
        walked += names
        if not more:
            break
        after = names[-1]
    assert walked == ["a", "bb", "e", "f"] and len(mine) == 4  # the store's hidden tasks counted in one query
    assert bank.count_of(["a", "zz", "e"] + [f"n{i}" for i in range(1200)]) == 2  # in chunks of 500


def test_bank_copy_keeps_unchanged_tasks_identical_and_drops_unused_shared(tmp_path):
    bank = PromptBank(arch_for("llama"))
    bank.add(list(_tasks().values()))
    before = {n: bank.view(n) for n in bank.names()}
    bank.remove("m")  # an MPT adapter name removes all its tasks
    assert "m/0" not in bank and bank.shared_count() == 0
    assert same_prompt(bank.view("pt"), before["pt"])
    with pytest.raises(ValueError, match="already in the bank"):
        bank.add([_tasks()["pt"]])


def test_a_cold_read_blocks_no_hot_lookup_and_one_read_serves_every_waiter(tmp_path, monkeypatch):
    """While one thread reads a cold task from the store (held here inside the read), a hot task is served and a
    change is written; three more threads asking for the same cold task get the one read's view."""
    import threading

    from promptmux.core import bank as bank_module

    first = PromptBank(arch_for("llama"))
    first.add(list(_tasks().values()))
    first.save(tmp_path)
    bank = PromptBank.load(tmp_path, arch_for("llama"))
    hot = bank.view("pt")
    inside, release, real = threading.Event(), threading.Event(), bank_module.load_tensors

    def held_read(data):  # the cold read of m/0's tensors waits here until released
        if threading.current_thread().name.startswith("cold"):
            inside.set()
            assert release.wait(30)
        return real(data)

    monkeypatch.setattr(bank_module, "load_tensors", held_read)
    got = []
    threads = [threading.Thread(target=lambda: got.append(bank.view("m/0")), name=f"cold-{i}") for i in range(4)]
    threads[0].start()
    assert inside.wait(30)
    for t in threads[1:]:
        t.start()
    assert bank.view("pt") is hot  # not blocked by the cold read
    bank.add([dataclasses.replace(_tasks()["pt"], name="written-meanwhile")])
    release.set()
    for t in threads:
        t.join(30)
    assert len(got) == 4 and all(v is got[0] for v in got)
    assert bank.stats["loads"] == 2 and bank.stats["misses"] == 2  # pt and m/0, each read once
    np.testing.assert_array_equal(got[0].tensors["cols"], _tasks()["m/0"].tensors["cols"])


def test_a_reader_that_outlives_the_bank_connection_merges_the_log(tmp_path):
    """Whichever of a bank's connections closes last merges the write-ahead log into the store, so the folder can
    be copied and made read-only afterwards (a reader closing last once left the log behind)."""
    import threading

    from promptmux.core.bank import STORE_FILE

    first = PromptBank(arch_for("llama"), path=tmp_path / STORE_FILE)
    first.add(list(_tasks().values()))
    first.close()
    bank = PromptBank.load(tmp_path, arch_for("llama"))
    reader = threading.Thread(target=bank.view, args=("pt",))  # a cold read: a reader connection of its own
    reader.start()
    reader.join(30)
    bank.add([dataclasses.replace(_tasks()["pt"], name="late")])  # committed to the log
    assert (tmp_path / f"{STORE_FILE}-wal").stat().st_size > 0
    bank.db.close()  # the bank's own connection first, the reader's last
    bank.close()
    assert not (tmp_path / f"{STORE_FILE}-wal").exists()


def _store(tmp_path) -> PromptBank:
    first = PromptBank(arch_for("llama"), path=tmp_path / STORE_FILE)
    first.add(list(_tasks().values()))
    first.close()
    return PromptBank.load(tmp_path, arch_for("llama"))


def test_lookups_go_on_while_another_process_holds_the_stores_write_lock(tmp_path):
    """A change waiting for another process's transaction (a large add) polls for the write lock without the bank's
    lock: a lookup meanwhile is answered at once (it waited for the other transaction), and the change then lands."""
    import sqlite3
    import threading

    bank = _store(tmp_path)
    bank.view("pt")
    other = sqlite3.connect(str(tmp_path / STORE_FILE), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    change = threading.Thread(target=bank.remove, args=("cpt",))
    change.start()
    change.join(0.3)
    assert change.is_alive()  # waiting for the other transaction
    looked = threading.Thread(target=lambda: (bank.view("pt"), bank.view("prefix"), len(bank)))
    looked.start()
    looked.join(10)
    assert not looked.is_alive() and change.is_alive()  # answered while the change still waits
    other.execute("ROLLBACK")
    change.join(10)
    assert not change.is_alive() and "cpt" not in bank


def test_a_replace_committed_while_a_cold_read_is_kept_is_seen_at_the_next_lookup(tmp_path, monkeypatch):
    """The window between checking a freshly read task's version and recording the store's data version: a replace
    committed there by another process is seen at the next lookup (it was served stale until any later commit)."""
    bank = _store(tmp_path)
    writer = PromptBank.load(tmp_path, arch_for("llama"))
    stored, hit = bank._stored_version, []

    def then_replaced(name):
        seq = stored(name)
        if not hit:
            hit.append(1)
            writer.add([dataclasses.replace(_tasks()["pt"], labels=None, source="new")], replace=True)
        return seq
    monkeypatch.setattr(bank, "_stored_version", then_replaced)
    assert bank.view("pt").source != "new" and hit
    assert bank.view("pt").source == "new"


def test_reading_threads_that_ended_leave_no_connection_open(tmp_path):
    import threading

    bank = _store(tmp_path)
    for name in ("pt", "cpt", "prefix", "cart", "m/0", "m/1") * 3:
        bank._views.clear()  # a cold read: the thread's own reader connection
        t = threading.Thread(target=bank.view, args=(name,))
        t.start()
        t.join(10)
    assert len(bank._readers) == 1  # the last thread's; the others' closed as new ones came


def test_configs_that_name_their_sizes_otherwise_are_read_as_their_modules_read_them():
    """Falcon's key/value heads (1 for the old architecture's multi-query attention), GPT-Neo's local-attention
    window (window_size), and embeddings narrower than the hidden size: prompts at their width, and OPT's head
    reading its projected-down features (test_families checks both families against PEFT)."""
    from transformers import AlbertConfig, FalconConfig, GPTNeoConfig, OPTConfig

    from promptmux.core.archs import dims_of, sliding_window

    falcon = dict(num_attention_heads=4, hidden_size=32, num_hidden_layers=2)
    assert dims_of(FalconConfig(multi_query=True, new_decoder_architecture=False, **falcon)).num_kv_heads == 1
    assert dims_of(FalconConfig(multi_query=False, new_decoder_architecture=False, **falcon)).num_kv_heads == 4
    assert dims_of(FalconConfig(new_decoder_architecture=True, num_kv_heads=2, **falcon)).num_kv_heads == 4
    local = GPTNeoConfig(window_size=8, attention_types=[[["global", "local"], 1]], num_layers=2)
    assert sliding_window(local) == 8
    assert sliding_window(GPTNeoConfig(window_size=8, attention_types=[[["global"], 2]], num_layers=2)) is None
    narrow = dims_of(OPTConfig(hidden_size=32, word_embed_proj_dim=16, num_attention_heads=4))
    assert (narrow.prompt_width, narrow.head_input, narrow.hidden_size) == (16, 16, 32)
    albert = dims_of(AlbertConfig(hidden_size=32, embedding_size=16, num_attention_heads=4))
    assert (albert.prompt_width, albert.head_input) == (16, 32)
    plain = dims_of(OPTConfig(hidden_size=32, word_embed_proj_dim=32, num_attention_heads=4))
    assert (plain.embed_size, plain.feature_size, plain.prompt_width) == (None, None, 32)


def test_io_spec_declares_every_graph_input_and_tensorrt_profiles_cover_its_axes():
    """One declaration: the inputs the layout feeds are declared, and every dynamic axis it names has a TensorRT
    profile range (a new input without one fails here, not at an engine build)."""
    from promptmux.core.archs import arch_for
    from promptmux.core.io_spec import INPUTS, dynamic_axes, input_names
    from promptmux.export.trt_engine import _profile_ranges

    for model_type in ("bert", "distilbert", "llama", "t5"):
        assert set(input_names(arch_for(model_type))) <= set(INPUTS)
    names = {a for n in INPUTS for a in dynamic_axes(n).values()} | set(dynamic_axes("past_key_values.0.key").values())
    assert names <= set(_profile_ranges(names, 1, 8, 128, 32, 8, 64))
    lay, _ = _layout(["pt", "prefix"])
    for name, value in lay.feeds.items():
        assert value.ndim == len(INPUTS[name].axes) and str(value.dtype) == INPUTS[name].dtype, name


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "gpt2", "llama", "t5", "bart", "qwen2-cls"])
def test_light_config_reads_as_the_transformers_config(arch):
    """What the runtime reads of a config (rules, sizes, positions, special tokens) is the same from the export's
    record as from transformers' config object, attribute_map names included."""
    from conftest import tiny_config

    from promptmux.core.archs import decoder_sizes, dims_of, position_offset, usable_positions
    from promptmux.core.light_config import LightConfig, config_record

    config = tiny_config(arch)
    light = LightConfig(json.loads(json.dumps(config_record(config))))  # as the manifest stores it
    assert arch_for(light) == arch_for(config)
    assert dims_of(light) == dims_of(config)
    assert (position_offset(light), usable_positions(light)) == (position_offset(config), usable_positions(config))
    for name in ("pad_token_id", "eos_token_id", "hidden_size", "num_hidden_layers", "architectures"):
        assert getattr(light, name, None) == getattr(config, name, None), name
    if arch_for(config).family.encoder_decoder:
        assert decoder_sizes(light) == decoder_sizes(config)
    with pytest.raises(AttributeError, match="has no 'no_such_setting'"):
        light.no_such_setting


def test_the_backend_table_is_the_one_list_of_backends_and_auto_covers_every_precision_and_family():
    from promptmux.bench.settings import BACKENDS as BENCH_BACKENDS
    from promptmux.cli.common import BACKEND_CHOICES
    from promptmux.runtime.backends import AUTO, BACKENDS, FAMILIES, PRECISION_FAMILIES, PRECISIONS

    assert BACKEND_CHOICES == list(BENCH_BACKENDS) == ["auto", *BACKENDS]
    for precision in PRECISIONS:  # auto always ends on a row without a condition, on a backend that runs it
        for family in PRECISION_FAMILIES.get(precision, FAMILIES):
            rows = [r for r in AUTO if r[0] == precision and family in r[1]]
            assert rows and rows[-1][2] is None, (precision, family)
            assert all(precision in BACKENDS[r[3]].precisions and family in BACKENDS[r[3]].families for r in rows)


def test_each_model_family_is_one_object_that_refuses_comparison_with_a_name():
    """archs' rows hold the Family objects core/families registers; comparing one with its name (a branch on the
    family outside core/families) raises instead of being quietly False."""
    from promptmux.core.families import FAMILIES, family_of

    assert set(FAMILIES) == {"encoder", "decoder", "seq2seq"}
    assert arch_for("bert").family is family_of("encoder") and str(arch_for("t5").family) == "seq2seq"
    assert arch_for("gpt2").family is arch_for("llama").family is FAMILIES["decoder"]
    with pytest.raises(TypeError, match="ask the family"):
        arch_for("bert").family == "encoder"  # noqa: B015
    with pytest.raises(ValueError, match="unknown model family 'vision'; promptmux knows"):
        family_of("vision")
    # what each decides: a causal LM's prompts pad on the left and share positions with the tokens generated
    decoder, seq2seq = FAMILIES["decoder"], FAMILIES["seq2seq"]
    assert (decoder.prompt_padding, decoder.new_token_room(8)) == ("left", 8)
    assert (seq2seq.prompt_padding, seq2seq.new_token_room(8)) == ("right", 0)
    assert seq2seq.submodules_message(2) is None and "use 1" in decoder.submodules_message(2)
