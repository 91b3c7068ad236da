"""fp16 boundaries: declare chosen fp32 graph inputs/outputs float16, converted by a Cast inside the graph.

A recurrent state the NPU both reads and writes can then stay float16 between calls: no fp32 <-> fp16
conversion of it per token on the board (the RKNN compiler folds such Casts into the model's own fp16
computation; measured with rknn-toolkit2 2.5.0: no CPU op). Exact for values the NPU holds in fp16 anyway.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.graphutil import np_dtype, toposort
from passes.infra import PassResult

_F16, _F32 = np.dtype(np.float16), np.dtype(np.float32)


def fp16_boundary(graph: gs.Graph, names: list[str]) -> PassResult:
    """Make the named float32 graph inputs and outputs float16 at the boundary (Casts inside)."""
    wanted = set(names)
    found = set()
    for side, to, step in ((graph.inputs, onnx.TensorProto.FLOAT, "to_fp32"),
                           (graph.outputs, onnx.TensorProto.FLOAT16, "to_fp16")):
        for i, t in enumerate(list(side)):
            if t.name not in wanted or np_dtype(t.dtype) != _F32:
                continue
            found.add(t.name)
            outer = gs.Variable(t.name, dtype=_F16, shape=t.shape)
            t.name = f"{t.name}.fp32"
            # an input is cast on the way in (outer -> t), an output on the way out (t -> outer)
            ins, outs = ([outer], [t]) if side is graph.inputs else ([t], [outer])
            graph.nodes.append(gs.Node("Cast", name=f"{outer.name}.{step}", attrs={"to": to},
                                       inputs=ins, outputs=outs))
            side[i] = outer
    missing = wanted - found
    if missing:
        raise ValueError(f"fp16_boundary: no float32 graph input or output named {sorted(missing)[0]!r}")
    return PassResult(toposort(graph), modified=bool(found))

