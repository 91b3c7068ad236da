"""Structural clean-up passes: unique names, Constant nodes -> initializers, Identity removal, static shapes."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.graphutil import bypass, static_shape
from passes.infra import PassResult


def name_nodes(graph: gs.Graph) -> PassResult:
    """Give every node a unique, non-empty name (existing unique names are kept)."""
    seen = set()
    counters = {}
    renamed = 0
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
        renamed += 1
    return PassResult(graph, modified=renamed > 0)


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


def constants_to_initializers(graph: gs.Graph) -> PassResult:
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
    turned = len(graph.nodes) - len(keep)
    graph.nodes = keep
    return PassResult(graph, modified=turned > 0)


def remove_identities(graph: gs.Graph) -> PassResult:
    """Bypass Identity nodes; keep those whose output is a graph output (its name must survive)."""
    outputs = {id(t) for t in graph.outputs}
    keep = []
    for node in graph.nodes:
        if node.op == "Identity" and id(node.outputs[0]) not in outputs:
            bypass(node, node.inputs[0])
            continue
        keep.append(node)
    removed = len(graph.nodes) - len(keep)
    graph.nodes = keep
    return PassResult(graph, modified=removed > 0)


def materialize_outputs(graph: gs.Graph) -> PassResult:
    """Make every graph output a Variable produced by a node: constant outputs get an Identity.

    A graph input listed as an output needs no producer: the runtime's tensor table already holds it.
    """
    made = 0
    for i, out in enumerate(list(graph.outputs)):
        if isinstance(out, gs.Constant):
            made += 1
            name = out.name
            out.name = f"{name}__const"
            var = gs.Variable(name, dtype=out.values.dtype, shape=list(out.values.shape))
            graph.nodes.append(gs.Node("Identity", name=f"{name}__identity", inputs=[out], outputs=[var]))
            graph.outputs[i] = var
    return PassResult(graph, modified=made > 0)


def fix_input_shapes(graph: gs.Graph, shapes: dict | None = None) -> PassResult:
    """Give graph inputs static shapes from `shapes`; raise ValueError naming an input left symbolic."""
    shapes = shapes or {}
    changed = 0
    for inp in graph.inputs:
        if inp.name in shapes:
            want = [int(d) for d in shapes[inp.name]]
            changed += list(inp.shape) != want if inp.shape is not None else 1
            inp.shape = want
        elif static_shape(inp) is None:
            raise ValueError(
                f"graph input {inp.name!r} has a symbolic or unknown shape {inp.shape}; "
                f"give its static shape (shapes={{{inp.name!r}: [...]}})"
            )
        if inp.dtype is None:
            raise ValueError(f"graph input {inp.name!r} has no dtype")
    return PassResult(graph, modified=changed > 0)


# Constants larger than this go into shape inference as typed inputs, not as data: inference only
# needs their shapes, and serializing a layer's weights twice per graph dominated normalize time.
_INFER_DATA_LIMIT = 64


def infer_shapes(graph: gs.Graph) -> PassResult:
    """Run ONNX shape inference (with data propagation) on a weight-free copy; write the results back."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    inputs = {id(t) for t in graph.inputs}
    before = _types(graph)
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and id(t) not in inputs:
            t.shape = None  # stale shapes (fp16 era, symbolic) must not conflict with fresh ones
    onnx_inputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs]
    initializers = []
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            if t.values.size <= _INFER_DATA_LIMIT or t.values.dtype.kind in "iub":
                initializers.append(OnnxExporter.export_tensor_proto(t))
            else:
                onnx_inputs.append(onnx.helper.make_tensor_value_info(
                    t.name, onnx.helper.np_dtype_to_tensor_dtype(t.values.dtype), list(t.values.shape)))
    skeleton = onnx.helper.make_model(
        onnx.helper.make_graph(
            [OnnxExporter.export_node(n) for n in graph.nodes], graph.name or "graph", onnx_inputs,
            [onnx.helper.make_tensor_value_info(t.name, 0, None) for t in graph.outputs],
            initializer=initializers),
        opset_imports=[onnx.helper.make_opsetid("", graph.opset)], ir_version=graph.ir_version or 8)
    inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
    tensors = graph.tensors()
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = tensors.get(vi.name)
        tt = vi.type.tensor_type
        if not isinstance(t, gs.Variable) or id(t) in inputs or not vi.type.HasField("tensor_type"):
            continue
        if tt.elem_type:
            t.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if tt.HasField("shape"):
            t.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return PassResult(graph, modified=_types(graph) != before)


def _types(graph: gs.Graph) -> dict:
    """name -> (dtype, shape) of every variable: what shape inference writes."""
    return {name: (str(t.dtype), None if t.shape is None else tuple(t.shape))
            for name, t in graph.tensors().items() if isinstance(t, gs.Variable)}
