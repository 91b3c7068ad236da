"""Rewrite 1-D MatMuls into the 2-D [1,in] @ W[in,out] form the NPU compiler expects; cancel Reshape chains."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from passes.graphutil import bypass, static_shape
from passes.infra import PassResult


def _shape_const(name, dims):
    return gs.Constant(name, np.array(dims, dtype=np.int64))


def matmul_to_2d(graph: gs.Graph) -> PassResult:
    """MatMul(W[out,in] const, x[in]) and MatMul(x[in], W[in,out] const) -> Reshape, 2-D MatMul, Reshape."""
    transposed = {}  # id(W) -> W^T constant, so a shared weight is transposed once
    new_nodes = []
    rewritten = 0
    for node in graph.nodes:
        if node.op != "MatMul" or len(node.inputs) != 2:
            new_nodes.append(node)
            continue
        a, b = node.inputs
        out = node.outputs[0]
        a_shape = list(a.values.shape) if isinstance(a, gs.Constant) else static_shape(a)
        b_shape = list(b.values.shape) if isinstance(b, gs.Constant) else static_shape(b)
        if a_shape is None or b_shape is None:
            new_nodes.append(node)
            continue
        if isinstance(a, gs.Constant) and len(a_shape) == 2 and not isinstance(b, gs.Constant) \
                and len(b_shape) == 1:
            x, (n_out, n_in) = b, a_shape
            key = id(a)
            if key not in transposed:
                transposed[key] = gs.Constant(f"{a.name}__T", np.ascontiguousarray(a.values.T))
            w = transposed[key]
        elif isinstance(b, gs.Constant) and len(b_shape) == 2 and not isinstance(a, gs.Constant) \
                and len(a_shape) == 1:
            x, w, (n_in, n_out) = a, b, b_shape
        else:
            new_nodes.append(node)
            continue
        dt = out.dtype if out.dtype is not None else x.dtype
        base = node.name or out.name
        x2 = gs.Variable(f"{base}__x2d", dtype=x.dtype, shape=[1, n_in])
        y2 = gs.Variable(f"{base}__y2d", dtype=dt, shape=[1, n_out])
        node.inputs.clear()
        node.outputs.clear()
        pre = gs.Node("Reshape", name=f"{base}__to2d", inputs=[x, _shape_const(f"{base}__shape_in", [1, n_in])],
                      outputs=[x2])
        node.inputs.extend([x2, w])
        node.outputs.append(y2)
        post = gs.Node("Reshape", name=f"{base}__to1d", inputs=[y2, _shape_const(f"{base}__shape_out", [n_out])],
                       outputs=[out])
        out.dtype, out.shape = dt, [n_out]
        new_nodes.extend([pre, node, post])
        rewritten += 1
    graph.nodes = new_nodes
    return PassResult(graph, modified=rewritten > 0)


def _const_shape(node):
    s = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(s, gs.Constant):
        return None
    if node.attrs.get("allowzero", 0):
        return None
    dims = [int(d) for d in np.asarray(s.values).reshape(-1)]
    return None if 0 in dims else dims


def cancel_reshapes(graph: gs.Graph) -> PassResult:
    """Reshape(Reshape(x)) -> Reshape(x); a Reshape to its input's own (static) shape is removed.

    Only constant target shapes without 0 entries are touched (0 copies a dim from the input).
    Nodes are visited in topological order so whole chains collapse in one pass.
    """
    outputs = {id(t) for t in graph.outputs}
    keep = []
    changed = 0
    for node in graph.nodes:
        if node.op != "Reshape" or _const_shape(node) is None:
            keep.append(node)
            continue
        src = node.inputs[0]
        up = src.inputs[0] if len(src.inputs) == 1 else None
        if up is not None and up.op == "Reshape" and _const_shape(up) is not None:
            node.inputs[0] = up.inputs[0]
            src = node.inputs[0]
            changed += 1
        out = node.outputs[0]
        in_shape = list(src.values.shape) if isinstance(src, gs.Constant) else static_shape(src)
        out_shape = static_shape(out)
        if in_shape is not None and in_shape == out_shape and id(out) not in outputs:
            bypass(node, src)
            changed += 1
            continue
        if in_shape is not None and in_shape == out_shape and _renamable(src, outputs):
            # a graph output that is a no-op Reshape of an inner tensor: the inner tensor takes the output's
            # place (a compiler that drops the Reshape would otherwise find two outputs of one value)
            producer = src.inputs[0]
            for consumer in list(src.outputs):
                if consumer is not node:
                    consumer.inputs[consumer.inputs.index(src)] = out
            node.inputs.clear()
            node.outputs.clear()
            producer.outputs[producer.outputs.index(src)] = out
            changed += 1
            continue
        keep.append(node)
    graph.nodes = keep
    return PassResult(graph, modified=changed > 0)


def _renamable(src, outputs: set) -> bool:
    """An inner tensor made by one node, neither a graph input nor output nor a constant."""
    return (isinstance(src, gs.Variable) and len(src.inputs) == 1 and id(src) not in outputs
            and not isinstance(src.inputs[0], gs.Constant))
