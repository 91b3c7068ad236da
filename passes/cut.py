"""Cutting: each segment becomes a standalone ONNX model with named, typed, static boundary tensors."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.graphutil import np_dtype, static_shape
from passes.stats import matmul_flops


class TensorInfo(NamedTuple):
    name: str
    dtype: str   # numpy name, e.g. "float32"
    shape: list


class CutSegment(NamedTuple):
    model: onnx.ModelProto
    inputs: list   # TensorInfo
    outputs: list  # TensorInfo
    backend: str
    matmul_flops: int
    nodes: int


def _info(t, where) -> TensorInfo:
    dt, shape = np_dtype(t.dtype), static_shape(t)
    if dt is None or shape is None:
        raise ValueError(f"boundary tensor {t.name!r} of {where} has no static dtype/shape "
                         f"(dtype={t.dtype}, shape={t.shape}); run passes.pipeline.normalize first")
    return TensorInfo(t.name, np.dtype(dt).name, shape)


def extract_segments(graph: gs.Graph, segments) -> list:
    """One CutSegment per segment, in order; chaining them by tensor name reproduces `graph`."""
    seg_of = {}
    for s, seg in enumerate(segments):
        for node in seg.nodes:
            if id(node) in seg_of:
                raise ValueError(f"node {node.name!r} is in two segments")
            seg_of[id(node)] = s
    if len(seg_of) != len(graph.nodes):
        missing = [n.name for n in graph.nodes if id(n) not in seg_of][:5]
        raise ValueError(f"segments do not cover the graph: {missing} ...")
    graph_inputs = {t.name for t in graph.inputs}
    graph_outputs = [t for t in graph.outputs]
    out_names = {t.name for t in graph_outputs}
    produced_in = {}
    for node in graph.nodes:
        for t in node.outputs:
            produced_in[t.name] = seg_of[id(node)]
    last_use = {}  # tensor name -> last segment that reads it
    for node in graph.nodes:
        s = seg_of[id(node)]
        for t in node.inputs:
            if isinstance(t, gs.Variable) and t.name:
                last_use[t.name] = max(last_use.get(t.name, -1), s)
    for t in graph_outputs:
        if t.name not in produced_in and t.name not in graph_inputs:
            raise ValueError(f"graph output {t.name!r} is produced by no node; run normalize first")

    cuts = []
    for s, seg in enumerate(segments):
        where = f"segment {s} ({seg.backend})"
        inputs, seen_in = [], set()
        outputs, seen_out = [], set()
        for node in seg.nodes:
            for t in node.inputs:
                if not isinstance(t, gs.Variable) or not t.name or t.name in seen_in:
                    continue
                src = produced_in.get(t.name)
                if src == s:
                    continue
                if src is not None and src > s:
                    raise ValueError(f"{where} reads {t.name!r} from later segment {src}: segments out of order")
                if src is None and t.name not in graph_inputs:
                    raise ValueError(f"{where} reads {t.name!r}, which nothing produces")
                seen_in.add(t.name)
                inputs.append(t)
        for node in seg.nodes:
            for t in node.outputs:
                if t.name in seen_out:
                    continue
                if t.name in out_names or last_use.get(t.name, -1) > s:
                    seen_out.add(t.name)
                    outputs.append(t)
        # Graph outputs first in the source's order, then hand-offs to later segments.
        order = {t.name: k for k, t in enumerate(graph_outputs)}
        outputs.sort(key=lambda t: order.get(t.name, len(order)))
        in_infos = [_info(t, where) for t in inputs]
        out_infos = [_info(t, where) for t in outputs]
        sub_inputs = [gs.Variable(t.name, dtype=np.dtype(i.dtype), shape=i.shape) for t, i in zip(inputs, in_infos)]
        sub_outputs = [gs.Variable(t.name, dtype=np.dtype(i.dtype), shape=i.shape)
                       for t, i in zip(outputs, out_infos)]
        model = _export(graph, seg.nodes, sub_inputs, sub_outputs, name=f"{graph.name}_s{s}")
        cuts.append(CutSegment(model, in_infos, out_infos, seg.backend,
                               sum(matmul_flops(n) for n in seg.nodes), len(seg.nodes)))
    return cuts


def _export(graph, nodes, inputs, outputs, name):
    """Export `nodes` as a model with its own initializer copies; the source graph is left untouched."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    node_protos = [OnnxExporter.export_node(n) for n in nodes]
    inits, seen = [], set()
    value_info, seen_vi = [], {t.name for t in inputs} | {t.name for t in outputs}
    for n in nodes:
        for t in n.inputs:
            if isinstance(t, gs.Constant) and t.name not in seen:
                seen.add(t.name)
                inits.append(OnnxExporter.export_tensor_proto(t))
        for t in n.outputs:
            if t.name not in seen_vi and t.dtype is not None:
                seen_vi.add(t.name)
                value_info.append(OnnxExporter.export_value_info_proto(t, do_type_check=False))
    g = onnx.helper.make_graph(
        node_protos, name,
        [OnnxExporter.export_value_info_proto(t, do_type_check=True) for t in inputs],
        [OnnxExporter.export_value_info_proto(t, do_type_check=True) for t in outputs],
        initializer=inits, value_info=value_info)
    opsets = [onnx.helper.make_opsetid("", graph.opset)]
    for dom in graph.import_domains or []:
        if dom.domain not in ("", "ai.onnx"):
            opsets.append(dom)
    model = onnx.helper.make_model(g, opset_imports=opsets, producer_name="rwkv2rknn.passes")
    if graph.ir_version:
        model.ir_version = graph.ir_version
    onnx.checker.check_model(model)
    return model
