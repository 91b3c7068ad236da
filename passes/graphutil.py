"""Small iterative helpers over onnx-graphsurgeon graphs shared by the passes."""
from __future__ import annotations

import heapq

import numpy as np
import onnx
import onnx_graphsurgeon as gs

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def np_dtype(dtype):
    """The numpy dtype of a gs tensor dtype (numpy type or ONNX enum); None if unknown."""
    if dtype is None:
        return None
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype == onnx.TensorProto.UNDEFINED:
            return None
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
        except (KeyError, TypeError, ValueError):
            return None
    try:
        return np.dtype(dtype)
    except TypeError:
        return None


def is_float(tensor) -> bool:
    dt = np_dtype(tensor.dtype)
    return dt is not None and dt in FLOAT_DTYPES


def static_shape(tensor):
    """The tensor's shape as a list of ints, or None when unknown or symbolic."""
    shape = tensor.shape
    if shape is None:
        return None
    out = []
    for d in shape:
        if isinstance(d, (int, np.integer)) and d >= 0:
            out.append(int(d))
        else:
            return None
    return out


def row_index(node) -> int | None:
    """The row a node reads from its first input along axis 0: Gather(x, r) or Slice(x, r, r + 1) with
    constant indices; None for anything else."""
    def const(t):
        return int(np.asarray(t.values).reshape(-1)[0]) if isinstance(t, gs.Constant) and t.values.size == 1 else None

    if node.op == "Gather" and len(node.inputs) == 2 and int(node.attrs.get("axis", 0)) == 0:
        return const(node.inputs[1])
    if node.op == "Slice" and len(node.inputs) >= 3:
        start, end = const(node.inputs[1]), const(node.inputs[2])
        axes = const(node.inputs[3]) if len(node.inputs) > 3 else 0
        if start is not None and end == start + 1 and axes == 0:
            return start
    return None


def producer_map(graph):
    """tensor name -> producing node (graph-local)."""
    prod = {}
    for node in graph.nodes:
        for t in node.outputs:
            prod[t.name] = node
    return prod


def consumer_map(graph):
    """tensor name -> list of consuming nodes, in node order."""
    cons = {}
    for node in graph.nodes:
        for t in node.inputs:
            if t.name:
                cons.setdefault(t.name, []).append(node)
    return cons


def toposort(graph: gs.Graph) -> gs.Graph:
    """Stable iterative topological sort: ties keep the original node order (no recursion)."""
    nodes = list(graph.nodes)
    prod = {}
    for i, n in enumerate(nodes):
        for t in n.outputs:
            prod[t.name] = i
    deps = [set() for _ in nodes]
    users = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        for t in n.inputs:
            j = prod.get(t.name)
            if j is not None and j != i and j not in deps[i]:
                deps[i].add(j)
                users[j].append(i)
    indeg = [len(d) for d in deps]
    ready = [i for i, d in enumerate(indeg) if d == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users[i]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = [nodes[i].name for i in range(len(nodes)) if indeg[i] > 0][:5]
        raise ValueError(f"graph has a cycle through nodes {stuck}")
    graph.nodes = order
    return graph


def replace_uses(graph, old, new, consumers=None):
    """Make every consumer of tensor `old` read `new` instead (graph outputs untouched)."""
    users = list(old.outputs) if consumers is None else consumers
    for node in users:
        for k, t in enumerate(node.inputs):
            if t is old:
                node.inputs[k] = new


def bypass(node: gs.Node, src: gs.Tensor) -> None:
    """Make every consumer of `node`'s first output read `src` instead, and detach `node`."""
    replace_uses(None, node.outputs[0], src)
    node.inputs.clear()
    node.outputs.clear()
