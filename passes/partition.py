"""Partitioning: one ready-set topological sweep groups placed nodes into execution-ordered segments."""
from __future__ import annotations

import heapq
from typing import NamedTuple

import onnx_graphsurgeon as gs

from passes.stats import matmul_flops

# Segmenting strategies (the user-facing policy registry, with help texts, is rwkv2rknn/policies.py).
POLICIES = ("cpu", "matmul", "fused", "layer", "deep")
# An NPU call costs ~0.1-0.2 ms of driver overhead (seed: a 1024x1024 M=1 MatMul lost to the CPU).
# Runs below this many MatMul FLOPs go back to the CPU. A placeholder until board timings exist.
DEFAULT_MIN_NPU_FLOPS = 1 << 16
_MATMUL_OPS = ("MatMul", "Gemm", "Conv")


class Segment(NamedTuple):
    backend: str  # "npu" | "cpu"
    nodes: list   # gs.Node, in execution order
    reason: str


def _dependencies(nodes):
    prod = {}
    for i, n in enumerate(nodes):
        for t in n.outputs:
            prod[t.name] = i
    users = [[] for _ in nodes]
    indeg = [0] * len(nodes)
    for i, n in enumerate(nodes):
        deps = {prod[t.name] for t in n.inputs if t.name in prod and prod[t.name] != i}
        indeg[i] = len(deps)
        for j in deps:
            users[j].append(i)
    return users, indeg


def _sweep(nodes, backend_of, npu_one_per_segment=False, start=None):
    """Take ready nodes of the current backend until none is ready, then switch (ties: original order).

    Acyclic by construction: segments are consecutive runs of one topological order. `start`: the
    backend of the first run when both have ready nodes (default: the CPU, for host-side preparation).
    """
    users, indeg = _dependencies(nodes)
    ready = {"cpu": [], "npu": []}
    for i, d in enumerate(indeg):
        if d == 0:
            heapq.heappush(ready[backend_of[i]], i)
    runs = []
    current = start if start and ready[start] else ("cpu" if ready["cpu"] else "npu")  # host-side preparation first
    done = 0
    while done < len(nodes):
        if not ready[current]:
            current = "npu" if current == "cpu" else "cpu"
            if not ready[current]:
                raise ValueError("graph has a cycle (no node is ready)")
        run = []
        while ready[current]:
            i = heapq.heappop(ready[current])
            run.append(i)
            done += 1
            for u in users[i]:
                indeg[u] -= 1
                if indeg[u] == 0:
                    heapq.heappush(ready[backend_of[u]], u)
            if current == "npu" and npu_one_per_segment:
                break
        runs.append((current, run))
        current = "npu" if current == "cpu" else "cpu"
    return runs


def _flops(nodes):
    return sum(matmul_flops(n) for n in nodes)


def _mmcount(nodes):
    return sum(1 for n in nodes if n.op in _MATMUL_OPS)


def propose_segments(graph: gs.Graph, placement: dict, policy: str = "fused",
                     min_npu_flops: int = DEFAULT_MIN_NPU_FLOPS) -> list:
    """Segments in execution order under `policy` ("cpu" | "matmul" | "fused" | "layer" | "deep").

    deep: like fused, but the NPU runs first (CPU work that waits for nothing, e.g. reads of the state for
    its update, is deferred after the NPU call instead of costing a call of its own) and no NPU run folds
    back for being small.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    nodes = list(graph.nodes)
    if not nodes:
        return []
    if policy == "cpu":
        order = [nodes[i] for _, run in _sweep(nodes, ["cpu"] * len(nodes)) for i in run]
        return [Segment("cpu", order, "cpu policy: no NPU (the baseline every plan is measured against)")]
    if policy == "layer":
        order = [nodes[i] for _, run in _sweep(nodes, ["npu"] * len(nodes)) for i in run]
        if not _mmcount(order):
            return [Segment("cpu", order, "layer policy: no MatMul in the graph, nothing worth an NPU call")]
        return [Segment("npu", order, "layer policy: whole graph is one NPU model (RKNN places ops itself)")]
    if policy == "matmul":
        backend_of = ["npu" if n.op == "MatMul" and placement[n.name].backend == "npu" else "cpu" for n in nodes]
        runs = _sweep(nodes, backend_of, npu_one_per_segment=True)
    elif policy == "deep":
        runs = _sweep(nodes, [placement[n.name].backend for n in nodes], start="npu")
    else:
        runs = _sweep(nodes, [placement[n.name].backend for n in nodes])
    segments = []
    for backend, run in runs:
        seg_nodes = [nodes[i] for i in run]
        flops = _flops(seg_nodes)
        if backend == "npu" and policy == "fused" and flops < min_npu_flops:
            reason = (f"NPU run of {len(seg_nodes)} nodes has {flops} MatMul FLOPs < {min_npu_flops}: "
                      "too small to pay for a call")
            backend = "cpu"
        elif backend == "npu":
            reason = f"{policy}: {_mmcount(seg_nodes)} MatMul, {flops} FLOPs"
        else:
            reason = "cpu: " + _cpu_reason(seg_nodes, placement)
        if segments and segments[-1].backend == backend == "cpu":
            prev = segments[-1]
            segments[-1] = Segment("cpu", prev.nodes + seg_nodes, prev.reason)
        else:
            segments.append(Segment(backend, seg_nodes, reason))
    return segments


def _cpu_reason(nodes, placement):
    reasons = []
    for n in nodes:
        r = placement.get(n.name)
        if r is not None and r.backend == "cpu" and r.reason not in reasons:
            reasons.append(r.reason)
        if len(reasons) == 3:
            break
    return "; ".join(reasons) if reasons else "not NPU-eligible under this policy"
