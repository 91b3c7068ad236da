"""Shared pieces of the legalize_* passes: the Note record, fresh names, Reshape/constant builders, layouts."""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

from passes.graphutil import np_dtype, static_shape
from passes.infra import PassResult


class Note(NamedTuple):
    """What a legalize pass did with one node: `rewritten` True with how, or False with why it was left alone."""

    node: str        # the node's name in the input graph
    op: str
    rewritten: bool
    reason: str
    new_nodes: tuple = ()  # names of the nodes that replace it

    def __str__(self) -> str:
        return f"{self.node}: {'rewritten' if self.rewritten else 'left alone'}: {self.reason}"


def legalized(graph: gs.Graph, notes: list[Note]) -> PassResult:
    """A legalize pass's result: its notes; modified when it rewrote a node."""
    return PassResult(graph, tuple(notes), modified=any(n.rewritten for n in notes))


class Names:
    """Fresh node and tensor names derived from a base name; unique within one graph."""

    def __init__(self, graph: gs.Graph):
        self.nodes = {n.name for n in graph.nodes}
        self.tensors = set(graph.tensors().keys())

    @staticmethod
    def _fresh(used: set, base: str) -> str:
        name, k = base, 0
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        return name

    def node(self, base: str) -> str:
        return self._fresh(self.nodes, base)

    def tensor(self, base: str) -> str:
        return self._fresh(self.tensors, base)


def shape_of(t):
    """Static shape of a tensor (constants included), or None."""
    return list(t.values.shape) if isinstance(t, gs.Constant) else static_shape(t)


def float_dtype(t):
    """The numpy float dtype a tensor computes in (float32 when unknown)."""
    dt = t.values.dtype if isinstance(t, gs.Constant) else np_dtype(t.dtype)
    return dt if dt is not None and dt.kind == "f" else np.dtype(np.float32)


def variable(names: Names, base: str, dtype, shape) -> gs.Variable:
    return gs.Variable(names.tensor(base), dtype=np.dtype(dtype), shape=list(shape))


def constant(names: Names, base: str, values) -> gs.Constant:
    return gs.Constant(names.tensor(base), np.asarray(values))


def reshape(names: Names, nodes: list, x, shape, base: str, out=None):
    """Append Reshape(x, shape) to `nodes`; a constant x is reshaped in place of a node. Returns the result."""
    shape = [int(d) for d in shape]
    if isinstance(x, gs.Constant):
        return constant(names, f"{x.name}__{'x'.join(map(str, shape))}", np.reshape(x.values, shape))
    if out is None:
        out = variable(names, f"{base}", float_dtype(x), shape)
    nodes.append(gs.Node("Reshape", names.node(base), inputs=[x, constant(names, f"{base}__shape",
                                                                              np.array(shape, np.int64))],
                         outputs=[out]))
    return out


def hw_layout(n: int):
    """[1, 1, H, W] with H*W = n, both > 1 and as square as possible (H <= W); None when n has no such split."""
    for h in range(math.isqrt(n), 1, -1):
        if n % h == 0:
            return [1, 1, h, n // h]
    return None


def same_shape_operands(names: Names, node, out_shape):
    """(inputs, "") when each input is a variable of `out_shape` or a constant that broadcasts to it (returned
    broadcast to a full constant under a fresh name); (None, why) otherwise."""
    result = []
    for t in node.inputs:
        s = shape_of(t)
        if s is None:
            return None, f"input {t.name} has no static shape"
        if isinstance(t, gs.Constant):
            try:
                full = np.broadcast_to(t.values, out_shape)
            except ValueError:
                return None, f"constant {t.name} {s} does not broadcast to {out_shape}"
            result.append(constant(names, f"{t.name}__full", np.ascontiguousarray(full)))
        elif s != list(out_shape):
            return None, f"input {t.name} {s} broadcasts to {list(out_shape)}"
        else:
            result.append(t)
    return result, ""


def detach(node: gs.Node) -> None:
    node.inputs.clear()
    node.outputs.clear()
