"""An elementwise Div of two same-shape tensors moves to a [1, 1, H, W] layout, which rknn-toolkit2 keeps on the NPU."""
from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from passes.infra import PassResult
from passes.legalize_common import (
    Names,
    Note,
    constant,
    detach,
    float_dtype,
    hw_layout,
    legalized,
    reshape,
    same_shape_operands,
    shape_of,
    variable,
)


def _compressible(v) -> bool:
    """Constant along H or W: the compiler would store it as a broadcast [1, 1, 1, W] / [1, 1, H, 1]."""
    return bool((v == v[:, :, :1, :]).all() or (v == v[:, :, :, :1]).all())


def _pattern(v):
    """A fixed pseudo-random pattern of 1s and 2s that makes v * pattern vary along both H and W."""
    for seed in range(64):
        c = np.where(np.random.default_rng(seed).random(v.shape) < 0.5, 1.0, 2.0).astype(v.dtype)
        if not _compressible(v * c):
            return c
    return c


def legalize_div(graph: gs.Graph) -> PassResult:
    """Rewrite Div(a, b) with a variable divisor of the output's full shape into Reshape -> Div -> Reshape.

    rknn-toolkit2 2.5.0 runs Div on the NPU only with a channel dimension of 1 and H, W > 1: [1, C] and
    [1, 1, 1, C] operands are folded back into its [1, C, 1, 1] layout and land on the CPU inside a layer.
    H, W: the most square split of N = H * W. Exact (same operation, same operands).
    A constant numerator that is constant along H or W (e.g. the 1 of a reciprocal) is compressed by the
    compiler into a broadcast, which lands on the CPU again: it is multiplied by a fixed random pattern c of
    1s and 2s and the quotient by 1/c afterwards, exact in binary floating point (powers of two) unless
    2k/b overflows (|k/b| above half the largest fp16, i.e. 32752).
    Left alone: a constant divisor (the compiler turns it into a Mul on the NPU), a broadcasting divisor
    ([C] / [1] stays on the NPU; LayerNorm's x / std fuses into exNorm), a Div already in [1, 1, H, W], prime N.
    """
    names = Names(graph)
    notes, out_nodes = [], []
    for node in graph.nodes:
        if node.op != "Div" or len(node.inputs) != 2:
            out_nodes.append(node)
            continue
        y = node.outputs[0]
        shape = shape_of(y)
        divisor = node.inputs[1]
        hw = hw_layout(math.prod(shape)) if shape is not None else None
        operands = None
        if isinstance(divisor, gs.Constant):
            why = "constant divisor: rknn-toolkit2 turns it into a Mul on the NPU"
        elif shape is None:
            why = f"output {y.name} has no static shape"
        elif shape_of(divisor) != shape:
            why = (f"divisor {divisor.name} {shape_of(divisor)} broadcasts to {shape}: rknn-toolkit2 keeps a "
                   "broadcast Div on the NPU (LayerNorm's x / std fuses into exNorm)")
        elif len(shape) == 4 and shape[0] == shape[1] == 1 and shape[2] > 1 and shape[3] > 1:
            why = "already in a [1, 1, H, W] layout the NPU takes"
        elif hw is None:
            why = f"{math.prod(shape)} elements have no H x W split with H, W > 1"
        else:
            operands, why = same_shape_operands(names, node, shape)
        if operands is None:
            notes.append(Note(node.name, "Div", False, why))
            out_nodes.append(node)
            continue
        a, b = operands
        new = []
        dt = float_dtype(y)
        a4 = reshape(names, new, a, hw, f"{node.name}__a_hw")
        b4 = reshape(names, new, b, hw, f"{node.name}__b_hw")
        q = variable(names, f"{y.name}__hw", dt, hw)
        how = f"Div in a {hw} layout (exact)"
        unscale = None
        if isinstance(a4, gs.Constant) and _compressible(a4.values):
            c = _pattern(a4.values)
            a4 = constant(names, f"{a4.name}__scaled", (a4.values * c).astype(a4.values.dtype))
            unscale = constant(names, f"{node.name}__unscale", (1.0 / c).astype(dt))
            how = f"Div in a {hw} layout, numerator scaled by a 1/2 pattern and unscaled after (exact)"
        new.append(gs.Node("Div", node.name, inputs=[a4, b4], outputs=[q]))  # the Div keeps its name
        if unscale is not None:
            q2 = variable(names, f"{y.name}__hw_unscaled", dt, hw)
            new.append(gs.Node("Mul", names.node(f"{node.name}__unscale"), inputs=[q, unscale], outputs=[q2]))
            q = q2
        reshape(names, new, q, shape, f"{node.name}__back", out=y)
        detach(node)
        out_nodes += new
        notes.append(Note(node.name, "Div", True, how, tuple(n.name for n in new)))
    graph.nodes = out_nodes
    return legalized(graph, notes)
