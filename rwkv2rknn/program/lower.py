"""Lowering: a split's plan and a build's record become the execution program (docs/runtime-abi.md).

Pure data work (standard library only): `split` and `build` call it and write OUT/program.json; the runtime
calls it only for an output made before programs existed.

What it decides, once, so that no runner has to:
- a buffer per tensor that crosses a segment boundary, in the dtype its writer gives; a link between graphs is
  the same buffer (no copy), a prefill link to the head's last row is a view of it;
- a recurrent state is a pair of buffers that swap roles every token (ping-pong): the steps read one and write
  the other, nothing is copied; the prefill plan uses the same pair; an fp16 shadow (the copy an NPU segment
  reads) is a pair of its own, written in the same pass as the state;
- a `convert` step only where a buffer's dtype differs from what its reader declares (an fp32 link into an
  NPU segment, a state whose shadow the other plan does not keep up to date);
- every step's dependencies, and which CPU steps may overlap the next NPU step (nothing later in the run
  reads their outputs: a state update that feeds only the next token);
- the bytes converted per run and where (casts inside CPU graphs, convert steps, the NPU runtime converting
  an fp32 boundary). The sampler reads the logits buffer in whatever dtype the head writes; that is the
  sampler's business, not a step of the program.
"""

from __future__ import annotations

import math

from rwkv2rknn.artifacts import join, plan_graphs
from rwkv2rknn.program import ITEMSIZE, VERIFY_VERSION, Buffer, Plan, Program, Segment, State, Step, Tensor

FP32_BYTES = 4  # conversions are counted in fp32-side bytes (4 per element), as the board profiles price them
FP16_SUFFIX = "@fp16"


class LoweringError(ValueError):
    pass


def _tensor(t: dict) -> Tensor:
    return Tensor(t["name"], t["dtype"], [int(d) for d in t["shape"]])


def _elements(shape) -> int:
    return int(math.prod(shape)) if shape else 1


def segment_of(seg: dict, assume_precision: str | None = None) -> Segment:
    """A program segment from a (joined) manifest segment entry (assume_precision: an NPU segment's precision
    where no build recorded one)."""
    device = "cpu" if seg["backend"] == "cpu" or seg.get("fallback_reason") else "npu"
    return Segment(id=seg["id"], device=device, onnx=seg["onnx"], inputs=[_tensor(t) for t in seg["inputs"]],
                   outputs=[_tensor(t) for t in seg["outputs"]], onnx_sha256=seg.get("sha256"),
                   rknn=seg.get("rknn") if device == "npu" else None,
                   rknn_sha256=seg.get("rknn_sha256") if device == "npu" else None,
                   precision=seg.get("precision") or (assume_precision if device == "npu" else None),
                   core_mask=seg.get("core_mask"),
                   casts=list(seg.get("boundary_casts") or []),
                   planned="cpu" if seg["backend"] == "cpu" and not seg.get("fallback_reason") else "npu",
                   fallback_reason=seg.get("fallback_reason"),
                   calib=seg.get("calib") if device == "npu" else None,
                   parallel=seg.get("parallel"), slices=dict(seg.get("slices") or {}),
                   hybrid=seg.get("hybrid") if device == "npu" else None,
                   weights=list(seg.get("external_weights") or []))


class _Lowerer:
    def __init__(self, data: dict, assume_precision: str | None = None):
        self.data = data
        self.assume_precision = assume_precision
        self.buffers: list[Buffer] = []
        self.segments: dict[str, Segment] = {}
        self.graph_by_name = {g["name"]: g for g in plan_graphs(data)}
        self.graphs: dict = {}  # graph name -> {plan, inputs, outputs, steps}: for running one graph alone

    # -- buffers ----------------------------------------------------------------------------------------
    def buffer(self, name: str, dtype: str, shape, role: str = "activation", view_of=None, offset=0) -> int:
        b = Buffer(len(self.buffers), name, dtype, [int(d) for d in shape], role, view_of, offset)
        self.buffers.append(b)
        return b.id

    def state_rows(self, states: list[dict]) -> list[dict]:
        """A verify plan's per-row state buffers: {state, rows: [buffer after row 0, 1, ...]} per state (the state
        after the last row is the pair's written buffer, as in every plan)."""
        out = []
        for k, st in enumerate(states):
            outs = self.graphs[st["graph"]]["outputs"]
            missing = [n for n in st["row_outputs"] if n not in outs]
            if missing:
                raise LoweringError(f"verify plan: graph {st['graph']} writes no {missing[0]}")
            rows = [outs[n] for n in st["row_outputs"]]
            for b in rows:
                self.buffers[b].role = "state_row"
            out.append({"state": k, "rows": rows})
        return out

    # -- one plan ---------------------------------------------------------------------------------------
    def lower_plan(self, name: str, graph_names: list[str], tokens: int, links: list[dict], token_ref: dict | None,
                   logits_ref: dict | None, states: list[dict], state_slots: list[_Slot]) -> Plan:
        steps: list[Step] = []
        writer: dict[int, int] = {}          # buffer id -> step id in this run
        tables: dict[str, dict[str, int]] = {}
        conversions: list[dict] = []
        converted: dict[tuple[int, str], int] = {}
        links_into = {(lk["to"]["graph"], lk["to"]["name"]): lk for lk in links}
        views: dict[int, int] = {}
        state_in, state_out, shadow_in, shadow_out = {}, {}, {}, {}
        for k, st in enumerate(states):
            state_in[(st["graph"], st["input"])] = k
            state_out[(st["graph"], st["output"])] = k
            if st.get("shadow"):
                shadow_in[(st["graph"], st["shadow"]["input"])] = k
                shadow_out[(st["graph"], st["shadow"]["output"])] = k
        token_buf = None
        pending_end: list[tuple[int, int, str]] = []  # (src, dst, what) converts appended after the last step
        current = {"graph": ""}  # the graph being lowered: its steps (and the converts feeding it) belong to it

        def add_step(step: Step) -> Step:
            step.id = len(steps)
            step.deps = sorted({writer[b] for b in step.inputs if b in writer}
                               | {writer[self.buffers[b].view_of] for b in step.inputs
                                  if self.buffers[b].view_of is not None and self.buffers[b].view_of in writer})
            steps.append(step)
            for b in step.outputs:
                writer[b] = step.id
                if self.buffers[b].view_of is not None:  # a column slice: the whole buffer is done after it
                    writer[self.buffers[b].view_of] = step.id
            return step

        def convert(src: int, dtype: str, dst: int | None = None, what: str = "") -> int:
            key = (src, dtype)
            if dst is None and key in converted:
                return converted[key]
            sb = self.buffers[src]
            if dst is None:
                dst = self.buffer(f"{sb.name}@{dtype}", dtype, sb.shape, sb.role if sb.role != "state" else "activation")
            nbytes = _elements(sb.shape) * FP32_BYTES
            step = add_step(Step(0, "convert", [src], [dst], "cpu", graph=current["graph"], converted_bytes=nbytes))
            conversions.append({"step": step.id, "kind": "cpu", "where": what or "convert step", "tensor": sb.name,
                                "bytes": nbytes})
            if dst is not None:
                converted[key] = dst
            return dst

        def as_dtype(b: int, dtype: str) -> int:
            return b if self.buffers[b].dtype == dtype else convert(b, dtype, what="convert step (dtype of the "
                                                                                   "writer differs from the reader)")

        def view_last_row(src: int, want: Tensor) -> int:
            if src in views:
                return views[src]
            sb = self.buffers[src]
            rows = sb.shape[0] if sb.shape else 1
            row_elems = _elements(sb.shape) // max(1, rows)
            if row_elems != want.elements:
                raise LoweringError(f"a last-row link from {sb.name} {sb.shape} cannot feed {want.name} {want.shape}")
            v = self.buffer(f"{sb.name}[-1]", sb.dtype, want.shape, "activation", view_of=src,
                            offset=(rows - 1) * row_elems * ITEMSIZE[sb.dtype])
            views[src] = v
            return v

        for k, slot in enumerate(state_slots):  # a shadow another plan lets go stale is refreshed first
            if slot.refresh_at_start.get(name):
                convert(slot.pair[0], "float16", dst=slot.shadow[0], what=f"refresh the fp16 copy of state {k}")

        for gname in graph_names:
            g = self.graph_by_name.get(gname)
            if g is None:
                raise LoweringError(f"plan {name} names graph {gname!r}, which the manifest does not have")
            table = tables.setdefault(gname, {})
            current["graph"] = gname
            first_step = len(steps)
            info = self.graphs.setdefault(gname, {"plan": name, "inputs": {}, "outputs": {}, "steps": []})
            own = info["plan"] == name  # the head of a prefill plan is the decode plan's graph: recorded once

            def resolve(t: Tensor, gname: str = gname) -> int:
                nonlocal token_buf
                key = (gname, t.name)
                if token_ref and key == (token_ref["graph"], token_ref["name"]):
                    if token_buf is None:
                        token_buf = self.buffer(f"{name}/{gname}/{t.name}", t.dtype, t.shape, "token")
                    return token_buf
                if key in state_in:
                    return state_slots[state_in[key]].pair[0]
                if key in shadow_in:
                    return state_slots[shadow_in[key]].shadow[0]
                if key in links_into:
                    lk = links_into[key]
                    src_tab = tables.get(lk["from"]["graph"])
                    if src_tab is None or lk["from"]["name"] not in src_tab:
                        raise LoweringError(f"link {lk['from']} -> {lk['to']}: nothing in plan {name} writes its "
                                            "source before it is read")
                    src = src_tab[lk["from"]["name"]]
                    return view_last_row(src, t) if lk.get("last") else src
                if self.data.get("model") is None:  # a single graph: its inputs are its user's
                    return self.buffer(f"{name}/{gname}/{t.name}", t.dtype, t.shape, "input")
                raise LoweringError(f"graph {gname} input {t.name!r} is fed by no link, state or token")

            whole_cols: dict[str, int] = {}  # an N-split output: its columns over all pieces
            for raw in g["segments"]:
                for sl in (raw.get("slices") or {}).values():
                    whole_cols[sl["of"]] = max(whole_cols.get(sl["of"], 0), int(sl["stop"]))
            for raw in g["segments"]:
                seg = self.segments.setdefault(raw["id"], segment_of(raw, self.assume_precision))
                ins = []
                for t in seg.inputs:
                    if t.name in table:
                        b = table[t.name]
                    else:
                        b = table[t.name] = resolve(t)
                        if own:
                            info["inputs"][t.name] = b
                    ins.append(as_dtype(b, t.dtype))
                outs = []
                late = []
                for t in seg.outputs:
                    key = (gname, t.name)
                    if key in state_out:
                        slot = state_slots[state_out[key]]
                        b = slot.pair[1]
                        if self.buffers[b].dtype != t.dtype:  # written in another dtype: converted after the run
                            tmp = self.buffer(f"{name}/{gname}/{t.name}", t.dtype, t.shape)
                            late.append((tmp, b))
                            b = tmp
                    elif key in shadow_out:
                        b = state_slots[shadow_out[key]].shadow[1]
                    elif t.name in seg.slices:  # columns [start, stop) of a whole output: a view of its buffer
                        sl = seg.slices[t.name]
                        whole = table.get(sl["of"])
                        if whole is None and (gname, sl["of"]) in state_out:
                            whole = table[sl["of"]] = state_slots[state_out[(gname, sl["of"])]].pair[1]
                        if whole is None:
                            whole = table[sl["of"]] = self.buffer(f"{name}/{gname}/{sl['of']}", t.dtype,
                                                                   t.shape[:-1] + [whole_cols[sl["of"]]])
                        b = self.buffer(f"{name}/{gname}/{t.name}", t.dtype, t.shape, view_of=whole,
                                        offset=int(sl["start"]) * ITEMSIZE[t.dtype])
                    else:
                        b = self.buffer(f"{name}/{gname}/{t.name}", t.dtype, t.shape)
                    table[t.name] = b
                    outs.append(b)
                casts = sum(int(c["elements"]) * FP32_BYTES for c in seg.casts)
                npu_conv = 0
                if seg.device == "npu":  # an fp32 boundary of an NPU segment: the NPU runtime converts it. (A w8a8
                    # model quantizes its fp16 inputs and dequantizes its outputs itself: exDataConvert ops inside
                    # it, which rknn-toolkit2 2.5.0's table places on the NPU; they are priced as its ops.)
                    npu_conv = sum(t.elements * FP32_BYTES for t in seg.inputs + seg.outputs if t.dtype == "float32")
                step = add_step(Step(0, "run", ins, outs, seg.device, graph=gname, segment=seg.id,
                                     core_mask=seg.core_mask if seg.device == "npu" else None,
                                     converted_bytes=casts + npu_conv,
                                     parallel=seg.parallel if seg.device == "npu" else None))
                for c in seg.casts:
                    conversions.append({"step": step.id, "kind": "cpu", "where": f"cast inside {seg.id} (onnxruntime)",
                                        "tensor": c["tensor"], "bytes": int(c["elements"]) * FP32_BYTES})
                if npu_conv:
                    conversions.append({"step": step.id, "kind": "npu_runtime",
                                        "where": f"NPU runtime, fp32 boundary of {seg.id}",
                                        "tensor": ",".join(t.name for t in seg.inputs + seg.outputs
                                                           if t.dtype == "float32"), "bytes": npu_conv})
                for tmp, b in late:
                    pending_end.append((tmp, b, "state written in another dtype than it is kept"))
            if own:
                info["steps"] = list(range(first_step, len(steps)))
                for t in g["outputs"]:
                    if t["name"] in table:
                        info["outputs"][t["name"]] = table[t["name"]]
                        if self.data.get("model") is None:
                            self.buffers[table[t["name"]]].role = "output"
        current["graph"] = ""

        for src, dst, what in pending_end:
            convert(src, self.buffers[dst].dtype, dst=dst, what=what)
        for k, slot in enumerate(state_slots):  # the plan updates the state but not the shadow the other reads
            if slot.refresh_at_end.get(name):
                convert(slot.pair[1], "float16", dst=slot.shadow[1], what=f"update the fp16 copy of state {k}")

        logits = None
        if logits_ref is not None:
            logits = tables.get(logits_ref["graph"], {}).get(logits_ref["name"])
            if logits is None:
                raise LoweringError(f"plan {name}: nothing writes the logits {logits_ref}")
            self.buffers[logits].role = "logits"
        _mark_overlap(steps, self.buffers, logits)
        total = sum(c["bytes"] for c in conversions)
        return Plan(name, tokens, steps, token_buf, logits, conversions, total)


class _Slot:
    """The buffers of one recurrent state: its ping-pong pair, and the fp16 shadow's pair if a plan reads one."""

    def __init__(self, pair, shadow=None):
        self.pair, self.shadow = pair, shadow
        self.refresh_at_start: dict[str, bool] = {}
        self.refresh_at_end: dict[str, bool] = {}


def _mark_overlap(steps: list[Step], buffers: list, logits: int | None) -> None:
    """A CPU run step whose outputs nothing later in the run reads (and which writes no logits) may overlap.
    A view (a last-row pick, a column slice) is a read of the buffer it views, and a write of a view is a write
    of its buffer: the runner does not wait for an overlapped step before a later step reads through a view."""
    def base(b: int) -> set[int]:
        return {b} if buffers[b].view_of is None else {b, buffers[b].view_of}

    read_later: set[int] = set()
    for step in reversed(steps):
        outs = set().union(*(base(b) for b in step.outputs)) if step.outputs else set()
        step.overlap = (step.op == "run" and step.device == "cpu" and not (outs & read_later)
                        and logits not in outs)
        for b in step.inputs:
            read_later |= base(b)


def lower(plan: dict, record: dict | None = None, producer: str = "", source: dict | None = None,
          assume_precision: str | None = None) -> Program:
    """The execution program of a plan (manifest data, format 3) and a build record (None before a build).
    assume_precision: an NPU segment's precision where the build recorded none (the estimate's what-if)."""
    data = join(plan, record)
    low = _Lowerer(data, assume_precision)
    model = data.get("model")
    states: list[State] = []
    slots: list[_Slot] = []
    plans: dict[str, Plan] = {}
    if model is not None:
        pre = data.get("prefill") or None
        pre_states = (pre or {}).get("state") or []
        ver = data.get("verify") or None
        ver_states = (ver or {}).get("state") or []
        for k, st in enumerate(model["state"]):
            label = f"state/{st['graph']}/{st['input']}"
            a = low.buffer(f"{label}.a", st["dtype"], st["shape"], "state")
            b = low.buffer(f"{label}.b", st["dtype"], st["shape"], "state")
            has_shadow = [bool(st.get("shadow")), bool(k < len(pre_states) and pre_states[k].get("shadow")),
                          bool(k < len(ver_states) and ver_states[k].get("shadow"))]
            shadow = None
            if any(has_shadow) and st["dtype"] == "float32":
                shadow = [low.buffer(f"{label}@fp16.a", "float16", st["shape"], "state"),
                          low.buffer(f"{label}@fp16.b", "float16", st["shape"], "state")]
            slot = _Slot([a, b], shadow)
            if shadow and pre is not None and has_shadow[0] != has_shadow[1]:
                # keep the copy fresh from the prefill plan (it runs once per chunk, decode once per token)
                if has_shadow[1]:
                    slot.refresh_at_start["prefill"] = True
                else:
                    slot.refresh_at_end["prefill"] = True
            if shadow and ver is not None and has_shadow[0] != has_shadow[2]:  # the same for the verify plan
                slot.refresh_at_start["verify"] = has_shadow[2]
                slot.refresh_at_end["verify"] = not has_shadow[2]
            slots.append(slot)
            init = st.get("init") or {}
            states.append(State(label, st["dtype"], [int(d) for d in st["shape"]], [a, b],
                                float(init.get("fill", 0.0)), dict(init.get("rows") or {}), shadow))
        decode_names = [g["name"] for g in data["graphs"]]
        plans["decode"] = low.lower_plan("decode", decode_names, 1, model["links"], model["token_input"],
                                         model["logits"], model["state"], slots)
        if pre is not None:
            plans["prefill"] = low.lower_plan("prefill", pre["order"], int(pre["chunk"]), pre["links"],
                                              pre["token_input"], pre["logits"], pre_states, slots)
        if ver is not None:
            plans["verify"] = low.lower_plan("verify", ver["order"], int(ver["rows"]), ver["links"],
                                             ver["token_input"], ver["logits"], ver_states, slots)
            plans["verify"].state_rows = low.state_rows(ver_states)
    else:
        plans["decode"] = low.lower_plan("decode", [g["name"] for g in data["graphs"]], 1, [], None, None, [], [])
    model_info = None
    if model is not None:
        model_info = {k: model.get(k) for k in ("family", "vocab_size", "tokenizer", "n_layer", "n_embd",
                                                  "state_tuning")}
    probes = [segment_of(p) for p in (data.get("build") or {}).get("probes") or [] if p.get("rknn")]
    version = VERIFY_VERSION if "verify" in plans else 1  # a runtime without the verify plan runs the rest
    return Program(version, producer, data.get("target", "rk3588"), model_info, low.segments, low.buffers,
                   states, plans, low.graphs, dict(source or {}), [], probes)


__all__ = ["LoweringError", "lower", "segment_of"]
