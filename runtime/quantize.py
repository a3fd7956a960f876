"""int8 graphs (precision "int8", ONNX Runtime): weight-only int8 for a causal LM's cached decoder, dynamic int8
for a classifier's full-sequence graphs.

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth: int8 weights
(ONNX Runtime's MatMulNBits, per-block scales, int8 compute on AVX512-VNNI / AMX with accuracy_level 4) read
a quarter of the bytes. The LM head is included: with tied embeddings the exporter feeds the head's MatMul a
transposed view of the embedding table, which the quantizer skips, so that view is first written out as its
own initializer. Activations and the KV cache stay fp32.

A classifier's forward over whole sequences is bound by compute instead, and there MatMulNBits was barely faster
than fp32 (1.04-1.07x at B = 32 on the demo, AMD Zen 4): its graphs get ONNX Runtime's dynamic quantization, int8
weights with a scale per output channel and int8 activations with a scale per batch (MatMulInteger), 2.4x faster
than fp32 there (results/int8-classifier-bench-amd-zen4.md). Per channel rather than per tensor: 95.3 % of
fp32's sentiment predictions kept against 91.6 % (results/int8-classifier-minilm-amd-zen4.json). Whether that is good enough for a deployment is its
accuracy contract's to say (runtime/precision.py).

Each quantized graph is written once beside the original (`decoder.int8.onnx`, `model.int8.onnx`, ...) and
reused while the original is unchanged and made the same way (RECIPES).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

import numpy as np

from promptmux.core.durable import as_created, save_onnx

from .derived import graph_key, is_current, one_maker, stage, write_stamp

log = logging.getLogger("promptmux.runtime")

BITS = 8
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations inside the kernel: the VNNI/AMX path
# How an int8 graph is made: weight-only for a language model's decoder step, dynamic for a classifier's
# full-sequence graphs (Family.int8_full_sequence). Part of its stamp's key (a graph made otherwise, as by an
# earlier promptmux, is made again) and of its accuracy contract (measured again).
RECIPES = {"weight_only": f"matmulnbits-int{BITS}-block{BLOCK_SIZE}-accuracy{ACCURACY_LEVEL}",
           "dynamic": "dynamic-int8-matmul-per-channel"}


def untie_lm_head(model) -> int:
    """Give each MatMul whose weight is Transpose(initializer) its own transposed initializer, so that the
    weight-only quantizer (which only takes initializers) quantizes it. Returns how many were untied."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    untied = 0
    for node in g.node:
        if node.op_type != "MatMul":
            continue
        src = producer.get(node.input[1])
        if src is None or src.op_type != "Transpose" or src.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in src.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(inits[src.input[0]])
        if weight.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{src.input[0]}.transposed"
        if name not in inits:
            t = numpy_helper.from_array(np.ascontiguousarray(weight.T), name)
            g.initializer.append(t)
            inits[name] = t
        node.input[1] = name
        untied += 1
    return untied


def gemms_to_matmuls(model) -> int:
    """Rewrite Gemm(A, W[, bias]) with a weight initializer as MatMul + Add (GPT-2's Conv1D layers export as Gemm,
    which the weight-only quantizer does not take). Returns how many were rewritten."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes, rewritten = [], 0
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0) \
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            t = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[weight]).T), f"{weight}.T")
            g.initializer.append(t)
            weight = t.name
        out = node.output[0]
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{out}.matmul" if has_bias else out
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}.matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [out], name=f"{node.name}.bias"))
        rewritten += 1
    del g.node[:]
    g.node.extend(nodes)
    return rewritten


def weight_only_int8(path: Path) -> Path:
    """The int8 weight-only copy of the decoder graph at `path` (made once; reused while `path` is unchanged)."""

    out, stamp, key = _int8_files(path, "weight_only")
    if is_current(out, stamp, key):
        return out
    with one_maker(out):
        if not is_current(out, stamp, key):  # another process may have made it while this one waited
            _make_weight_only(path, out, stamp, key)
    return out


def _make_weight_only(path: Path, out: Path, stamp: Path, key: str) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    log.warning("quantizing %s to int8 weights (once per deployment)", path.name)
    model = onnx.load(str(path))
    untied = untie_lm_head(model)
    gemms = gemms_to_matmuls(model)
    quantizer = MatMulNBitsQuantizer(model, bits=BITS, block_size=BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL)
    chatty = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")  # a line per node at INFO
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        chatty.setLevel(level)
    quantized = quantizer.model.model
    count = sum(n.op_type == "MatMulNBits" for n in quantized.graph.node)
    stamp.unlink(missing_ok=True)  # killed below: no stamp, so the copy is made again (never an old stamp on it)
    _save_beside(quantized, out)
    write_stamp(stamp, key, graph=path.name, bits=BITS, block_size=BLOCK_SIZE, accuracy_level=ACCURACY_LEVEL,
                matmuls_quantized=count, lm_head_untied=untied, gemms_rewritten=gemms)


def _int8_files(path: Path, method: str, keep_fp32: tuple[int, ...] = ()) -> tuple[Path, Path, str]:
    """The int8 copy of the graph at `path`, its stamp, and the key the stamp must hold for the copy to be current
    (the graph's identity, the method's recipe and the weight MatMuls kept in fp32)."""
    out = path.with_name(f"{path.stem}.int8.onnx")
    keep = f":fp32={','.join(map(str, keep_fp32))}" if keep_fp32 else ""
    return out, out.with_suffix(".json"), f"{graph_key(path)}:{RECIPES[method]}{keep}"


def int8_graph(path: Path, full_sequence: bool, keep_fp32: tuple[int, ...] = ()) -> Path:
    """The graph precision int8 runs in place of the deployment's graph at `path`: the int8 copy of a causal LM's
    cached decoder or of a classifier's graphs (keep_fp32: weight MatMuls left fp32, by weight_matmuls index, as
    accuracy_control.py chose them); anything else (a causal LM's full-sequence graph) as is. full_sequence: the
    family's full-sequence graphs run int8 (Family.int8_full_sequence)."""
    from promptmux.core.folder import DECODER_GRAPH

    if path.name == DECODER_GRAPH:
        return weight_only_int8(path)
    return dynamic_int8(path, keep_fp32) if full_sequence else path


def weight_matmuls(graph) -> list[str]:
    """The names of the graph's MatMul and Gemm nodes with a weight initializer, in graph order: what dynamic int8
    quantizes (a Gemm as the MatMul the quantizer rewrites it into). A classifier's graphs with and without prefix
    inputs list the same layers in the same order, so an index names one layer in both."""
    inits = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits]


def dynamic_int8(path: Path, keep_fp32: tuple[int, ...] = ()) -> Path:
    """The dynamic int8 copy of a classifier graph at `path`: every MatMul with a weight initializer (but those
    at the keep_fp32 indices) gets int8 weights (a scale per output channel) and int8 activations (a scale per
    batch). Made once; reused while `path` is unchanged and the same layers are kept."""

    keep_fp32 = tuple(sorted(set(keep_fp32)))
    out, stamp, key = _int8_files(path, "dynamic", keep_fp32)
    if is_current(out, stamp, key):
        return out
    with one_maker(out):
        if not is_current(out, stamp, key):
            _make_dynamic(path, out, stamp, key, keep_fp32)
    return out


def _make_dynamic(path: Path, out: Path, stamp: Path, key: str, keep_fp32: tuple[int, ...]) -> None:
    import onnx

    log.warning("quantizing %s to int8 (once per deployment)%s", path.name,
                f", {len(keep_fp32)} layers kept fp32" if keep_fp32 else "")
    names = weight_matmuls(onnx.load(str(path), load_external_data=False).graph)
    bad = [i for i in keep_fp32 if not 0 <= i < len(names)]
    if bad:
        raise ValueError(f"{path.name} has {len(names)} weight MatMuls; cannot keep layer(s) {bad} in fp32")
    nodes = [n for i, n in enumerate(names) if i not in keep_fp32]
    stamp.unlink(missing_ok=True)
    if nodes:
        quantize_matmuls(path, out, nodes)
    else:  # every layer kept fp32 (the quantizer would read an empty list as "all")
        _save_beside(onnx.load(str(path)), out)
    graph = onnx.load(str(out), load_external_data=False).graph
    write_stamp(stamp, key, graph=path.name, recipe=RECIPES["dynamic"], fp32_layers=list(keep_fp32),
                matmuls_quantized=sum(n.op_type == "MatMulInteger" for n in graph.node))


def quantize_matmuls(path: Path, out: Path, nodes: list[str], weights: str = "int8") -> None:
    """ONNX Runtime's dynamic quantization of these MatMul nodes of the graph at `path`, written as `out`; weights
    "int8" (symmetric) or "uint8" (a zero point per channel: MLAS multiplies uint8 by uint8 in 16-bit lanes that
    cannot saturate, where its AVX2 uint8 x int8 kernel saturates pairs of products at 16 bits)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()  # the quantizer advises pre-processing on the root logger, every time
    advice = logging.Filter()
    advice.filter = lambda record: "pre-processing before quantization" not in record.getMessage()
    root.addFilter(advice)
    try:
        with stage(out) as tmp:
            work = Path(tmp) / "quantized.onnx"
            weight_type = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[weights]
            with _reading(path):
                quantize_dynamic(str(path), str(work), weight_type=weight_type, per_channel=True,
                                 op_types_to_quantize=["MatMul"], use_external_data_format=True,
                                 nodes_to_quantize=nodes + [f"{n}_MatMul" for n in nodes],  # a Gemm's name rewritten
                                 extra_options={"MatMulConstBOnly": True})
            _save_beside(onnx.load(str(work)), out)  # the quantizer names the weights' file after its own output
    finally:
        root.removeFilter(advice)


@contextlib.contextmanager
def _reading(path: Path):
    """One process at a time quantizes from the graph at `path`: the quantizer writes <graph>-inferred.onnx beside
    it and deletes it after, so another process quantizing the same graph (or accuracy control ranking its layers)
    deleted this one's midway. (Links in a private folder will not do: onnx refuses weights behind symbolic and hard
    links alike; a private copy would cost the model's size in writes at every layer accuracy control ranks.)"""
    try:
        lock = open(path.with_name(f".{path.name}.quantize.lock"), "w")
    except OSError:  # a read-only folder: nothing is written beside the graph there either
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _save_beside(model, out: Path) -> None:
    """Write `model` as `out` with its weights in `out`.data: both written whole in a folder of their own beside
    `out`, then renamed into place, the weights first, so that a graph never appears without its weights and a
    running session's files are never written over (it keeps the ones it opened)."""

    data = out.with_name(out.name + ".data")
    with stage(out) as tmp:
        staged = Path(tmp) / out.name
        save_onnx(model, staged, data.name)
        for made in (staged.with_name(data.name), staged):
            if made.exists():  # (no weights file where every tensor is small)
                as_created(made)  # onnx writes the weights 0600
        if staged.with_name(data.name).exists():
            os.replace(staged.with_name(data.name), data)
        os.replace(staged, out)
