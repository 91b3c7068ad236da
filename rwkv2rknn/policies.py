"""The partition policies: objects in one registry that holds their behaviour; the CLI's choices, the split driver,
the benchmarks and the docs read it.

A policy says how to place, group and price a graph:
- `place(graph, ctx)`: the graph rewritten as the policy needs it (parallel mixes stacked; deep: legalized, the
  state rule) and a Placement per node;
- `group(graph, placement)`: segments, by the policy's `grouping` (a passes.partition.Grouping the partitioner
  asks, as torch.fx's partitioner asks an OperatorSupport);
- `plan(graph, ctx)`: placed, grouped, cut and priced on the board (rwkv2rknn/planner.py). `auto` has no
  placement of its own: it composes the other policies' priced plans and keeps the cheapest, per graph and, for
  a whole model, against the policies that merge layers (`choose_model`).
and, for a whole model, which units it splits (deep merges layers) and what a graph entry records. Policies are
registered once by name (in the manner of Polygraphy's tool registry); nothing else tests a policy's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

import onnx_graphsurgeon as gs

from passes.combine import combine_parallel
from passes.fp16_io import fp16_boundary
from passes.infra import PassManager, bind
from passes.legalize import legalize
from passes.norm_affine import flat_norm_affine
from passes.partition import DEFAULT_MIN_NPU_FLOPS, Grouping, MatMulCalls, WholeGraph, propose_segments
from passes.placement import Placement, place
from passes.state_rule import StateUpdate, clone_state_cone
from rwkv2rknn.deep import Unit, units
from rwkv2rknn.planner import STATE_UPDATE_REASON, STATE_UPDATES, GraphPlan, PlanContext, plan_graph


class Placed(NamedTuple):
    graph: gs.Graph  # the graph as the policy rewrote it
    placement: dict  # node name -> passes.placement.Placement
    notes: tuple | list = ()  # legalization notes (deep): what was rewritten, what was left alone and why


def _fewer_ops(graph: gs.Graph, combine: bool) -> gs.Graph:
    """A group norm's affine on the flat vector, as w8a8 wants; with `combine`, fewer, larger ops for the NPU: the
    token-shift mixes stacked (both exact)."""
    return PassManager([combine_parallel, flat_norm_affine] if combine else [flat_norm_affine],
                       name="fewer_ops")(graph).graph


class Policy:
    """A partition policy. Subclasses set the class attributes and override the behaviour that differs."""

    name: str = ""
    help: str = ""
    grouping: Grouping | None = None  # how its placement becomes segments; None: it composes other policies
    npu_all: bool = False  # the fp32 precision rule off: the NPU takes the recurrence
    groups_layers: bool = False  # consecutive layer graphs merge into one graph first
    takes_state_update: bool = False  # --state-update applies
    chooses: bool = False  # per graph its plan is one of other policies' (the summary says which)
    nsplit: bool = True  # False: NPU segments are never split over the three cores (a baseline stays as it was)
    combine: bool = True  # stack parallel elementwise branches before placement (passes/combine.py)
    model_candidate: bool = False  # a choosing policy prices it for a whole model too (not only per graph)

    @property
    def concrete(self) -> bool:
        """Produces a plan by itself."""
        return self.grouping is not None

    # -- one graph --------------------------------------------------------------------------------------
    def place(self, graph: gs.Graph, ctx: PlanContext) -> Placed:
        graph = _fewer_ops(graph, self.combine)
        return Placed(graph, place(graph, target=ctx.target, npu_all=ctx.npu_all or self.npu_all,
                                     seeds=ctx.boundaries.seeds))

    def group(self, graph: gs.Graph, placement: dict) -> list:
        return propose_segments(graph, placement, self.grouping)

    def plan(self, graph: gs.Graph, ctx: PlanContext) -> GraphPlan:
        """Placed, grouped, cut and priced; raises ValueError when the graph cannot be cut."""
        return plan_graph(graph, self, ctx)

    def moved_reason(self, node: gs.Node, seg) -> str:
        """Why a node runs elsewhere than its placement said (a segment's reason names other nodes)."""
        return f"{node.op}: {seg.reason}"

    # -- a whole model ------------------------------------------------------------------------------------
    def units(self, model, layers_per_call: int | None = None) -> list[Unit]:
        """The units of a whole model this policy splits: one per source graph."""
        return units(model, False)

    def for_unit(self, unit: Unit) -> Policy:
        """The policy a unit is planned with (deep: a unit that merged nothing is planned fused)."""
        return self

    def prefill_by_default(self, state_update: str) -> bool:
        """Whether a whole model gets a prefill plan when --prefill-chunk is not given."""
        return True

    def entry_fields(self, state_update: str) -> dict:
        """What a manifest graph entry planned by this policy records besides its plan."""
        return {}

    def cli_notes(self, state_update: str) -> list[str]:
        """Notes `rwkv2rknn split` prints before splitting under this policy."""
        return []

    def __repr__(self) -> str:
        return f"<policy {self.name}>"


class Fused(Policy):
    name = "fused"
    help = "maximal NPU regions around the MatMuls, the recurrence fp32 on the CPU (default)"
    grouping = Grouping("fused")

    def moved_reason(self, node, seg) -> str:
        if seg.backend == "cpu":
            return (f"{node.op}: NPU-capable, but its NPU run had under {DEFAULT_MIN_NPU_FLOPS:,} MatMul FLOPs, "
                    "too few to pay for an NPU call; runs on the CPU")
        return super().moved_reason(node, seg)


class MatMul(Policy):
    name = "matmul"
    help = "each MatMul its own NPU call (the 2023 attempt, kept as a baseline)"
    grouping = MatMulCalls("matmul")
    nsplit = False

    def moved_reason(self, node, seg) -> str:
        if seg.backend == "cpu":
            return f"{node.op}: NPU-capable, but the matmul policy sends only MatMuls to the NPU"
        return super().moved_reason(node, seg)


class Layer(Policy):
    name = "layer"
    help = "each whole graph one NPU model; the compiler places ops itself"
    grouping = WholeGraph("layer", on="npu")
    npu_all = True


class Cpu(Policy):
    name = "cpu"
    help = "no NPU at all (the baseline every plan must beat)"
    grouping = WholeGraph("cpu", on="cpu")
    combine = False
    # whole, it keeps fp32 links between graphs; per-graph choices assume the NPU's fp16 links, so an all-CPU
    # per-graph choice prices a little above it
    model_candidate = True

    def place(self, graph, ctx) -> Placed:  # no NPU: nothing to stack for it
        return Placed(graph, place(graph, target=ctx.target, npu_all=ctx.npu_all, seeds=ctx.boundaries.seeds))

    def moved_reason(self, node, seg) -> str:
        if seg.backend == "cpu":
            return f"{node.op}: NPU-capable, but the cpu policy uses no NPU"
        return super().moved_reason(node, seg)


class Deep(Policy):
    name = "deep"
    help = ("legalized layers, several per NPU call (--layers-per-call); the state update fp32 on the CPU between "
            "calls (--state-update)")
    grouping = Grouping("deep", npu_first=True, fold_small=False)
    npu_all = True
    groups_layers = True
    takes_state_update = True
    # stacked mixes in a legalized multi-layer model: the compiler put two Transposes of their Adds on its CPU
    # (RWKV-4, 2 x 128 per call; not reproduced in isolation), so deep keeps the branches
    combine = False

    def place(self, graph, ctx) -> Placed:
        """Legalized (ops the compiler would run on its CPU rewritten), every node may go to the NPU; with
        state_update "cpu" the nodes that update a recurrent state stay fp32 on the CPU (passes/state_rule.py):
        one NPU call, then one CPU call for the update; with "npu" the state stays fp16 between calls."""
        if ctx.state_update not in STATE_UPDATES:
            raise ValueError(f"state update {ctx.state_update!r}: choose one of {', '.join(STATE_UPDATES)}")
        steps = ([combine_parallel] if self.combine else []) + [flat_norm_affine, legalize]
        if ctx.state_update == "cpu" and ctx.state_pairs:
            steps.append(bind(clone_state_cone, list(ctx.state_pairs), ctx.recurrent))
        elif ctx.state_pairs:  # the NPU owns the state: keep it fp16 between calls, no conversion per token
            steps.append(bind(fp16_boundary, [n for pair in ctx.state_pairs for n in pair]))
        result = PassManager(steps, name="deep")(graph)
        graph = result.graph
        update = {n.node for n in result.notes if isinstance(n, StateUpdate)}
        placement = place(graph, target=ctx.target, npu_all=True, whole_models=True)
        for node in graph.nodes:
            if node.name in update:
                placement[node.name] = Placement("cpu", STATE_UPDATE_REASON.format(op=node.op))
        return Placed(graph, placement, [n for n in result.notes if not isinstance(n, StateUpdate)])

    def units(self, model, layers_per_call=None) -> list[Unit]:
        return units(model, True, layers_per_call)

    def for_unit(self, unit) -> Policy:
        # the embedding lookup (and a lone head) stay as fused plans: nothing to merge
        return self if unit.merged else get("fused")

    def prefill_by_default(self, state_update) -> bool:
        # with the state in the NPU model, its prefill scan (M steps unrolled in fp16 on the NPU) took over 600 s
        # to compile in the measurements of docs/wkv-precision.md: no prefill plan unless asked for
        return state_update != "npu"

    def entry_fields(self, state_update) -> dict:
        return {"state_update": state_update}

    def cli_notes(self, state_update) -> list[str]:
        if state_update != "npu":
            return []
        return ["--state-update npu keeps each layer's state fp16 between calls; it drifts on long-memory channels "
                "(docs/wkv-precision.md); the default, cpu, keeps it exact"]


class Auto(Policy):
    name = "auto"
    help = ("per graph, the plan with the lowest predicted time on the --board among cpu, matmul, fused and layer; "
            "for a whole model, that plan or deep's, whichever predicts faster")
    chooses = True
    takes_state_update = True  # the whole-model candidates that take it (deep) get it

    def candidates(self) -> list[Policy]:
        """The policies whose plans of one graph auto prices against each other."""
        return [p for p in concrete() if not p.groups_layers]

    def place(self, graph, ctx) -> Placed:
        raise TypeError("auto composes the other policies' plans; it does not place a graph itself")

    def group(self, graph, placement) -> list:
        raise TypeError("auto composes the other policies' plans; it does not group a graph itself")

    def plan(self, graph, ctx) -> GraphPlan:
        """Every candidate's plan of the graph, the cheapest kept; its `choice` is the manifest's `auto` record."""
        plans = [p.plan(graph, ctx) for p in self.candidates()]
        ranked = sorted(plans, key=lambda p: (p.ms, p.policy))
        best = ranked[0]
        profile = ctx.profile
        record = {"chosen": best.policy, "predicted_ms": round(best.ms, 4), "board": profile.name,
                  "candidates": {p.policy: round(p.ms, 4) for p in plans}}
        if len(ranked) > 1:
            second = ranked[1]
            record["runner_up"] = {"policy": second.policy, "predicted_ms": round(second.ms, 4)}
            record["reason"] = (f"lowest predicted time on {profile.name}: {best.policy} {best.ms:.3f} ms per token, "
                                f"runner-up {second.policy} {second.ms:.3f} ms")
        else:
            record["reason"] = f"the only policy: {best.policy} {best.ms:.3f} ms per token on {profile.name}"
        return replace(best, choice=record)

    def model_candidates(self) -> list[Policy]:
        """For a whole model: the per-graph choice (this policy) against every policy that merges layers, and the
        baseline without an NPU."""
        return [self] + [p for p in concrete() if p.groups_layers or p.model_candidate]

    def choose_model(self, price: Callable[[Policy], float], board: str) -> tuple[Policy, dict]:
        """The model candidate with the lowest predicted decode ms per token (`price` splits the whole model under
        one candidate without writing it), and the manifest's top-level record of the choice."""
        ms = {p.name: price(p) for p in self.model_candidates()}
        ranked = sorted(ms, key=lambda n: (ms[n], n))
        best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
        label = {self.name: "per-graph choice among " + ", ".join(p.name for p in self.candidates())}
        record = {"policy": self.name, "auto": {
            "chosen": best, "board": board, "predicted_ms": round(ms[best], 4),
            "candidates": {n: round(v, 4) for n, v in ms.items()},
            "reason": f"lowest predicted decode time per token: {best} ({label.get(best, best)}) {ms[best]:.2f} ms"
                      + (f", runner-up {second} {ms[second]:.2f} ms" if second else "")}}
        return get(best), record


_REGISTRY: dict[str, Policy] = {}


def register(policy: Policy) -> Policy:
    if policy.name in _REGISTRY:
        raise ValueError(f"policy {policy.name!r} is registered twice")
    _REGISTRY[policy.name] = policy
    return policy


def get(name: str) -> Policy:
    return _REGISTRY[name]


def names() -> list[str]:
    return list(_REGISTRY)


def concrete() -> list[Policy]:
    """Policies that produce a plan by themselves."""
    return [p for p in _REGISTRY.values() if p.concrete]


def help_text() -> str:
    return "; ".join(f"{p.name}: {p.help}" for p in _REGISTRY.values())


for _policy in (Fused(), MatMul(), Layer(), Cpu(), Deep(), Auto()):
    register(_policy)
