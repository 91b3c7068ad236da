"""Exp(x) with x provably <= 0 becomes Elu(x) + 1: the NPU runs Elu, while rknn-toolkit2 places Exp on the CPU."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from passes.infra import PassResult
from passes.legalize_common import Names, Note, constant, detach, float_dtype, legalized, shape_of, variable
from passes.signs import describe, nonpositive


def legalize_exp(graph: gs.Graph) -> PassResult:
    """Rewrite every Exp whose argument is provably <= 0 (e.g. the WKV form Exp(a - Max(a, b))).

    Elu(x) = exp(x) - 1 for x < 0 (alpha = 1), so Elu(x) + 1 = exp(x) on x <= 0; for x > 0 it would be
    x + 1, hence the proof. Error: absolute, not relative: at most ~1 ulp of 1.0 (6e-8 in fp32,
    4.9e-4 in fp16), so exp(x) below ~5e-4 loses its relative precision on the fp16 NPU.
    """
    names = Names(graph)
    notes, out_nodes = [], []
    for node in graph.nodes:
        if node.op != "Exp" or len(node.inputs) != 1 or len(node.outputs) != 1:
            out_nodes.append(node)
            continue
        x, y = node.inputs[0], node.outputs[0]
        why = nonpositive(x)
        if not why:
            notes.append(Note(node.name, node.op, False, f"cannot prove its argument <= 0 ({describe(x)})"))
            out_nodes.append(node)
            continue
        shape = shape_of(x) if shape_of(x) is not None else shape_of(y)
        dt = float_dtype(x)
        e = variable(names, f"{y.name}__elu", dt, shape) if shape is not None else \
            gs.Variable(names.tensor(f"{y.name}__elu"), dtype=dt)
        elu = gs.Node("Elu", names.node(f"{node.name}__elu"), attrs={"alpha": 1.0}, inputs=[x], outputs=[e])
        one = constant(names, f"{node.name}__one", dt.type(1.0))
        add = gs.Node("Add", names.node(f"{node.name}__plus1"), inputs=[e, one], outputs=[y])
        detach(node)
        out_nodes += [elu, add]
        notes.append(Note(node.name, "Exp", True, f"Elu(x) + 1, argument <= 0: {why}", (elu.name, add.name)))
    graph.nodes = out_nodes
    return legalized(graph, notes)
