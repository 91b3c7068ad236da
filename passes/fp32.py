"""Disable fp16 folding: every float16 tensor becomes float32 and float<->float Casts disappear."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.graphutil import is_float, np_dtype
from passes.infra import PassResult

_F16, _F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
_DTYPE_ATTRS = {"ConstantOfShape": "value", "EyeLike": "dtype", "RandomNormal": "dtype",
                "RandomUniform": "dtype", "RandomNormalLike": "dtype", "RandomUniformLike": "dtype"}


def _is_f16(dtype) -> bool:
    return np_dtype(dtype) == np.dtype(np.float16)


def fp16_to_fp32(graph: gs.Graph) -> PassResult:
    """Upcast fp16 initializers/inputs/outputs/value_info to fp32; Cast(to fp16|fp32) of a float is Identity.

    The graph then computes the same function in fp32 (Cast(fp32)->Max->Cast(fp16) wrappers vanish);
    Casts to integer types stay. Call remove_identities afterwards.
    """
    changed = 0
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            if t.values.dtype == np.float16:
                t.values = t.values.astype(np.float32)
                changed += 1
        elif _is_f16(t.dtype):
            t.dtype = np.float32
            changed += 1
    for node in graph.nodes:
        if node.op == "Cast":
            to = node.attrs.get("to")
            if to in (_F16, _F32):
                src = node.inputs[0]
                src_dt = src.values.dtype if isinstance(src, gs.Constant) else np_dtype(src.dtype)
                if src_dt is not None and is_float_dtype(src_dt):
                    node.op, node.attrs = "Identity", {}
                    changed += 1
                elif to != _F32:
                    node.attrs["to"] = _F32
                    changed += 1
            for out in node.outputs:
                if out.dtype is not None and _is_f16(out.dtype):
                    out.dtype = np.float32
                    changed += 1
        elif node.op == "CastLike":
            for t in node.inputs:
                if isinstance(t, gs.Constant) and t.values.dtype == np.float16:
                    t.values = t.values.astype(np.float32)
                    changed += 1
        attr = _DTYPE_ATTRS.get(node.op)
        if attr and attr in node.attrs:
            v = node.attrs[attr]
            if isinstance(v, gs.Constant) and v.values.dtype == np.float16:
                node.attrs[attr] = gs.Constant(v.name, v.values.astype(np.float32))
                changed += 1
            elif v == _F16:
                node.attrs[attr] = _F32
                changed += 1
    return PassResult(graph, modified=changed > 0)


def is_float_dtype(dt) -> bool:
    return np.dtype(dt) in (np.dtype(np.float16), np.dtype(np.float32))


__all__ = ["fp16_to_fp32", "is_float"]
