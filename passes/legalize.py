"""Legalization: rewrite the ops rknn-toolkit2 2.5.0 would place on the CPU into NPU-native equivalents."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from passes.infra import PassManager, PassResult, tidy
from passes.legalize_common import Note
from passes.legalize_div import legalize_div
from passes.legalize_exp import legalize_exp
from passes.legalize_matvec import legalize_matvec
from passes.legalize_max import legalize_max
from passes.legalize_min import legalize_min
from passes.legalize_reciprocal import legalize_reciprocal

# Order matters: MatMul-by-a-column first (a product of two computed tensors becomes Mul + ReduceSum, see
# legalize_matvec), then Exp (its proof reads the Max it follows), Min before Max (Min becomes a Max),
# Reciprocal before Div (Reciprocal becomes a Div). Max uses the exact 4-D form: the Exp proofs rely on
# Max being exact, and a + Relu(b - a) is not (with pp = -1e30 it returns 0 instead of k, so k - q > 0).
LEGALIZE = PassManager([legalize_matvec, legalize_exp, legalize_min, legalize_max, legalize_reciprocal, legalize_div,
                        tidy], name="legalize")


def legalize(graph: gs.Graph) -> PassResult:
    """Run the legalize passes in order on a normalized graph (LEGALIZE); the notes are every pass's Notes.

    Ends with cleanup + toposort. A pass that raises is named in the PassError.
    """
    return LEGALIZE(graph)


__all__ = ["LEGALIZE", "Note", "legalize"]
