"""Every model family users prompt-tune, beyond the six the other tests cover in depth: each a tiny random model
(conftest.FAMILIES) with every prompt kind PEFT supports for it, one mixed batch against PEFT eager (1e-4) and
greedy tokens against PEFT's generate. Causal LMs without a row in core/archs.py run on the generic rules and are
verified against PEFT at export; a family those rules do not fit is refused with the measured difference."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FAMILIES, Fixture, is_encoder, is_seq2seq, peft_generate, random_batch, tiny_config

from promptmux import Runtime

# Every kind once: prompt tuning, P-tuning, prefix tuning, MPT, CARTRIDGE and (causal LMs only) CPT.
KINDS = ("pt", "ptmlp", "prefix", "mpt", "cartridge", "cpt")
TOL = 1e-4
_FAMILY_FIXTURES: dict[str, Fixture] = {}


def _family(arch: str, tmp_path_factory) -> Fixture:
    if arch not in _FAMILY_FIXTURES:
        fx = _FAMILY_FIXTURES[arch] = Fixture.shared(tmp_path_factory, arch, KINDS, name=f"family-{arch}")
        fx.rt = Runtime(fx.deploy, backend="onnxruntime")
    return _FAMILY_FIXTURES[arch]


# Each family's tests on one pytest-xdist worker (its export is the slow part), the families spread over them.
@pytest.fixture(scope="module", params=[pytest.param(arch, marks=pytest.mark.xdist_group(f"family-{arch}"))
                                        for arch in FAMILIES])
def family(request, tmp_path_factory):
    return _family(request.param, tmp_path_factory)


def test_mixed_batch_of_every_kind_matches_peft(family):
    if is_seq2seq(family.arch):
        pytest.skip("a seq2seq deployment answers by generation (test_greedy_tokens_match_peft_generate)")
    names = family.task_names()
    ids, mask = random_batch(family.arch, rows=2 * len(names), seq=8, seed=5,
                             padding_side="right" if is_encoder(family.arch) else "left")
    tasks = [names[i % len(names)] for i in range(len(ids))][::-1]
    got = family.rt.forward(ids, mask, tasks)
    for name in names:
        rows = [i for i, t in enumerate(tasks) if t == name]
        want = family.reference(name, ids[rows], mask[rows])
        worst = max(float(np.abs(got[r] - w).max()) for r, w in zip(rows, want))
        assert worst < TOL, (name, worst)


def test_greedy_tokens_match_peft_generate(family):
    if is_encoder(family.arch):
        pytest.skip("a sequence classifier does not generate")
    names = family.task_names()
    ids, mask = random_batch(family.arch, rows=len(names) + 2, seq=7, seed=4, padding_side="left")
    tasks = [names[i % len(names)] for i in range(len(ids))]
    got = family.rt.generate({"input_ids": ids, "attention_mask": mask}, tasks, max_new_tokens=7, eos_token_id=[])
    for name in names:
        rows = [i for i, t in enumerate(tasks) if t == name]
        assert [got[i]["token_ids"] for i in rows] == peft_generate(family, name, ids[rows], mask[rows]), name


@pytest.mark.xdist_group("family-qwen2-cls")
def test_a_causal_lm_classifier_gives_each_row_its_result_alone(tmp_path_factory):
    """A Qwen2 sequence classifier pools each row's last real token with positions that follow the mask: left- and
    right-padded batches give the same scores (PEFT's own result moves with the padding; the rows alone match it,
    test_mixed_batch_of_every_kind_matches_peft), and the export recorded it as a classifier."""
    fx = _family("qwen2-cls", tmp_path_factory)
    assert fx.rt.spec.family.classifies and fx.rt.config.architectures == ["Qwen2ForSequenceClassification"]
    names = fx.task_names()
    tasks = [names[i % len(names)] for i in range(2 * len(names))]
    ids, mask = random_batch("qwen2-cls", rows=len(tasks), seq=8, seed=3, padding_side="right")
    pads = (mask == 0).sum(1)
    left = [np.roll(x, pads[i]) for i, x in enumerate(ids)], [np.roll(m, pads[i]) for i, m in enumerate(mask)]
    assert pads.max() > 0 and all(m[0] == 0 for m, p in zip(left[1], pads) if p)  # the same tokens, padded on the left
    a, b = fx.rt.forward(ids, mask, tasks), fx.rt.forward(np.array(left[0]), np.array(left[1]), tasks)
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) < TOL


def test_generic_families_are_verified_against_peft_at_export(family):
    from promptmux.core.archs import ARCHS

    verified = family.rt.manifest["graph"].get("verified_against_peft")
    if family.arch in ARCHS:  # a row of the table: tested here, not verified at each export
        assert verified is None
    else:
        assert set(verified) == set(family.task_names()) and max(verified.values()) < TOL


@pytest.mark.xdist_group("family-qwen2")
def test_a_family_the_generic_rules_do_not_fit_is_refused_with_the_difference(monkeypatch, tmp_path,
                                                                              tmp_path_factory):
    """A deliberately wrong rule (positions that skip the padding, as OPT's do) for Qwen2: the ONNX graph still
    matches the PyTorch module it was traced from, but not PEFT, so the export refuses it and leaves nothing."""
    from promptmux import export_deployment
    from promptmux.core import archs
    from promptmux.core.archs import ArchSpec, UnsupportedModelError

    fx = _family("qwen2", tmp_path_factory)
    monkeypatch.setitem(archs.ARCHS, "qwen2", ArchSpec(family=archs.DECODER, positions_follow_mask=True,
                                                      verify_at_export=True))
    out = tmp_path / "deploy"
    with pytest.raises(UnsupportedModelError) as e:
        export_deployment(fx.base, {"pt": fx.adapters["pt"]}, out, quiet=True)
    message = str(e.value)
    assert "model type 'qwen2' has no row in promptmux's table" in message
    assert "task 'pt': rows differ by" in message and "add a row to core/archs.py" in message
    diffs = [float(x) for x in message.split("rows differ by ")[1].split(" (")[0].split(", ")]
    assert max(diffs) > TOL and min(diffs) < TOL  # the unpadded row is right, the padded one is not
    assert not out.exists() and not list(tmp_path.glob(".deploy.tmp-*"))


@pytest.mark.xdist_group("family-qwen2")
def test_adapters_peft_itself_cannot_run_are_refused_saying_so(monkeypatch, tmp_path, tmp_path_factory):
    """A family on the generic rules is checked against PEFT; where PEFT's own forward fails (RoFormer's prefix
    tuning: a TypeError inside PEFT), the export says so instead of showing PEFT's traceback."""
    from promptmux import export_deployment
    from promptmux.core import archs
    from promptmux.core.archs import ArchSpec, UnsupportedModelError
    from promptmux.export import verify

    fx = _family("qwen2", tmp_path_factory)
    monkeypatch.setitem(archs.ARCHS, "qwen2", ArchSpec(family=archs.DECODER, verify_at_export=True))
    peft_code = compile("def forward(*a, **k):\n    raise TypeError(\"'DynamicCache' object is not subscriptable\")\n",
                        "/site-packages/peft/peft_model.py", "exec")
    namespace: dict = {}
    exec(peft_code, namespace)
    monkeypatch.setattr(verify, "peft_outputs", namespace["forward"])
    out = tmp_path / "deploy"
    with pytest.raises(UnsupportedModelError, match="PEFT itself fails on these adapters \\(TypeError: 'DynamicCache'"):
        export_deployment(fx.base, {"pt": fx.adapters["pt"]}, out, quiet=True)
    assert not out.exists()


@pytest.mark.xdist_group("family-qwen2")
def test_a_model_the_onnx_exporter_cannot_trace_is_refused_in_a_line(monkeypatch, tmp_path, tmp_path_factory):
    """torch.onnx's failures (Mixtral's grouped MoE, Falcon's multi-query SDPA, dynamic rope scaling) came out as
    hundreds of lines of exporter report: now a refusal naming the model and the exporter's own reason."""
    from promptmux import export_deployment
    from promptmux.core.archs import UnsupportedModelError
    from promptmux.export import onnx_export

    fx = _family("qwen2", tmp_path_factory)
    failure = type("ConversionError", (Exception,), {"__module__": "torch.onnx._internal.exporter._errors"})

    def fails(*a, **k):
        raise failure("Failed to convert the exported program.\n## Exception summary\n\n<class 'AssertionError'>: "
                      "SDPA (MHA) requires q_num_heads = kv_num_heads\n\u2b06\ufe0f\n(and 300 lines more)")
    monkeypatch.setattr(onnx_export, "to_onnx", fails)
    out = tmp_path / "deploy"
    with pytest.raises(UnsupportedModelError, match=r"the ONNX export of this qwen2 model fails \("
                                                    r"ConversionError: <class 'AssertionError'>: SDPA \(MHA\) "
                                                    r"requires q_num_heads"):
        export_deployment(fx.base, {"pt": fx.adapters["pt"]}, out, quiet=True)
    assert not out.exists() and not list(tmp_path.glob(".deploy.tmp-*"))


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.xdist_group(f"family-{a}"))
                                  for a in ("mistral", "gemma2")])
def test_sliding_window_families_keep_rows_within_the_window(arch, tmp_path_factory):
    """The graphs attend over every position, which is what sliding-window attention computes while a row fits its
    window (the tokens above match PEFT there): a row that would outgrow it is refused, not answered differently."""
    from promptmux import InputError

    fx = _family(arch, tmp_path_factory)
    window = FAMILIES[arch][1]["sliding_window"]
    assert fx.rt.max_positions == window < fx.rt.config.max_position_embeddings
    ids, mask = random_batch(arch, rows=1, seq=7, seed=1, padding_side="left")
    with pytest.raises(InputError, match=f"7 tokens \\+ 4 virtual tokens of task 'pt' \\+ max_new_tokens=22 exceed "
                                         f"the model's {window} positions"):
        fx.rt.generate({"input_ids": ids, "attention_mask": mask}, "pt", max_new_tokens=22)
    assert len(fx.rt.generate({"input_ids": ids, "attention_mask": mask}, "pt", max_new_tokens=21,
                              eos_token_id=[])[0]["token_ids"]) == 21
    # Rows that each fit, batched into more slots than the window (one row's virtual tokens, the other's text): each
    # row's logits are those it gets alone. transformers counts a window in slots, so a windowed graph dropped a row's
    # first keys there (or failed: the server's batches), though every row fits its window.
    from promptmux.runtime.generate import ContinuousBatch, SamplingParams

    rows = [np.arange(3, 3 + window - 3 - 8), np.array([11])]  # with 3 and 5 virtual tokens, and 8 new: the window
    tasks = ["ptmlp", "cpt"]

    def steps(which):  # every step's next-token logits of these rows, decoded together
        batch = ContinuousBatch(fx.rt.generator)
        params = SamplingParams(max_new_tokens=8, eos_token_id=[])
        batch.add_many([(rows[i], fx.rt.bank.view(tasks[i]), params, True, None) for i in which])
        out = []
        while batch.rows:
            out.append(batch.logits.copy())
            batch.pick()
            batch.advance()
        return np.stack(out)

    together = steps([0, 1])
    for i in (0, 1):
        assert np.abs(together[:, i] - steps([i])[:, 0]).max() < 1e-4, tasks[i]


def test_a_setting_the_row_does_not_cover_is_refused(tmp_path):
    """ModernBERT's row computes the `cls` pooling: a classifier that mean-pools is refused when it is read."""
    from promptmux.core.archs import UnsupportedModelError
    from promptmux.core.folder import load_base_config

    config = tiny_config("modernbert")
    config.classifier_pooling = "mean"
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="modernbert with classifier_pooling='mean' is not supported: "
                                                    "promptmux computes this family with "
                                                    "classifier_pooling='cls'"):
        load_base_config(tmp_path)


@pytest.mark.xdist_group("family-plbart")
def test_a_seq2seq_family_the_bart_step_does_not_fit_is_refused_with_the_tokens(monkeypatch, tmp_path_factory):
    """PLBart has no row: the BART step read from its modules, verified by greedy tokens against PEFT's generate.
    With a deliberately wrong rule (the embedding LayerNorm before the positions, BlenderbotSmall's order) the
    export refuses it, says on how many rows the tokens differ, and leaves nothing."""
    from promptmux import export_deployment
    from promptmux.core import archs
    from promptmux.core.archs import ArchSpec, UnsupportedModelError

    fx = _family("plbart", tmp_path_factory)
    assert fx.rt.manifest["graph"]["verified_against_peft"]  # the right rules were verified
    monkeypatch.setattr(archs, "generic_seq2seq", lambda config: ArchSpec(
        family=archs.SEQ2SEQ, decoder_step="bart", embed_norm="before_positions", verify_at_export=True))
    out = tmp_path_factory.mktemp("wrong") / "deploy"
    with pytest.raises(UnsupportedModelError) as e:
        export_deployment(fx.base, {"pt": fx.adapters["pt"]}, out, quiet=True)
    assert "model type 'plbart' has no row" in str(e.value)
    assert "task 'pt': greedy tokens differ from PEFT's generate on" in str(e.value)
    assert not out.exists()
