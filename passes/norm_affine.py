"""A group norm's affine on the flat vector: `norm * W + B` with W, B of shape [G, N] done on [G * N].

RWKV-7's ln_x is a GroupNorm: the output [H, 64] is normalized per head, then scaled and shifted by per-channel
constants of shape [H, 64]. rknn-toolkit2 2.5.0 fuses the normalization into one exNorm op and, building w8a8,
refuses that affine ("meet unsupported exNorm element_affine broadcast type"; the segment then falls back to
the CPU). The same affine applied after flattening the normalized tensor to [G * N] is an ordinary per-channel
scale and shift, which it quantizes. Exact: the same products and sums, element by element.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from passes.graphutil import static_shape
from passes.infra import PassResult, same_wiring, wiring


def _const(t):
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def flat_norm_affine(graph: gs.Graph) -> PassResult:
    """Rewrite Div(centered, std) -> Mul(W[G, N]) -> Add(B[G, N]) as Reshape -> Mul(W[G*N]) -> Add -> Reshape."""
    before = wiring(graph)
    serial = 0
    for mul in list(graph.nodes):
        if mul.op != "Mul" or len(mul.inputs) != 2:
            continue
        x, w = mul.inputs
        if _const(x) is not None:
            x, w = w, x
        wv = _const(w)
        if wv is None or wv.ndim < 2 or not x.inputs or x.inputs[0].op != "Div":
            continue
        shape = static_shape(x)
        if shape is None or list(shape[-wv.ndim:]) != list(wv.shape) or int(np.prod(wv.shape[:-1])) < 2:
            continue
        out = mul.outputs[0]
        add = out.outputs[0] if len(out.outputs) == 1 else None
        bv = None
        if add is not None and add.op == "Add" and len(add.inputs) == 2:
            other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            bv = _const(other)
            if bv is None or bv.shape != wv.shape:
                add, bv = None, None
        else:
            add = None
        serial += 1
        lead = list(shape[:-wv.ndim])
        flat = lead + [int(np.prod(wv.shape))]
        name = f"norm_affine{serial}"
        xf = gs.Variable(f"{name}.flat", dtype=x.dtype, shape=flat)
        graph.nodes.append(gs.Node("Reshape", f"{name}.Reshape_in", inputs=[x, gs.Constant(
            f"{name}.shape_in", np.array(flat, np.int64))], outputs=[xf]))
        scaled = gs.Variable(f"{name}.scaled", dtype=x.dtype, shape=flat)
        graph.nodes.append(gs.Node("Mul", f"{name}.Mul", inputs=[xf, gs.Constant(
            f"{name}.w", wv.reshape(-1).astype(wv.dtype))], outputs=[scaled]))
        last = scaled
        final = out
        if add is not None:
            shifted = gs.Variable(f"{name}.shifted", dtype=x.dtype, shape=flat)
            graph.nodes.append(gs.Node("Add", f"{name}.Add", inputs=[scaled, gs.Constant(
                f"{name}.b", bv.reshape(-1).astype(bv.dtype))], outputs=[shifted]))
            last = shifted
            final = add.outputs[0]
            add.outputs.clear()
        mul.outputs.clear()
        graph.nodes.append(gs.Node("Reshape", f"{name}.Reshape_out", inputs=[last, gs.Constant(
            f"{name}.shape_out", np.array(list(shape), np.int64))], outputs=[final]))
    graph.cleanup().toposort()
    return PassResult(graph, modified=not same_wiring(before, wiring(graph)))
