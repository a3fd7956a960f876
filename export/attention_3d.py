"""A rewrite rule for the exporter's optimizer: the standard `Attention` op (opset 23) on the projections as they
are, [batch, tokens, heads x head_dim], instead of on copies transposed to [batch, heads, tokens, head_dim].

torch's exporter writes each SDPA call of an encoder as Reshape -> Transpose(0, 2, 1, 3) on Q, K and V, the 4-D
Attention, then Transpose -> Reshape back. The op takes 3-D inputs when told the head counts (q_num_heads,
kv_num_heads) and returns 3-D output, so the four Transposes and four Reshapes of every layer go. ONNX Runtime ran
the demo's graph 4-5 % faster at B = 1, 8 and 32 x 64 with bit-identical outputs; OpenVINO, which folds the
transposes itself, ran it as fast as before (AMX Xeon; python -m studies.attention_3d). The rule fires only where
Q, K and V each come straight from such a Reshape -> Transpose (a decoder's keys that are concatenated with a cache
or rotated do not) and the shapes say the heads; anything else keeps its 4-D form.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchFailureError

HEADS_FIRST = [0, 2, 1, 3]  # [batch, tokens, heads, head_dim] <-> [batch, heads, tokens, head_dim]


def _dims(value, rank: int, what: str) -> list:
    if value.shape is None or value.shape.rank() != rank:
        raise MatchFailureError(f"{what}: not of rank {rank}", value)
    return list(value.shape)


class Attention3D(pattern.RewriteRuleClassBase):
    def __init__(self):
        super().__init__("PromptmuxAttention3D")

    def pattern(self, op, q, k, v, q_shape, k_shape, v_shape, out_shape):
        def heads_first(x, shape, name):
            return op.Transpose(op.Reshape(x, shape, _allow_other_attributes=True, _outputs=[name]),
                                perm=HEADS_FIRST)

        attn = op.Attention(heads_first(q, q_shape, "q_heads"), heads_first(k, k_shape, "k_heads"),
                            heads_first(v, v_shape, "v_heads"), pattern.Var("mask", can_match_none=True),
                            _allow_other_attributes=True, _outputs=["attn"])
        return op.Reshape(op.Transpose(attn, perm=HEADS_FIRST), out_shape, _allow_other_attributes=True,
                          _outputs=["out"])

    def check(self, context, q, k, v, q_heads, k_heads, v_heads, attn, out, **_):
        if "q_num_heads" in attn.producer().attributes:
            raise MatchFailureError("already 3-D", attn)
        for x, split in ((q, q_heads), (k, k_heads), (v, v_heads)):
            b, t, hidden = _dims(x, 3, "projection")
            per_head = _dims(split, 4, "projection split into heads")
            if per_head[:2] != [b, t] or not all(isinstance(d, int) for d in per_head[2:]) \
                    or per_head[2] * per_head[3] != hidden:
                raise MatchFailureError("a projection is not split into heads on its last axis", x)
        if k_heads.shape[2] != v_heads.shape[2]:
            raise MatchFailureError("keys and values have different head counts", k)
        if _dims(out, 3, "output")[:2] != _dims(q, 3, "queries")[:2] or not isinstance(out.shape[2], int):
            raise MatchFailureError("the output is not merged back to [batch, tokens, heads x head_dim]", out)
        return True

    def rewrite(self, op, q, k, v, q_heads, k_heads, attn, mask=None, **_):
        inputs = (q, k, v) if mask is None else (q, k, v, mask)
        return op.Attention(*inputs, **dict(attn.producer().attributes), q_num_heads=q_heads.shape[2],
                            kv_num_heads=k_heads.shape[2])


RULES = (Attention3D.rule(),)
