"""Segment features: cheap numbers from one segment's ONNX that the cost model prices.

`segment_features(model, backend)` is pure and reads only the graph structure and tensor shapes (never
weight values), so `split` can store it in the manifest as `entry["cost"]`.

The support table `CPU_FALLBACK` lists the ops the RKNN compiler is expected to place on the CPU *inside*
an NPU model (each a NPU -> CPU -> NPU hop in one call), with the reason for each; `MULTICORE_OPS` are the
op kinds the RKNN runtime spreads over three cores (shared/docs/rk3588-board-costs.md,
shared/docs/rknn-toolkit2.md).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx

FEATURES_VERSION = 5
# Casts passes/boundary.py (and fp16_io) put at a segment's boundary: the RKNN compiler folds them into its fp16
# work, and onnxruntime's are the program's conversions, which the estimator prices from the program itself.
BOUNDARY_CAST_SUFFIXES = (".cast_in", ".cast_out", "@fp16.cast", ".to_fp32", ".to_fp16")
MATMUL_OPS = ("MatMul", "Gemm", "Conv")
# Ops that only rename or reshape a tensor: the RKNN compiler folds them; onnxruntime still dispatches them.
SHAPE_OPS = ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Constant")
# RKNN runtime API reference 2.3.2: core_mask 0_1_2 speeds up only these; other ops run on core 0.
# A MatMul with a constant weight is compiled to a 1x1 Conv (rknn-toolkit2.md), hence multi-core capable.
MULTICORE_OPS = ("Conv", "DepthwiseConv", "Add", "Concat", "Relu", "Clip", "PRelu", "LeakyRelu")
_REDUCE_CPU = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceLogSumExp")

# The support table: op -> (condition, reason). The condition names a check in `_fallback` below.
CPU_FALLBACK: dict[str, tuple[str, str]] = {
    "Exp": ("always", "Exp runs on the CPU inside an RKNN model (toolkit 2.3.2 op list; the 2.5.0 verbose "
                      "build places a layer's 4 Exps on the CPU); Elu(x)+1 for x <= 0 stays on the NPU"),
    "Log": ("always", "Log runs on the CPU inside an RKNN model (toolkit 2.3.2 op list; 2.5.0 build)"),
    "Max": ("rank_lt4", "Max with {rank}-D inputs is placed on the CPU by the 2.5.0 compiler (verbose build); "
                        "4-D inputs or a + Relu(b - a) stay on the NPU"),
    "Min": ("rank_lt4", "Min with {rank}-D inputs: like Max, placed on the CPU below 4-D (judgement from Max)"),
    "Div": ("wkv_div", "Div of two computed {rank}-D tensors (the WKV num/den) is placed on the CPU by the "
                       "2.5.0 compiler; in another layout it stays on the NPU (shared/docs/rknn-toolkit2.md)"),
    # ReduceMean / ReduceSum over the last axis: measured on the NPU with 2.5.0 (a Conv or exNorm; see
    # docs/legalization.md and passes/legalize_matvec.py), although toolkit 2.3.2's op list says CPU.
    "ReduceMax": ("always", "ReduceMax falls back to the CPU (toolkit 2.3.2 op list)"),
    "ReduceMin": ("always", "ReduceMin falls back to the CPU (toolkit 2.3.2 op list)"),
    "Gather": ("variable_index", "Gather with computed indices falls back to the CPU (toolkit 2.3.2 op list); "
                                 "a constant index compiles on the NPU (a whole 2.5.0 layer with state Gathers "
                                 "showed 0 CPU ops once Exp/Max/Div were rewritten)"),
    "Pow": ("not_layernorm", "Pow is not in the RK3588 NPU op list (toolkit 2.3.2) outside a LayerNorm "
                             "pattern (exNorm)"),
    "Reciprocal": ("always", "Reciprocal is not supported on the RK3588 NPU (toolkit 2.3.2 op list)"),
    "Cast": ("not_float_cast", "Cast falls back to the CPU (toolkit 2.3.2 op list)"),
    "Expand": ("always", "Expand falls back to the CPU (toolkit 2.3.2 op list)"),
    "MatMul": ("matmul_4d", "MatMul of two computed 4-D tensors falls back to the CPU (toolkit 2.3.2 op list)"),
}

_ITEMSIZE: dict[int, int] = {}


def _itemsize(elem_type: int) -> int:
    if elem_type not in _ITEMSIZE:
        try:
            _ITEMSIZE[elem_type] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
        except Exception:  # undefined / string types
            _ITEMSIZE[elem_type] = 4
    return _ITEMSIZE[elem_type]


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _value_infos(model: onnx.ModelProto) -> dict:
    """name -> (elem_type, shape list | None) for every typed tensor of the graph."""
    g = model.graph
    out = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        tt = vi.type.tensor_type
        shape = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            shape = dims if all(d is not None for d in dims) else None
        out[vi.name] = (tt.elem_type, shape)
    for t in g.initializer:
        out[t.name] = (t.data_type, list(t.dims))
    for n in g.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = (a.t.data_type, list(a.t.dims))
    return out


def _infer_missing(model: onnx.ModelProto, infos: dict) -> dict:
    """Shape inference on a weight-free copy when some node output has no shape (cheap: no tensor data)."""
    g = model.graph
    if all(o in infos and infos[o][1] is not None for n in g.node for o in n.output if o):
        return infos
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    lg = light.graph
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    names = {i.name for i in g.input}
    for t in g.initializer:  # initializers become typed inputs: same shapes, no bytes
        if t.name not in names:
            lg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:
        return infos
    merged = _value_infos(inferred)
    merged.update({k: v for k, v in infos.items() if v[1] is not None})
    return merged


def _constants(model: onnx.ModelProto) -> dict:
    """name -> TensorProto of every constant (initializers and Constant nodes)."""
    consts = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    return consts


def _numel(shape) -> int:
    return int(math.prod(shape)) if shape is not None else 0


def _matmul_flops(node, infos) -> int:
    def shape(i):
        return infos.get(node.input[i], (0, None))[1] if len(node.input) > i else None

    if node.op_type == "MatMul" and len(node.input) == 2:
        a, b = shape(0), shape(1)
        if not a or not b:
            return 0
        a = [1] + a if len(a) == 1 else a
        b = b + [1] if len(b) == 1 else b
        batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])) if len(a) > 2 or len(b) > 2 else ()
        return 2 * int(math.prod(batch)) * a[-2] * a[-1] * b[-1]
    if node.op_type == "Gemm" and len(node.input) >= 2:
        a, b = shape(0), shape(1)
        if not a or not b or len(a) != 2 or len(b) != 2:
            return 0
        attrs = {x.name: x.i for x in node.attribute}
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else a
        n = b[0] if attrs.get("transB", 0) else b[1]
        return 2 * m * k * n
    if node.op_type == "Conv" and len(node.input) >= 2:
        w, y = shape(1), infos.get(node.output[0], (0, None))[1]
        if not w or not y:
            return 0
        return 2 * _numel(y) * _numel(w[1:])
    return 0


def _rows(node, infos) -> int:
    """M of a MatMul/Gemm: rows of the activation (all leading dims of A)."""
    a = infos.get(node.input[0], (0, None))[1] if node.input else None
    if not a:
        return 1
    if node.op_type == "Gemm":
        attrs = {x.name: x.i for x in node.attribute}
        return int(a[1] if attrs.get("transA", 0) else a[0])
    return int(math.prod(a[:-1])) if len(a) > 1 else 1


def _layernorm_nodes(nodes, consumers) -> tuple[set, int]:
    """Indices of the nodes of decomposed LayerNorms (ReduceMean -> Sub -> Pow|Mul -> ReduceMean -> Add -> Sqrt
    -> Div), which the compiler turns into one exNorm op on the NPU. Returns (node indices, pattern count)."""
    def users(tensor, ops):
        return [i for i in consumers.get(tensor, ()) if nodes[i].op_type in ops]

    fused, count = set(), 0
    for i1, r1 in enumerate(nodes):
        if r1.op_type != "ReduceMean" or not r1.input:
            continue
        x, mean = r1.input[0], r1.output[0]
        for i_sub in users(mean, ("Sub",)):
            if list(nodes[i_sub].input) != [x, mean]:
                continue
            c = nodes[i_sub].output[0]
            for i_sq in users(c, ("Pow", "Mul")):
                if nodes[i_sq].op_type == "Mul" and list(nodes[i_sq].input) != [c, c]:
                    continue
                for i_r2 in users(nodes[i_sq].output[0], ("ReduceMean",)):
                    for i_add in users(nodes[i_r2].output[0], ("Add",)):
                        for i_sqrt in users(nodes[i_add].output[0], ("Sqrt",)):
                            std = nodes[i_sqrt].output[0]
                            for i_div in users(std, ("Div",)):
                                if list(nodes[i_div].input) == [c, std]:
                                    fused.update((i1, i_sub, i_sq, i_r2, i_add, i_sqrt, i_div))
                                    count += 1
    return fused, count


def _fallback(node, infos, consts, in_layernorm: bool) -> str | None:
    """The support table's reason when `node` is expected to run on the CPU inside an NPU model."""
    entry = CPU_FALLBACK.get(node.op_type)
    if entry is None:
        return None
    cond, reason = entry
    ranks = [len(infos[i][1]) for i in node.input if i and i in infos and infos[i][1] is not None]
    rank = max(ranks) if ranks else 1
    variable = [i for i in node.input if i and i not in consts]
    if cond == "always":
        hit = True
    elif cond == "rank_lt4":
        hit = rank < 4
    elif cond == "wkv_div":  # same-shape computed operands only: a broadcast divisor stays on the NPU (measured)
        shapes = [infos[i][1] for i in variable if i in infos]
        hit = (not in_layernorm and len(variable) >= 2 and rank < 4 and len(shapes) == 2
               and shapes[0] is not None and shapes[0] == shapes[1])
    elif cond == "not_layernorm":
        hit = not in_layernorm
    elif cond == "variable_index":
        hit = len(node.input) > 1 and node.input[1] not in consts
    elif cond == "matmul_4d":
        hit = len(variable) >= 2 and rank >= 4
    elif cond == "not_float_cast":  # fp32 <-> fp16 is folded into the model's fp16 work (measured: no CPU op)
        floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        src = infos.get(node.input[0], (None, None))[0] if node.input else None
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        hit = not (src in floats and to in floats)
    else:  # pragma: no cover - table typo
        raise ValueError(f"unknown condition {cond!r} for {node.op_type}")
    return reason.format(rank=rank) if hit else None


def segment_features(model: onnx.ModelProto, backend: str = "npu") -> dict:
    """Cost features of one segment model (JSON-serialisable; stored in the manifest as entry["cost"]).

    weight_bytes: {"stored": as the ONNX holds them, "fp32": float weights at 4 B, "fp16": at 2 B (as the NPU
    holds them)}; Gather tables are not streamed per call and are counted apart (gather_table_bytes).
    matmul_flops: 2*M*K*N per call; rows: M of the MatMuls (1 for a decode segment).
    elementwise_ops: every op that is neither MatMul/Gemm/Conv nor a pure shape op.
    cpu_ops: what the support table expects the RKNN compiler to run on the CPU inside this model.
    npu_ops: elementwise ops left on the NPU (a decomposed LayerNorm counted once, as exNorm).
    multicore: the heavy work (constant-weight MatMuls = 1x1 Conv) is of kinds spread over three cores.
    """
    g = model.graph
    infos = _infer_missing(model, _value_infos(model))
    consts = _constants(model)
    nodes = list(g.node)
    consumers: dict[str, list[int]] = {}
    for idx, n in enumerate(nodes):
        for i in n.input:
            consumers.setdefault(i, []).append(idx)
    gather_tables = {n.input[0] for n in nodes if n.op_type == "Gather" and n.input and n.input[0] in consts}

    stored = f32 = f16 = gather_bytes = 0
    for name, t in consts.items():
        numel = _numel(t.dims)
        nbytes = numel * _itemsize(t.data_type)
        if name in gather_tables:
            gather_bytes += nbytes
            continue
        stored += nbytes
        if t.data_type in _FLOAT_TYPES:
            f32 += numel * 4
            f16 += numel * 2
        else:
            f32 += nbytes
            f16 += nbytes

    ln_nodes, ln_count = _layernorm_nodes(nodes, consumers)
    ops = Counter(n.op_type for n in g.node)
    flops = mc_flops = mm_w16 = mc_w16 = 0
    rows = 1
    n_mm = elementwise = elems = shape_ops = npu_ops = 0
    cpu_ops = []
    boundary_casts = 0
    for idx, n in enumerate(nodes):
        op = n.op_type
        in_ln = idx in ln_nodes
        if op == "Cast" and n.name.endswith(BOUNDARY_CAST_SUFFIXES):
            boundary_casts += 1
            continue
        if op in MATMUL_OPS:
            n_mm += 1
            f = _matmul_flops(n, infos)
            flops += f
            rows = max(rows, _rows(n, infos))
            w = n.input[1] if len(n.input) > 1 else ""
            if w in consts:
                wb = _numel(consts[w].dims) * (2 if consts[w].data_type in _FLOAT_TYPES else
                                               _itemsize(consts[w].data_type))
                mm_w16 += wb
                mc_w16 += wb  # constant weight: compiled to a 1x1 Conv, multi-core capable
                mc_flops += f
        elif op in SHAPE_OPS:
            shape_ops += 1
            continue
        else:
            elementwise += 1
            elems += sum(_numel(infos.get(o, (0, None))[1]) for o in n.output if o)
        why = _fallback(n, infos, consts, in_ln)
        if why is not None:
            cpu_ops.append({"node": n.name, "op": op, "reason": why})
        elif op not in MATMUL_OPS and not in_ln:
            npu_ops += 1
    npu_ops += ln_count  # each decomposed LayerNorm is one exNorm

    def io_bytes(values, only=None):
        total = 0
        for vi in values:
            if vi.name in consts:
                continue
            et, shape = infos.get(vi.name, (vi.type.tensor_type.elem_type, None))
            if only is None or et == only:
                total += _numel(shape) * _itemsize(et)
        return total

    heavy = mc_w16 / f16 if f16 else (mc_flops / flops if flops else 0.0)
    return {
        "version": FEATURES_VERSION,
        "backend": backend,
        "rows": int(rows),
        "nodes": len(g.node) - boundary_casts,
        "boundary_casts": boundary_casts,
        "weight_bytes": {"stored": int(stored), "fp32": int(f32), "fp16": int(f16)},
        "gather_table_bytes": int(gather_bytes),
        "matmuls": n_mm,
        "matmul_flops": int(flops),
        "matmul_weight_bytes_fp16": int(mm_w16),
        "elementwise_ops": elementwise,
        "elementwise_elems": int(elems),
        "shape_ops": shape_ops,
        "layernorm_patterns": ln_count,
        "npu_ops": npu_ops,
        "cpu_ops": cpu_ops,
        "input_bytes": io_bytes(g.input),
        "output_bytes": io_bytes(g.output),
        # what the board converts per call: fp32 boundaries (fp16 ones, e.g. a state kept fp16, pass through)
        "convert_in_bytes": io_bytes(g.input, onnx.TensorProto.FLOAT),
        "convert_out_bytes": io_bytes(g.output, onnx.TensorProto.FLOAT),
        "op_counts": dict(sorted(ops.items())),
        "multicore": bool(n_mm and heavy >= 0.5),
        "multicore_weight_share": round(mc_w16 / f16, 6) if f16 else 0.0,
        "multicore_flops_share": round(mc_flops / flops, 6) if flops else 0.0,
    }


def load_weightless(path) -> onnx.ModelProto:
    """Load a segment ONNX for features: structure and shapes only matter (external data not read)."""
    return onnx.load(str(path), load_external_data=False)


__all__ = ["CPU_FALLBACK", "FEATURES_VERSION", "MULTICORE_OPS", "load_weightless", "segment_features"]
