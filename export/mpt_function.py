"""`ai.mpt::MPTPromptConcat`: the MPT prompt composition as one ONNX node.

The exporter turns the torch custom op `promptmux::mpt_prompt_concat` into a single node of
domain `ai.mpt`. We then attach a model-local ONNX function with that name whose body is
standard ops (Gather, MatMul, Mul, Concat), so ONNX Runtime runs the body while a TensorRT
build can swap in a plugin for the node.
"""

from __future__ import annotations

import onnx
from onnx import helper

DOMAIN = "ai.mpt"
OP_TYPE = "MPTPromptConcat"
VERSION = 1
INPUTS = ["task_ids", "shared_ids", "shared", "cols", "rows", "embeds"]


def mpt_function(opset: int) -> onnx.FunctionProto:
    nodes = [
        helper.make_node("Gather", ["shared_ids", "task_ids"], ["row_shared"], axis=0),
        helper.make_node("Gather", ["shared", "row_shared"], ["s"], axis=0),  # [B, T, d]
        helper.make_node("Gather", ["cols", "task_ids"], ["c"], axis=0),  # [B, T, r]
        helper.make_node("Gather", ["rows", "task_ids"], ["r"], axis=0),  # [B, r, d]
        helper.make_node("MatMul", ["c", "r"], ["low_rank"]),  # [B, T, d]
        helper.make_node("Mul", ["s", "low_rank"], ["prompt"]),
        helper.make_node("Concat", ["prompt", "embeds"], ["out"], axis=1),  # [B, T + S, d]
    ]
    return helper.make_function(
        DOMAIN, OP_TYPE, INPUTS, ["out"], nodes, [helper.make_opsetid("", opset)], doc_string=__doc__.split("\n")[0]
    )


def torch_translation():
    """The exporter translation: emit one `ai.mpt::MPTPromptConcat` node for the custom op."""
    from onnx.defs import OpSchema
    from onnxscript import values

    # onnxscript traces ops through their schema; ours is local to the model, so describe it here.
    fp = OpSchema.FormalParameter
    schema = OpSchema(
        OP_TYPE,
        DOMAIN,
        VERSION,
        inputs=[fp(name, "T" if name in ("shared", "cols", "rows", "embeds") else "I") for name in INPUTS],
        outputs=[fp("out", "T")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "prompt and embedding type"),
            ("I", ["tensor(int64)"], "indices"),
        ],
    )
    op = values.Op(values.Opset(DOMAIN, VERSION), OP_TYPE, schema)

    def mpt_prompt_concat(task_ids, shared_ids, shared, cols, rows, embeds):
        return op(task_ids, shared_ids, shared, cols, rows, embeds)

    return mpt_prompt_concat


def attach(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the function body and the ai.mpt opset import to an exported model."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    uses = any(n.domain == DOMAIN and n.op_type == OP_TYPE for n in model.graph.node)
    if not uses:
        raise RuntimeError("the exported graph has no MPTPromptConcat node; the MPT custom op was not translated")
    if not any(f.domain == DOMAIN and f.name == OP_TYPE for f in model.functions):
        model.functions.append(mpt_function(opset))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    return model
