"""Plans for one normalized graph: a policy's placement, segments and cuts, priced on a board profile.

`plan_graph` makes one policy's plan: the policy (rwkv2rknn/policies.py) places and groups, this module cuts,
sets the board boundaries and prices. The `auto` policy composes such plans. Prices are PREDICTIONS from the
board profile (rwkv2rknn/cost), per token at M=1.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from passes.boundary import BoundaryResult, board_boundaries
from passes.cut import TensorInfo, extract_segments
from passes.nsplit import nsplit
from passes.placement import Seeds
from rwkv2rknn.cost.estimate import SegmentPrice, price_segment
from rwkv2rknn.cost.features import segment_features
from rwkv2rknn.cost.profile import BoardProfile


@dataclass
class GraphPlan:
    policy: str
    placement: dict
    segments: list   # passes.partition.Segment
    cuts: list       # passes.cut.CutSegment
    features: list   # per cut: rwkv2rknn.cost.features.segment_features
    prices: list     # per cut: SegmentPrice (one call)
    notes: list = ()  # legalization notes (deep): what was rewritten, what was left alone and why
    boundary: BoundaryResult | None = None  # the board dtypes of the cut's boundaries (None: fp32 boundaries)
    extra: list = ()  # per cut: {} or an N-split piece's {"parallel", "slices", "core_mask"}
    choice: dict | None = None  # a plan that policy `auto` chose among others: the manifest's `auto` record

    @property
    def ms(self) -> float:
        return 1e3 * sum(p.seconds for p in self.prices)


STATE_UPDATE_REASON = ("{op}: updates the recurrent state: kept fp32 on the CPU (the NPU reads an fp16 copy of the "
                       "exact state each token; an fp16 update would drift)")
STATE_UPDATES = ("cpu", "npu")
NPU_IO = ("float16", "float32")


@dataclass(frozen=True)
class Boundaries:
    """How a graph's cut meets its neighbours on the board (passes/boundary.py).

    npu_io "float16": NPU segments read and write fp16, CPU segments convert inside their graphs; "float32":
    every boundary as the source graph declares it (the runtime of the board converts at each NPU call).
    input_dtypes: the buffer dtype behind each graph input fed from another graph (its writer decides).
    fixed: graph inputs/outputs whose declared dtype a user feeds or reads (a single-graph split's boundary).
    nsplit: split single-row NPU segments over the three cores where predicted faster (passes/nsplit.py).
    """

    npu_io: str = "float16"
    input_dtypes: dict | None = None
    fixed: frozenset = frozenset()
    nsplit: bool = True  # price three N-split pieces (one per core) against each single-row NPU segment
    seeds: Seeds = Seeds()  # where the fp32 precision rule starts (the model family's; passes/placement.py)


def _infos(tensors) -> list[TensorInfo]:
    import numpy as np

    return [TensorInfo(t.name, np.dtype(t.dtype).name, list(t.shape)) for t in tensors]


@dataclass(frozen=True)
class PlanContext:
    """What planning one graph needs besides the graph and its policy.

    state_pairs: (state input, state output) names of the graph's recurrent states. state_update (deep): "cpu"
    keeps the nodes that update a state fp32 on the CPU (passes/state_rule.py), "npu" keeps the state fp16 in the
    NPU model. recurrent: the recurrent rows per state input (from the single-token graph, for a graph batched
    over tokens).
    """

    target: str
    profile: BoardProfile
    npu_all: bool = False
    state_pairs: tuple = ()
    state_update: str = "cpu"
    recurrent: dict | None = None
    boundaries: Boundaries = Boundaries()


def plan_graph(graph: gs.Graph, policy, ctx: PlanContext) -> GraphPlan:
    """One policy's plan of a normalized graph (rwkv2rknn.policies.Policy: it places and groups; the segments
    are then cut, given their board boundaries and priced); raises ValueError when the graph cannot be cut."""
    placed = policy.place(graph, ctx)
    graph, placement = placed.graph, placed.placement
    segments = policy.group(graph, placement)
    cuts = extract_segments(graph, segments)
    boundary = None
    boundaries = ctx.boundaries
    if boundaries.npu_io == "float16":
        boundary = board_boundaries(cuts, _infos(graph.inputs), _infos(graph.outputs), boundaries.input_dtypes,
                                    list(ctx.state_pairs), boundaries.fixed)
        cuts = boundary.cuts
    profile = ctx.profile
    features = [segment_features(c.model, c.backend) for c in cuts]
    # one call of each segment, over the tokens it processes (M for a graph batched over M tokens)
    prices: list[SegmentPrice] = [price_segment(f, profile, c.backend, f.get("rows", 1)) for f, c in zip(features, cuts)]
    extra: list[dict] = [{} for _ in cuts]
    if boundaries.nsplit and policy.nsplit:
        segments, cuts, features, prices, extra, boundary = _three_cores(segments, cuts, features, prices, extra,
                                                                         boundary, profile)
    return GraphPlan(policy.name, placement, segments, cuts, features, prices, list(placed.notes), boundary, extra)


PIECE_CORES = (1, 2, 4)  # NPU_CORE_0, _1, _2: one N-split piece per core


def _three_cores(segments, cuts, features, prices, extra, boundary, profile):
    """Each single-row NPU segment priced whole (one core, or core mask 0_1_2) and as three N-split pieces pinned
    to the three cores (passes/nsplit.py); the pieces replace it where they are predicted faster."""
    from passes.cut import CutSegment
    from passes.partition import Segment

    out = ([], [], [], [], [], [])
    for seg, cut, f, price, ex, casts in zip(segments, cuts, features, prices, extra,
                                              boundary.casts if boundary else [[]] * len(cuts)):
        pieces = None
        if cut.backend == "npu" and f.get("rows", 1) == 1:
            pieces = nsplit(cut.model, len(PIECE_CORES))
        if pieces:
            feats = []
            for p, mask in zip(pieces, PIECE_CORES):
                pf = segment_features(p.model, "npu")
                pf.update(parallel_pieces=len(pieces), pinned_core_mask=mask)
                feats.append(pf)
            piece_prices = [price_segment(pf, profile, "npu", 1) for pf in feats]
            together = max(pp.seconds for pp in piece_prices) + profile.npu_parallel_us * 1e-6
            if together < price.seconds:
                group = f"nsplit{len(out[1])}"
                for k, (p, pf, pp, mask) in enumerate(zip(pieces, feats, piece_prices, PIECE_CORES)):
                    g = p.model.graph
                    ins = [_info(v) for v in g.input]
                    outs = [_info(v) for v in g.output]
                    out[0].append(seg if k == 0 else Segment("npu", [], seg.reason))
                    out[1].append(CutSegment(p.model, ins, outs, "npu", cut.matmul_flops // len(pieces), cut.nodes))
                    out[2].append(pf)
                    out[3].append(pp)
                    out[4].append({"parallel": group, "core_mask": mask,
                                   "slices": {name: {"of": t[0], "start": t[1], "stop": t[2]}
                                              for name, t in p.outputs.items() if t is not None},
                                   "whole": {"seconds": price.seconds, "core_mask": price.core_mask,
                                             "pieces_seconds": together}})
                    out[5].append(casts if k == 0 else [])
                continue
        for lst, v in zip(out, (seg, cut, f, price, ex, casts)):
            lst.append(v)
    if boundary is not None:
        boundary.casts = out[5]
    return out[0], out[1], out[2], out[3], out[4], boundary


def _info(vi) -> TensorInfo:
    import onnx

    t = vi.type.tensor_type
    return TensorInfo(vi.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, [d.dim_value for d in t.shape.dim])
