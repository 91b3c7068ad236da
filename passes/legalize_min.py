"""Min(a, b) becomes -Max(-a, -b): rknn-toolkit2 places Min on the CPU in every layout, Neg and 4-D Max on the NPU."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from passes.infra import PassResult
from passes.legalize_common import Names, Note, detach, float_dtype, legalized, shape_of, variable


def legalize_min(graph: gs.Graph) -> PassResult:
    """Rewrite each two-input Min as Neg(Max(Neg(a), Neg(b))): exact (negation is exact, Max picks an operand).

    The new Max still needs legalize_max (run after this pass) to get the 4-D layout the NPU takes.
    """
    names = Names(graph)
    notes, out_nodes = [], []
    for node in graph.nodes:
        if node.op != "Min":
            out_nodes.append(node)
            continue
        y = node.outputs[0]
        shape = shape_of(y)
        if len(node.inputs) != 2:
            notes.append(Note(node.name, "Min", False, f"{len(node.inputs)} inputs; only two-input Min is rewritten"))
            out_nodes.append(node)
            continue
        dt = float_dtype(y)
        new, negs = [], []
        for k, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant):
                negs.append(gs.Constant(names.tensor(f"{t.name}__neg"), np.asarray(-np.asarray(t.values))))
                continue
            nt = variable(names, f"{t.name}__neg", float_dtype(t), shape_of(t)) if shape_of(t) is not None else \
                gs.Variable(names.tensor(f"{t.name}__neg"), dtype=float_dtype(t))
            new.append(gs.Node("Neg", names.node(f"{node.name}__neg{k}"), inputs=[t], outputs=[nt]))
            negs.append(nt)
        m = variable(names, f"{y.name}__negmax", dt, shape) if shape is not None else \
            gs.Variable(names.tensor(f"{y.name}__negmax"), dtype=dt)
        new.append(gs.Node("Max", names.node(f"{node.name}__max"), inputs=negs, outputs=[m]))
        new.append(gs.Node("Neg", names.node(f"{node.name}__neg"), inputs=[m], outputs=[y]))
        detach(node)
        out_nodes += new
        notes.append(Note(node.name, "Min", True, "-Max(-a, -b) (exact)", tuple(n.name for n in new)))
    graph.nodes = out_nodes
    return legalized(graph, notes)
