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

_F16, _F32 = np.dtype(np.float16), np.dtype(np.float32)


def fp16_boundary(graph: gs.Graph, names: list[str]) -> gs.Graph:
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
    return toposort(graph)


BOUNDARY_CASTS = (".cast_in", ".cast_out", ".to_fp32", ".to_fp16")


def fp32_boundary(model: onnx.ModelProto) -> onnx.ModelProto:
    """The inverse for a compiler that quantizes: a copy whose fp16 boundaries are fp32 again (the Casts at
    the inputs and outputs that passes/boundary.py and fp16_boundary put there removed).

    rknn-toolkit2 2.5.0's w8a8 quantizer fails on some graphs with such Casts (a KeyError in its fp16 hybrid
    step, seen on an RWKV-7 prefill segment); a w8a8 model's tensors are int8 on the NPU anyway, so what its
    runtime converts from does not change. Values: the same, computed from the fp32 inputs.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    ins = {v.name: v for v in g.input}
    outs = {v.name: v for v in g.output}
    rename: dict[str, str] = {}
    keep = []
    for n in g.node:
        if n.op_type == "Cast" and n.name.endswith(BOUNDARY_CASTS) and n.input[0] in ins \
                and ins[n.input[0]].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            ins[n.input[0]].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            rename[n.output[0]] = n.input[0]  # the graph's uses of the cast read the input itself
            continue
        if n.op_type == "Cast" and n.name.endswith(BOUNDARY_CASTS) and n.output[0] in outs \
                and outs[n.output[0]].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            outs[n.output[0]].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            rename[n.input[0]] = n.output[0]  # the producer writes the output's name directly
            continue
        keep.append(n)
    for n in keep:
        n.input[:] = [rename.get(i, i) for i in n.input]
        n.output[:] = [rename.get(o, o) for o in n.output]
    del g.node[:]
    g.node.extend(keep)
    for vi in list(g.value_info):
        if vi.name in rename:
            g.value_info.remove(vi)
    onnx.checker.check_model(m)
    return m
