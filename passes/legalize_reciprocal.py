"""Reciprocal(x) becomes Div(1, x): rknn-toolkit2 puts Reciprocal on the CPU in every layout; legalize_div does the rest."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from passes.infra import PassResult
from passes.legalize_common import Names, Note, constant, detach, float_dtype, legalized


def legalize_reciprocal(graph: gs.Graph) -> PassResult:
    """Rewrite Reciprocal(x) as Div(ones, x) with a scalar constant 1 (exact: IEEE 1/x is the same operation).

    Alone this gains nothing (a scalar-numerator Div stays on the CPU); legalize_div, run after it,
    broadcasts the 1 to a full [1, 1, H, W] constant, a layout the NPU takes.
    """
    names = Names(graph)
    notes, out_nodes = [], []
    for node in graph.nodes:
        if node.op != "Reciprocal" or len(node.inputs) != 1:
            out_nodes.append(node)
            continue
        x, y = node.inputs[0], node.outputs[0]
        one = constant(names, f"{node.name}__one", np.array(1.0, dtype=float_dtype(x)))
        div = gs.Node("Div", node.name, inputs=[one, x], outputs=[y])  # keeps the name
        detach(node)
        out_nodes.append(div)
        notes.append(Note(node.name, "Reciprocal", True, "Div(1, x) (exact)", (div.name,)))
    graph.nodes = out_nodes
    return legalized(graph, notes)
