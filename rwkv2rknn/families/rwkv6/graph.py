"""RWKV-6 per-layer ONNX graphs: RWKV-5.2's interface and matrix-state attention (rwkv2rknn/families/rwkv5/graph.py)
with the v6 token-shift LoRA, the data-dependent decay and the v6 channel mix.

The decay is written as the model defines it, Exp(-Exp(loglog)) with loglog = time_decay + tanh(x_w dw1) dw2:
the fused policy keeps both Exps fp32 on the CPU (precision seeds); the deep policy's legalization proves the
outer argument <= 0 and bounds the inner one from the tanh's range (passes/legalize_exp.py, passes/signs.py).
"""

from __future__ import annotations

import numpy as np
import onnx

from rwkv2rknn.families.graph import GraphBuilder, build_embed, build_head, exporter
from rwkv2rknn.families.rwkv5.graph import LAYER_INPUTS, finish, linear, matrix_state_attention, shift_rows, silu
from rwkv2rknn.families.rwkv6.checkpoint import MIX_ORDER


def build_mixing6(part: dict[str, np.ndarray], index: int = 0, dtype: str = "float16",
                  weights_as: str = "constants") -> onnx.ModelProto:
    """One RWKV-6 block in RNN mode (I/O as RWKV-5's: input, state_in [2, C], wkv_in [H, N, N])."""
    b = GraphBuilder(dtype, weights_as, reserved=LAYER_INPUTS)
    C = part["ln1.weight"].shape[0]
    H, N = part["att.time_faaaa"].shape
    Dm = part["att.time_maa_w2"].shape[1]
    consts = b.ln_constants()
    s_ffn, s_att = shift_rows(b)
    axis0 = b.index("axes_0", [0])

    def const(key: str) -> str:
        return b.weight(key, part[key])

    h = b.layer_norm("input", "ln1", part["ln1.weight"], part["ln1.bias"], consts)
    d = b.op("Sub", [s_att, h], "att.delta")
    xx = b.op("Add", [h, b.op("Mul", [d, const("att.time_maa_x")])], "att.m_x")
    t = b.op("Tanh", [linear(b, part, "att.time_maa_w1", xx, "att.maa_down", transpose=True)], "att.maa_tanh")
    x = {}
    for i, q in enumerate(MIX_ORDER):
        ti = b.op("Slice", [t, b.index(f"maa_start_{q}", [i * Dm]), b.index(f"maa_end_{q}", [(i + 1) * Dm]), axis0],
                  f"att.maa_t_{q}")
        up = b.op("MatMul", [b.weight(f"att.time_maa_w2.{q}", part["att.time_maa_w2"][i].T), ti], f"att.maa_up_{q}")
        x[q] = b.op("Add", [h, b.op("Mul", [d, b.op("Add", [const(f"att.time_maa_{q}"), up])])], f"att.m_{q}")
    r = linear(b, part, "att.receptance.weight", x["r"], "att.r")
    k = linear(b, part, "att.key.weight", x["k"], "att.k")
    v = linear(b, part, "att.value.weight", x["v"], "att.v")
    g = silu(b, linear(b, part, "att.gate.weight", x["g"], "att.g_lin"), "att.g")
    lora = b.op("Tanh", [linear(b, part, "att.time_decay_w1", x["w"], "att.decay_down", transpose=True)],
                "att.decay_tanh")
    loglog = b.op("Add", [const("att.time_decay"),
                          linear(b, part, "att.time_decay_w2", lora, "att.decay_up", transpose=True)], "att.decay_loglog")
    rate = b.op("Exp", [loglog], "att.decay_rate")                               # -log(decay) > 0
    decay = b.op("Exp", [b.op("Neg", [rate], "att.decay_log")], "att.decay")      # in (0, 1)
    att = matrix_state_attention(b, part, r, k, v, g, decay, consts)
    x1 = b.op("Add", ["input", att], "x1")

    c = b.layer_norm(x1, "ln2", part["ln2.weight"], part["ln2.bias"], consts)
    dc = b.op("Sub", [s_ffn, c], "ffn.delta")
    fk = b.op("Add", [c, b.op("Mul", [dc, const("ffn.time_maa_k")])], "ffn.m_k")
    fr = b.op("Add", [c, b.op("Mul", [dc, const("ffn.time_maa_r")])], "ffn.m_r")
    fr = b.op("Sigmoid", [linear(b, part, "ffn.receptance.weight", fr, "ffn.r_lin")], "ffn.r")
    hid = b.op("Relu", [linear(b, part, "ffn.key.weight", fk, "ffn.k")], "ffn.relu")
    hid = b.op("Mul", [hid, hid], "ffn.sq")
    b.op("Add", [x1, b.op("Mul", [fr, linear(b, part, "ffn.value.weight", hid, "ffn.v")], "ffn.out")], "output")
    return finish(b, index, C, H, N, c, h, "rwkv6")


export_model6 = exporter((build_embed, build_mixing6, build_head))
