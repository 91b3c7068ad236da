"""The split driver: source graphs -> passes pipeline -> segment ONNX files + manifest.json."""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from passes.infra import PassError
from passes.pipeline import normalize
from passes.placement import TARGETS, Seeds
from rwkv2rknn import __version__, policies
from rwkv2rknn.errors import UserError
from rwkv2rknn.fsio import sha256_file, staged_directory, write_json_atomic
from rwkv2rknn.cost.profile import BoardProfile, load_profile
from rwkv2rknn.manifest import DEFAULT_OUT, FORMAT_VERSION, MANIFEST_NAME, tensor_spec, validate
from rwkv2rknn.model import RwkvModel, SourceGraph, load_sources
from rwkv2rknn.deep import Unit, merge_unit, tensor_ref
from rwkv2rknn.model_loop import model_loop
from rwkv2rknn.options import SplitOptions
from rwkv2rknn.planner import NPU_IO, STATE_UPDATES, Boundaries, PlanContext
from rwkv2rknn.prefill import MAX_PREFILL_CHUNK, default_chunk, prefill_loop, prefill_units
from rwkv2rknn.prefill import batched as prefill_graph
from rwkv2rknn import verify_plan as ver
from rwkv2rknn.weights import save_segment



@dataclass
class GraphReport:
    """What one graph became: for the summary table and the preview."""

    name: str
    npu_segments: int = 0
    cpu_segments: int = 0
    matmul_flops: int = 0
    npu_matmul_flops: int = 0
    crossing_bytes: int = 0
    placement: list[dict] = field(default_factory=list)
    policy: str = ""
    predicted_ms: float = 0.0  # per token on the split's board profile (a prediction)
    notes: list[str] = field(default_factory=list)  # legalization: rewritten, or left alone and why
    plan: str = "decode"  # or "prefill"

    @property
    def npu_share(self) -> float:
        return self.npu_matmul_flops / self.matmul_flops if self.matmul_flops else 0.0


def parse_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """--shape NAME=D0,D1,... -> {NAME: [D0, D1, ...]}."""
    shapes = {}
    for spec in specs or []:
        name, sep, dims = spec.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",") if d.strip() != ""]
        except ValueError:
            raise UserError(f"--shape {spec!r}: expected NAME=D0,D1,... with integer dims, e.g. input=1024") from None
    return shapes


def _nbytes(t) -> int:
    return int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize


def _io_specs(tensors) -> list[dict]:
    return [tensor_spec(t.name, np.dtype(t.dtype).name, t.shape) for t in tensors]


def _check_shapes(src: SourceGraph, graph: gs.Graph, shapes: dict) -> None:
    """--shape may fix a symbolic dimension, never change a static one; every symbolic input needs it."""
    for inp in graph.inputs:
        have = list(inp.shape) if inp.shape is not None else None
        want = shapes.get(inp.name)
        if want is None:
            if have is None or not all(isinstance(d, int) and d >= 0 for d in have):
                dims = ",".join(f"D{i}" for i in range(len(have or [0])))
                raise UserError(f"{src.path}: input {inp.name!r} has dynamic shape {have}; "
                                f"fix it with --shape {inp.name}={dims}")
            continue
        if have is not None and (len(want) != len(have) or any(
                isinstance(h, int) and h >= 0 and h != w for h, w in zip(have, want))):
            raise UserError(f"--shape {inp.name}={','.join(map(str, want))}: {src.path} declares {inp.name} "
                            f"as {have}; give a shape of that rank that keeps its fixed dimensions")


def _normalized(src: SourceGraph, shapes: dict) -> gs.Graph:
    graph = gs.import_onnx(src.model)
    _check_shapes(src, graph, shapes)
    try:
        return normalize(graph, shapes).graph
    except PassError as exc:
        if not isinstance(exc.cause, ValueError):
            raise
        raise UserError(f"{src.path}: {exc.cause} (pass {exc.name}); fix the sizes with --shape NAME=D0,D1,...") from None


def _unit_graph(unit: Unit, shapes: dict, model: RwkvModel | None) -> gs.Graph:
    """The normalized graph of a unit: one source graph, or a group merged along the family's links."""
    graphs = [_normalized(src, shapes) for src in unit.sources]
    if not unit.merged:
        return graphs[0]
    return merge_unit(unit, graphs, model.family.links(model.n_layer))


def _state_pairs(unit: Unit, model: RwkvModel | None) -> list[tuple[str, str]]:
    if model is None:
        return []
    return [(tensor_ref(unit, s.name, st.input)["name"], tensor_ref(unit, s.name, st.output)["name"])
            for s in unit.sources if s.name.startswith("mixing_") for st in model.family.states]


def _plan(graph: gs.Graph, policy: policies.Policy, ctx: PlanContext, where):
    try:
        return policy.plan(graph, ctx)
    except (ValueError, PassError) as exc:  # e.g. a tensor whose shape no inference could find (a damaged graph)
        if isinstance(exc, PassError) and not isinstance(exc.cause, ValueError):
            raise
        raise UserError(f"{where}: cannot cut this graph ({exc}); check the file, or fix input sizes "
                        "with --shape NAME=D0,D1,...") from None


def _seeds(unit: Unit, model: RwkvModel | None) -> Seeds:
    """Where the fp32 precision rule starts in the unit's graph: the family's ops, and the readers of its state
    inputs the family names (their names in the unit)."""
    if model is None:
        return Seeds()
    prec = model.family.precision
    inputs = tuple(tensor_ref(unit, s.name, name)["name"]
                   for s in unit.sources if s.name.startswith("mixing_") for name in prec.state_inputs)
    return Seeds(tuple(prec.ops), inputs)


@dataclass(frozen=True)
class _Job:
    """One split under way: its policy and options, the board profile, the whole model (None: single graphs) and
    where segments are written (None: preview)."""

    policy: policies.Policy
    options: SplitOptions
    profile: BoardProfile
    model: RwkvModel | None
    seg_dir: Path | None = None
    root: Path | None = None


def _context(job: _Job, unit: Unit, graph: gs.Graph, link_dtypes, recurrent: dict | None = None) -> PlanContext:
    """Planning one unit's graph. A whole model's graphs meet through links and states; a single graph's boundary
    is its user's (fixed). link_dtypes(unit): the dtypes of the buffers feeding the unit's graph inputs from graphs
    already split (their writers decide: fp16 from an NPU segment)."""
    opts, model = job.options, job.model
    if model is None:
        boundaries = Boundaries(opts.npu_io, None, frozenset(t.name for t in graph.inputs + graph.outputs),
                                opts.nsplit)
    else:
        boundaries = Boundaries(opts.npu_io, link_dtypes(unit) if link_dtypes else None, nsplit=opts.nsplit,
                                seeds=_seeds(unit, model))
    return PlanContext(opts.target, job.profile, opts.npu_all, tuple(_state_pairs(unit, model)), opts.state_update,
                       recurrent, boundaries)


def _split_unit(unit: Unit, job: _Job, prefill: Unit | None = None, chunk: int = 0, link_dtypes=None,
                prefill_link_dtypes=None) -> list[tuple[dict, GraphReport]]:
    """The unit's decode-plan graph entry, and (with `prefill`) the entry of its prefill-plan counterpart.

    link_dtypes(unit) / prefill_link_dtypes(unit): the dtypes of the buffers feeding the unit's graph inputs
    from graphs already split (their writers decide: fp16 from an NPU segment)."""
    where = unit.sources[0].path if len(unit.sources) == 1 else f"{unit.sources[0].path} ... {unit.sources[-1].path}"
    shapes, model = job.options.shapes or {}, job.model
    graph = _unit_graph(unit, shapes, model)
    policy = job.policy.for_unit(unit)
    batched = rows = None
    if prefill is not None:  # batch before planning: a deep plan rewrites its graph in place
        base = graph if prefill.sources == unit.sources else _unit_graph(prefill, shapes, model)
        try:
            batched, rows = prefill_graph(base, chunk, _state_pairs(prefill, model))
        except ValueError as exc:
            raise UserError(f"{where}: cannot batch this graph over {chunk} tokens ({exc}); split with "
                            "--prefill-chunk 0 (no prefill plan)") from None
    ctx = _context(job, unit, graph, link_dtypes)
    out = [_entry(unit, graph, _plan(graph, policy, ctx, where), job)]
    if batched is not None:
        pctx = _context(job, prefill, batched, prefill_link_dtypes, rows)
        out.append(_entry(prefill, batched, _plan(batched, policy, pctx, where), job, tokens=chunk))
    return out


def _split_prefill_unit(unit: Unit, job: _Job, chunk: int, link_dtypes) -> list[tuple[dict, GraphReport]]:
    """The prefill-plan entry of a prefill unit that has no decode counterpart of the same layers."""
    where = f"{unit.sources[0].path} ... {unit.sources[-1].path}"
    graph = _unit_graph(unit, job.options.shapes or {}, job.model)
    try:
        batched, rows = prefill_graph(graph, chunk, _state_pairs(unit, job.model))
    except ValueError as exc:
        raise UserError(f"{where}: cannot batch this graph over {chunk} tokens ({exc}); split with "
                        "--prefill-chunk 0 (no prefill plan)") from None
    ctx = _context(job, unit, batched, link_dtypes, rows)
    return [_entry(unit, batched, _plan(batched, job.policy.for_unit(unit), ctx, where), job, tokens=chunk)]


def _prefill_group_layers(pol, opts: SplitOptions, model: RwkvModel | None, chunk: int) -> int | None:
    """Layers per prefill group for a policy that merges layers: as many as compile within the budget
    (rwkv2rknn/deep.py COMPILE_MODEL), from the ops of one layer batched over `chunk` tokens (the batched
    graph has ~2.4x a layer's ops at 16 tokens and ~7x at 64: measured on RWKV-7, 12 x 64). None: the decode
    groups as they are (no merged groups, or --layers-per-call given)."""
    from rwkv2rknn.deep import MAX_GROUP_OPS

    if model is None or not pol.groups_layers or opts.layers_per_call is not None or model.n_layer < 2:
        return None
    layer = Unit(model.graphs[2].name, [model.graphs[2]])  # mixing_1: a layer like the rest (mixing_0 makes v_first)
    batched, _ = prefill_graph(_unit_graph(layer, opts.shapes or {}, model), chunk, _state_pairs(layer, model))
    ops = sum(n.op != "Constant" for n in batched.nodes)
    return max(1, MAX_GROUP_OPS // max(1, ops))


def _entry(unit: Unit, graph: gs.Graph, plan, job: _Job, tokens: int = 1) -> tuple[dict, GraphReport]:
    """A manifest graph entry from a plan: its segments cut, written (unless preview) and described."""
    placement, segments, cuts, policy = plan.placement, plan.segments, plan.cuts, plan.policy
    planned_by = policies.get(policy)
    seg_dir, root = job.seg_dir, job.root
    report = GraphReport(unit.name, policy=policy, predicted_ms=plan.ms / tokens,
                         notes=[str(n) for n in plan.notes])
    seg_entries = []
    for i, (seg, cut) in enumerate(zip(segments, cuts)):
        sid = f"{unit.name}.s{i}"
        for node in seg.nodes:
            decided = placement[node.name]
            reason = decided.reason if decided.backend == seg.backend else planned_by.moved_reason(node, seg)
            report.placement.append({"node": node.name, "op": node.op, "segment": sid,
                                     "backend": seg.backend, "reason": reason})
        report.matmul_flops += cut.matmul_flops
        if cut.backend == "npu":
            report.npu_segments += 1
            report.npu_matmul_flops += cut.matmul_flops
            report.crossing_bytes += sum(_nbytes(t) for t in cut.inputs + cut.outputs)
        else:
            report.cpu_segments += 1
        entry = {"id": sid, "backend": cut.backend, "onnx": f"segments/{sid}.onnx",
                 "inputs": _io_specs(cut.inputs), "outputs": _io_specs(cut.outputs),
                 "nodes": cut.nodes, "matmul_flops": int(cut.matmul_flops), "cost": plan.features[i]}
        if plan.boundary is not None and plan.boundary.casts[i]:  # conversions inside this CPU segment's graph
            entry["boundary_casts"] = [{"tensor": t, "to": "float16" if d == "to_fp16" else "float32",
                                        "elements": int(n)} for t, d, n in plan.boundary.casts[i]]
        if plan.prices[i].core_mask is not None:  # the board runner's default, from the prediction
            entry["core_mask"] = plan.prices[i].core_mask
        extra = plan.extra[i] if plan.extra else {}
        if extra:  # an N-split piece: pinned to its core, run beside its group, writing columns of its outputs
            entry.update(parallel=f"{unit.name}.{extra['parallel']}", core_mask=extra["core_mask"],
                         slices=extra["slices"],
                         nsplit={"whole_ms": round(1e3 * extra["whole"]["seconds"], 6),
                                 "whole_core_mask": extra["whole"]["core_mask"],
                                 "pieces_ms": round(1e3 * extra["whole"]["pieces_seconds"], 6)})
        if seg_dir is not None:
            path = seg_dir / f"{sid}.onnx"
            saved = save_segment(cut.model, path)  # large weights in segments/weights/, shared by both plans
            entry["sha256"] = sha256_file(path)
            if saved["weights_sha256"]:
                entry["weights_sha256"] = saved["weights_sha256"]
                # where the runtime finds them without reading the ONNX (one memory map per file, shared)
                entry["external_weights"] = [{**t, "file": f"segments/{t['file']}"} for t in saved["tensors"]]
        seg_entries.append(entry)
    sources = [{"name": src.name,
                "path": os.path.relpath(src.path.resolve(), root.resolve()) if root else str(src.path),
                "sha256": sha256_file(src.path), "dtype": _source_float_dtype(src.model)} for src in unit.sources]
    entry = {"name": unit.name, "policy": policy,
             "inputs": _graph_io(graph.inputs, plan.boundary, "input"),
             "outputs": _graph_io(graph.outputs, plan.boundary, "output"),
             "segments": seg_entries, "placement": report.placement}
    if plan.boundary is not None and plan.boundary.shadows:
        entry["state_shadows"] = {i: {"input": si, "output": so} for i, (si, so) in plan.boundary.shadows.items()}
    if unit.merged or tokens > 1:
        entry["covers"] = [src.name for src in unit.sources]
        entry["sources"] = sources
    else:
        entry["source"] = {k: v for k, v in sources[0].items() if k != "name"}
    if tokens > 1:
        entry["tokens_per_call"] = tokens
    if plan.notes:
        entry["legalized"] = report.notes
    entry.update(planned_by.entry_fields(job.options.state_update))
    if plan.choice is not None:
        entry["auto"] = plan.choice
    return entry, report


def _graph_io(tensors, boundary, side: str) -> list[dict]:
    """A graph entry's inputs or outputs with their board dtypes, and the fp16 copies the boundary added."""
    specs = _io_specs(tensors)
    if boundary is None:
        return specs
    dtypes = boundary.input_dtypes if side == "input" else boundary.output_dtypes
    shape = {t["name"]: t["shape"] for t in specs}
    out = [dict(t, dtype=dtypes.get(t["name"], t["dtype"])) for t in specs]
    from passes.boundary import FP16_SUFFIX

    for name, dt in dtypes.items():
        if name not in shape and name.endswith(FP16_SUFFIX) and name[:-len(FP16_SUFFIX)] in shape:
            out.append(tensor_spec(name, dt, shape[name[:-len(FP16_SUFFIX)]]))
    return out


def _price_reports(data: dict, reports: list[GraphReport], profile) -> None:
    """Each graph's predicted ms per token from the estimate of the whole split (its execution program: the
    conversions it keeps, CPU steps overlapping NPU steps); the totals go into the manifest's `predicted`."""
    from rwkv2rknn.cost.estimate import estimate

    est = estimate(data, profile)
    ms = {("decode", g.name): g.ms_per_token for g in est.decode.graphs}
    if est.prefill is not None:
        ms.update({("prefill", g.name): g.ms_per_token for g in est.prefill.graphs})
    for r in reports:
        r.predicted_ms = ms.get((r.plan, r.name), r.predicted_ms)
    data["predicted"] = {"board": profile.name, "label": est.label,
                         "decode_ms_per_token": round(est.decode_ms_per_token, 6),
                         "prefill_ms_per_token": round(est.prefill_ms_per_token, 6),
                         "decode_overlap_ms": round(est.decode.breakdown["overlap"], 6),
                         "prefill_overlap_ms": round(est.prefill.breakdown["overlap"], 6) if est.prefill else 0.0}


def _write_program(data: dict, stage: Path) -> None:
    """OUT/program.json: the plan lowered to the execution program the runtime executes (no build yet)."""
    from rwkv2rknn.program import PROGRAM_NAME, save
    from rwkv2rknn.program.lower import LoweringError, lower
    from rwkv2rknn.artifacts import source_hashes

    try:
        program = lower(data, None, producer=f"rwkv2rknn {__version__}", source=source_hashes(stage))
    except LoweringError as exc:  # a plan the runtime could not execute is a bug of the split, not the user's
        raise RuntimeError(f"the split's plan does not lower to a program: {exc}") from exc
    save(program, stage / PROGRAM_NAME)


def _source_float_dtype(model: onnx.ModelProto) -> str:
    for v in list(model.graph.input) + list(model.graph.output):
        et = v.type.tensor_type.elem_type
        if et in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT):
            return onnx.helper.tensor_dtype_to_np_dtype(et).name
    return "float32"


def _check_tokenizer(model: RwkvModel) -> None:
    """A tokenizer.json beside the graphs is copied into the output: it must fit the model's vocab."""
    from rwkv2rknn.run.tokenizers import JsonTokenizer

    tok = JsonTokenizer(model.tokenizer_file)
    if tok.vocab_size > model.vocab_size:
        raise UserError(f"{model.tokenizer_file}: {tok.vocab_size} tokens, but head.onnx has {model.vocab_size} "
                        "logits; put the tokenizer the model was trained with beside the graphs")


def _choose_for_model(policy: policies.Policy, paths, out_dir, opts: SplitOptions) -> tuple[dict, list[GraphReport]]:
    """A policy that chooses (auto) on a whole model: it prices the whole model split under each of its model
    candidates (unwritten) and picks one; that split is then written (or, in preview, returned as it is).
    The candidates get their own layer grouping (--layers-per-call is not passed on)."""
    opts = replace(opts, layers_per_call=None)
    previews: dict[str, tuple[dict, list[GraphReport]]] = {}

    def price(candidate: policies.Policy) -> float:
        previews[candidate.name] = split_plan(paths, out_dir, candidate, replace(opts, preview=True))
        return previews[candidate.name][0]["predicted"]["decode_ms_per_token"]

    best, record = policy.choose_model(price, opts.board)
    if opts.preview:
        data, reports = previews[best.name]
        data.update(record)
        return data, reports
    return split_plan(paths, out_dir, best, opts, record=record)


def split_model(paths: list[str | Path], out_dir: str | Path = DEFAULT_OUT, options: SplitOptions | None = None,
                **overrides) -> tuple[dict, list[GraphReport]]:
    """Split source graphs into segments and write OUT/manifest.json + OUT/segments/ (not in preview).

    `options` (rwkv2rknn/options.py; default SplitOptions()); keyword `overrides` replace its fields
    (split_model(paths, out, policy="deep", preview=True)). Returns the manifest data (also in preview, where
    nothing is written) and a report per graph. Each segment carries its cost features; the board profile prices
    the plans. A policy that chooses (auto) on a whole model prices its model candidates and splits under the one
    predicted fastest, recorded as the manifest's `auto`. A prefill plan's graph entries are named prefill.<graph>.
    """
    opts = replace(options or SplitOptions(), **overrides)
    if opts.policy not in policies.names():
        raise UserError(f"--policy {opts.policy!r}: choose one of {', '.join(policies.names())}")
    pol = policies.get(opts.policy)
    if pol.chooses and len(paths) == 1 and Path(paths[0]).is_dir():
        return _choose_for_model(pol, paths, out_dir, opts)
    return split_plan(paths, out_dir, pol, opts)


def split_plan(paths: list[str | Path], out_dir: str | Path, pol: policies.Policy, opts: SplitOptions,
               record: dict | None = None) -> tuple[dict, list[GraphReport]]:
    """One policy's split of the source graphs, never composed at model level (a choosing policy plans per
    graph); `record`: top-level manifest keys (a whole-model choice)."""
    opts = replace(opts, policy=pol.name)
    policy, target, state_update, npu_io = pol.name, opts.target, opts.state_update, opts.npu_io
    layers_per_call, prefill_chunk, shapes = opts.layers_per_call, opts.prefill_chunk, opts.shapes or {}
    if target not in TARGETS:
        raise UserError(f"--target {target!r}: unknown; choose one of {', '.join(TARGETS)}")
    if state_update not in STATE_UPDATES:
        raise UserError(f"--state-update {state_update!r}: choose one of {', '.join(STATE_UPDATES)}")
    if npu_io not in NPU_IO:
        raise UserError(f"--npu-io {npu_io!r}: choose one of {', '.join(NPU_IO)}")
    grouped = pol.groups_layers
    if layers_per_call is not None and not grouped:
        merging = ", ".join(p.name for p in policies.concrete() if p.groups_layers)
        raise UserError(f"--layers-per-call goes with a policy that merges layers ({merging})")
    if state_update != "cpu" and not pol.takes_state_update:
        taking = ", ".join(p.name for p in policies.concrete() if p.takes_state_update)
        raise UserError(f"--state-update {state_update} goes with --policy {taking} (--policy {policy} keeps the "
                        "recurrent state fp32 on the CPU)")
    profile = load_profile(opts.board)
    sources, model = load_sources(paths)
    if model is not None and model.tokenizer_file is not None:
        _check_tokenizer(model)
    if grouped and model is None:
        raise UserError(f"--policy {policy} merges the layers of a whole model: give a model directory "
                        "(embed.onnx, mixing_*.onnx, head.onnx), not single files")
    work = pol.units(model, layers_per_call) if model is not None else [Unit(s.name, [s]) for s in sources]
    if prefill_chunk is not None and (prefill_chunk < 0 or prefill_chunk == 1 or prefill_chunk > MAX_PREFILL_CHUNK):
        raise UserError(f"--prefill-chunk {prefill_chunk}: give 0 (no prefill plan) or 2 to {MAX_PREFILL_CHUNK} "
                        "tokens per call (the prefill graph unrolls the recurrence once per token)")
    chunk_default = default_chunk(model.n_embd if model is not None else None)
    chunk_default = chunk_default if pol.prefill_by_default(state_update) else 0
    chunk = (chunk_default if prefill_chunk is None else prefill_chunk) if model is not None else 0
    if prefill_chunk and model is None:
        raise UserError("--prefill-chunk needs a whole model (a model directory): single graphs have no prompt")
    verify_tokens = opts.verify_tokens
    if verify_tokens and model is None:
        raise UserError("--verify-tokens needs a whole model (a model directory): single graphs have no draft")
    if not 0 <= verify_tokens <= ver.MAX_DRAFT_TOKENS:
        raise UserError(f"--verify-tokens {verify_tokens}: give 0 (no verify plan) or 1 to {ver.MAX_DRAFT_TOKENS} "
                        "drafted tokens per verify call")
    ver_units = ver.verify_units(work) if verify_tokens else []
    ver_of_src = {src.name: u for u in ver_units for src in u.sources}
    ver_entries: list[dict] = []
    max_pre = _prefill_group_layers(pol, opts, model, chunk) if chunk else None
    pre_units, own_head = prefill_units(work, max_pre) if chunk else ([], None)
    pre_of: dict[str, list[Unit]] = {}  # decode unit -> its prefill units (a group's may be smaller groups)
    for pu in pre_units:
        pre_of.setdefault(pu.parent, []).append(pu)
    out_dir = Path(out_dir)
    # disable=None: no bar when stderr is not a terminal (a log or a pipe gets only the result)
    bar = tqdm(work, desc="split", unit="graph", disable=None if opts.progress else True, file=sys.stderr,
               leave=False)
    entries, reports, pre_entries = [], [], []
    source_inputs: set[str] = set()
    written: dict[tuple[str, str], str] = {}  # (graph entry, output) -> the dtype of its buffer on the board
    dec_of = {src.name: u for u in work for src in u.sources}
    pre_of_src = {src.name: u for u in pre_units for src in u.sources}
    if chunk:
        pre_of_src["head"] = own_head or dec_of["head"]

    def link_dtypes(of: dict):
        def dtypes(unit: Unit) -> dict:
            names = {s.name for s in unit.sources}
            out = {}
            for a, o, b, i in model.family.links(model.n_layer):
                if b in names and a in of and of[a] is not unit:
                    src, dst = tensor_ref(of[a], a, o), tensor_ref(unit, b, i)
                    if (src["graph"], src["name"]) in written:
                        out[dst["name"]] = written[(src["graph"], src["name"])]
            return out
        return dtypes

    def note_written(entry: dict) -> None:
        for t in entry["outputs"]:
            written[(entry["name"], t["name"])] = t["dtype"]

    def run(stage: Path | None):
        seg_dir = None
        if stage is not None:
            seg_dir = stage / "segments"
            seg_dir.mkdir()
        job = _Job(pol, opts, profile, model, seg_dir, out_dir if stage is not None else None)
        for unit in bar:
            bar.set_postfix_str(unit.name)
            subs = pre_of.get(unit.name, [])
            whole = subs[0] if len(subs) == 1 and len(subs[0].sources) == len(
                [s for s in unit.sources if s.name != "head"]) else None
            (entry, report), *pre = _split_unit(
                unit, job, whole, chunk, link_dtypes(dec_of) if model else None,
                link_dtypes(pre_of_src) if model and chunk else None)
            if whole is None:
                for sub in subs:  # a group's prefill counterpart in smaller groups (compile time)
                    got = _split_prefill_unit(sub, job, chunk, link_dtypes(pre_of_src))
                    note_written(got[0][0])  # the next smaller group reads what this one writes
                    pre += got
            note_written(entry)
            for e, _ in pre:
                note_written(e)
            if verify_tokens:  # the verify plan's counterpart of this unit, k + 1 rows per call
                ve, vr = ver.split_verify_unit(ver_units[work.index(unit)], job, verify_tokens + 1,
                                               link_dtypes(ver_of_src))
                note_written(ve)
                ver_entries.append(ve)
                reports.append(vr)
            if own_head is not None and own_head.sources[0] in unit.sources:  # deep: the head runs once per chunk
                pre += _split_unit(own_head, job, link_dtypes=link_dtypes(pre_of_src))
            for src in unit.sources:
                source_inputs.update(i.name for i in src.model.graph.input)
                src.release()  # let the source weights go before the next graph loads its own
            entries.append(entry)
            reports.append(report)
            for e, r in pre:
                r.plan = "prefill"
                pre_entries.append(e)
                reports.append(r)
        unused = sorted(set(shapes) - source_inputs)
        if unused:  # a typo in --shape must not pass silently
            raise UserError(f"--shape {unused[0]}=...: no graph has an input named {unused[0]!r}")

    def manifest_data() -> dict:
        loop = model_loop(model, work, entries, opts.npu_all) if model else None
        data = {"format_version": FORMAT_VERSION, "producer": f"rwkv2rknn {__version__}",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "target": target, "policy": policy, "npu_all": opts.npu_all, "board": profile.name,
                "graphs": entries, "model": loop, **(record or {})}
        if pre_entries:
            head = own_head or next(u for u in work if u.name == "head")
            data["prefill"] = {**prefill_loop(model, pre_units, head, loop, pre_entries, chunk, entries),
                               "graphs": pre_entries}
        if ver_entries:
            data["verify"] = {**ver.verify_loop(model, ver_units, loop, ver_entries, verify_tokens + 1),
                              "graphs": ver_entries}
        return data

    if opts.preview:
        run(None)
        data = manifest_data()
        _price_reports(data, reports, profile)
    else:
        with staged_directory(out_dir, force=opts.force) as stage:
            run(stage)
            data = manifest_data()
            _price_reports(data, reports, profile)
            if model is not None and model.tokenizer_file is not None:
                shutil.copyfile(model.tokenizer_file, stage / "tokenizer.json")
            validate(data, out_dir / MANIFEST_NAME)
            write_json_atomic(stage / MANIFEST_NAME, data)
            _write_program(data, stage)
    return data, reports
