"""Structural clean-up passes: unique names, Constant nodes -> initializers, Identity removal, static shapes."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.graphutil import static_shape


def name_nodes(graph: gs.Graph) -> gs.Graph:
    """Give every node a unique, non-empty name (existing unique names are kept)."""
    seen = set()
    counters = {}
    for node in graph.nodes:
        name = node.name
        if name and name not in seen:
            seen.add(name)
            continue
        base = name or node.op
        k = counters.get(base, 0)
        while f"{base}_{k}" in seen:
            k += 1
        counters[base] = k + 1
        node.name = f"{base}_{k}"
        seen.add(node.name)
    return graph


def _constant_value(node):
    if "value" in node.attrs:
        v = node.attrs["value"]
        return v.values if isinstance(v, gs.Constant) else np.asarray(v)
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in node.attrs:
            return np.array(node.attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in node.attrs:
            return np.array(node.attrs[key], dtype=dtype)
    raise ValueError(f"Constant node {node.name!r}: unsupported attribute {sorted(node.attrs)}")


def constants_to_initializers(graph: gs.Graph) -> gs.Graph:
    """Turn Constant nodes into initializers (gs.Constant tensors) so weights look the same either way."""
    keep = []
    for node in graph.nodes:
        if node.op != "Constant" or node.domain not in ("", "ai.onnx", None):
            keep.append(node)
            continue
        values = np.array(_constant_value(node))
        out = node.outputs[0]
        node.outputs.clear()
        out.to_constant(values)
    graph.nodes = keep
    return graph


def remove_identities(graph: gs.Graph) -> gs.Graph:
    """Bypass Identity nodes; keep those whose output is a graph output (its name must survive)."""
    outputs = {id(t) for t in graph.outputs}
    keep = []
    for node in graph.nodes:
        if node.op == "Identity" and id(node.outputs[0]) not in outputs:
            src, dst = node.inputs[0], node.outputs[0]
            for user in list(dst.outputs):
                for k, t in enumerate(user.inputs):
                    if t is dst:
                        user.inputs[k] = src
            node.inputs.clear()
            node.outputs.clear()
            continue
        keep.append(node)
    graph.nodes = keep
    return graph


def materialize_outputs(graph: gs.Graph) -> gs.Graph:
    """Make every graph output a Variable produced by a node: constant outputs get an Identity.

    A graph input listed as an output needs no producer: the runtime's tensor table already holds it.
    """
    for i, out in enumerate(list(graph.outputs)):
        if isinstance(out, gs.Constant):
            name = out.name
            out.name = f"{name}__const"
            var = gs.Variable(name, dtype=out.values.dtype, shape=list(out.values.shape))
            graph.nodes.append(gs.Node("Identity", name=f"{name}__identity", inputs=[out], outputs=[var]))
            graph.outputs[i] = var
    return graph


def fix_input_shapes(graph: gs.Graph, shapes: dict | None = None) -> gs.Graph:
    """Give graph inputs static shapes from `shapes`; raise ValueError naming an input left symbolic."""
    shapes = shapes or {}
    for inp in graph.inputs:
        if inp.name in shapes:
            inp.shape = [int(d) for d in shapes[inp.name]]
        elif static_shape(inp) is None:
            raise ValueError(
                f"graph input {inp.name!r} has a symbolic or unknown shape {inp.shape}; "
                f"give its static shape (shapes={{{inp.name!r}: [...]}})"
            )
        if inp.dtype is None:
            raise ValueError(f"graph input {inp.name!r} has no dtype")
    return graph


def infer_shapes(graph: gs.Graph) -> gs.Graph:
    """Run ONNX shape inference (with data propagation) and return the re-imported graph."""
    inputs = {id(t) for t in graph.inputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and id(t) not in inputs:
            t.shape = None  # stale shapes (fp16 era, symbolic) must not conflict with fresh ones
    for t in graph.outputs:
        if isinstance(t, gs.Variable):
            t.shape = None
    model = gs.export_onnx(graph, do_type_check=False)
    model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    return gs.import_onnx(model)
