"""Exp(x) with x provably <= 0 becomes Elu(x) + 1: the NPU runs Elu, while rknn-toolkit2 places Exp on the CPU.

Exp(x) with x provably <= B for a constant B (interval bounds, passes/bounds.py; e.g. RWKV-6's inner decay
exp(t_decay + tanh(.) w2) <= exp(t_decay + sum |w2|)) becomes exp(B) * (Elu(x - B) + 1), where x - B <= 0.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from passes.bounds import interval
from passes.infra import PassResult
from passes.legalize_common import Names, Note, constant, detach, float_dtype, legalized, shape_of, variable
from passes.signs import describe, nonpositive

# The largest bound shifted out: exp(B) must stay far inside fp16 (65504), and the shifted result's absolute
# error (~4.3e-4 of Elu + 1 in fp16) grows by exp(B).
MAX_SHIFT = 8.0


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
            shifted = _shifted(names, node, x, y)
            if isinstance(shifted, str):
                notes.append(Note(node.name, node.op, False, f"cannot prove its argument <= 0 ({describe(x)}){shifted}"))
                out_nodes.append(node)
            else:
                new, note = shifted
                detach(node)
                out_nodes += new
                notes.append(note)
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


def _shifted(names: Names, node, x, y):
    """(nodes of exp(B) * (Elu(x - B) + 1), note) when x <= B with B a finite constant bound; else why not ("")."""
    iv = interval(x)
    shape = shape_of(x) if shape_of(x) is not None else shape_of(y)
    if iv is None or shape is None or not iv.finite_hi:
        return ""
    B = np.broadcast_to(iv.hi, shape)
    if float(B.max()) > MAX_SHIFT:
        return f"; its bound reaches {float(B.max()):.3g} > {MAX_SHIFT} (exp of it would cost fp16 precision)"
    dt = float_dtype(x)
    b = B.astype(dt)
    b = np.where(b.astype(np.float64) < B, np.nextafter(b, dt.type(np.inf)), b)  # rounded up: still a bound
    d = variable(names, f"{y.name}__shifted", dt, shape)
    e = variable(names, f"{y.name}__elu", dt, shape)
    p1 = variable(names, f"{y.name}__plus1", dt, shape)
    sub = gs.Node("Sub", names.node(f"{node.name}__shift"), inputs=[x, constant(names, f"{node.name}__bound", b)],
                  outputs=[d])
    elu = gs.Node("Elu", names.node(f"{node.name}__elu"), attrs={"alpha": 1.0}, inputs=[d], outputs=[e])
    add = gs.Node("Add", names.node(f"{node.name}__plus1"),
                  inputs=[e, constant(names, f"{node.name}__one", dt.type(1.0))], outputs=[p1])
    scale = np.exp(b.astype(np.float64)).astype(dt)
    mul = gs.Node("Mul", names.node(f"{node.name}__scale"),
                  inputs=[p1, constant(names, f"{node.name}__exp_bound", scale)], outputs=[y])
    why = (f"exp(B) * (Elu(x - B) + 1) with x <= B (max B {float(b.max()):.3g}), x - B <= 0: {iv.why}")
    return [sub, elu, add, mul], Note(node.name, "Exp", True, why, (sub.name, elu.name, add.name, mul.name))
