"""Legalization: rewrite the ops rknn-toolkit2 2.5.0 would place on the CPU into NPU-native equivalents."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from passes.graphutil import toposort
from passes.legalize_common import Note
from passes.legalize_div import legalize_div
from passes.legalize_exp import legalize_exp
from passes.legalize_matvec import legalize_matvec
from passes.legalize_max import legalize_max
from passes.legalize_min import legalize_min
from passes.legalize_reciprocal import legalize_reciprocal


def legalize(graph: gs.Graph) -> tuple[gs.Graph, list[Note]]:
    """Run the legalize passes in order on a normalized graph; returns the graph and every pass's notes.

    Order matters: MatMul-by-a-column first (a product of two computed tensors becomes Mul + ReduceSum, see
    legalize_matvec), then Exp (its proof reads the Max it follows), Min before Max (Min becomes a Max),
    Reciprocal before Div (Reciprocal becomes a Div). Max uses the exact 4-D form: the Exp proofs rely on
    Max being exact, and a + Relu(b - a) is not (with pp = -1e30 it returns 0 instead of k, so k - q > 0).
    Ends with cleanup + toposort.
    """
    notes: list[Note] = []
    graph, n = legalize_matvec(graph)
    notes += n
    graph, n = legalize_exp(graph)
    notes += n
    graph, n = legalize_min(graph)
    notes += n
    graph, n = legalize_max(graph)
    notes += n
    graph, n = legalize_reciprocal(graph)
    notes += n
    graph, n = legalize_div(graph)
    notes += n
    return toposort(graph.cleanup()), notes


__all__ = ["Note", "legalize"]
