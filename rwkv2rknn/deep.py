"""Units of a split: one source graph each, or (deep policy) consecutive layers merged into one graph per NPU call.

A group holds as many layers as the size budget allows (the fp32 ONNX of one NPU model: under the 2 GB
protobuf limit with room to spare, and a compile of about a minute), balanced over the groups; the head
joins the last group when it still fits. Names inside a merged graph are `<source graph>.<name>`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from passes.merge import merge_graphs
from rwkv2rknn.errors import UserError

# fp32 bytes of the layers of one NPU model: 8 layers of the 430M shape (437 MB) compile in about a minute.
DEFAULT_GROUP_BYTES = 448 * 1024 * 1024
# Compile time of a deep group against its source nodes, t = a + b * nodes^p seconds (fp16, one compile at a time,
# this project's 2-core x86 host; benchmarks/results/compile_time.json). A group is bounded to what compiles in
# COMPILE_BUDGET_S, so a timeout's bisection is not the normal path.
COMPILE_MODEL = {"a": 0.0, "b": 0.0, "p": 1.0}
COMPILE_BUDGET_S = 120.0
MAX_GROUP_NODES = 10**9
# The head joins the last group while the whole model stays under this (far below protobuf's 2 GB limit).
MAX_MODEL_BYTES = 1024 * 1024 * 1024


@dataclass
class Unit:
    """What one manifest graph entry is made of."""

    name: str
    sources: list  # rwkv2rknn.model.SourceGraph, in execution order
    merged: bool = False  # the sources merged into one graph whose names are `<source>.<name>`


def _nodes(src) -> int:
    import onnx

    return len(onnx.load(str(src.path), load_external_data=False).graph.node)


def predicted_compile_seconds(nodes: int) -> float:
    """The compile-time model: seconds to build one deep group of `nodes` source nodes (fp16, one compile on
    this project's 2-core x86 host; COMPILE_MODEL)."""
    a, b, p = COMPILE_MODEL["a"], COMPILE_MODEL["b"], COMPILE_MODEL["p"]
    return a + b * nodes ** p


def _fp32_bytes(src, float_dtype: str) -> int:
    return src.path.stat().st_size * (2 if float_dtype == "float16" else 1)


def group_layers(layer_bytes: list[int], head_bytes: int, layers_per_call: int | None = None,
                 budget: int = DEFAULT_GROUP_BYTES, layer_nodes: list[int] | None = None,
                 max_nodes: int = MAX_GROUP_NODES) -> tuple[list[list[int]], bool]:
    """Layer indices per group, and whether the head joins the last group.

    layers_per_call: a fixed group size; default: the fewest groups whose layers fit `budget` bytes and
    `max_nodes` source nodes each (what the compiler takes in time: COMPILE_MODEL), balanced (24 layers of
    52 MB -> 3 groups of 8).
    """
    n = len(layer_bytes)
    if n == 0:
        return [], False
    if layers_per_call is not None:
        if layers_per_call < 1:
            raise UserError(f"--layers-per-call {layers_per_call}: must be at least 1")
        k = layers_per_call
    else:
        per = max(layer_bytes)
        k = max(1, min(n, budget // max(1, per)))
        if layer_nodes:
            k = max(1, min(k, max_nodes // max(1, max(layer_nodes))))
        k = math.ceil(n / math.ceil(n / k))  # balance: the same number of groups, sizes as even as possible
    groups = [list(range(i, min(n, i + k))) for i in range(0, n, k)]
    head_in_last = sum(layer_bytes[i] for i in groups[-1]) + head_bytes <= max(budget, MAX_MODEL_BYTES)
    if layers_per_call is not None:
        head_in_last = True  # the user asked for this size: the head goes with the last group
    return groups, head_in_last


def units(model, grouped: bool, layers_per_call: int | None = None, budget: int = DEFAULT_GROUP_BYTES) -> list[Unit]:
    """The units of a whole model: embed, groups of mixing layers (+ head), or one unit per graph."""
    graphs = model.graphs
    if not grouped:
        return [Unit(g.name, [g]) for g in graphs]
    embed, layers, head = graphs[0], graphs[1:-1], graphs[-1]
    sizes = [_fp32_bytes(g, model.float_dtype) for g in layers]
    nodes = [_nodes(g) for g in layers]
    groups, head_in_last = group_layers(sizes, _fp32_bytes(head, model.float_dtype), layers_per_call, budget, nodes)
    out = [Unit(embed.name, [embed])]
    for k, idx in enumerate(groups):
        members = [layers[i] for i in idx]
        if head_in_last and k == len(groups) - 1:
            members.append(head)
        out.append(Unit(f"group_{k}", members, merged=True))
    if not head_in_last:
        out.append(Unit(head.name, [head]))
    return out


def merge_unit(unit: Unit, graphs: list[gs.Graph], model_links: list[tuple[str, str, str, str]]) -> gs.Graph:
    """The unit's normalized source graphs as one graph, joined by the model's links between them; a linked
    output that a graph outside the unit also reads (RWKV-7's v_first) stays an output of the unit."""
    names = [s.name for s in unit.sources]
    inside = set(names)
    links = [(a, o, b, i) for a, o, b, i in model_links if a in inside and b in inside]
    keep = {(a, o) for a, o, b, _ in model_links if a in inside and b not in inside}
    return merge_graphs(list(zip(names, graphs)), links, name=unit.name, keep_outputs=keep)


def tensor_ref(unit: Unit, graph: str, tensor: str) -> dict:
    """Where a source graph's tensor lives in the manifest: {graph: unit name, name: tensor name in it}."""
    return {"graph": unit.name, "name": f"{graph}.{tensor}" if unit.merged else tensor}
