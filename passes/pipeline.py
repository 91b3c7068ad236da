"""The normalize pipeline: every source graph goes through it before placement and partitioning.

The pass infrastructure it runs on (PassResult, PassManager, PassError) is passes/infra.py.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from passes.fp32 import fp16_to_fp32
from passes.graphutil import static_shape
from passes.infra import PassError, PassManager, PassResult, bind, same_wiring, sort, tidy, wiring
from passes.matmul2d import cancel_reshapes, matmul_to_2d
from passes.normalize import (
    constants_to_initializers,
    fix_input_shapes,
    infer_shapes,
    materialize_outputs,
    name_nodes,
    remove_identities,
)


def fold(graph: gs.Graph) -> PassResult:
    """Constant folding (gs, onnxruntime underneath) followed by cleanup and a stable toposort."""
    before = wiring(graph)
    tidy(graph)
    graph.fold_constants(fold_shapes=True, recurse_subgraphs=False)
    tidy(graph)
    return PassResult(graph, modified=not same_wiring(before, wiring(graph)))


def infer_missing_shapes(graph: gs.Graph) -> PassResult:
    """Shape inference again when a tensor still lacks a dtype or static shape (folding can leave some)."""
    if any(t.dtype is None or static_shape(t) is None
           for t in graph.tensors().values() if isinstance(t, gs.Variable)):
        return infer_shapes(graph)
    return PassResult(graph, modified=False)


def normalize_passes(shapes: dict | None = None) -> PassManager:
    """Names, initializers, fp32 everywhere, static shapes, 2-D MatMuls, folded, sorted."""
    return PassManager([
        name_nodes,
        constants_to_initializers,
        infer_shapes,  # Cast removal needs every source dtype
        fp16_to_fp32,
        remove_identities,
        materialize_outputs,
        bind(fix_input_shapes, shapes),
        infer_shapes,
        matmul_to_2d,
        sort,
        cancel_reshapes,
        fold,
        infer_missing_shapes,
        name_nodes,
        tidy,
    ], name="normalize")


def normalize(graph: gs.Graph, shapes: dict | None = None) -> PassResult:
    """Names, initializers, fp32 everywhere, static shapes, 2-D MatMuls, folded; the graph sorted.

    A pass that raises is named in the PassError (its `cause` is what it raised).
    """
    ir_version, opset = graph.ir_version, graph.opset
    result = normalize_passes(shapes)(graph)
    result.graph.ir_version = result.graph.ir_version or ir_version
    result.graph.opset = result.graph.opset or opset
    return result


__all__ = ["PassError", "PassManager", "PassResult", "fold", "normalize", "normalize_passes"]
