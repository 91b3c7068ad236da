"""Export canonical RWKV-4 weights to per-layer ONNX graphs in the llama.onnx layout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rwkv2rknn.checkpoints import Weights
from rwkv2rknn.errors import UserError
from rwkv2rknn.fsio import staged_directory

OPSET = 16
IR_VERSION = 8
LN_EPS = 1e-5
DTYPES = {"float16": (np.float16, TensorProto.FLOAT16), "float32": (np.float32, TensorProto.FLOAT)}
WEIGHTS_AS = ("constants", "initializers")

# State rows of a mixing graph, in the llama.onnx / ChatRWKV order.
ROW_FFN_SHIFT, ROW_ATT_SHIFT, ROW_AA, ROW_BB, ROW_PP = range(5)


class _GraphBuilder:
    """Collects nodes and tensors of one graph; every float tensor gets the graph's dtype."""

    def __init__(self, dtype: str, weights_as: str):
        self.np_dtype, self.onnx_dtype = DTYPES[dtype]
        self.fp16 = dtype == "float16"
        self.weights_as = weights_as
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self._op_counts: dict[str, int] = {}

    def _unique(self, name: str) -> str:
        base, n = name, 1
        while name in self._names:
            name = f"{base}_{n}"
            n += 1
        self._names.add(name)
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        """A float weight: a Constant node (the published layout) or an initializer."""
        name = self._unique(name)
        tensor = numpy_helper.from_array(np.asarray(array, dtype=self.np_dtype), name)
        if self.weights_as == "constants":
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"Constant_{name}", value=tensor))
        else:
            self.initializers.append(tensor)
        return name

    def index(self, name: str, array) -> str:
        """A small int64 tensor (Gather index, Reshape shape): always an initializer, as published."""
        name = self._unique(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype=np.int64), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        k = self._op_counts.get(op_type, 0)
        self._op_counts[op_type] = k + 1
        out = self._unique(out or f"{op_type.lower()}_{k}")
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type}_{k}", **attrs))
        return out

    def max(self, a: str, b: str, out: str | None = None) -> str:
        # onnxconverter-common keeps Max in fp32 (the WKV max exponent must not lose range).
        if not self.fp16:
            return self.op("Max", [a, b], out)
        a32 = self.op("Cast", [a], to=TensorProto.FLOAT)
        b32 = self.op("Cast", [b], to=TensorProto.FLOAT)
        m = self.op("Max", [a32, b32])
        return self.op("Cast", [m], out, to=TensorProto.FLOAT16)

    def layer_norm(self, x: str, prefix: str, gamma: np.ndarray, beta: np.ndarray, consts: dict) -> str:
        """Decomposed LayerNorm over the last axis (opset 16 has no LayerNormalization)."""
        mean = self.op("ReduceMean", [x], f"{prefix}.mean", axes=[-1], keepdims=1)
        d = self.op("Sub", [x, mean], f"{prefix}.centered")
        sq = self.op("Pow", [d, consts["two"]], f"{prefix}.sq")
        var = self.op("ReduceMean", [sq], f"{prefix}.var", axes=[-1], keepdims=1)
        ve = self.op("Add", [var, consts["eps"]], f"{prefix}.var_eps")
        sd = self.op("Sqrt", [ve], f"{prefix}.std")
        n = self.op("Div", [d, sd], f"{prefix}.norm")
        g = self.op("Mul", [n, self.weight(f"{prefix}.weight", gamma)], f"{prefix}.scaled")
        return self.op("Add", [g, self.weight(f"{prefix}.bias", beta)], f"{prefix}.out")

    def ln_constants(self) -> dict:
        # One shared exponent and epsilon per graph: 23 weights + these 2 = the published 25 Constants.
        return {"two": self.weight("pow_exponent", np.array(2.0)), "eps": self.weight("ln_eps", np.array(LN_EPS))}

    def model(self, name: str, inputs: list, outputs: list) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="rwkv2rknn")
        model.ir_version = IR_VERSION
        return model

    def value(self, name: str, shape: list[int], elem: int | None = None):
        return helper.make_tensor_value_info(name, self.onnx_dtype if elem is None else elem, shape)


def _mix(b: _GraphBuilder, x: str, s: str, mu: np.ndarray, name: str) -> str:
    """Token shift x*mu + s*(1-mu), with 1-mu folded into a constant in fp32 before the cast."""
    a = b.op("Mul", [x, b.weight(f"{name}.mu", mu)])
    c = b.op("Mul", [s, b.weight(f"{name}.one_minus_mu", np.float32(1) - mu)])
    return b.op("Add", [a, c], name)


def _wkv_terms(b: _GraphBuilder, p: str, kk: str, aa: str, bb: str, v: str,
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


def build_embed(w: dict[str, np.ndarray], dtype: str = "float16", weights_as: str = "constants") -> onnx.ModelProto:
    """`token` int32 [1] -> LN0(emb[token]) -> `output` [C]."""
    b = _GraphBuilder(dtype, weights_as)
    C = w["emb.weight"].shape[1]
    consts = b.ln_constants()
    row = b.op("Gather", [b.weight("emb.weight", w["emb.weight"]), "token"], "emb_row", axis=0)
    ln = b.layer_norm(row, "ln0", w["ln0.weight"], w["ln0.bias"], consts)
    b.op("Reshape", [ln, b.index("flat_shape", [-1])], "output")
    return b.model("embed", [b.value("token", [1], TensorProto.INT32)], [b.value("output", [C])])


def build_head(w: dict[str, np.ndarray], dtype: str = "float16", weights_as: str = "constants") -> onnx.ModelProto:
    """`x` [C] -> Whead LN_out(x) -> `output` [V]."""
    b = _GraphBuilder(dtype, weights_as)
    V, C = w["head.weight"].shape
    consts = b.ln_constants()
    ln = b.layer_norm("x", "ln_out", w["ln_out.weight"], w["ln_out.bias"], consts)
    b.op("MatMul", [b.weight("head.weight", w["head.weight"]), ln], "output")
    return b.model("head", [b.value("x", [C])], [b.value("output", [V])])


def build_mixing(w: dict[str, np.ndarray], index: int = 0, dtype: str = "float16",
                 weights_as: str = "constants") -> onnx.ModelProto:
    """One RWKV-4 block in RNN mode: (`input` [C], `state_in` [5,C]) -> (`output` [C], `state_out` [5,C])."""
    b = _GraphBuilder(dtype, weights_as)
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
    xk = _mix(b, xa, s_att, w["att.time_mix_k"], "att.xk")
    xv = _mix(b, xa, s_att, w["att.time_mix_v"], "att.xv")
    xr = _mix(b, xa, s_att, w["att.time_mix_r"], "att.xr")
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
    fk = _mix(b, xf, s_ffn, w["ffn.time_mix_k"], "ffn.xk")
    fr = _mix(b, xf, s_ffn, w["ffn.time_mix_r"], "ffn.xr")
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
    )


def export_model(weights: Weights, out_dir: str | os.PathLike, dtype: str = "float16",
                 weights_as: str = "constants", force: bool = False, progress: bool = True) -> list[Path]:
    """Write embed.onnx, mixing_0..L-1.onnx and head.onnx into `out_dir` (all or nothing).

    One graph is built, serialized and dropped at a time, so peak memory is about one layer's
    weights (or the embedding) a few times over, not the whole model.
    """
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; use float16 or float32")
    if weights_as not in WEIGHTS_AS:
        raise UserError(f"weights_as {weights_as!r} is not supported; use constants or initializers")
    return write_graphs(weights, out_dir, (build_embed, build_mixing, build_head), dtype, weights_as, force,
                        progress)


def write_graphs(weights, out_dir: str | os.PathLike, builders, dtype: str, weights_as: str, force: bool,
                 progress: bool) -> list[Path]:
    """embed.onnx, mixing_0..L-1.onnx and head.onnx from (build_embed, build_mixing, build_head), all or nothing.

    One part is fetched, built, serialized and dropped at a time: peak memory is about one layer's weights
    (or the embedding) a few times over, not the whole model.
    """
    from tqdm import tqdm

    build_embed_, build_mixing_, build_head_ = builders
    out_dir = Path(out_dir)
    names = ["embed"] + [f"mixing_{i}" for i in range(weights.n_layer)] + ["head"]
    with staged_directory(out_dir, force=force) as stage:
        for name in tqdm(names, desc=f"export {out_dir}", unit="file", file=sys.stderr,
                         disable=None if progress else True):  # None: only on a terminal
            if name == "embed":
                model = build_embed_(weights.embed(), dtype, weights_as)
            elif name == "head":
                model = build_head_(weights.head(), dtype, weights_as)
            else:
                i = int(name.split("_")[1])
                model = build_mixing_(weights.layer(i), i, dtype, weights_as)
            with open(stage / f"{name}.onnx", "wb") as f:
                f.write(model.SerializeToString())
            del model
    return [out_dir / f"{n}.onnx" for n in names]
