"""PREDICTED decode time with a draft model (speculative decoding, docs/speculative.md), from a board profile.

One round drafts k tokens and checks them in one verify pass of k + 1 rows. With a per-token acceptance rate p
(independent from token to token, the usual model: Leviathan et al. 2023), a round yields
    E[tokens] = 1 + p + ... + p^k = (1 - p^(k+1)) / (1 - p)
tokens and costs
    (k + p^k) draft steps            (k per round, one more after a round that kept every draft: its last draft)
  + one verify pass of k + 1 rows   (the verify plan priced at k + 1 rows: weights stream once, per-row work x rows)
  + (1 - p^k) x rollback            (copying the state after the last kept row into the state: a CPU copy)
  + (k - 1) draft state snapshots   (+ a restore when fewer than k - 1 drafts were kept).
ms/token = round / E[tokens]. k is picked per board profile as the k with the lowest ms/token at a given p.

A verify plan built for K drafts is priced at other row counts by scaling what grows with rows (MatMul FLOPs,
elementwise work, boundary bytes, conversions: the estimator's own rule for T tokens per call; weights stream once
per pass either way) and the op count of CPU segments (the recurrence is unrolled once per row there; an NPU op
takes all rows at once). tests/test_speculative_cost.py checks that against plans built for each k. Copies run
at the CPU's streaming rate (read and write). Every figure is a PREDICTION.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from rwkv2rknn.cost.estimate import LABEL, _price_plan, estimate
from rwkv2rknn.errors import UserError
from rwkv2rknn.acceptance import tokens_per_pass

ACCEPTANCE_GRID = (0.5, 0.6, 0.7, 0.8, 0.9)
MAX_K = 15  # the verify plan's rows: the NPU pads M to 16


@dataclass
class Point:
    p: float
    k: int
    ms_per_token: float
    tokens_per_pass: float
    round_ms: float
    draft_ms: float        # per round
    verify_ms: float       # per round (one pass)
    rollback_ms: float     # per round (expected)
    snapshot_ms: float     # per round (expected)
    speedup: float         # plain decode / speculative


@dataclass
class SpecEstimate:
    label: str
    board: str
    precision: str
    plain_ms_per_token: float      # the target's decode plan
    draft_ms_per_token: float      # the draft's decode plan
    verify_rows_built: int         # rows of the verify plan in OUT
    verify_ms: dict                # k -> ms per verify pass of k + 1 rows
    state_bytes: int               # the target's recurrent state (what a rollback copies)
    draft_state_bytes: int
    curve: list = field(default_factory=list)   # Point over p x k
    best: dict = field(default_factory=dict)    # p -> the Point with the lowest ms/token

    def to_dict(self) -> dict:
        d = asdict(self)
        d["best"] = {str(p): asdict(pt) for p, pt in self.best.items()}
        d["predicted"] = True
        return d


def _state_bytes(program) -> tuple[int, int]:
    """(bytes of the recurrent states, fp32-side bytes of their fp16 copies)."""
    total = shadow = 0
    for st in program.states:
        b = program.buffers[st.pair[0]]
        total += b.nbytes
        if st.shadow:
            shadow += program.buffers[st.shadow[0]].nbytes * 2
    return total, shadow


def verify_pass_ms(data: dict, program, profile, rows: int, precision: str, loader=None) -> float:
    """One verify pass of `rows` rows (the verify plan priced at that many rows), ms."""
    ver = data.get("verify")
    plan = program.verify if program is not None else None
    built = int(ver["rows"])
    if plan is not None and rows != built:  # what grows with rows: the program's conversions (activations)
        plan = dataclasses.replace(plan, conversions=[{**c, "bytes": c["bytes"] * rows / built}
                                                      for c in plan.conversions])
    graphs = ver["graphs"] if rows == built else [_scaled_graph(g, rows / built) for g in ver["graphs"]]
    est = _price_plan(graphs, profile, rows, loader, False, precision, program_plan=plan)
    return est.ms_per_token * rows


def _scaled_graph(graph: dict, factor: float) -> dict:
    """A verify graph entry priced at another row count: a CPU segment's ops are mostly the scan unrolled once per
    row (an NPU segment's ops take all rows at once), so its non-MatMul op count scales with the rows."""
    segs = []
    for seg in graph["segments"]:
        f = seg.get("cost")
        if seg["backend"] == "cpu" and isinstance(f, dict):
            ops = f["nodes"] - f["matmuls"]
            seg = dict(seg, cost=dict(f, nodes=f["matmuls"] + max(1, round(ops * factor))))
        segs.append(seg)
    return dict(graph, segments=segs)


def speculative_estimate(target: dict, draft: dict, profile, precision: str | None = None, ps=ACCEPTANCE_GRID,
                         ks=None, target_program=None, draft_program=None, loader=None,
                         draft_loader=None) -> SpecEstimate:
    """The curve over acceptance rates `ps` and draft lengths `ks` (default 1..MAX_K) on one board profile, and
    the best k per p. target/draft: manifest data with cost features (cost.estimate.with_features)."""
    from rwkv2rknn.cost.estimate import program_of

    if not target.get("verify"):
        raise UserError("the target has no verify plan: split it with --verify-tokens K (e.g. 4) to price "
                        "speculative decoding")
    precision = precision or (target.get("build") or {}).get("precision", "fp16")
    tp = target_program or program_of(target, precision)
    dp = draft_program or program_of(draft, precision)
    if tp is None or dp is None or tp.verify is None:
        raise UserError("cannot lower the target's or the draft's plan to a program; split them again")
    plain = estimate(target, profile, loader=loader, program=tp, precision=precision).decode_ms_per_token
    draft_ms = estimate(draft, profile, loader=draft_loader, program=dp, precision=precision).decode_ms_per_token
    state, shadow = _state_bytes(tp)
    dstate, _ = _state_bytes(dp)
    copy_ns = 2.0 / profile.cpu_stream_gbps  # ns per byte: read and write at the CPU's streaming rate
    rollback = (state * copy_ns + shadow * profile.cpu_convert_ns_per_byte) * 1e-6  # ms
    snap = dstate * copy_ns * 1e-6
    ks = list(ks or range(1, MAX_K + 1))
    verify = {k: verify_pass_ms(target, tp, profile, k + 1, precision, loader) for k in ks}
    out = SpecEstimate(LABEL, profile.name, precision, plain, draft_ms, int(target["verify"]["rows"]), verify,
                       state, dstate)
    for p in ps:
        for k in ks:
            e = tokens_per_pass(p, k)
            d = (k + p ** k) * draft_ms
            rb = (1.0 - p ** k) * rollback
            sn = (k - 1) * snap + (1.0 - p ** (k - 1)) * snap
            total = d + verify[k] + rb + sn
            pt = Point(p, k, total / e, e, total, d, verify[k], rb, sn, plain / (total / e))
            out.curve.append(pt)
            if p not in out.best or pt.ms_per_token < out.best[p].ms_per_token:
                out.best[p] = pt
    return out


def repeat_layers(plan: dict, n_layer: int, template: str | None = None) -> dict:
    """cost.plan.repeat_layers (the plan of an n_layer model from one holding fewer identical layers), the verify plan
    repeated too: its graphs, links and states, every graph under the verify. prefix (the head included)."""
    from rwkv2rknn.cost.plan import _loop_states, _repeat
    from rwkv2rknn.cost.plan import repeat_layers as repeat_plan
    from rwkv2rknn.families import get
    from rwkv2rknn.model_loop import fp16_links

    out = repeat_plan(plan, n_layer, template)
    ver = plan.get("verify")
    if not ver:
        return out
    graphs = _repeat(ver["graphs"], n_layer, "verify.", template)
    links = [{"from": {"graph": f"verify.{a}", "name": o}, "to": {"graph": f"verify.{b}", "name": i}}
             for a, o, b, i in get(plan["model"]["family"]).links(n_layer)]
    out["verify"] = dict(ver, graphs=graphs, order=[g["name"] for g in graphs], links=fp16_links(links, graphs),
                         state=_loop_states(ver["state"], n_layer, "verify."))
    return out


__all__ = ["repeat_layers", "ACCEPTANCE_GRID", "MAX_K", "Point", "SpecEstimate", "speculative_estimate", "tokens_per_pass",
           "verify_pass_ms"]
