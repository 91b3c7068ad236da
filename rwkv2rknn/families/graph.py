"""Shared pieces of every family's exporter: a graph builder, the embed and head graphs, and the writer of a
model directory (llama.onnx layout: embed.onnx, mixing_0..L-1.onnx, head.onnx; opset 16, IR 8, static shapes,
no batch dimension)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rwkv2rknn.errors import UserError
from rwkv2rknn.families.base import METADATA_KEY
from rwkv2rknn.fsio import staged_directory

OPSET = 16
IR_VERSION = 8
LN_EPS = 1e-5
DTYPES = {"float16": (np.float16, TensorProto.FLOAT16), "float32": (np.float32, TensorProto.FLOAT)}
WEIGHTS_AS = ("constants", "initializers")


def check_options(dtype: str, weights_as: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; use float16 or float32")
    if weights_as not in WEIGHTS_AS:
        raise UserError(f"weights_as {weights_as!r} is not supported; use constants or initializers")


class GraphBuilder:
    """Collects nodes and tensors of one graph; every float tensor gets the graph's dtype."""

    def __init__(self, dtype: str, weights_as: str, reserved=()):
        check_options(dtype, weights_as)
        self.np_dtype, self.onnx_dtype = DTYPES[dtype]
        self.fp16 = dtype == "float16"
        self.weights_as = weights_as
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set(reserved)  # graph inputs: no tensor may take their names
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
        """Decomposed LayerNorm over the last axis (opset 16 has no LayerNormalization); over [H, N] it is a
        GroupNorm with H groups."""
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

    def model(self, name: str, inputs: list, outputs: list, family: str | None = None) -> onnx.ModelProto:
        """The graph as a model; `family` (a layer graph's) is recorded in its metadata, where loading a model
        directory reads it (families sharing one layer interface are told apart by it)."""
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="rwkv2rknn")
        model.ir_version = IR_VERSION
        if family is not None:
            helper.set_model_props(model, {METADATA_KEY: family})
        return model

    def value(self, name: str, shape: list[int], elem: int | None = None):
        return helper.make_tensor_value_info(name, self.onnx_dtype if elem is None else elem, shape)


def mix(b: GraphBuilder, x: str, s: str, mu: np.ndarray, name: str) -> str:
    """Token shift x*mu + s*(1-mu), with 1-mu folded into a constant in fp32 before the cast."""
    a = b.op("Mul", [x, b.weight(f"{name}.mu", mu)])
    c = b.op("Mul", [s, b.weight(f"{name}.one_minus_mu", np.float32(1) - mu)])
    return b.op("Add", [a, c], name)


def build_embed(w: dict[str, np.ndarray], dtype: str = "float16", weights_as: str = "constants") -> onnx.ModelProto:
    """`token` int32 [1] -> LN0(emb[token]) -> `output` [C] (the same graph for every family)."""
    b = GraphBuilder(dtype, weights_as)
    C = w["emb.weight"].shape[1]
    consts = b.ln_constants()
    row = b.op("Gather", [b.weight("emb.weight", w["emb.weight"]), "token"], "emb_row", axis=0)
    ln = b.layer_norm(row, "ln0", w["ln0.weight"], w["ln0.bias"], consts)
    b.op("Reshape", [ln, b.index("flat_shape", [-1])], "output")
    return b.model("embed", [b.value("token", [1], TensorProto.INT32)], [b.value("output", [C])])


def build_head(w: dict[str, np.ndarray], dtype: str = "float16", weights_as: str = "constants") -> onnx.ModelProto:
    """`x` [C] -> Whead LN_out(x) -> `output` [V] (the same graph for every family)."""
    b = GraphBuilder(dtype, weights_as)
    V, C = w["head.weight"].shape
    consts = b.ln_constants()
    ln = b.layer_norm("x", "ln_out", w["ln_out.weight"], w["ln_out.bias"], consts)
    b.op("MatMul", [b.weight("head.weight", w["head.weight"]), ln], "output")
    return b.model("head", [b.value("x", [C])], [b.value("output", [V])])


def write_graphs(weights, out_dir: str | os.PathLike, builders, dtype: str = "float16",
                 weights_as: str = "constants", force: bool = False, progress: bool = True) -> list[Path]:
    """embed.onnx, mixing_0..L-1.onnx and head.onnx from (build_embed, build_mixing, build_head), all or nothing.

    One part is fetched, built, serialized and dropped at a time: peak memory is about one layer's weights
    (or the embedding) a few times over, not the whole model.
    """
    from tqdm import tqdm

    check_options(dtype, weights_as)
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


def exporter(builders):
    """A family's `export`: write_graphs with its three builders."""

    def export(weights, out_dir, dtype="float16", weights_as="constants", force=False, progress=True) -> list[Path]:
        return write_graphs(weights, out_dir, builders, dtype, weights_as, force, progress)

    return export
