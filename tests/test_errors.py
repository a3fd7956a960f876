"""Every refusal a user can cause says what was wrong (and names both values for mismatches)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import adapter_configs, make_adapter, make_base, random_batch

from promptmux import AdapterError, InputError, Runtime, UnknownTaskError, export_deployment, load_adapter
from promptmux.core.archs import UnsupportedModelError
from promptmux.core.folder import load_base_config


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("errs")
    base = make_base("bert", root / "base")
    pt = make_adapter("bert", base, adapter_configs("bert")["pt"], root / "pt", seed=1, train_steps=0)
    return {"root": root, "base": base, "pt": pt, "config": load_base_config(base)}


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_pickled_adapter_is_refused(bert, tmp_path):
    d = tmp_path / "pickled"
    shutil.copytree(bert["pt"], d)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(AdapterError, match="adapter_model.bin, a pickle; promptmux loads safetensors only"):
        load_adapter("x", d, bert["config"])


def test_missing_adapter_folder(bert, tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter("x", tmp_path / "nope", bert["config"])


def test_folder_without_adapter_config(bert, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        load_adapter("x", tmp_path / "empty", bert["config"])


def test_non_prompt_method_is_refused(bert, tmp_path):
    from peft import LoraConfig, get_peft_model

    from promptmux.core.folder import load_base_model

    model = get_peft_model(load_base_model(bert["base"]), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    model.save_pretrained(tmp_path / "lora")
    with pytest.raises(AdapterError, match="is LORA, not a prompt-learning method"):
        load_adapter("x", tmp_path / "lora", bert["config"])


@pytest.mark.parametrize("field,value,message", [
    ("token_dim", 48, "hidden size is 48 in the adapter but 32 in the base model"),
    ("num_layers", 3, "number of layers is 3 in the adapter but 2 in the base model"),
    ("num_attention_heads", 8, "number of attention heads is 8 in the adapter but 4 in the base model"),
    ("task_type", "CAUSAL_LM", "task type CAUSAL_LM but the base model \\(bert\\) is exported for SEQ_CLS"),
])
def test_config_mismatch_names_both_values(bert, tmp_path, field, value, message):
    d = _edit_config(bert["pt"], tmp_path / "bad", **{field: value})
    with pytest.raises(AdapterError, match=message):
        load_adapter("x", d, bert["config"])


def test_prompt_shape_mismatch_names_both_values(bert, tmp_path):
    d = _edit_config(bert["pt"], tmp_path / "bad", num_virtual_tokens=7)
    with pytest.raises(AdapterError, match=r"prompt_embeddings shape is \(4, 32\) in the adapter but \(7, 32\) in what adapter_config"):
        load_adapter("x", d, bert["config"])


def test_model_type_and_vocab_mismatch_via_recorded_base(bert, tmp_path):
    gpt = make_base("gpt2", tmp_path / "gpt2")
    d = _edit_config(bert["pt"], tmp_path / "bad", base_model_name_or_path=str(gpt))
    with pytest.raises(AdapterError, match="model type is gpt2 in the adapter but bert in the base model"):
        load_adapter("x", d, bert["config"])


def test_prefix_mismatch_for_grouped_query_attention(tmp_path):
    llama = make_base("llama", tmp_path / "llama")
    cfg = adapter_configs("llama")["prefix"]
    d = make_adapter("llama", llama, cfg, tmp_path / "prefix", seed=1, train_steps=0)
    bad = _edit_config(d, tmp_path / "bad", num_attention_heads=4)
    with pytest.raises(AdapterError, match="number of key/value heads is 4 in the adapter but 2 in the base model"):
        load_adapter("x", bad, load_base_config(llama))


def test_prefix_tuning_refused_for_distilbert(bert, tmp_path):
    distil = make_base("distilbert", tmp_path / "distil")
    d = _edit_config(bert["pt"], tmp_path / "prefix", peft_type="PREFIX_TUNING")
    with pytest.raises(AdapterError, match="PREFIX_TUNING, which distilbert does not support"):
        load_adapter("x", d, load_base_config(distil))


def test_modules_to_save_outside_the_head_is_refused(bert, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "extra"
    shutil.copytree(bert["pt"], d)
    w = load_file(str(d / "adapter_model.safetensors"))
    w["base_model.bert.pooler.dense.weight"] = torch.zeros(32, 32)
    save_file(w, str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="'base_model.bert.pooler.dense.weight' .* not part of this model's"):
        load_adapter("x", d, bert["config"])


@pytest.mark.parametrize("name", ["a/b", "a\nb", "tab\there", " padded"])
def test_bad_task_names(bert, name):
    with pytest.raises(AdapterError, match=re.escape(f"task name {name!r} is not allowed")):
        load_adapter(name, bert["pt"], bert["config"])


def test_a_task_name_longer_than_every_entry_point_takes_is_refused(bert):
    """The server takes names of up to 128 characters (and /v1/classify 256); a longer one added by the CLI or the
    library could not be classified or paged past there."""
    assert load_adapter("n" * 128, bert["pt"], bert["config"])[0].name == "n" * 128
    with pytest.raises(AdapterError, match="has 129 characters; use at most 128"):
        load_adapter("n" * 129, bert["pt"], bert["config"])


def _edit_weights(src, dst, change):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    w = load_file(str(dst / "adapter_model.safetensors"))
    save_file(change(w), str(dst / "adapter_model.safetensors"))
    return dst


def test_a_head_whose_bias_does_not_fit_its_weight_is_refused(bert, tmp_path):
    def widen(w):
        key = next(k for k in w if k.endswith("classifier.bias"))
        return {**w, key: np.zeros(w[key].shape[0] + 2, np.float32)}

    d = _edit_weights(bert["pt"], tmp_path / "bias", widen)
    with pytest.raises(AdapterError, match=r"classifier.bias size is \d+ in the adapter but \d+ in classifier.weight"):
        load_adapter("x", d, bert["config"])


def test_labels_that_do_not_fit_the_base_head_are_refused_where_the_adapter_saves_none(bert, tmp_path):
    d = _edit_weights(bert["pt"], tmp_path / "nohead",
                      lambda w: {k: v for k, v in w.items() if "classifier" not in k})
    (d / "labels.json").write_text(json.dumps({"id2label": {"0": "only"}}))
    with pytest.raises(AdapterError, match=r"names 1 labels but the base model's head \(the adapter saves none\) "
                                           rf"has {bert['config'].num_labels} outputs"):
        load_adapter("x", d, bert["config"])


def test_unsupported_model_family(tmp_path):
    """ProphetNet: a seq2seq model whose decoder is neither BART's nor T5's (n-gram streams)."""
    from transformers import ProphetNetConfig

    ProphetNetConfig(hidden_size=32, encoder_ffn_dim=37, decoder_ffn_dim=37, num_encoder_layers=1,
                     num_decoder_layers=1, num_encoder_attention_heads=4, num_decoder_attention_heads=4,
                     vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError,
                       match="model type 'prophetnet' is not supported: promptmux exports causal LMs of any family "
                             "transformers knows, sequence classifiers of .* and seq2seq models of bart, .*pegasus, t5 "
                             "and of other families whose decoder is BART's or T5's"):
        load_base_config(tmp_path)


def test_seq2seq_prefix_needs_both_submodules(tmp_path):
    """PEFT builds a seq2seq prefix for decoder self- and cross-attention (2 submodules); 1 cannot be placed."""
    t5 = make_base("t5", tmp_path / "t5")
    d = make_adapter("t5", t5, adapter_configs("t5")["prefix"], tmp_path / "prefix", seed=1, train_steps=0)
    bad = _edit_config(d, tmp_path / "bad", num_transformer_submodules=1)
    with pytest.raises(AdapterError, match="num_transformer_submodules=1; PEFT builds seq2seq adapters with 2"):
        load_adapter("x", bad, load_base_config(t5))


def test_seq2seq_adapter_on_a_causal_lm_names_both_task_types(tmp_path):
    t5 = make_base("t5", tmp_path / "t5")
    d = make_adapter("t5", t5, adapter_configs("t5")["pt"], tmp_path / "pt", seed=1, train_steps=0)
    gpt2 = make_base("gpt2", tmp_path / "gpt2")
    with pytest.raises(AdapterError, match="task type SEQ_2_SEQ_LM but the base model .gpt2. is exported for CAUSAL_LM"):
        load_adapter("x", d, load_base_config(gpt2))


def test_export_refuses_nonempty_target_and_duplicate_names(bert, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_deployment(bert["base"], {"a": bert["pt"]}, tmp_path / "out", quiet=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"
    with pytest.raises(AdapterError, match="--fold 'zzz' names no task"):
        export_deployment(bert["base"], {"a": bert["pt"]}, tmp_path / "o2", fold="zzz", quiet=True)


def test_generation_only_is_refused_for_a_classifier_with_the_reason(bert, tmp_path):
    with pytest.raises(AdapterError, match="--generation-only is for causal LMs; classifiers need their "
                                           "full-sequence graph \\(it classifies\\)"):
        export_deployment(bert["base"], {"a": bert["pt"]}, tmp_path / "o", quiet=True, generation_only=True)
    assert not (tmp_path / "o").exists()


def test_failed_export_leaves_no_folder(bert, tmp_path, monkeypatch):
    from promptmux.export import onnx_export

    def boom(*a, **k):
        raise RuntimeError("simulated failure during export")

    monkeypatch.setattr(onnx_export, "export_onnx", boom)
    with pytest.raises(RuntimeError, match="simulated failure"):
        export_deployment(bert["base"], {"a": bert["pt"]}, tmp_path / "out", quiet=True)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp folder


@pytest.fixture(scope="module")
def rt(bert):
    return Runtime(export_deployment(bert["base"], {"pt": bert["pt"]}, bert["root"] / "deploy", quiet=True))


def test_unknown_task_lists_the_served_ones(rt):
    ids, mask = random_batch("bert", rows=1, seq=5, seed=0, padding_side="right")
    with pytest.raises(UnknownTaskError, match="unknown task 'nope'; this deployment serves: pt"):
        rt.forward(ids, mask, ["nope"])


def test_task_names_given_as_numpy_strings_are_plain_names(rt):
    """Names from np.array(["pt"]) (or a DataFrame column) are numpy strings: messages and results print 'pt'."""
    ids, mask = random_batch("bert", rows=1, seq=5, seed=0, padding_side="right")
    with pytest.raises(InputError) as e:
        rt.forward(np.ones((1, 61), int), None, np.array(["pt"]))  # too long: the message names the task
    assert "of task 'pt'" in str(e.value) and "np.str_" not in str(e.value)
    with pytest.raises(UnknownTaskError) as e:
        rt.forward(ids, mask, np.array(["nope"]))
    assert str(e.value).startswith("unknown task 'nope';")
    got = rt.forward(ids, mask, np.array(["pt"]))
    assert np.array_equal(got[0], rt.forward(ids, mask, ["pt"])[0])
    assert all(type(v.name) is str for v in (rt.bank.view(np.str_("pt")), rt.bank.view("pt")))
    with pytest.raises(InputError, match=r"a task name must be a string, got int 3; give one task name"):
        rt.forward(ids, mask, [3])


@pytest.mark.parametrize("kwargs,message", [
    (dict(attention_mask=np.ones((2, 4), int)), r"attention_mask has shape \(2, 4\) but input_ids has \(2, 5\)"),
    (dict(tasks=["pt"] * 3), "got 3 task names for 2 rows"),
    (dict(attention_mask=np.full((2, 5), 2)), "attention_mask must contain only 0 and 1"),
    (dict(attention_mask=np.zeros((2, 5), int)), "have no real token"),
])
def test_bad_forward_inputs(rt, kwargs, message):
    ids, _ = random_batch("bert", rows=2, seq=5, seed=0, padding_side="right")
    args = dict(attention_mask=np.ones_like(ids), tasks=["pt", "pt"])
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        rt.forward(ids, **args)


def test_ragged_rows_of_ids_are_padded_like_tokenized_text(rt):
    rows = [[5, 6, 7, 8], [9, 10]]
    got = rt.forward(rows, None, "pt")
    alone = [rt.forward([r], None, "pt")[0] for r in rows]
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, alone)) < 1e-5
    with pytest.raises(InputError, match="or have different lengths and come with an attention_mask"):
        rt.forward(rows, [[1, 1, 1, 1], [1, 1]], "pt")
    with pytest.raises(InputError, match="have no real token"):
        rt.forward([[5, 6], []], None, "pt")


def test_out_of_vocab_and_too_long_inputs(rt):
    with pytest.raises(InputError, match=r"input_ids must lie in \[0, 120\)"):
        rt.forward(np.array([[1, 500]]), None, "pt")
    with pytest.raises(InputError, match="exceed the model's 64 positions"):
        rt.forward(np.ones((1, 61), int), None, "pt")  # 61 tokens + 4 virtual tokens > 64


@pytest.mark.parametrize("deployment", ["roberta"], indirect=True)
def test_roberta_positions_count_from_after_the_padding_index(deployment):
    """RoBERTa's 66-entry position table starts at padding index + 1, so a row has 64 positions: the last one
    that fits runs, one more is refused as an input error (not an out-of-range error inside the graph)."""
    rt = Runtime(deployment.deploy)
    virtual = rt.bank.view("pt").num_virtual_tokens
    assert rt.max_positions == 64
    assert rt.forward(np.full((1, 64 - virtual), 5), None, "pt")[0].shape == (3,)
    with pytest.raises(InputError, match="exceed the model's 64 positions"):
        rt.forward(np.full((1, 65 - virtual), 5), None, "pt")


def test_unknown_backend(rt):
    with pytest.raises(ValueError, match="unknown backend 'tensorrt-llm'"):
        Runtime(rt.dir, backend="tensorrt-llm")


def test_not_a_deployment(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a promptmux deployment"):
        Runtime(tmp_path)


def test_vocab_mismatch_via_recorded_base(bert, tmp_path):
    from transformers import BertConfig

    other = tmp_path / "other-bert"
    cfg = json.loads((bert["base"] / "config.json").read_text())
    BertConfig(**{**cfg, "vocab_size": 999}).save_pretrained(other)
    d = _edit_config(bert["pt"], tmp_path / "bad", base_model_name_or_path=str(other))
    with pytest.raises(AdapterError, match="vocab size is 999 in the adapter but 120 in the base model"):
        load_adapter("x", d, bert["config"])


def test_promptmux_threads_sets_the_default_and_a_bad_value_is_named(rt, monkeypatch):
    from promptmux.runtime.cpu import default_threads
    from promptmux.runtime.sessions import OrtSession

    monkeypatch.setenv("PROMPTMUX_THREADS", "1")
    assert OrtSession(rt.dir / "model.onnx").session.get_session_options().intra_op_num_threads == 1
    assert OrtSession(rt.dir / "model.onnx", threads=2).session.get_session_options().intra_op_num_threads == 2
    monkeypatch.setenv("PROMPTMUX_THREADS", "two")
    with pytest.raises(InputError, match="PROMPTMUX_THREADS='two': give a whole number of threads, 1 or more"):
        OrtSession(rt.dir / "model.onnx")
    monkeypatch.delenv("PROMPTMUX_THREADS")  # unset (the test workers set it): each engine's own default
    assert default_threads() is None and OrtSession(rt.dir / "model.onnx").session.get_session_options(
    ).intra_op_num_threads == 0
