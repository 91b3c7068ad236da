"""The estimator: per-segment, per-graph and per-token time PREDICTIONS from features and a board profile.

Pure functions over the manifest's data. Each segment entry's features come from `entry["cost"]` (written by
split), or, if missing, from its ONNX through a `loader(graph, segment) -> onnx.ModelProto` callback. Where
`build` stored the compiler's own table (`entry["compiler"] = {"ops", "cpu_ops", "cycles"}`), the NPU time of
the Conv/MatMul work comes from its cycles and the hops from its real CPU ops; the compiler's cycles cover
only that work (elementwise ops show 0 and M is padded to `npu_pad_rows`), so elementwise work, hops, call
and conversion costs come from the profile.

Pricing one call of a segment that processes T tokens (features describe `rows` tokens per call; s = T/rows):
- NPU: weights stream once per call (fp16 bytes / streaming rate; int8 for w8a8) and the MatMul FLOPs (x s) run at
  the profile's fp16 GFLOPS for T rows: the MatMul work is max(stream, compute) (roofline). Plus elementwise ops
  left on the NPU (npu_op_us each + their bytes), CPU-fallback hops (npu_hop_us each), fp32 <-> fp16 conversion
  of the boundary bytes (x s) and the fixed call cost. Priced on one core and, if the profile allows it, on three
  cores (only the multi-core-capable share speeds up, plus npu_multicore_call_us); the faster one is reported
  with its core mask (1 = NPU_CORE_0, 7 = NPU_CORE_0_1_2).
- CPU (onnxruntime): the stored weights stream once per call at cpu_stream_gbps, FLOPs (x s) at cpu_gflops,
  roofline; every non-MatMul op costs cpu_op_us plus its bytes; plus the fixed cpu_call_us.
Segments with `fallback_reason` run on the CPU. Per token = per call / T.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from rwkv2rknn.cost.features import FEATURES_VERSION, segment_features
from rwkv2rknn.cost.profile import CORE_MASK_NAMES, BoardProfile
from rwkv2rknn.errors import UserError
from rwkv2rknn.manifest import runs_on

CATEGORIES = ("npu_stream", "npu_compute", "npu_call", "io_copy", "conversion", "hops", "cpu_compute", "cpu_call",
              "overlap")
LABEL = "PREDICTION from a board profile (published figures and judgement), not a measurement"
_NPU_ELEM_BYTES = 2 * 3  # fp16, two reads and one write per element
_CPU_ELEM_BYTES = 4 * 3  # fp32


def _zero() -> dict:
    return dict.fromkeys(CATEGORIES, 0.0)


def _add(into: dict, other: dict, factor: float = 1.0) -> dict:
    for k in CATEGORIES:
        into[k] += other[k] * factor
    return into


@dataclass
class SegmentEstimate:
    id: str
    backend: str          # as planned by split
    runs_on: str          # "npu" | "cpu" (a fallen-back NPU segment runs on the CPU)
    ms: float             # per call
    breakdown: dict       # ms per call by category
    core_mask: int | None = None
    one_core_ms: float | None = None
    three_core_ms: float | None = None
    features_from: str = "manifest"  # "manifest" | "onnx"
    compiler_table: bool = False
    hops: int = 0
    measured_ms: float | None = None  # a board timing from the profile (calibrate), if any


@dataclass
class GraphEstimate:
    name: str
    ms_per_token: float
    breakdown: dict       # ms per token
    npu_calls: int        # per call of the plan
    cpu_calls: int
    segments: list = field(default_factory=list)


@dataclass
class PlanEstimate:
    tokens_per_call: int
    ms_per_token: float
    breakdown: dict
    npu_calls_per_token: float
    cpu_calls_per_token: float
    graphs: list
    measured_ms_per_token: float | None = None  # when the profile has board timings of every segment


@dataclass
class Estimate:
    label: str
    board: str
    board_file: str
    board_files: list
    policy: str | None
    all_cpu: bool
    tokens_per_call: int
    decode_ms_per_token: float
    prefill_ms_per_token: float
    prefill_plan: str
    npu_calls_per_token: float
    cpu_calls_per_token: float
    breakdown: dict
    decode: PlanEstimate
    prefill: PlanEstimate | None

    def to_dict(self) -> dict:
        return asdict(self)


# -- one segment -----------------------------------------------------------------------------------------------

def _npu_variant(f: dict, p: BoardProfile, t: int, s: float, mask: int, compiler: dict | None,
                 precision: str, convert: bool = True, int8_share: float = 1.0) -> tuple[float, dict, int]:
    # w8a8: int8 weights (a hybrid build: only the share of the weights its heavy MatMuls hold)
    w = f["weight_bytes"]["fp16"] * ((1.0 - 0.5 * int8_share) if precision == "w8a8" else 1.0)
    flops = f["matmul_flops"] * s
    r1, r3, r7 = p.npu_stream_gbps_1core * 1e9, p.npu_stream_gbps_3core * 1e9, p.npu_stream_gbps_mask7 * 1e9
    g1 = p.gflops(t) * 1e9 * (p.npu_int8_compute_speedup if precision == "w8a8" else 1.0)
    mc, mcf = f.get("multicore_weight_share", 0.0), f.get("multicore_flops_share", 0.0)
    stream1, compute1 = w / r1, flops / g1
    pieces = int(f.get("parallel_pieces", 1))
    if pieces > 1:  # one of N-split pieces pinned to its own core, running beside the others: a share of r3
        stream1 = w / (r3 / pieces)
    if mask == 7:
        stream = w * mc / r7 + w * (1 - mc) / r1
        compute = flops * mcf / (g1 * p.npu_multicore_compute_speedup) + flops * (1 - mcf) / g1
    else:
        stream, compute = stream1, compute1
    roof1 = max(stream1, compute1)
    if compiler and compiler.get("cycles"):
        mm1 = compiler["cycles"] * p.npu_cycle_scale / p.npu_clock_hz
        if t > max(p.npu_pad_rows, f.get("rows", 1)):  # the compiled M no longer covers T rows
            mm1 = max(mm1, compute1)
        mm = mm1 * (max(stream, compute) / roof1) if roof1 > 0 else mm1
    else:
        mm = max(stream, compute)
    b = _zero()
    b["npu_stream"] = min(mm, stream)
    b["npu_compute"] = mm - b["npu_stream"]
    predicted_cpu = len(f.get("cpu_ops", []))
    if compiler is not None and "cpu_ops" in compiler:
        hops = len(compiler["cpu_ops"])
        npu_ops = max(0, f.get("npu_ops", 0) + predicted_cpu - hops)
    else:
        hops, npu_ops = predicted_cpu, f.get("npu_ops", 0)
    b["npu_compute"] += (npu_ops * p.npu_op_us * 1e-6
                         + f.get("elementwise_elems", 0) * s * _NPU_ELEM_BYTES / r1)
    b["hops"] = hops * p.npu_hop_us * 1e-6
    if convert:  # priced per segment (planning); an estimate over a program prices the program's conversions instead
        conv_in = f.get("convert_in_bytes", f["input_bytes"])
        conv_out = f.get("convert_out_bytes", f["output_bytes"])
        b["conversion"] = (conv_in * p.conv_in_ns_per_byte + conv_out * p.conv_out_ns_per_byte) * s * 1e-9
    # what the runtime does per call beyond the program: copies in and out (RKNNLite), fp16 outputs returned as fp32
    out16 = f["output_bytes"] - f.get("convert_out_bytes", f["output_bytes"])
    b["io_copy"] = ((f["input_bytes"] + f["output_bytes"]) * p.npu_io_copy_ns_per_byte
                    + 2 * out16 * p.npu_output_fp32_ns_per_byte) * s * 1e-9
    b["npu_call"] = (p.npu_call_us + (p.npu_multicore_call_us if mask == 7 else 0.0)) * 1e-6
    return sum(b.values()), b, hops


def _cpu_cost(f: dict, p: BoardProfile, s: float) -> dict:
    rate = p.cpu_stream_gbps * 1e9
    mm = max(f["weight_bytes"]["stored"] / rate, f["matmul_flops"] * s / (p.cpu_gflops * 1e9))
    ops = (f["nodes"] - f["matmuls"]) * p.cpu_op_us * 1e-6 + f.get("elementwise_elems", 0) * s * _CPU_ELEM_BYTES / rate
    b = _zero()
    b["cpu_compute"] = mm + ops
    b["cpu_call"] = p.cpu_call_us * 1e-6
    return b


class SegmentPrice(NamedTuple):
    seconds: float
    breakdown: dict       # seconds per category
    core_mask: int | None  # None for CPU
    variants: dict        # core mask -> seconds (NPU only)
    hops: int


def price_segment(features: dict, profile: BoardProfile, runs_on: str, tokens_per_call: int = 1,
                  compiler: dict | None = None, precision: str = "fp16", convert: bool = True,
                  int8_share: float = 1.0) -> SegmentPrice:
    """One call of one segment processing `tokens_per_call` tokens, on "npu" or "cpu" (pure).

    convert False: leave the NPU runtime's fp32-boundary conversions out (the program's accounting prices them).
    """
    t = max(1, int(tokens_per_call))
    s = t / max(1, int(features.get("rows", 1)))
    if runs_on == "cpu":
        b = _cpu_cost(features, profile, s)
        return SegmentPrice(sum(b.values()), b, None, {}, 0)
    masks = [features["pinned_core_mask"]] if features.get("pinned_core_mask") else sorted(profile.npu_core_masks)
    variants = {mask: _npu_variant(features, profile, t, s, mask, compiler, precision, convert, int8_share)
                for mask in masks}
    best = min(variants, key=lambda m: (variants[m][0], m))
    total, b, hops = variants[best]
    return SegmentPrice(total, b, best, {m: v[0] for m, v in variants.items()}, hops)


# -- manifests -------------------------------------------------------------------------------------------------

Loader = Callable[[dict, dict], object]


def _features(graph: dict, seg: dict, loader: Loader | None) -> tuple[dict, str]:
    f = seg.get("cost")
    if isinstance(f, dict) and f.get("version") == FEATURES_VERSION:
        return f, "manifest"
    if loader is None:
        raise UserError(f"segment {seg['id']}: the manifest holds no cost features (entry 'cost'); split again "
                        "with a rwkv2rknn that stores them, or keep the segment ONNX files beside the manifest")
    return segment_features(loader(graph, seg), seg["backend"]), "onnx"


def with_features(manifest_data: dict, loader: Loader) -> tuple[dict, int]:
    """A copy of the manifest data in which every segment (decode and prefill plans) has `cost` features.

    Segments without stored features get them from `loader(graph, segment)` once (pricing a manifest
    twice, e.g. the plan and its CPU-only counterpart, then loads no ONNX twice). Returns (data, computed).
    """
    data = dict(manifest_data)
    computed = 0

    def fill(graphs):
        nonlocal computed
        out = []
        for g in graphs:
            g = dict(g, segments=[dict(s) for s in g["segments"]])
            for seg in g["segments"]:
                f, where = _features(g, seg, loader)
                seg["cost"] = f
                computed += where == "onnx"
            out.append(g)
        return out

    data["graphs"] = fill(manifest_data["graphs"])
    pre = manifest_data.get("prefill")
    if isinstance(pre, dict) and pre.get("graphs"):
        data["prefill"] = dict(pre, graphs=fill(pre["graphs"]))
    return data, computed


def _merge(features: list[dict]) -> dict:
    """The features of one onnxruntime session holding several segments (for the CPU-only plan)."""
    out = {"rows": max(f.get("rows", 1) for f in features), "nodes": 0, "matmuls": 0, "matmul_flops": 0,
           "elementwise_elems": 0, "weight_bytes": {"stored": 0, "fp32": 0, "fp16": 0}}
    for f in features:
        for k in ("nodes", "matmuls", "matmul_flops", "elementwise_elems"):
            out[k] += f.get(k, 0)
        for k in ("stored", "fp32", "fp16"):
            out["weight_bytes"][k] += f["weight_bytes"][k]
    return out


def _conversion_seconds(conv: dict, p: BoardProfile) -> float:
    """One of the program's conversions: in a CPU loop, or inside the NPU runtime at an fp32 boundary."""
    rate = p.conv_in_ns_per_byte if conv.get("kind") == "npu_runtime" else p.cpu_convert_ns_per_byte
    return conv["bytes"] * rate * 1e-9


def critical_path(steps, seconds: dict, parallel_s: float = 0.0) -> float:
    """The time of one run of a program plan: steps in order on the main thread, except those marked `overlap`,
    which a worker runs in order beside it (each once its inputs exist), and the pieces of one N-split group,
    which run at once (each on its own core; `parallel_s` to start and join them); the run ends when all are."""
    main = worker = 0.0
    finish: dict[int, float] = {}
    k = 0
    while k < len(steps):
        st = steps[k]
        group = [st]
        while getattr(st, "parallel", None) and k + len(group) < len(steps) and \
                getattr(steps[k + len(group)], "parallel", None) == st.parallel:
            group.append(steps[k + len(group)])
        ready = max((finish.get(d, 0.0) for g in group for d in g.deps), default=0.0)
        if len(group) > 1:
            main = max(main, ready) + max(seconds.get(g.id, 0.0) for g in group) + parallel_s
            for g in group:
                finish[g.id] = main
        elif st.overlap:
            worker = max(worker, main, ready) + seconds.get(st.id, 0.0)
            finish[st.id] = worker
        else:
            main = max(main, ready) + seconds.get(st.id, 0.0)
            finish[st.id] = main
        k += len(group)
    return max(main, worker)


def _price_plan(graphs: list[dict], profile: BoardProfile, t: int, loader: Loader | None, all_cpu: bool,
                precision: str, own_rows: bool = False, program_plan=None) -> PlanEstimate:
    """t tokens per run of the plan. own_rows (a prefill plan): every segment is called once per run over the
    rows it was built for (M for a batched graph, 1 for the head that runs on the last row only).

    program_plan: the plan of the execution program; its conversions are priced (instead of every fp32 boundary
    of every NPU segment) and its steps' critical path, CPU steps overlapping NPU steps, is the time per run.
    """
    measured = profile.measured_segments or {}
    out, total = [], _zero()
    npu_calls = cpu_calls = 0
    all_measured = True
    measured_sum = 0.0
    seg_seconds: dict[str, float] = {}
    conv_of_graph: dict[str, float] = {}
    step_seconds: dict[int, float] = {}
    if program_plan is not None and not all_cpu:
        for c in program_plan.conversions:
            sec = _conversion_seconds(c, profile)
            step = program_plan.steps[c["step"]] if c.get("step") is not None else None
            graph = step.graph if step is not None else ""
            conv_of_graph[graph] = conv_of_graph.get(graph, 0.0) + sec
            if step is not None:
                step_seconds[step.id] = step_seconds.get(step.id, 0.0) + sec
    for g in graphs:
        feats = [_features(g, s, loader) for s in g["segments"]]
        gb = _zero()
        segs = []
        if all_cpu:  # one onnxruntime session per graph, as a CPU-only split would give
            merged = _merge([f for f, _ in feats])
            sec, b = price_segment(merged, profile, "cpu", merged["rows"] if own_rows else t)[:2]
            _add(gb, b)
            segs.append(SegmentEstimate(id=f"{g['name']}.cpu", backend="cpu", runs_on="cpu", ms=sec * 1e3,
                                        breakdown={k: v * 1e3 for k, v in b.items()},
                                        features_from="+".join(sorted({w for _, w in feats}))))
            n_npu, n_cpu = 0, 1
            all_measured = False
        else:
            n_npu = n_cpu = 0
            for seg, (f, where) in zip(g["segments"], feats):
                side = runs_on(seg)
                compiler = seg.get("compiler") if side == "npu" else None
                prec = seg.get("precision", precision)
                rows = f.get("rows", 1) if own_rows else t
                share = (seg.get("hybrid") or {}).get("int8_weight_share", 1.0)
                sec, b, mask, variants, hops = price_segment(f, profile, side, rows, compiler, prec,
                                                             convert=program_plan is None, int8_share=share)
                seg_seconds[seg["id"]] = sec
                _add(gb, b)
                m = measured.get(seg["id"])
                if m is None:
                    all_measured = False
                else:
                    measured_sum += float(m["ms"])
                n_npu += side == "npu"
                n_cpu += side == "cpu"
                segs.append(SegmentEstimate(
                    id=seg["id"], backend=seg["backend"], runs_on=side, ms=sec * 1e3,
                    breakdown={k: v * 1e3 for k, v in b.items()}, core_mask=mask,
                    one_core_ms=variants[1] * 1e3 if 1 in variants else None,
                    three_core_ms=variants[7] * 1e3 if 7 in variants else None,
                    features_from=where, compiler_table=compiler is not None,
                    hops=hops,
                    measured_ms=float(m["ms"]) if m is not None else None))
            gb["conversion"] += conv_of_graph.get(g["name"], 0.0)
        npu_calls += n_npu
        cpu_calls += n_cpu
        _add(total, gb)
        per_token = {k: v * 1e3 / t for k, v in gb.items()}
        out.append(GraphEstimate(name=g["name"], ms_per_token=sum(per_token.values()), breakdown=per_token,
                                 npu_calls=n_npu, cpu_calls=n_cpu, segments=segs))
    total["conversion"] += conv_of_graph.get("", 0.0)
    if program_plan is not None and not all_cpu:  # what overlapping CPU steps with NPU steps saves
        for st in program_plan.steps:
            if st.op == "run":
                step_seconds[st.id] = step_seconds.get(st.id, 0.0) + seg_seconds.get(st.segment, 0.0)
        serial = sum(total.values())
        crit = critical_path(program_plan.steps, step_seconds, profile.npu_parallel_us * 1e-6)
        total["overlap"] = min(0.0, crit - sum(step_seconds.values())) if crit < sum(step_seconds.values()) else \
            crit - sum(step_seconds.values())
        total["overlap"] = max(total["overlap"], -serial)
    breakdown = {k: v * 1e3 / t for k, v in total.items()}
    return PlanEstimate(tokens_per_call=t, ms_per_token=sum(breakdown.values()), breakdown=breakdown,
                        npu_calls_per_token=npu_calls / t, cpu_calls_per_token=cpu_calls / t, graphs=out,
                        measured_ms_per_token=measured_sum / t if all_measured and graphs else None)


def program_of(manifest_data: dict, precision: str = "fp16"):
    """The execution program of manifest data (plan and build results joined), or None where it cannot be made
    (an old or partial manifest: the estimate then prices every fp32 boundary per segment). precision: what an
    NPU segment without a recorded precision is assumed to be built at."""
    from rwkv2rknn.program.lower import lower

    try:
        return lower(manifest_data, None, assume_precision=precision)
    except (ValueError, KeyError, TypeError):
        return None


def estimate(manifest_data: dict, profile: BoardProfile, tokens_per_call: int = 1, loader: Loader | None = None,
             all_cpu: bool = False, program=None, precision: str | None = None) -> Estimate:
    """Predict the per-token time of a manifest's plan on the board `profile` describes.

    tokens_per_call: T tokens per call of the manifest's plan (1 = decode; T > 1 prices the same segments as if
      each call processed T rows: weights stream once per call, activations and FLOPs scale with T).
    loader(graph, segment) -> onnx.ModelProto: used for segments without stored features.
    all_cpu: price every graph as one onnxruntime session (the CPU-only plan of the same model).
    program: the execution program (lowered from the data when not given): conversions and the critical path
      come from it.
    precision: price NPU segments as if built at this precision ("w8a8": int8 weights and compute), where the
      build recorded none.
    A manifest key "prefill" = {"chunk": M, "graphs": [...]} is priced at M tokens per call; without it the
    prefill figure is the main plan at `tokens_per_call`.
    """
    if tokens_per_call < 1:
        raise UserError(f"tokens per call {tokens_per_call}: must be at least 1")
    if precision is not None and precision not in ("fp16", "w8a8"):
        raise UserError(f"--precision {precision!r}: choose fp16 or w8a8")
    precision = precision or (manifest_data.get("build") or {}).get("precision", "fp16")
    if program is None and not all_cpu:
        program = program_of(manifest_data, precision)
    decode = _price_plan(manifest_data["graphs"], profile, tokens_per_call, loader, all_cpu, precision,
                         program_plan=program.decode if program is not None and tokens_per_call == 1 else None)
    pre = manifest_data.get("prefill")
    if isinstance(pre, dict) and pre.get("graphs"):
        chunk = int(pre.get("chunk", 1))
        own = {g["name"] for g in pre["graphs"]}
        # graphs the prefill plan shares with the decode plan (the head, once per chunk on the last row)
        shared = [g for g in manifest_data["graphs"] if g["name"] in pre.get("order", []) and g["name"] not in own]
        prefill = _price_plan(pre["graphs"] + shared, profile, chunk, loader, all_cpu, precision, own_rows=True,
                              program_plan=program.prefill if program is not None else None)
        prefill_plan, prefill_ms = f"manifest prefill plan, {chunk} tokens per call", prefill.ms_per_token
    else:
        prefill = None
        prefill_plan = f"the decode plan at M={tokens_per_call}; the manifest has no prefill plan"
        prefill_ms = decode.ms_per_token
    return Estimate(label=LABEL, board=profile.name, board_file=str(profile.path),
                    board_files=[str(f) for f in profile.files], policy=manifest_data.get("policy"),
                    all_cpu=all_cpu, tokens_per_call=tokens_per_call, decode_ms_per_token=decode.ms_per_token,
                    prefill_ms_per_token=prefill_ms, prefill_plan=prefill_plan,
                    npu_calls_per_token=decode.npu_calls_per_token, cpu_calls_per_token=decode.cpu_calls_per_token,
                    breakdown=dict(decode.breakdown), decode=decode, prefill=prefill)


def core_mask_name(mask: int | None) -> str:
    """7 -> "7 (0_1_2)", 1 -> "1 (0)", None -> "-"."""
    if mask is None:
        return "-"
    name = CORE_MASK_NAMES.get(mask)
    return f"{mask} ({name.removeprefix('NPU_CORE_')})" if name else str(mask)


def verdict(plan_ms: float, cpu_ms: float) -> str:
    """How a plan's predicted decode time compares with the CPU-only plan's: beats, ties with, LOSES to."""
    if abs(plan_ms - cpu_ms) <= 0.005 * cpu_ms:
        return "ties with"
    return "beats" if plan_ms < cpu_ms else "LOSES to"


__all__ = ["CATEGORIES", "LABEL", "Estimate", "GraphEstimate", "PlanEstimate", "SegmentEstimate", "core_mask_name",
           "SegmentPrice", "critical_path", "estimate", "price_segment", "program_of", "verdict", "with_features"]

