"""RWKV-5.2 per-layer ONNX graphs (opset 16, IR 8, static shapes, no batch dimension), and the matrix-state
pieces RWKV-6 shares (`shift_rows`, `silu`, `matrix_state_attention`).

| file | inputs | outputs |
|---|---|---|
| embed.onnx | `token` int32 [1] | `output` [C] |
| mixing_i.onnx | `input` [C], `state_in` [2, C], `wkv_in` [H, N, N] | `output`, `state_out`, `wkv_out` (same shapes) |
| head.onnx | `x` [C] | `output` [V] |
`state_in` rows: 0 = ffn shift (LN2 output of the previous token), 1 = att shift (LN1 output), as RWKV-7's.
`wkv_in` is the matrix state S, per head [value, key] (the layout of RWKV-7's wkv_in and of a state-tuning
file's time_state; the `rwkv` package holds its transpose): y = S r + (sum over the head of r u k) v, and
S' = S * decay[key] + v k^T. The decay of RWKV-5 is a constant, exp(-exp(time_decay)) computed at export.
"""

from __future__ import annotations

import numpy as np
import onnx

from rwkv2rknn.families.graph import GraphBuilder, build_embed, build_head, exporter, mix
from rwkv2rknn.families.rwkv5.reference import GN_EPS

LAYER_INPUTS = ("input", "state_in", "wkv_in")


def shift_rows(b: GraphBuilder) -> tuple[str, str]:
    """(ffn shift, att shift): rows 0 and 1 of state_in."""
    s_ffn = b.op("Gather", ["state_in", b.index("row_0", 0)], "ffn_shift", axis=0)
    s_att = b.op("Gather", ["state_in", b.index("row_1", 1)], "att_shift", axis=0)
    return s_ffn, s_att


def linear(b: GraphBuilder, part: dict, key: str, x: str, out: str, transpose: bool = False) -> str:
    """MatMul(W[out, in], x[in]), weight first as every projection of these graphs."""
    w = part[key].T if transpose else part[key]
    return b.op("MatMul", [b.weight(key, w), x], out)


def silu(b: GraphBuilder, x: str, out: str) -> str:
    return b.op("Mul", [x, b.op("Sigmoid", [x])], out)


def matrix_state_attention(b: GraphBuilder, part: dict, r: str, k: str, v: str, g: str, decay: str,
                           consts: dict) -> str:
    """The time mix after the projections: the matrix-state read and update, GroupNorm, gate, output projection.

    decay: the name of a [C] tensor (or constant) of per-key decays. Returns the output projection's tensor;
    writes `wkv_out`.
    """
    H, N = part["att.time_faaaa"].shape
    hn, col, row = b.index("shape_hn", [H, N]), b.index("shape_col", [H, N, 1]), b.index("shape_row", [H, 1, N])
    flat, last_axis = b.index("shape_flat", [-1]), b.index("axes_last", [-1])
    S = "wkv_in"
    y = b.op("Reshape", [b.op("MatMul", [S, b.op("Reshape", [r, col], "att.r_col")], "att.s_r"), hn], "att.y_state")
    ruk = b.op("Mul", [b.op("Mul", [r, k], "att.rk"), b.weight("att.time_faaaa", part["att.time_faaaa"].reshape(-1))])
    bonus = b.op("ReduceSum", [b.op("Reshape", [ruk, hn]), last_axis], "att.bonus", keepdims=1)  # [H, 1]
    v_hn = b.op("Reshape", [v, hn], "att.v_hn")
    y = b.op("Add", [y, b.op("Mul", [bonus, v_hn])], "att.y")
    s_dec = b.op("Mul", [S, b.op("Reshape", [decay, row], "att.decay_row")], "att.s_decayed")
    vk = b.op("Mul", [b.op("Reshape", [v, col], "att.v_col"), b.op("Reshape", [k, row], "att.k_row")], "att.vk")
    b.op("Add", [s_dec, vk], "wkv_out")
    gn = {"two": consts["two"], "eps": b.weight("gn_eps", np.array(GN_EPS))}
    y = b.layer_norm(y, "att.ln_x", part["att.ln_x.weight"].reshape(H, N), part["att.ln_x.bias"].reshape(H, N), gn)
    y = b.op("Mul", [b.op("Reshape", [y, flat]), g], "att.y_gated")
    return linear(b, part, "att.output.weight", y, "att.out")


def finish(b: GraphBuilder, index: int, C: int, H: int, N: int, c: str, h: str, family: str) -> onnx.ModelProto:
    """state_out = [c; h] and the graph's interface."""
    shape_row = b.index("state_row_shape", [1, -1])
    rows = [b.op("Reshape", [t, shape_row], f"state_row_{i}") for i, t in enumerate((c, h))]
    b.op("Concat", rows, "state_out", axis=0)
    inputs = [b.value("input", [C]), b.value("state_in", [2, C]), b.value("wkv_in", [H, N, N])]
    outputs = [b.value("output", [C]), b.value("state_out", [2, C]), b.value("wkv_out", [H, N, N])]
    return b.model(f"mixing_{index}", inputs, outputs, family)


def build_mixing5(part: dict[str, np.ndarray], index: int = 0, dtype: str = "float16",
                  weights_as: str = "constants") -> onnx.ModelProto:
    """One RWKV-5.2 block in RNN mode (I/O in the module docstring)."""
    b = GraphBuilder(dtype, weights_as, reserved=LAYER_INPUTS)
    C = part["ln1.weight"].shape[0]
    H, N = part["att.time_decay"].shape
    consts = b.ln_constants()
    s_ffn, s_att = shift_rows(b)

    h = b.layer_norm("input", "ln1", part["ln1.weight"], part["ln1.bias"], consts)
    m = {q: mix(b, h, s_att, part[f"att.time_mix_{q}"], f"att.m_{q}") for q in "kvrg"}
    r = linear(b, part, "att.receptance.weight", m["r"], "att.r")
    k = linear(b, part, "att.key.weight", m["k"], "att.k")
    v = linear(b, part, "att.value.weight", m["v"], "att.v")
    g = silu(b, linear(b, part, "att.gate.weight", m["g"], "att.g_lin"), "att.g")
    decay = np.exp(-np.exp(part["att.time_decay"].astype(np.float64))).reshape(-1)
    att = matrix_state_attention(b, part, r, k, v, g, b.weight("att.decay", decay), consts)
    x1 = b.op("Add", ["input", att], "x1")

    c = b.layer_norm(x1, "ln2", part["ln2.weight"], part["ln2.bias"], consts)
    fk = mix(b, c, s_ffn, part["ffn.time_mix_k"], "ffn.m_k")
    fr = mix(b, c, s_ffn, part["ffn.time_mix_r"], "ffn.m_r")
    fr = b.op("Sigmoid", [linear(b, part, "ffn.receptance.weight", fr, "ffn.r_lin")], "ffn.r")
    hid = b.op("Relu", [linear(b, part, "ffn.key.weight", fk, "ffn.k")], "ffn.relu")
    hid = b.op("Mul", [hid, hid], "ffn.sq")
    b.op("Add", [x1, b.op("Mul", [fr, linear(b, part, "ffn.value.weight", hid, "ffn.v")], "ffn.out")], "output")
    return finish(b, index, C, H, N, c, h, "rwkv5")


export_model5 = exporter((build_embed, build_mixing5, build_head))
