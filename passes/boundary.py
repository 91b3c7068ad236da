"""Board dtypes at segment boundaries: NPU segments take and give float16, CPU segments convert in their own graph.

An RKNN model computes in fp16 and its tensors are fp16 on the board. A cut that hands it fp32 makes the
runtime convert every input and output on every call (on the CPU, outside any graph). This pass decides, for
every float tensor that crosses a segment boundary, the dtype its buffer has on the board, and rewrites the
cut models so that each side reads and writes that dtype directly:

- an NPU segment declares its float inputs and outputs float16 (a Cast inside, which the RKNN compiler folds
  into its fp16 work), except where the graph's own boundary is `fixed` (a single-graph split keeps fp32 I/O);
- a CPU segment that reads an fp16 buffer declares it float16 and casts inside (onnxruntime converts in its
  own loop); one whose output an NPU segment reads writes float16 (or an extra `<name>@fp16` copy when a CPU
  reader or the graph boundary needs the fp32 value too);
- a recurrent state keeps the dtype of the segment that writes it: fp16 when the NPU writes it, fp32 when the
  CPU does. An fp32 state that an NPU segment reads gets an fp16 shadow: its writer emits `<out>@fp16` and the
  NPU reads `<in>@fp16` (the copy made in the same pass as the update, never a conversion per read).

The values are those of the board: fp16 where the board holds fp16, computed in fp32 inside each segment.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from passes.cut import CutSegment, TensorInfo

FP16_SUFFIX = "@fp16"
_F32, _F16 = "float32", "float16"


@dataclass
class BoundaryResult:
    cuts: list                      # CutSegment, rewritten
    output_dtypes: dict             # graph output name -> dtype of its buffer (incl. added shadow outputs)
    input_dtypes: dict              # graph input name -> dtype read (incl. added shadow inputs)
    shadows: dict = field(default_factory=dict)  # state input -> (shadow input, shadow output)
    casts: list = field(default_factory=list)    # per cut: [(tensor, "to_fp16" | "to_fp32", elements)]
    notes: list = field(default_factory=list)


def _elements(info: TensorInfo) -> int:
    return int(np.prod(info.shape, dtype=np.int64)) if info.shape else 1


def _is_float(dtype: str) -> bool:
    return dtype in (_F32, _F16)


def board_boundaries(cuts: list[CutSegment], graph_inputs: list[TensorInfo], graph_outputs: list[TensorInfo],
                     input_dtypes: dict | None = None, state_pairs=(), fixed=()) -> BoundaryResult:
    """Rewrite the cut segments of one graph for the board's buffer dtypes (see the module docstring).

    input_dtypes: dtype of the buffer behind a graph input where it differs from its declaration (a link from
      another graph whose writer is an NPU segment gives float16); state inputs are decided here.
    state_pairs: (state input, state output) of the graph's recurrent states.
    fixed: graph input/output names whose declared dtype the graph's user feeds or reads (kept as declared).
    """
    given = dict(input_dtypes or {})
    fixed = set(fixed)
    declared = {t.name: t.dtype for t in graph_inputs} | {t.name: t.dtype for t in graph_outputs}
    out_names = {t.name for t in graph_outputs}
    producer: dict[str, int] = {}
    readers: dict[str, list[int]] = {}
    for k, c in enumerate(cuts):
        for t in c.outputs:
            producer.setdefault(t.name, k)
        for t in c.inputs:
            readers.setdefault(t.name, []).append(k)
    npu = [c.backend == "npu" for c in cuts]
    state_in_of = {o: i for i, o in state_pairs}

    # 1. the dtype of every boundary buffer as written
    buf: dict[str, str] = {}
    for k, c in enumerate(cuts):
        for t in c.outputs:
            if not _is_float(t.dtype) or (t.name in fixed):
                buf[t.name] = t.dtype
            else:
                buf[t.name] = _F16 if npu[k] else t.dtype
    for t in graph_inputs:
        if t.name in buf:
            continue
        if t.name in state_in_of.values():
            continue  # decided from the state's writer below
        buf[t.name] = t.dtype if (t.name in fixed or not _is_float(t.dtype)) else given.get(t.name, t.dtype)
    for i, o in state_pairs:
        buf[i] = buf.get(o, declared.get(i, _F32))

    # 2. who needs which dtype
    need16: set[str] = set()   # an NPU segment reads it and it is fp32: an fp16 copy is needed
    need32: set[str] = set()   # something needs the fp32 value (a CPU reader of an fp32 buffer, or the boundary)
    for name, ks in readers.items():
        if not _is_float(buf.get(name, "")):
            continue
        for k in ks:
            if npu[k] and buf[name] == _F32 and name not in fixed:
                need16.add(name)
            if not npu[k] and buf[name] == _F32:
                need32.add(name)
    shadows = {}
    for i, o in state_pairs:
        if i in need16:  # an fp32 state the NPU reads: shadowed, written by the state's writer in the same pass
            shadows[i] = (i + FP16_SUFFIX, o + FP16_SUFFIX)
    for name in out_names:
        if name in producer and not npu[producer[name]]:
            need32.add(name)  # a CPU-written graph output stays as written (+ an fp16 copy if shadowed)

    new_inputs, new_outputs = {}, {}
    casts: list[list] = [[] for _ in cuts]
    models = []
    for k, c in enumerate(cuts):
        m = onnx.ModelProto()
        m.CopyFrom(c.model)
        ins, outs = [], []
        for t in c.inputs:
            want = buf.get(t.name, t.dtype)
            name = t.name
            if npu[k] and _is_float(t.dtype) and t.name not in fixed:
                if want == _F32:  # read the fp16 copy of an fp32 buffer (a shadow, or a copy its writer makes)
                    name = shadows[t.name][0] if t.name in shadows else t.name + FP16_SUFFIX
                want = _F16
            if want != t.dtype:
                _retype_input(m, t.name, name, want)
                if not npu[k]:
                    casts[k].append((t.name, "to_fp32", _elements(t)))
            ins.append(TensorInfo(name, want if _is_float(t.dtype) else t.dtype, list(t.shape)))
        for t in c.outputs:
            if not _is_float(t.dtype) or t.name in fixed:
                outs.append(t)
                continue
            if npu[k]:
                if t.dtype != _F16:
                    _retype_output(m, t.name, _F16)
                outs.append(TensorInfo(t.name, _F16, list(t.shape)))
                continue
            copy16 = t.name in need16 or (t.name in state_in_of and state_in_of[t.name] in shadows)
            if copy16 and t.name not in need32 and t.name not in out_names:
                _retype_output(m, t.name, _F16)  # only NPU segments read it: written fp16 only
                buf[t.name] = _F16
                outs.append(TensorInfo(t.name, _F16, list(t.shape)))
                casts[k].append((t.name, "to_fp16", _elements(t)))
                continue
            outs.append(t)
            if copy16:
                copy = shadows[state_in_of[t.name]][1] if t.name in state_in_of else t.name + FP16_SUFFIX
                _add_fp16_copy(m, t.name, copy, t.shape)
                outs.append(TensorInfo(copy, _F16, list(t.shape)))
                casts[k].append((t.name, "to_fp16", _elements(t)))
        if ins != list(c.inputs) or outs != list(c.outputs):
            onnx.checker.check_model(m)
        models.append(CutSegment(m, ins, outs, c.backend, c.matmul_flops, c.nodes))
        for t in ins:
            if t.name not in producer:
                new_inputs[t.name] = t.dtype
        for t in outs:
            if t.name in out_names or t.name.endswith(FP16_SUFFIX) and t.name[:-len(FP16_SUFFIX)] in out_names:
                new_outputs[t.name] = t.dtype

    # an fp16 copy made for an in-graph reader is no graph output; keep only shadows and real outputs
    shadow_outs = {so for _, so in shadows.values()}
    new_outputs = {n: d for n, d in new_outputs.items() if n in out_names or n in shadow_outs}
    for t in graph_inputs:
        new_inputs.setdefault(t.name, buf.get(t.name, t.dtype))
    notes = [f"{i}: fp32 state read by the NPU, fp16 shadow {si} written by its update" for i, (si, _) in shadows.items()]
    return BoundaryResult(models, new_outputs, new_inputs, shadows, casts, notes)


_ONNX_TYPE = {_F32: TensorProto.FLOAT, _F16: TensorProto.FLOAT16}


def _retype_input(m: onnx.ModelProto, name: str, new_name: str, dtype: str) -> None:
    """Graph input `name` is read as `new_name` of `dtype` and cast inside to the dtype the graph computes in."""
    g = m.graph
    vi = next(v for v in g.input if v.name == name)
    inner = vi.type.tensor_type.elem_type
    vi.type.tensor_type.elem_type = _ONNX_TYPE[dtype]
    if new_name == name:  # the outer name stays; the graph's own uses move to an inner name
        _rename_uses(g, name, f"{name}.inner")
        g.node.insert(0, helper.make_node("Cast", [name], [f"{name}.inner"], name=f"{name}.cast_in", to=inner))
    else:
        vi.name = new_name
        g.node.insert(0, helper.make_node("Cast", [new_name], [name], name=f"{name}.cast_in", to=inner))


def _retype_output(m: onnx.ModelProto, name: str, dtype: str) -> None:
    """Graph output `name` is written as `dtype` (the graph's value cast once on the way out)."""
    g = m.graph
    vo = next(v for v in g.output if v.name == name)
    inner_name = f"{name}.inner"
    for n in g.node:
        n.output[:] = [inner_name if o == name else o for o in n.output]
    _rename_uses(g, name, inner_name)
    vo.type.tensor_type.elem_type = _ONNX_TYPE[dtype]
    g.node.append(helper.make_node("Cast", [inner_name], [name], name=f"{name}.cast_out", to=_ONNX_TYPE[dtype]))


def _add_fp16_copy(m: onnx.ModelProto, name: str, copy: str, shape) -> None:
    g = m.graph
    g.node.append(helper.make_node("Cast", [name], [copy], name=f"{copy}.cast", to=TensorProto.FLOAT16))
    g.output.append(helper.make_tensor_value_info(copy, TensorProto.FLOAT16, list(shape)))


def _rename_uses(g, old: str, new: str) -> None:
    for n in g.node:
        n.input[:] = [new if i == old else i for i in n.input]
