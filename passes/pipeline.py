"""The normalize pipeline: every source graph goes through it before placement and partitioning."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from passes.fp32 import fp16_to_fp32
from passes.graphutil import static_shape, toposort
from passes.matmul2d import cancel_reshapes, matmul_to_2d
from passes.normalize import (
    constants_to_initializers,
    fix_input_shapes,
    infer_shapes,
    materialize_outputs,
    name_nodes,
    remove_identities,
)


def fold(graph: gs.Graph) -> gs.Graph:
    """Constant folding (gs, onnxruntime underneath) followed by cleanup and a stable toposort."""
    toposort(graph.cleanup())
    graph.fold_constants(fold_shapes=True, recurse_subgraphs=False)
    return toposort(graph.cleanup())


def normalize(graph: gs.Graph, shapes: dict | None = None) -> gs.Graph:
    """Names, initializers, fp32 everywhere, static shapes, 2-D MatMuls, folded; returns a sorted graph."""
    ir_version, opset = graph.ir_version, graph.opset
    graph = name_nodes(graph)
    graph = constants_to_initializers(graph)
    graph = infer_shapes(graph)  # Cast removal needs every source dtype
    graph = fp16_to_fp32(graph)
    graph = remove_identities(graph)
    graph = materialize_outputs(graph)
    graph = fix_input_shapes(graph, shapes)
    graph = infer_shapes(graph)
    graph = matmul_to_2d(graph)
    graph = toposort(graph)
    graph = cancel_reshapes(graph)
    graph = fold(graph)
    if any(t.dtype is None or static_shape(t) is None
           for t in graph.tensors().values() if isinstance(t, gs.Variable)):
        graph = infer_shapes(graph)
    graph = name_nodes(graph)
    graph.ir_version = graph.ir_version or ir_version
    graph.opset = graph.opset or opset
    return toposort(graph.cleanup())
