"""Max of two 1-D..3-D tensors is computed in a 4-D [1, N, 1, 1] layout, where rknn-toolkit2 keeps it on the NPU."""
from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from passes.infra import PassResult
from passes.legalize_common import (
    Names,
    Note,
    detach,
    float_dtype,
    legalized,
    reshape,
    same_shape_operands,
    shape_of,
    variable,
)

FORMS = ("4d", "relu")


def legalize_max(graph: gs.Graph, form: str = "4d") -> PassResult:
    """Rewrite each two-input Max of rank < 4 (rknn-toolkit2 2.5.0 places those on the CPU; 4-D ones on the NPU).

    form="4d": Reshape both operands to [1, N, 1, 1], Max, Reshape back: exact, and -inf/inf stay right
    (pp = -1e30 becomes -inf in fp16). form="relu": a + Relu(b - a): NPU in every layout, but rounded
    (|error| <= ~1 ulp of max(|a|, |b|)) and NaN when a is infinite, so not the default.
    A constant operand is broadcast to the full shape first; a broadcasting variable is left alone.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")
    names = Names(graph)
    notes, out_nodes = [], []
    for node in graph.nodes:
        if node.op != "Max":
            out_nodes.append(node)
            continue
        y = node.outputs[0]
        shape = shape_of(y)
        if len(node.inputs) != 2:
            why = f"{len(node.inputs)} inputs; only two-input Max is rewritten"
        elif shape is None:
            why = f"output {y.name} has no static shape"
        elif len(shape) == 4 and form == "4d":
            why = "already 4-D: rknn-toolkit2 keeps it on the NPU"
        elif len(shape) > 4:
            why = f"rank {len(shape)} > 4"
        else:
            operands, why = same_shape_operands(names, node, shape)
        if why:
            notes.append(Note(node.name, "Max", False, why))
            out_nodes.append(node)
            continue
        a, b = operands
        dt = float_dtype(y)
        new = []
        if form == "4d":
            s4 = [1, math.prod(shape), 1, 1]
            a4 = reshape(names, new, a, s4, f"{node.name}__a4d")
            b4 = reshape(names, new, b, s4, f"{node.name}__b4d")
            m4 = variable(names, f"{y.name}__4d", dt, s4)
            new.append(gs.Node("Max", node.name, inputs=[a4, b4], outputs=[m4]))  # the Max keeps its name
            reshape(names, new, m4, shape, f"{node.name}__back", out=y)
            how = f"Max in a {s4} layout (exact)"
        else:
            d = variable(names, f"{y.name}__diff", dt, shape)
            r = variable(names, f"{y.name}__relu", dt, shape)
            new.append(gs.Node("Sub", names.node(f"{node.name}__sub"), inputs=[b, a], outputs=[d]))
            new.append(gs.Node("Relu", names.node(f"{node.name}__relu"), inputs=[d], outputs=[r]))
            new.append(gs.Node("Add", names.node(f"{node.name}__add"), inputs=[a, r], outputs=[y]))
            how = "a + Relu(b - a) (rounded; NaN for infinite a)"
        detach(node)
        out_nodes += new
        notes.append(Note(node.name, "Max", True, how, tuple(n.name for n in new)))
    graph.nodes = out_nodes
    return legalized(graph, notes)
