"""N-split: one single-row NPU segment becomes `pieces` models that each compute a slice of its output columns.

At M=1 an NPU model is bound by streaming its weights. The fastest published RK3588 GEMVs split N over three
contexts pinned to the three cores and run them at once (26.6 GB/s against 11.1 on one core). This pass makes
that split for a segment whose heavy MatMuls (constant weights) are all "last": no heavy MatMul's output reaches
another heavy MatMul, and from each heavy MatMul to the segment's outputs there are only column-wise ops (an
elementwise op whose other operand is a constant broadcast along the columns). Each piece computes everything
the heavy MatMuls read (replicated: LayerNorms, token-shift mixes, small LoRA MatMuls) and its columns of every
heavy MatMul and of the ops after it; the first piece also computes the segment's other outputs. Written side
by side (`Y#0`, `Y#1`, `Y#2` are columns [c0, c1) ... of `Y`), the pieces' outputs are the segment's outputs:
with one row, a column slice is a contiguous run of bytes, so the runtime needs no concat.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

# ops that act on each column alone when their other operands are constants broadcast along the columns
_COLUMNWISE = {"Add", "Sub", "Mul", "Div", "Sigmoid", "Tanh", "Relu", "Exp", "Neg", "Abs", "Sqrt", "Cast",
               "Identity", "Elu", "LeakyRelu", "Clip", "HardSigmoid", "Softplus", "Pow"}
ALIGN = 16  # piece boundaries on 16 columns (fp16 N alignment of the NPU, shared/docs/rknn-runtime-api.md)


@dataclass
class Piece:
    model: onnx.ModelProto
    index: int
    columns: tuple[int, int]
    outputs: dict  # piece output name -> (segment output name, start column, stop column), or None (whole)


def _shape(vi) -> list | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return None if any(d is None for d in dims) else dims


def _bounds(n: int, pieces: int) -> list[tuple[int, int]]:
    blocks = n // ALIGN
    per = [blocks // pieces + (1 if k < blocks % pieces else 0) for k in range(pieces)]
    out, c = [], 0
    for k, b in enumerate(per):
        stop = n if k == pieces - 1 else c + b * ALIGN
        out.append((c, stop))
        c = stop
    return out


def heavy_matmuls(model: onnx.ModelProto, min_bytes: int) -> list:
    """Constant-weight 2-D MatMuls whose weight has at least `min_bytes` fp16 bytes."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits:
            dims = list(inits[n.input[1]].dims)
            if len(dims) == 2 and dims[0] * dims[1] * 2 >= min_bytes:
                out.append(n)
    return out


def plan_columns(model: onnx.ModelProto, min_bytes: int = 256 * 1024) -> dict | None:
    """{tensor: N} of every tensor computed per column from a heavy MatMul (its output and the column-wise ops
    after it), or None when the segment is not one stage (a heavy output reaches another heavy MatMul, or meets
    a non-column-wise op, or feeds a graph output with more than one row)."""
    g = model.graph
    heavy = heavy_matmuls(model, min_bytes)
    if not heavy:
        return None
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    shapes = {v.name: _shape(v) for v in list(g.input) + list(g.output) + list(g.value_info)}
    outputs = {o.name for o in g.output}
    heavy_ids = {id(n) for n in heavy}
    cols: dict[str, int] = {}
    stack = []
    for n in heavy:
        dims = list(inits[n.input[1]].dims)
        if dims[1] < 3 * ALIGN:
            return None
        cols[n.output[0]] = dims[1]
        stack.append(n.output[0])
    while stack:
        t = stack.pop()
        n_cols = cols[t]
        if t in outputs:
            shape = shapes.get(t)
            if shape is None or int(np.prod(shape[:-1])) != 1 or shape[-1] != n_cols:
                return None  # more than one row: a column slice would not be contiguous
        for c in consumers.get(t, []):
            if c.op_type == "Reshape" and _row_reshape(c, inits, n_cols):
                for o in c.output:
                    if o not in cols:
                        cols[o] = n_cols
                        stack.append(o)
                continue
            if id(c) in heavy_ids or c.op_type not in _COLUMNWISE:
                return None
            for other in c.input:
                if other == t or not other or other in cols:
                    continue
                if other not in inits:
                    return None  # a computed operand: not column-wise
                d = list(inits[other].dims)
                if d and d[-1] not in (1, n_cols):
                    return None
            for o in c.output:
                if o not in cols:
                    cols[o] = n_cols
                    stack.append(o)
    if not any(t in outputs for t in cols):
        return None
    return cols


def _row_reshape(node, inits: dict, n_cols: int) -> bool:
    """A Reshape of one row that keeps the columns last ([1, N] <-> [N]): column-wise."""
    if len(node.input) < 2 or node.input[1] not in inits:
        return False
    target = [int(d) for d in numpy_helper.to_array(inits[node.input[1]]).reshape(-1)]
    return bool(target) and target[-1] == n_cols and int(np.prod(target[:-1])) == 1


def nsplit(model: onnx.ModelProto, pieces: int = 3, min_bytes: int = 256 * 1024) -> list[Piece] | None:
    """The segment as `pieces` models over column ranges of its heavy MatMuls, or None when it is not one
    stage (see plan_columns)."""
    cols = plan_columns(model, min_bytes)
    if cols is None:
        return None
    g = model.graph
    n_cols = {n for n in cols.values()}
    if len(n_cols) != 1:
        return None  # heavy MatMuls of different widths: one split of the columns would not fit all
    (n,) = n_cols
    bounds = _bounds(n, pieces)
    inits = {t.name: t for t in g.initializer}
    outputs = [o.name for o in g.output]
    out = []
    for k, (c0, c1) in enumerate(bounds):
        rename = {t: f"{t}#{k}" for t in cols}
        consts = _ColumnConsts(inits, n, k, c0, c1)
        nodes = []
        for node in g.node:
            new = onnx.NodeProto()
            new.CopyFrom(node)
            produces_cols = any(o in cols for o in node.output)
            if produces_cols:
                ins = []
                for i in node.input:
                    if i in rename:
                        ins.append(rename[i])
                    else:
                        ins.append(consts.get(i, node.op_type) if node.output[0] in cols else i)
                new.input[:] = ins
                new.output[:] = [rename.get(o, o) for o in node.output]
                new.name = f"{node.name}#{k}"
            nodes.append(new)
        wanted = [rename[o] for o in outputs if o in cols] + ([o for o in outputs if o not in cols] if k == 0 else [])
        nodes = _needed(nodes, set(wanted))
        used = {i for nd in nodes for i in nd.input}
        keep_inits = [t for t in g.initializer if t.name in used] + [t for t in consts.made if t.name in used]
        piece_inputs = [i for i in g.input if i.name in used and i.name not in inits]
        vis = {v.name: v for v in list(g.output) + list(g.value_info)}
        piece_outputs = []
        mapping = {}
        for o in outputs:
            if o in cols:
                vi = vis[o]
                shape = _shape(vi)
                shape[-1] = c1 - c0
                piece_outputs.append(helper.make_tensor_value_info(rename[o], vi.type.tensor_type.elem_type, shape))
                mapping[rename[o]] = (o, c0, c1)
            elif k == 0:
                piece_outputs.append(vis[o])
                mapping[o] = None
        pg = helper.make_graph(nodes, f"{g.name}_n{k}", piece_inputs, piece_outputs, keep_inits)
        m = helper.make_model(pg, opset_imports=list(model.opset_import), producer_name="rwkv2rknn.passes.nsplit")
        m.ir_version = model.ir_version
        onnx.checker.check_model(m)
        out.append(Piece(m, k, (c0, c1), mapping))
    return out


class _ColumnConsts:
    """The constants of one piece: a constant along the columns sliced to [c0, c1), a row Reshape's target shape
    given the piece's width; everything else shared as it is."""

    def __init__(self, inits: dict, n: int, k: int, c0: int, c1: int):
        self.inits, self.n, self.k, self.c0, self.c1 = inits, n, k, c0, c1
        self.made: list = []
        self._names: dict[str, str] = {}

    def get(self, name: str, op: str) -> str:
        if name not in self.inits:
            return name
        if name in self._names:
            return self._names[name]
        arr = numpy_helper.to_array(self.inits[name])
        if op == "Reshape":
            new = arr.copy()
            new[-1] = self.c1 - self.c0
        elif arr.ndim and arr.shape[-1] == self.n:
            new = np.ascontiguousarray(arr[..., self.c0:self.c1])
        else:
            return name
        key = f"{name}#{self.k}"
        self.made.append(numpy_helper.from_array(new, key))
        self._names[name] = key
        return key


def _needed(nodes: list, wanted: set) -> list:
    """The nodes `wanted` depends on, in their order."""
    need = set(wanted)
    keep = []
    for node in reversed(nodes):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
    return list(reversed(keep))
