"""Token axis rules: re-emit one single-token ONNX node so that its per-token tensors carry a leading axis of M."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

# Elementwise ops with multidirectional broadcasting: a batched input of lower rank gets 1s after its token axis.
BROADCAST_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Greater", "Less",
    "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
})
# Elementwise ops whose first input is the data; any other input must be the same for every token.
UNARY_OPS = frozenset({
    "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Sigmoid", "Tanh", "Relu", "LeakyRelu", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Erf", "Gelu", "Mish", "Sin", "Cos", "Tan", "Asin", "Acos",
    "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Floor", "Ceil", "Round", "Sign", "Not", "IsNaN", "IsInf",
    "Identity", "Cast", "CastLike", "Clip", "PRelu", "ThresholdedRelu", "Shrink", "BitwiseNot",
})
# Ops with one `axis` attribute over the rank of input 0 (default in the value).
AXIS_OPS = {"Softmax": -1, "LogSoftmax": -1, "Hardmax": -1, "LayerNormalization": -1, "LpNormalization": -1,
            "ArgMax": 0, "ArgMin": 0, "TopK": -1}
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                        "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})


class Val(NamedTuple):
    """A tensor of the batched graph: `batched` means it has a leading token axis before the per-token `shape`."""
    tensor: gs.Tensor | None
    batched: bool
    shape: list


class Emitter:
    """Collects the nodes of the batched graph; hands out unique tensor and node names."""

    def __init__(self, m: int, opset: int, reserved_tensors, reserved_nodes):
        self.m, self.opset = m, opset
        self.nodes: list[gs.Node] = []
        self._reserved_t, self._reserved_n = set(reserved_tensors), set(reserved_nodes)
        self._used_t: set[str] = set()
        self._used_n: set[str] = set()
        self._protected: set[str] = set()
        self._transposed: dict[int, gs.Tensor] = {}

    @staticmethod
    def _fresh(base, used, reserved):
        name, k = base, 0
        while name in used or name in reserved:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        return name

    def tensor_name(self, base: str) -> str:
        return self._fresh(base, self._used_t, self._reserved_t)

    def protect(self, name: str) -> None:
        """Keep `name` (a graph output) for the final binding: claim() will not hand it out."""
        self._protected.add(name)

    def claim(self, name: str) -> str:
        """The source graph's own name for the batched version of a source tensor (fresh if already taken)."""
        if name and name not in self._used_t and name not in self._protected:
            self._used_t.add(name)
            return name
        return self.tensor_name(name or "t")

    def rename(self, t, name: str) -> None:
        """Give a helper tensor a source tensor's name when that name is still free."""
        if name and name not in self._used_t and name not in self._protected:
            self._used_t.add(name)
            t.name = name

    def node_name(self, base: str, exact: bool = False) -> str:
        if exact and base and base not in self._used_n:
            self._used_n.add(base)
            return base
        return self._fresh(base, self._used_n, self._reserved_n)

    def var(self, base, dtype, shape, exact=False):
        return gs.Variable(self.claim(base) if exact else self.tensor_name(base), dtype=dtype, shape=list(shape))

    def const(self, base, values, dtype=np.int64):
        return gs.Constant(self.tensor_name(base), np.asarray(values, dtype=dtype))

    def node(self, op, base, inputs, outputs, attrs=None, domain=None, exact=False):
        n = gs.Node(op, name=self.node_name(base, exact), attrs=dict(attrs or {}), inputs=list(inputs),
                    outputs=list(outputs), domain=domain)
        self.nodes.append(n)
        return n

    def op(self, op, base, inputs, dtype, shape, attrs=None):
        out = self.var(f"{base}__{op.lower()}", dtype, shape)
        self.node(op, base, inputs, [out], attrs)
        return out

    def reshape(self, t, shape_from, shape_to, base):
        """`t` (static shape `shape_from`) as `shape_to`; no node when the shapes agree."""
        if list(shape_from) == list(shape_to):
            return t
        if int(np.prod(shape_from)) != int(np.prod(shape_to)):
            raise ValueError(f"{base}: cannot reshape {list(shape_from)} to {list(shape_to)}")
        return self.op("Reshape", base, [t, self.const(f"{base}__shape", shape_to)], t.dtype, shape_to)

    def reshape_into(self, t, shape_from, out, base):
        """Make `out` hold `t` (same number of elements)."""
        if list(shape_from) == list(out.shape):
            self.node("Identity", base, [t], [out])
        else:
            self.node("Reshape", base, [t, self.const(f"{base}__shape", out.shape)], [out])

    def slice0(self, t, start, end, shape, base):
        """t[start:end] along axis 0 (shape: t's full shape)."""
        if start == 0 and end == shape[0]:
            return t
        ins = [t, self.const(f"{base}__start", [start]), self.const(f"{base}__end", [end]),
               self.const(f"{base}__axis", [0])]
        return self.op("Slice", base, ins, t.dtype, [end - start] + list(shape[1:]))

    def expand(self, t, shape, base):
        """Broadcast an unbatched tensor of per-token shape `shape` to [M] + shape."""
        return self.op("Expand", base, [t, self.const(f"{base}__shape", [self.m] + list(shape))], t.dtype,
                       [self.m] + list(shape))

    def stack(self, parts, shape, base, out=None):
        """M tensors of the same per-token shape -> [M] + shape (one Concat, at most one Reshape)."""
        shape = list(shape)
        dtype = parts[0].dtype
        if not shape:
            parts = [self.reshape(p, [], [1], f"{base}__row") for p in parts]
            shape_now = [len(parts)]
        else:
            shape_now = [shape[0] * len(parts)] + shape[1:]
        if len(parts) == 1:
            flat = parts[0]
            shape_now = shape or [1]
        else:
            flat = self.op("Concat", base, parts, dtype, shape_now, {"axis": 0})
        if out is not None:
            self.reshape_into(flat, shape_now, out, f"{base}__stack")
            return out
        return self.reshape(flat, shape_now, [len(parts)] + shape, f"{base}__stack")

    def transposed(self, t):
        """The transpose of a 2-D tensor that is the same for every token (a constant weight, typically)."""
        key = id(t)
        if key not in self._transposed:
            if isinstance(t, gs.Constant):
                self._transposed[key] = gs.Constant(self.tensor_name(f"{t.name}__T"), np.ascontiguousarray(t.values.T))
            else:
                shape = list(t.shape)[::-1]
                self._transposed[key] = self.op("Transpose", f"{t.name}__T", [t], t.dtype, shape, {"perm": [1, 0]})
        return self._transposed[key]


def _norm_axis(axis, rank, node):
    a = int(axis)
    if not -rank <= a < max(rank, 1):
        raise ValueError(f"node {node.name!r} ({node.op}): axis {a} out of range for rank {rank}")
    return a + rank if a < 0 else a


def _const_ints(t, node, what):
    if not isinstance(t, gs.Constant):
        raise ValueError(f"node {node.name!r} ({node.op}): {what} must be a constant to add a token axis")
    return [int(v) for v in np.asarray(t.values).reshape(-1)]


def _unbatched_only(node, ins, which):
    for k in which:
        if k < len(ins) and ins[k].tensor is not None and ins[k].batched:
            raise ValueError(f"node {node.name!r} ({node.op}): input {k} differs per token; "
                             "only its data input may carry the token axis")


def _clone(em, node, inputs, outs, attrs=None):
    return em.node(node.op, node.name or node.op, inputs, outs, node.attrs if attrs is None else attrs, node.domain,
                   exact=True)


def _tensors(ins):
    return [v.tensor if v.tensor is not None else gs.Variable.empty() for v in ins]


def batch_node(em: Emitter, node: gs.Node, ins: list, outs: list, out_shapes: list) -> None:
    """Emit nodes computing `outs` ([M] + out_shapes[i]) from `ins` (Val, at least one batched) for `node`."""
    op, m = node.op, em.m
    if node.domain not in (None, "", "ai.onnx"):
        raise ValueError(f"node {node.name!r} ({node.domain}:{op}): custom-domain op; cannot add a token axis")
    if op in BROADCAST_OPS:
        r = len(out_shapes[0])
        new = []
        for k, v in enumerate(ins):
            if v.tensor is not None and v.batched and len(v.shape) < r:
                new.append(em.reshape(v.tensor, [m] + v.shape, [m] + [1] * (r - len(v.shape)) + v.shape,
                                      f"{node.name}__in{k}"))
            else:
                new.append(v.tensor if v.tensor is not None else gs.Variable.empty())
        _clone(em, node, new, outs)
        return
    if op in UNARY_OPS:
        _unbatched_only(node, ins, range(1, len(ins)))
        _clone(em, node, _tensors(ins), outs)
        return
    rule = _RULES.get(op)
    if rule is None:
        raise ValueError(f"node {node.name!r} ({op}): no token-axis rule for this op on per-token inputs; "
                         "cannot batch this graph")
    rule(em, node, ins, outs, out_shapes)


def _axis_op(em, node, ins, outs, out_shapes):
    _unbatched_only(node, ins, range(1, len(ins)))
    rank = len(ins[0].shape)
    attrs = dict(node.attrs)
    axis = attrs.get("axis", AXIS_OPS[node.op])
    attrs["axis"] = _norm_axis(axis, rank, node) + 1
    _clone(em, node, _tensors(ins), outs, attrs)


def _concat(em, node, ins, outs, out_shapes):
    rank = len(out_shapes[0])
    attrs = dict(node.attrs)
    attrs["axis"] = _norm_axis(attrs["axis"], rank, node) + 1
    new = [v.tensor if v.batched else em.expand(v.tensor, v.shape, f"{node.name}__in{k}") for k, v in enumerate(ins)]
    _clone(em, node, new, outs, attrs)


def _split(em, node, ins, outs, out_shapes):
    _unbatched_only(node, ins, range(1, len(ins)))
    attrs = dict(node.attrs)
    attrs["axis"] = _norm_axis(attrs.get("axis", 0), len(ins[0].shape), node) + 1
    _clone(em, node, _tensors(ins), outs, attrs)


def _gather(em, node, ins, outs, out_shapes):
    data, idx = ins[0], ins[1]
    axis = _norm_axis(node.attrs.get("axis", 0), len(data.shape), node)
    if data.batched and not idx.batched:
        _clone(em, node, _tensors(ins), outs, {**node.attrs, "axis": axis + 1})
        return
    if data.batched:
        raise ValueError(f"node {node.name!r} (Gather): both data and indices differ per token; cannot batch it")
    if axis == 0:
        _clone(em, node, _tensors(ins), outs)
        return
    # Gather(data, idx[M, ...], axis) gives data[:axis] + [M] + idx + rest: move the token axis to the front
    shape = data.shape[:axis] + [em.m] + idx.shape + data.shape[axis + 1:]
    y = em.op("Gather", node.name, _tensors(ins), outs[0].dtype, shape, {"axis": axis})
    perm = [axis] + [d for d in range(len(shape)) if d != axis]
    em.node("Transpose", f"{node.name}__tokens_first", [y], outs, {"perm": perm})


def _slice(em, node, ins, outs, out_shapes):
    _unbatched_only(node, ins, range(1, len(ins)))
    rank = len(ins[0].shape)
    starts = ins[1]
    if len(ins) > 3 and ins[3].tensor is not None:
        axes = _const_ints(ins[3].tensor, node, "the Slice axes")
    else:
        n = len(_const_ints(starts.tensor, node, "the Slice starts")) if isinstance(starts.tensor, gs.Constant) \
            else starts.shape[0]
        axes = list(range(n))
    axes = [_norm_axis(a, rank, node) + 1 for a in axes]
    new = _tensors(ins)
    while len(new) < 4:
        new.append(gs.Variable.empty())
    new[3] = em.const(f"{node.name}__axes", axes)
    _clone(em, node, new, outs)


def _reduce(em, node, ins, outs, out_shapes):
    _unbatched_only(node, ins, range(1, len(ins)))
    rank = len(ins[0].shape)
    attrs = dict(node.attrs)
    if "axes" in attrs:
        axes, form = list(attrs["axes"]), "attr"
    elif len(ins) > 1 and ins[1].tensor is not None:
        axes, form = _const_ints(ins[1].tensor, node, "the reduction axes"), "input"
    else:
        axes = None
        form = "input" if (em.opset >= 18 or (node.op == "ReduceSum" and em.opset >= 13)) else "attr"
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            _clone(em, node, _tensors(ins), outs)
            return
        axes = list(range(rank))
    _clone_shifted_axes(em, node, ins, outs, attrs, axes, form, rank)


def _clone_shifted_axes(em, node, ins, outs, attrs, axes, form, rank):
    """Clone an axes-taking node with every axis moved one place right (the token axis comes first),
    the axes given the way the source gave them (attribute or constant input)."""
    axes = [_norm_axis(a, rank, node) + 1 for a in axes]
    new = [ins[0].tensor]
    if form == "attr":
        attrs["axes"] = axes
    else:
        attrs.pop("axes", None)
        new.append(em.const(f"{node.name}__axes", axes))
    _clone(em, node, new, outs, attrs)


def _squeeze(em, node, ins, outs, out_shapes):
    _unbatched_only(node, ins, range(1, len(ins)))
    unsq = node.op == "Unsqueeze"
    rank = len(out_shapes[0]) if unsq else len(ins[0].shape)
    attrs = dict(node.attrs)
    if "axes" in attrs:
        axes, form = list(attrs["axes"]), "attr"
    elif len(ins) > 1 and ins[1].tensor is not None:
        axes, form = _const_ints(ins[1].tensor, node, f"the {node.op} axes"), "input"
    else:
        if unsq:
            raise ValueError(f"node {node.name!r} (Unsqueeze) has no axes")
        axes = [i for i, d in enumerate(ins[0].shape) if d == 1]
        form = "input" if em.opset >= 13 else "attr"
    _clone_shifted_axes(em, node, ins, outs, attrs, axes, form, rank)


def _to_shape(em, node, ins, outs, out_shapes):
    """Reshape / Flatten / Expand: the static target shape with the token axis in front."""
    op = "Expand" if node.op == "Expand" else "Reshape"
    data = ins[0].tensor if ins[0].batched else em.expand(ins[0].tensor, ins[0].shape, f"{node.name}__data")
    em.node(op, node.name, [data, em.const(f"{node.name}__shape", [em.m] + list(out_shapes[0]))], outs, exact=True)


def _transpose(em, node, ins, outs, out_shapes):
    rank = len(ins[0].shape)
    perm = list(node.attrs.get("perm", range(rank - 1, -1, -1)))
    _clone(em, node, [ins[0].tensor], outs, {"perm": [0] + [int(p) + 1 for p in perm]})


def _tile(em, node, ins, outs, out_shapes):
    _unbatched_only(node, ins, [1])
    reps = _const_ints(ins[1].tensor, node, "the Tile repeats")
    _clone(em, node, [ins[0].tensor, em.const(f"{node.name}__repeats", [1] + reps)], outs)


def _pad(em, node, ins, outs, out_shapes):
    _unbatched_only(node, ins, range(1, len(ins)))
    rank = len(ins[0].shape)
    attrs = dict(node.attrs)
    new = _tensors(ins)
    if len(ins) > 3 and ins[3].tensor is not None:  # explicit axes: shift them
        axes = [_norm_axis(a, rank, node) + 1 for a in _const_ints(ins[3].tensor, node, "the Pad axes")]
        new[3] = em.const(f"{node.name}__axes", axes)
    elif "pads" in attrs:
        p = list(attrs["pads"])
        attrs["pads"] = [0] + p[:rank] + [0] + p[rank:]
    else:
        p = _const_ints(ins[1].tensor, node, "the Pad pads")
        new[1] = em.const(f"{node.name}__pads", [0] + p[:rank] + [0] + p[rank:])
    _clone(em, node, new, outs, attrs)


def _cumsum(em, node, ins, outs, out_shapes):
    _unbatched_only(node, ins, [1])
    axis = _const_ints(ins[1].tensor, node, "the CumSum axis")[0]
    ax = em.const(f"{node.name}__axis", _norm_axis(axis, len(ins[0].shape), node) + 1)
    _clone(em, node, [ins[0].tensor, ax], outs)


def _matmul(em, node, ins, outs, out_shapes):
    a, b = ins
    m, out = em.m, outs[0]
    if a.batched and not b.batched and len(b.shape) == 2:
        # x[..., K] @ W[K, N]: all token rows in one 2-D MatMul (the NPU's fast M>1 form)
        rows = m * int(np.prod(a.shape[:-1], dtype=np.int64))
        a2 = em.reshape(a.tensor, [m] + a.shape, [rows, a.shape[-1]], f"{node.name}__rows")
        _emit_then_reshape(em, node, "MatMul", [a2, b.tensor], [rows, b.shape[1]], out)
        return
    if b.batched and not a.batched and len(a.shape) == 2 and len(b.shape) == 1:
        # W[P, K] @ x[K] == x @ W^T, one row per token
        em.node("MatMul", node.name, [b.tensor, em.transposed(a.tensor)], outs, exact=True)
        return
    ea = a.shape if len(a.shape) >= 2 else [1] + a.shape
    eb = b.shape if len(b.shape) >= 2 else b.shape + [1]
    r = max(len(ea), len(eb))

    def operand(v, e, k):
        if v.batched:
            return em.reshape(v.tensor, [m] + v.shape, [m] + [1] * (r - len(e)) + e, f"{node.name}__in{k}")
        if len(v.shape) == 1:
            return em.reshape(v.tensor, v.shape, e, f"{node.name}__in{k}")
        return v.tensor

    pa, pb = operand(a, ea, 0), operand(b, eb, 1)
    batch = list(np.broadcast_shapes(tuple([1] * (r - len(ea)) + ea[:-2]), tuple([1] * (r - len(eb)) + eb[:-2])))
    _emit_then_reshape(em, node, "MatMul", [pa, pb], [m] + batch + [ea[-2], eb[-1]], out)


def _emit_then_reshape(em, node, op, inputs, shape, out, attrs=None):
    if list(shape) == list(out.shape):
        em.node(op, node.name, inputs, [out], attrs, exact=True)
        return
    y = em.var(f"{out.name}__rows", out.dtype, shape)
    em.node(op, node.name, inputs, [y], attrs, exact=True)
    em.reshape_into(y, shape, out, f"{node.name}__unrows")


def _gemm(em, node, ins, outs, out_shapes):
    _unbatched_only(node, ins, range(1, len(ins)))
    a = ins[0]
    if 1 not in a.shape:
        raise ValueError(f"node {node.name!r} (Gemm): A is {a.shape} per token (not one row); cannot batch it")
    k = int(np.prod(a.shape))
    a2 = em.reshape(a.tensor, [em.m] + a.shape, [em.m, k], f"{node.name}__rows")
    attrs = {**node.attrs, "transA": 0}
    n = out_shapes[0][-1]
    _emit_then_reshape(em, node, "Gemm", [a2] + _tensors(ins[1:]), [em.m, n], outs[0], attrs)


def _einsum(em, node, ins, outs, out_shapes):
    eq = node.attrs["equation"].replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if not _:
        letters = [c for c in lhs if c.isalpha()]
        rhs = ("..." if "..." in lhs else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    free = next((c for c in "ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvutsrqponmlkjihgfedcba" if c not in eq), None)
    if free is None:
        raise ValueError(f"node {node.name!r} (Einsum): no free subscript letter for the token axis")
    terms = [free + t if v.batched else t for t, v in zip(terms, ins)]
    _clone(em, node, _tensors(ins), outs, {**node.attrs, "equation": ",".join(terms) + "->" + free + rhs})


_RULES = {
    **{op: _axis_op for op in AXIS_OPS},
    **{op: _reduce for op in REDUCE_OPS},
    "Concat": _concat, "Split": _split, "Gather": _gather, "Slice": _slice, "Squeeze": _squeeze,
    "Unsqueeze": _squeeze, "Reshape": _to_shape, "Flatten": _to_shape, "Expand": _to_shape,
    "Transpose": _transpose, "Tile": _tile, "Pad": _pad, "CumSum": _cumsum, "MatMul": _matmul, "Gemm": _gemm,
    "Einsum": _einsum,
}
