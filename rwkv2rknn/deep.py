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
# Compile time of a deep group against the compute ops (non-Constant nodes) of its source layers: t = a + b * ops^p
# seconds (fp16, one compile, this project's 2-core x86 host). Fitted to RWKV-7 12 x 64 groups of 1-6 layers
# (114 ops a layer; benchmarks/results/compile_time.json): CPU seconds 3.7, 5.4, 13.7, 22.0, 63.9 at 1, 2, 3, 4, 6
# layers, p from the 3- and 6-layer points, `a` the toolkit's own start-up. It predicts ~310 s for all 12 layers in
# one group, which with two compiles sharing two cores passed the build's 600 s timeout (issue 19's report).
COMPILE_MODEL = {"a": 15.0, "b": 3.24e-5, "p": 2.22}
# A group is bounded to what compiles in this (predicted), so a timeout's bisection is not the normal path:
# 735 ops, i.e. 6 RWKV-7 layers (684 ops) or 8 RWKV-4 layers (704 ops, the byte budget's 8 of the 430M shape).
COMPILE_BUDGET_S = 90.0
# The head joins the last group while the whole model stays under this (far below protobuf's 2 GB limit).
MAX_MODEL_BYTES = 1024 * 1024 * 1024


@dataclass
class Unit:
    """What one manifest graph entry is made of."""

    name: str
    sources: list  # rwkv2rknn.model.SourceGraph, in execution order
    merged: bool = False  # the sources merged into one graph whose names are `<source>.<name>`
    parent: str | None = None  # a prefill unit: the decode unit whose layers it holds


def _ops(src) -> int:
    """Compute ops of a source graph (its nodes but the Constants that hold weights in the llama.onnx layout)."""
    import onnx

    return sum(n.op_type != "Constant" for n in onnx.load(str(src.path), load_external_data=False).graph.node)


def predicted_compile_seconds(ops: int) -> float:
    """The compile-time model: seconds to build one deep group of `ops` source compute ops (fp16, one compile on
    this project's 2-core x86 host; COMPILE_MODEL). A PREDICTION from measurements on that host."""
    a, b, p = COMPILE_MODEL["a"], COMPILE_MODEL["b"], COMPILE_MODEL["p"]
    return a + b * ops ** p


def max_group_ops(budget_s: float = COMPILE_BUDGET_S) -> int:
    """The most source compute ops of one group predicted to compile within `budget_s` seconds."""
    a, b, p = COMPILE_MODEL["a"], COMPILE_MODEL["b"], COMPILE_MODEL["p"]
    return int(((budget_s - a) / b) ** (1 / p)) if budget_s > a else 1


MAX_GROUP_OPS = max_group_ops()


def _fp32_bytes(src, float_dtype: str) -> int:
    return src.path.stat().st_size * (2 if float_dtype == "float16" else 1)


def group_layers(layer_bytes: list[int], head_bytes: int, layers_per_call: int | None = None,
                 budget: int = DEFAULT_GROUP_BYTES, layer_ops: list[int] | None = None,
                 max_ops: int | None = None) -> tuple[list[list[int]], bool]:
    """Layer indices per group, and whether the head joins the last group.

    layers_per_call: a fixed group size; default: the fewest groups whose layers fit `budget` bytes and
    `max_ops` source compute ops each (default MAX_GROUP_OPS: what compiles in COMPILE_BUDGET_S), balanced (24
    layers of 52 MB -> 3 groups of 8; 12 RWKV-7 layers of 114 ops -> 2 groups of 6).
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
        if layer_ops:
            k = max(1, min(k, (max_ops or MAX_GROUP_OPS) // max(1, max(layer_ops))))
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
    ops = [_ops(g) for g in layers]
    groups, head_in_last = group_layers(sizes, _fp32_bytes(head, model.float_dtype), layers_per_call, budget, ops)
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
