"""Partitioning: one ready-set topological sweep groups placed nodes into execution-ordered segments."""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import NamedTuple

import onnx_graphsurgeon as gs

from passes.stats import matmul_flops

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


@dataclass(frozen=True)
class Grouping:
    """How `propose_segments` groups placed nodes into segments: the caller's policy supplies one.

    Like torch.fx's OperatorSupport for its partitioner, the object answers and the sweep asks: this module keeps
    no list of policies (rwkv2rknn/policies.py holds them, each with its Grouping). This base class is the sweep
    over the placement: maximal runs of each backend in one topological order.
    label: names the NPU segments' reasons. npu_first: when both backends have ready nodes, the NPU goes first (CPU
    work that waits for nothing, e.g. reads of the state for its update, is deferred after the NPU call instead of
    costing a call of its own). fold_small: an NPU run under `min_npu_flops` MatMul FLOPs goes back to the CPU.
    one_npu_node_per_call: every NPU node its own segment.
    """

    label: str = "fused"
    npu_first: bool = False
    fold_small: bool = True
    one_npu_node_per_call: bool = False

    def backend(self, node: gs.Node, placed) -> str:
        """The backend of one node under this grouping, given its placement."""
        return placed.backend

    def segments(self, nodes: list, placement: dict, min_npu_flops: int) -> list:
        runs = _sweep(nodes, [self.backend(n, placement[n.name]) for n in nodes], self.one_npu_node_per_call,
                      start="npu" if self.npu_first else None)
        segments = []
        for backend, run in runs:
            seg_nodes = [nodes[i] for i in run]
            flops = _flops(seg_nodes)
            if backend == "npu" and self.fold_small and flops < min_npu_flops:
                reason = (f"NPU run of {len(seg_nodes)} nodes has {flops} MatMul FLOPs < {min_npu_flops}: "
                          "too small to pay for a call")
                backend = "cpu"
            elif backend == "npu":
                reason = f"{self.label}: {_mmcount(seg_nodes)} MatMul, {flops} FLOPs"
            else:
                reason = "cpu: " + _cpu_reason(seg_nodes, placement)
            if segments and segments[-1].backend == backend == "cpu":
                prev = segments[-1]
                segments[-1] = Segment("cpu", prev.nodes + seg_nodes, prev.reason)
            else:
                segments.append(Segment(backend, seg_nodes, reason))
        return segments


@dataclass(frozen=True)
class MatMulCalls(Grouping):
    """Only the MatMuls placed on the NPU go there, each its own call; everything else runs on the CPU."""

    label: str = "matmul"
    fold_small: bool = False
    one_npu_node_per_call: bool = True

    def backend(self, node: gs.Node, placed) -> str:
        return "npu" if node.op == "MatMul" and placed.backend == "npu" else "cpu"


@dataclass(frozen=True)
class WholeGraph(Grouping):
    """The whole graph one segment on `backend` ("cpu": no NPU at all; "npu": one NPU model, the compiler places
    the ops itself; a graph without a MatMul then stays on the CPU)."""

    label: str = "layer"
    on: str = "npu"

    def segments(self, nodes: list, placement: dict, min_npu_flops: int) -> list:
        order = [nodes[i] for _, run in _sweep(nodes, [self.on] * len(nodes)) for i in run]
        if self.on == "cpu":
            return [Segment("cpu", order, f"{self.label} policy: no NPU (the baseline every plan is measured against)")]
        if not _mmcount(order):
            return [Segment("cpu", order, f"{self.label} policy: no MatMul in the graph, nothing worth an NPU call")]
        return [Segment("npu", order, f"{self.label} policy: whole graph is one NPU model (RKNN places ops itself)")]


def propose_segments(graph: gs.Graph, placement: dict, grouping: Grouping | None = None,
                     min_npu_flops: int = DEFAULT_MIN_NPU_FLOPS) -> list:
    """Segments in execution order, grouped by `grouping` (default: Grouping(), the sweep of the placement with
    small NPU runs folded back to the CPU)."""
    grouping = Grouping() if grouping is None else grouping
    if not isinstance(grouping, Grouping):
        raise TypeError(f"propose_segments takes a passes.partition.Grouping, not {grouping!r} (rwkv2rknn.policies "
                        "maps policy names to theirs)")
    nodes = list(graph.nodes)
    if not nodes:
        return []
    return grouping.segments(nodes, placement, min_npu_flops)


def _cpu_reason(nodes, placement):
    reasons = []
    for n in nodes:
        r = placement.get(n.name)
        if r is not None and r.backend == "cpu" and r.reason not in reasons:
            reasons.append(r.reason)
        if len(reasons) == 3:
            break
    return "; ".join(reasons) if reasons else "not NPU-eligible under this policy"
