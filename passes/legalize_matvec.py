"""A matrix-vector MatMul of two computed tensors becomes ReduceSum(Mul(A, B as a row), last axis).

The RWKV-7 state products S @ kk and S_new @ r ([H, N, N] @ [H, N, 1]) have no constant weight, so the
placement table (passes/placement.py) sends them to the CPU: an NPU->CPU->NPU hop per product.
The Mul + ReduceSum form uses ops the table keeps on the NPU, and rknn-toolkit2 2.5.0 places them on the
NPU too (Mul, then a Transpose and a Conv for the ReduceSum). The compiler would keep the MatMul itself on
the NPU as well (an exMatMul, ~7% fewer estimated cycles): the rewrite exists for the placement table; the
measurements are in tests/passes/test_passes_legalize_matvec.py.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from passes.infra import PassResult
from passes.legalize_common import Names, Note, constant, detach, float_dtype, legalized, reshape, shape_of, variable

MAX_RANK = 4  # the NPU's largest rank (passes/placement.py MAX_NPU_RANK)


def _why_not(a, b, y) -> str:
    """Why MatMul(a, b) -> y is not a matvec of two computed tensors this pass rewrites; "" when it is."""
    sa, sb, sy = shape_of(a), shape_of(b), shape_of(y)
    for t, s in ((a, sa), (b, sb), (y, sy)):
        if s is None:
            return f"tensor {t.name} has no static shape"
    if len(sb) < 2:
        return f"B {b.name} {sb} is 1-D, not a column [..., K, 1]"
    if sb[-1] != 1:
        return (f"B {b.name} {sb} has {sb[-1]} columns, not 1: a matrix product (Mul + ReduceSum would need an "
                f"[..., M, K, {sb[-1]}] intermediate)")
    if len(sa) != len(sb) or sa[:-2] != sb[:-2]:
        return f"batch dimensions of A {a.name} {sa} and B {b.name} {sb} differ (broadcast MatMul)"
    if sa[-1] != sb[-2]:
        return f"A {a.name} {sa} and B {b.name} {sb} disagree on K"
    if len(sa) > MAX_RANK:
        return f"rank {len(sa)} > {MAX_RANK}"
    return ""


def legalize_matvec(graph: gs.Graph) -> PassResult:
    """Rewrite MatMul(A [..., M, K], B [..., K, 1]), both computed, as ReduceSum(Mul(A, B_row), axes=[-1], keepdims=1).

    B_row is B reshaped to [..., 1, K] (the same elements in the same order). Equal batch dimensions only,
    ranks 2 to 4, kept at their own rank: rknn-toolkit2 2.5.0 keeps the 3-D and the 4-D form on the NPU alike.
    Error: both forms sum the same K products in fp32 in some order, so each is within gamma_K * sum|a_i b_i|
    of the exact dot product (gamma_K = K u / (1 - K u), u = 2^-24); they differ by at most twice that.
    The ReduceSum keeps the MatMul's name, so the compiler table still shows it ("Conv:MatMul_11_2conv").
    Left alone, with a note: B with more than one column, a 1-D B, broadcasting batch dimensions, rank > 4,
    no static shapes. A MatMul with a constant operand is the NPU's native case (a Conv / exMatMul that the
    placement table already keeps on the NPU): skipped without a note, like the other ops, so the notes
    (and a manifest's `legalized` list) do not grow by every projection of every layer.
    """
    names = Names(graph)
    axes_as_input = (graph.opset or 13) >= 13  # ReduceSum took `axes` as an attribute before opset 13
    notes, out_nodes = [], []
    for node in graph.nodes:
        if node.op != "MatMul" or len(node.inputs) != 2 or len(node.outputs) != 1 \
                or any(isinstance(t, gs.Constant) for t in node.inputs):
            out_nodes.append(node)
            continue
        a, b = node.inputs
        y = node.outputs[0]
        why = _why_not(a, b, y)
        if why:
            notes.append(Note(node.name, "MatMul", False, why))
            out_nodes.append(node)
            continue
        sa, sb = shape_of(a), shape_of(b)
        k = sb[-2]
        dt = float_dtype(y)
        new = []
        b_row = reshape(names, new, b, sb[:-2] + [1, k], f"{node.name}__b_row")
        prod = variable(names, f"{y.name}__prod", dt, sa)
        new.append(gs.Node("Mul", names.node(f"{node.name}__mul"), inputs=[a, b_row], outputs=[prod]))
        if axes_as_input:
            axes = constant(names, f"{node.name}__axes", np.array([-1], np.int64))
            new.append(gs.Node("ReduceSum", node.name, attrs={"keepdims": 1}, inputs=[prod, axes], outputs=[y]))
        else:
            new.append(gs.Node("ReduceSum", node.name, attrs={"axes": [-1], "keepdims": 1}, inputs=[prod], outputs=[y]))
        detach(node)
        out_nodes += new
        notes.append(Note(node.name, "MatMul", True,
                          f"matrix {sa} times column {sb}: ReduceSum(Mul(A, B as {sb[:-2] + [1, k]}), last axis)",
                          tuple(n.name for n in new)))
    graph.nodes = out_nodes
    return legalized(graph, notes)
