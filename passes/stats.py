"""Cost numbers for the split summary: MatMul FLOPs per node and bytes crossing NPU<->CPU per run."""
from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from passes.graphutil import static_shape


def _shape(t):
    return list(t.values.shape) if isinstance(t, gs.Constant) else static_shape(t)


def matmul_flops(node) -> int:
    """Multiply-add FLOPs (2*M*K*N) of a MatMul/Gemm/Conv node with static shapes; 0 otherwise."""
    if node.op == "MatMul" and len(node.inputs) == 2:
        a, b = _shape(node.inputs[0]), _shape(node.inputs[1])
        if not a or not b:
            return 0
        a = [1] + a if len(a) == 1 else a
        b = b + [1] if len(b) == 1 else b
        batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])) if len(a) > 2 or len(b) > 2 else ()
        return 2 * math.prod(batch) * a[-2] * a[-1] * b[-1]
    if node.op == "Gemm" and len(node.inputs) >= 2:
        a, b = _shape(node.inputs[0]), _shape(node.inputs[1])
        if not a or not b or len(a) != 2 or len(b) != 2:
            return 0
        m, k = (a[1], a[0]) if node.attrs.get("transA", 0) else a
        n = b[0] if node.attrs.get("transB", 0) else b[1]
        return 2 * m * k * n
    if node.op == "Conv" and len(node.inputs) >= 2:
        w, y = _shape(node.inputs[1]), static_shape(node.outputs[0])
        if not w or not y:
            return 0
        return 2 * math.prod(y) * math.prod(w[1:])
    return 0


def tensor_bytes(dtype: str, shape) -> int:
    return int(np.dtype(dtype).itemsize * math.prod(shape))


def tensor_info_bytes(info) -> int:
    """Bytes of one TensorInfo (name, dtype, shape)."""
    return tensor_bytes(info.dtype, info.shape)


def boundary_bytes(cut_segments) -> dict:
    """Bytes crossing between backends per run: into and out of NPU segments, and in total.

    Inputs of an NPU segment and outputs an NPU segment hands to anything else are counted once each.
    """
    to_npu = sum(tensor_info_bytes(i) for s in cut_segments if s.backend == "npu" for i in s.inputs)
    from_npu = sum(tensor_info_bytes(o) for s in cut_segments if s.backend == "npu" for o in s.outputs)
    return {"to_npu": to_npu, "from_npu": from_npu, "total": to_npu + from_npu}


def flops_share(cut_segments, backend="npu") -> float:
    """Fraction of all MatMul FLOPs that run on `backend` (1.0 when there are none)."""
    total = sum(s.matmul_flops for s in cut_segments)
    part = sum(s.matmul_flops for s in cut_segments if s.backend == backend)
    return part / total if total else 1.0


__all__ = ["boundary_bytes", "flops_share", "matmul_flops", "tensor_bytes", "tensor_info_bytes"]
