"""RWKV-7 per-layer ONNX graphs (opset 16, IR 8, static shapes, no batch dimension).

| file | inputs | outputs |
|---|---|---|
| embed.onnx | `token` int32 [1] | `output` [C] |
| mixing_0.onnx | `input` [C], `state_in` [2, C], `wkv_in` [H, N, N] | `output`, `state_out`, `wkv_out`, `v_first` [C] |
| mixing_i.onnx (i > 0) | the same + `v_first` [C] | `output`, `state_out`, `wkv_out` |
| head.onnx | `x` [C] | `output` [V] |
`state_in` rows: 0 = ffn shift (LN2 output of the previous token), 1 = att shift (LN1 output), the
order of the first two RWKV-4 rows. `wkv_in` is the matrix state S, per head [value, key].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from rwkv2rknn.families.graph import GraphBuilder, build_embed, build_head, check_options, write_graphs
from rwkv2rknn.families.rwkv7.checkpoint import Weights7
from rwkv2rknn.families.rwkv7.reference import DECAY_SCALE, GN_EPS, L2_EPS


def build_embed7(part: dict[str, np.ndarray], dtype: str = "float16", weights_as: str = "constants") -> onnx.ModelProto:
    """`token` int32 [1] -> LN0(emb[token]) -> `output` [C]: the same graph as every family's."""
    return build_embed(part, dtype, weights_as)


def build_head7(part: dict[str, np.ndarray], dtype: str = "float16", weights_as: str = "constants") -> onnx.ModelProto:
    """`x` [C] -> head(LN_out(x)) -> `output` [V]: the same graph as every family's."""
    return build_head(part, dtype, weights_as)


def build_mixing7(part: dict[str, np.ndarray], index: int = 0, dtype: str = "float16",
                  weights_as: str = "constants") -> onnx.ModelProto:
    """One RWKV-7 block in RNN mode (I/O in the module docstring).

    Constant-weight projections are MatMul(W[out, in], x[in]); the LoRA matrices enter transposed so
    they are weight-first too. The products with the matrix state are MatMul([H, N, N], [H, N, 1]);
    outer products are broadcast Muls. The only Exp is the decay, whose argument is -0.606531 * sigmoid.
    """
    b = GraphBuilder(dtype, weights_as, reserved=("input", "state_in", "wkv_in", "v_first") if index else
                     ("input", "state_in", "wkv_in"))
    C = part["ln1.weight"].shape[0]
    H, N = part["att.r_k"].shape
    f32 = np.float32
    consts = b.ln_constants()
    gn_consts = {"two": consts["two"], "eps": b.weight("gn_eps", np.array(GN_EPS))}
    # fp16 cannot hold 1e-12: use its smallest subnormal (only a zero vector tells them apart)
    l2_eps = max(L2_EPS, float(np.finfo(np.float16).smallest_subnormal)) if b.fp16 else L2_EPS

    def shape(name, dims):
        return b.index(name, dims)

    hn, col, row, flat = shape("shape_hn", [H, N]), shape("shape_col", [H, N, 1]), \
        shape("shape_row", [H, 1, N]), shape("shape_flat", [-1])
    last_axis = b.index("axes_last", [-1])

    def const(key: str, array: np.ndarray | None = None) -> str:
        return b.weight(key, part[key] if array is None else array)

    def linear(key: str, x: str, out: str, transpose: bool = False) -> str:
        w = part[key].T if transpose else part[key]
        return b.op("MatMul", [b.weight(key, w), x], out)

    def lora(x: str, first: str, second: str, name: str, mid_op: str | None = None) -> str:
        """x @ first @ second as weight-first MatMuls, with an optional activation in between."""
        t = linear(first, x, f"{name}.down", transpose=True)
        if mid_op:
            t = b.op(mid_op, [t], f"{name}.{mid_op.lower()}")
        return linear(second, t, f"{name}.up", transpose=True)

    s_ffn = b.op("Gather", ["state_in", b.index("row_0", 0)], "ffn_shift", axis=0)
    s_att = b.op("Gather", ["state_in", b.index("row_1", 1)], "att_shift", axis=0)

    # time mixing
    h = b.layer_norm("input", "ln1", part["ln1.weight"], part["ln1.bias"], consts)
    d = b.op("Sub", [s_att, h], "att.delta")
    m = {q: b.op("Add", [h, b.op("Mul", [d, const(f"att.x_{q}")])], f"att.m_{q}") for q in "rwkvag"}
    r = linear("att.receptance.weight", m["r"], "att.r")
    k = linear("att.key.weight", m["k"], "att.k")
    v = linear("att.value.weight", m["v"], "v_first" if index == 0 else "att.v_lin")
    w_lora = lora(m["w"], "att.w1", "att.w2", "att.w_lora", "Tanh")
    a = b.op("Sigmoid", [b.op("Add", [const("att.a0"), lora(m["a"], "att.a1", "att.a2", "att.a_lora")])], "att.a")
    g = lora(m["g"], "att.g1", "att.g2", "att.g", "Sigmoid")

    # kk = per-head L2 normalisation of k * k_k
    kkr = b.op("Reshape", [b.op("Mul", [k, const("att.k_k")]), hn], "att.kk_raw")
    ssq = b.op("ReduceSum", [b.op("Mul", [kkr, kkr]), last_axis], "att.kk_sumsq", keepdims=1)
    nrm = b.op("Max", [b.op("Sqrt", [ssq]), b.weight("l2_eps", np.array(l2_eps))], "att.kk_norm")
    kk = b.op("Div", [kkr, nrm], "att.kk")  # [H, N]
    # k * (1 + (a - 1) * k_a) = k * ((1 - k_a) + a * k_a)
    k_a = part["att.k_a"].astype(f32)
    kscale = b.op("Add", [const("att.one_minus_k_a", f32(1) - k_a), b.op("Mul", [a, const("att.k_a")])])
    k = b.op("Mul", [k, kscale], "att.k_mod")
    if index:
        gate = b.op("Sigmoid", [b.op("Add", [const("att.v0"), lora(m["v"], "att.v1", "att.v2", "att.v_lora")])],
                    "att.v_gate")
        v = b.op("Add", [v, b.op("Mul", [b.op("Sub", ["v_first", v]), gate])], "att.v")
    decay_arg = b.op("Mul", [b.op("Sigmoid", [b.op("Add", [const("att.w0"), w_lora])]),
                             b.weight("decay_scale", np.array(-DECAY_SCALE))], "att.decay_log")  # <= 0
    decay = b.op("Exp", [decay_arg], "att.decay")

    # S = S * w[key] - (S kk) (kk a)^T + v k^T ; y = S r
    S = "wkv_in"
    s_kk = b.op("MatMul", [S, b.op("Reshape", [kk, col], "att.kk_col")], "att.s_kk")  # [H, N, 1]
    kka = b.op("Reshape", [b.op("Mul", [kk, b.op("Reshape", [a, hn])]), row], "att.kka_row")
    s_dec = b.op("Mul", [S, b.op("Reshape", [decay, row], "att.decay_row")], "att.s_decayed")
    s_rm = b.op("Sub", [s_dec, b.op("Mul", [s_kk, kka])], "att.s_removed")
    vk = b.op("Mul", [b.op("Reshape", [v, col], "att.v_col"), b.op("Reshape", [k, row], "att.k_row")], "att.vk")
    S_new = b.op("Add", [s_rm, vk], "wkv_out")
    y = b.op("Reshape", [b.op("MatMul", [S_new, b.op("Reshape", [r, col], "att.r_col")]), hn], "att.y")
    y = b.layer_norm(y, "att.ln_x", part["att.ln_x.weight"].reshape(H, N), part["att.ln_x.bias"].reshape(H, N),
                     gn_consts)
    rk = b.op("Mul", [b.op("Mul", [r, k]), const("att.r_k", part["att.r_k"].reshape(-1))])
    bonus = b.op("ReduceSum", [b.op("Reshape", [rk, hn]), last_axis], "att.bonus", keepdims=1)  # [H, 1]
    y = b.op("Add", [y, b.op("Mul", [bonus, b.op("Reshape", [v, hn])])], "att.y_bonus")
    y = b.op("Mul", [b.op("Reshape", [y, flat]), g], "att.y_gated")
    x1 = b.op("Add", ["input", linear("att.output.weight", y, "att.out")], "x1")

    # channel mixing
    c = b.layer_norm(x1, "ln2", part["ln2.weight"], part["ln2.bias"], consts)
    fk = b.op("Add", [c, b.op("Mul", [b.op("Sub", [s_ffn, c]), const("ffn.x_k")])], "ffn.m_k")
    hid = b.op("Relu", [linear("ffn.key.weight", fk, "ffn.k")], "ffn.relu")
    hid = b.op("Mul", [hid, hid], "ffn.sq")
    b.op("Add", [x1, linear("ffn.value.weight", hid, "ffn.v")], "output")

    shape_row = b.index("state_row_shape", [1, -1])
    rows = [b.op("Reshape", [t, shape_row], f"state_row_{i}") for i, t in enumerate((c, h))]
    b.op("Concat", rows, "state_out", axis=0)

    inputs = [b.value("input", [C]), b.value("state_in", [2, C]), b.value("wkv_in", [H, N, N])]
    outputs = [b.value("output", [C]), b.value("state_out", [2, C]), b.value("wkv_out", [H, N, N])]
    (inputs if index else outputs).append(b.value("v_first", [C]))
    return b.model(f"mixing_{index}", inputs, outputs, "rwkv7")


def export_model7(weights: Weights7, out_dir: str | os.PathLike, dtype: str = "float16",
                  weights_as: str = "constants", progress: bool = True, force: bool = False) -> list[Path]:
    """Write embed.onnx, mixing_0..L-1.onnx and head.onnx into `out_dir` (all or nothing).

    One part is fetched, built, written and dropped at a time: peak memory is about one layer's
    weights (or the embedding) a few times over.
    """
    check_options(dtype, weights_as)
    return write_graphs(weights, out_dir, (build_embed7, build_mixing7, build_head7), dtype, weights_as, force,
                        progress)
