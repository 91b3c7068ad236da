"""RWKV-4 layer graphs in the llama.onnx layout (shared/docs/llama-onnx-rwkv4.md): one block in RNN mode per file,
`input` [C], `state_in` [5, C] -> `output` [C], `state_out` [5, C]."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from rwkv2rknn.families.graph import GraphBuilder, build_embed, build_head, mix, write_graphs

# State rows of a mixing graph, in the llama.onnx / ChatRWKV order.
ROW_FFN_SHIFT, ROW_ATT_SHIFT, ROW_AA, ROW_BB, ROW_PP = range(5)


def _wkv_terms(b: GraphBuilder, p: str, kk: str, aa: str, bb: str, v: str,
               q_name: str, e_prefix: str, num_name: str, den_name: str) -> tuple[str, str, str]:
    """q = max(p, kk); e1 = exp(p - q), e2 = exp(kk - q); (q, e1*aa + e2*v, e1*bb + e2).

    The same stable weighted sum serves the WKV output (p = pp, kk = u + k) and the state update
    (p = pp + w, kk = k).
    """
    q = b.max(p, kk, q_name)
    e1 = b.op("Exp", [b.op("Sub", [p, q])], f"{e_prefix}1")
    e2 = b.op("Exp", [b.op("Sub", [kk, q])], f"{e_prefix}2")
    num = b.op("Add", [b.op("Mul", [e1, aa]), b.op("Mul", [e2, v])], num_name)
    den = b.op("Add", [b.op("Mul", [e1, bb]), e2], den_name)
    return q, num, den


def build_mixing(w: dict[str, np.ndarray], index: int = 0, dtype: str = "float16",
                 weights_as: str = "constants") -> onnx.ModelProto:
    """One RWKV-4 block in RNN mode: (`input` [C], `state_in` [5,C]) -> (`output` [C], `state_out` [5,C])."""
    b = GraphBuilder(dtype, weights_as)
    C = w["ln1.weight"].shape[0]
    consts = b.ln_constants()
    rows = [b.index(f"row_{i}", i) for i in range(5)]
    shape_row = b.index("row_shape", [1, -1])
    s_ffn, s_att, aa, bb, pp = (b.op("Gather", ["state_in", rows[i]], n, axis=0)
                                for i, n in enumerate(("ffn_shift", "att_shift", "aa", "bb", "pp")))

    def matmul(key: str, x: str, out: str) -> str:
        # Weight first: MatMul(W[out, in], x[in]) as the published graphs have it.
        return b.op("MatMul", [b.weight(key, w[key]), x], out)

    # time mixing
    xa = b.layer_norm("input", "ln1", w["ln1.weight"], w["ln1.bias"], consts)
    xk = mix(b, xa, s_att, w["att.time_mix_k"], "att.xk")
    xv = mix(b, xa, s_att, w["att.time_mix_v"], "att.xv")
    xr = mix(b, xa, s_att, w["att.time_mix_r"], "att.xr")
    r = b.op("Sigmoid", [matmul("att.receptance.weight", xr, "att.r_lin")], "att.r")
    k = matmul("att.key.weight", xk, "att.k")
    v = matmul("att.value.weight", xv, "att.v")
    u = b.weight("att.time_first", w["att.time_first"])
    decay = b.weight("att.time_decay", w["att.time_decay"])  # already w = -exp(raw)

    ww = b.op("Add", [u, k], "att.ww")
    _, num, den = _wkv_terms(b, pp, ww, aa, bb, v, "att.q", "att.e", "att.num", "att.den")
    wkv = b.op("Div", [num, den], "att.wkv")
    att = matmul("att.output.weight", b.op("Mul", [r, wkv], "att.rwkv"), "att.out")
    x1 = b.op("Add", ["input", att], "x1")

    ww2 = b.op("Add", [pp, decay], "att.ww2")
    q2, aa2, bb2 = _wkv_terms(b, ww2, k, aa, bb, v, "att.pp_new", "att.f", "att.aa_new", "att.bb_new")

    # channel mixing (its shift is the OLD ffn row of the state)
    xf = b.layer_norm(x1, "ln2", w["ln2.weight"], w["ln2.bias"], consts)
    fk = mix(b, xf, s_ffn, w["ffn.time_mix_k"], "ffn.xk")
    fr = mix(b, xf, s_ffn, w["ffn.time_mix_r"], "ffn.xr")
    fr = b.op("Sigmoid", [matmul("ffn.receptance.weight", fr, "ffn.r_lin")], "ffn.r")
    hid = b.op("Relu", [matmul("ffn.key.weight", fk, "ffn.k")], "ffn.relu")
    hid = b.op("Mul", [hid, hid], "ffn.sq")  # relu(x)^2 as a Mul, as published
    fv = matmul("ffn.value.weight", hid, "ffn.v")
    b.op("Add", [x1, b.op("Mul", [fr, fv], "ffn.out")], "output")

    new_rows = [b.op("Reshape", [t, shape_row], f"state_row_{i}") for i, t in enumerate((xf, xa, aa2, bb2, q2))]
    b.op("Concat", new_rows, "state_out", axis=0)
    return b.model(
        f"mixing_{index}",
        [b.value("input", [C]), b.value("state_in", [5, C])],
        [b.value("output", [C]), b.value("state_out", [5, C])],
        "rwkv4",
    )


def export_model(weights, out_dir: str | os.PathLike, dtype: str = "float16",
                 weights_as: str = "constants", force: bool = False, progress: bool = True) -> list[Path]:
    """Write embed.onnx, mixing_0..L-1.onnx and head.onnx into `out_dir` (all or nothing).

    One graph is built, serialized and dropped at a time, so peak memory is about one layer's
    weights (or the embedding) a few times over, not the whole model.
    """
    return write_graphs(weights, out_dir, (build_embed, build_mixing, build_head), dtype, weights_as, force,
                        progress)
