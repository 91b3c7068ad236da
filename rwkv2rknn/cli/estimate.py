"""`rwkv2rknn estimate`: PREDICT the per-token time of a split on the board, from a board profile."""

from __future__ import annotations

import json
import sys

from rwkv2rknn.manifest import DEFAULT_OUT, MANIFEST_NAME
from rwkv2rknn.cli import console as make_console

_SHORT = {"npu_stream": "NPU stream", "npu_compute": "NPU compute", "npu_call": "NPU calls", "io_copy": "NPU I/O copies",
          "conversion": "fp32<->fp16", "hops": "CPU hops", "cpu_compute": "CPU compute", "cpu_call": "CPU calls",
          "overlap": "overlap (saved)"}


def register(sub) -> None:
    p = sub.add_parser(
        "estimate",
        help="predict ms/token on the board from a board profile (a prediction, not a measurement)",
        description="Price every segment of OUT/manifest.json with a board profile's constants (per NPU call, "
        "fp32<->fp16 conversion, CPU-fallback hops, weight streaming on one or three NPU cores, onnxruntime "
        "on the CPU) and print the predicted time per token, per graph and in total, with the CPU-only plan "
        "of the same model for comparison. Every figure is a PREDICTION; the profile names the source of "
        "each constant. Uses the features `split` stores per segment, or reads the segment ONNX files.",
    )
    p.add_argument("out", nargs="?", default=DEFAULT_OUT, metavar="OUT",
                   help=f"split/build output directory, or its {MANIFEST_NAME} (default: {DEFAULT_OUT})")
    p.add_argument("--board", default="rk3588", metavar="NAME|FILE",
                   help="board profile: rk3588 (default; SDK 2.x through Python RKNNLite), rk3588-c (SDK 2.x through "
                   "librknnrt's C API, buffers bound once: `run --backend rknn-c`), rk3588-2023 (SDK 1.5.2, the 2023 "
                   "attempt), or a .toml file, e.g. one written by board calibration. Both runtimes' totals are "
                   "printed side by side whichever is named")
    p.add_argument("--tokens-per-call", type=int, default=1, metavar="T",
                   help="price the plan as if every call processed T tokens (default 1: decode)")
    p.add_argument("--precision", choices=["fp16", "w8a8"], default=None,
                   help="price NPU segments as if built at this precision (before a build that takes an hour); a "
                   "build's recorded per-segment precision replaces the assumption (default: the build's, else fp16)")
    p.add_argument("--segments", action="store_true", help="also print every segment")
    from rwkv2rknn.cli.estimate_draft import add_arguments

    add_arguments(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (on the last line of stdout) instead of tables")
    p.set_defaults(func=run)


def _loader(manifest):
    import onnx

    from rwkv2rknn.errors import UserError

    def load(graph: dict, seg: dict):
        path = manifest.resolve(seg["onnx"])
        if not path.is_file():
            raise UserError(f"{manifest.path}: segment {seg['id']} has no stored cost features and its file "
                            f"{seg['onnx']} is missing; copy the whole output directory, or split again")
        try:
            return onnx.load(str(path))
        except Exception as exc:
            raise UserError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0][:200]}); "
                            "split again") from None

    return load


def run(args) -> int:
    from rwkv2rknn.cost.estimate import estimate, with_features
    from rwkv2rknn.cost.memory import board_memory
    from rwkv2rknn.cost.profile import load_profile
    from rwkv2rknn.errors import UserError
    from rwkv2rknn.manifest import Manifest

    if args.tokens_per_call < 1:
        raise UserError(f"--tokens-per-call {args.tokens_per_call}: must be at least 1")
    from rwkv2rknn.cli import estimate_draft

    estimate_draft.check(args)
    from rwkv2rknn.cost.estimate import program_of

    profile = load_profile(args.board)
    manifest = Manifest.load(args.out, check_files=False)
    data, computed = with_features(manifest.data, _loader(manifest))
    program = program_of(data, args.precision or (data.get("build") or {}).get("precision", "fp16"))
    est = estimate(data, profile, args.tokens_per_call, program=program, precision=args.precision)
    cpu = estimate(data, profile, args.tokens_per_call, all_cpu=True)
    result = summary(est, cpu, manifest, computed)
    result["conversion"] = conversion_summary(program, profile)
    result["runtimes"] = runtimes(data, program, args.tokens_per_call, profile, args.precision)
    result["precision"] = args.precision or (data.get("build") or {}).get("precision", "fp16")
    mem = board_memory(data, program, result["precision"], profile.npu_context_bytes)
    result["board_memory_bytes"] = mem.board_memory_bytes
    result["memory"] = mem.to_dict()
    if not args.json:
        print_tables(est, cpu, result, profile, args.segments)
        print_runtimes(result["runtimes"])
        print_memory(mem, profile)
    if args.draft:
        result["speculative"] = estimate_draft.run(args, data, program, profile, _loader(manifest),
                                                   RUNTIME_PROFILES, _loader)
    if args.json:
        print(json.dumps(result))
    return 0


RUNTIME_PROFILES = {"rk3588": "Python RKNNLite (copies each call's inputs and outputs)",
                    "rk3588-c": "librknnrt C API (buffers bound once, zero copy)"}


def runtimes(data: dict, program, tokens_per_call: int, named, precision: str | None = None) -> dict:
    """The same plan priced on each runtime's profile (and the named one): decode and prefill ms per token."""
    from rwkv2rknn.cost.estimate import estimate
    from rwkv2rknn.cost.profile import load_profile

    out = {}
    for name in list(RUNTIME_PROFILES) + ([named.name] if named.name not in RUNTIME_PROFILES else []):
        prof = named if name == named.name else load_profile(name)
        e = estimate(data, prof, tokens_per_call, program=program, precision=precision)
        out[name] = {"runtime": RUNTIME_PROFILES.get(name, str(prof.path)), "decode_ms_per_token": e.decode_ms_per_token,
                     "prefill_ms_per_token": e.prefill_ms_per_token, "conversion_ms_per_token": e.breakdown["conversion"],
                     "io_copy_ms_per_token": e.breakdown["io_copy"], "overlap_ms_per_token": e.breakdown["overlap"],
                     "predicted": True}
    return out


def conversion_summary(program, profile) -> dict | None:
    """The program's conversions per decoded token (fp32-side bytes) and the profile's price of them."""
    if program is None:
        return None
    plan = program.decode
    cpu = sum(c["bytes"] for c in plan.conversions if c.get("kind") != "npu_runtime") / plan.tokens
    npu = sum(c["bytes"] for c in plan.conversions if c.get("kind") == "npu_runtime") / plan.tokens
    return {"converted_bytes_per_token": cpu + npu, "cpu_bytes_per_token": cpu, "npu_runtime_bytes_per_token": npu,
            "cpu_convert_ns_per_byte": profile.cpu_convert_ns_per_byte,
            "npu_runtime_ns_per_byte": profile.conv_in_ns_per_byte,
            "ms_per_token": (cpu * profile.cpu_convert_ns_per_byte + npu * profile.conv_in_ns_per_byte) * 1e-6}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def print_memory(mem, profile) -> None:
    """One line of the predicted board memory and what holds it."""
    parts = [f"NPU weights {_gb(v)} ({k})" for k, v in mem.npu_weight_bytes.items() if v]
    parts += [f"CPU weights {_gb(v)} ({k})" for k, v in mem.cpu_weight_bytes.items() if v]
    parts += [f"buffers {_gb(mem.buffer_bytes)}", f"{mem.npu_contexts} NPU contexts {_gb(mem.npu_context_bytes)}"]
    line = f"PREDICTED board memory: {_gb(mem.board_memory_bytes)} = " + " + ".join(parts)
    if mem.shareable_bytes:
        line += (f"; {_gb(mem.shareable_bytes)} of it are weights both plans hold (equal tensors in two .rknn "
                 "files)")
    make_console().print(line + f" (board profile {profile.name})", soft_wrap=True)


def print_runtimes(rt: dict) -> None:
    from rich.table import Table

    console = make_console()
    table = Table(title="the same plan on each NPU runtime, ms per token: PREDICTED (board profiles, not measured)",
                  title_justify="left")
    for col in ("board profile", "runtime", "decode", "prefill", "conversion", "I/O copies", "overlap"):
        table.add_column(col, justify="left" if col in ("board profile", "runtime") else "right", no_wrap=True)
    for name, r in rt.items():
        table.add_row(name, r["runtime"], f"{r['decode_ms_per_token']:.2f}", f"{r['prefill_ms_per_token']:.2f}",
                      f"{r['conversion_ms_per_token']:.2f}", f"{r['io_copy_ms_per_token']:.2f}",
                      f"{r['overlap_ms_per_token']:.2f}")
    console.print(table)


def summary(est, cpu, manifest, computed: int) -> dict:
    """The JSON object: the prediction, per graph and per segment, and the CPU-only comparison."""
    from rwkv2rknn.cost.estimate import verdict

    d = est.to_dict()
    graphs = d["decode"]["graphs"]
    ratio = cpu.decode_ms_per_token / est.decode_ms_per_token if est.decode_ms_per_token else float("inf")
    return {
        "predicted": True, "label": est.label, "board": est.board, "board_file": est.board_file,
        "board_files": est.board_files, "manifest": str(manifest.path), "policy": est.policy,
        "tokens_per_call": est.tokens_per_call,
        "decode_ms_per_token": est.decode_ms_per_token, "prefill_ms_per_token": est.prefill_ms_per_token,
        "prefill_plan": est.prefill_plan, "npu_calls_per_token": est.npu_calls_per_token,
        "cpu_calls_per_token": est.cpu_calls_per_token, "breakdown": est.breakdown,
        "measured_ms_per_token": d["decode"]["measured_ms_per_token"],
        "graphs": graphs,
        "prefill_graphs": d["prefill"]["graphs"] if d["prefill"] else None,
        "cpu_only": {"decode_ms_per_token": cpu.decode_ms_per_token, "prefill_ms_per_token": cpu.prefill_ms_per_token,
                     "cpu_calls_per_token": cpu.cpu_calls_per_token, "breakdown": cpu.breakdown,
                     "plan": "every graph one onnxruntime session on the CPU (the same features)"},
        "speedup_vs_cpu_only": ratio,
        "loses_to_cpu_only": verdict(est.decode_ms_per_token, cpu.decode_ms_per_token) == "LOSES to",
        "features_from_onnx": computed,
    }


def print_tables(est, cpu, result: dict, profile, show_segments: bool) -> None:
    from rich.table import Table

    from rwkv2rknn.cost.estimate import CATEGORIES, core_mask_name, verdict

    console = make_console()
    tag = f"predicted (board profile {profile.name}, not measured)"
    table = Table(title=f"per graph, ms per token: {tag}", title_justify="left")
    for col in ("graph", "NPU calls", "CPU calls", "CPU hops", "core mask", "ms/token"):
        table.add_column(col, justify="left" if col == "graph" else "right", no_wrap=True)
    for g in est.decode.graphs:
        masks = sorted({s.core_mask for s in g.segments if s.core_mask is not None})
        hops = sum(s.hops for s in g.segments)
        table.add_row(g.name, str(g.npu_calls), str(g.cpu_calls), str(hops),
                      ",".join(core_mask_name(m) for m in masks) or "-", f"{g.ms_per_token:.3f}")
    table.add_row("total", f"{est.npu_calls_per_token * est.tokens_per_call:g}",
                  f"{est.cpu_calls_per_token * est.tokens_per_call:g}", "", "", f"{est.decode_ms_per_token:.2f}",
                  style="bold")
    console.print(table)
    if show_segments:
        st = Table(title=f"per segment, ms per call: {tag}", title_justify="left")
        for col in ("segment", "runs on", "core mask", "1 core", "3 cores", "hops", "ms/call", "measured"):
            st.add_column(col, justify="left" if col in ("segment", "runs on") else "right", no_wrap=True)
        for g in est.decode.graphs:
            for s in g.segments:
                st.add_row(s.id, s.runs_on, core_mask_name(s.core_mask),
                           "-" if s.one_core_ms is None else f"{s.one_core_ms:.3f}",
                           "-" if s.three_core_ms is None else f"{s.three_core_ms:.3f}", str(s.hops),
                           f"{s.ms:.3f}", "-" if s.measured_ms is None else f"{s.measured_ms:.3f}")
        console.print(st)
    bt = Table(title=f"where the time goes, ms per token: {tag}", title_justify="left")
    for col in ("category", "this plan", "share", "CPU-only plan"):
        bt.add_column(col, justify="left" if col == "category" else "right")
    total = est.decode_ms_per_token or 1.0
    for k in CATEGORIES:
        bt.add_row(_SHORT[k], f"{est.breakdown[k]:.2f}", f"{100 * est.breakdown[k] / total:.0f}%",
                   f"{cpu.breakdown[k]:.2f}")
    bt.add_row("total", f"{est.decode_ms_per_token:.2f}", "100%", f"{cpu.decode_ms_per_token:.2f}", style="bold")
    console.print(bt)
    t = est.tokens_per_call
    console.print(f"PREDICTED decode: {est.decode_ms_per_token:.1f} ms/token, {est.npu_calls_per_token:g} NPU calls "
                  f"per token{'' if t == 1 else f' ({t} tokens per call)'}; prefill: {est.prefill_ms_per_token:.1f} "
                  f"ms/token ({est.prefill_plan}). Core masks: 1 = NPU_CORE_0, 7 = NPU_CORE_0_1_2.", soft_wrap=True)
    ratio = result["speedup_vs_cpu_only"]
    versus = verdict(est.decode_ms_per_token, cpu.decode_ms_per_token)
    if versus == "LOSES to":
        console.print(f"[bold red]The prediction says this plan LOSES to the CPU-only plan[/bold red]: "
                      f"{est.decode_ms_per_token:.1f} vs {cpu.decode_ms_per_token:.1f} ms/token "
                      f"({1 / ratio:.2f}x slower) on board profile {profile.name}.", soft_wrap=True)
    elif versus == "ties with":
        console.print(f"The prediction says this plan ties with the CPU-only plan: {est.decode_ms_per_token:.1f} "
                      f"ms/token on board profile {profile.name}.", soft_wrap=True)
    else:
        console.print(f"The prediction says this plan beats the CPU-only plan: {est.decode_ms_per_token:.1f} vs "
                      f"{cpu.decode_ms_per_token:.1f} ms/token ({ratio:.2f}x faster) on board profile "
                      f"{profile.name}.", soft_wrap=True)
    if result["measured_ms_per_token"] is not None:
        console.print(f"Board timings in the profile (sum of measured segments): "
                      f"{result['measured_ms_per_token']:.1f} ms/token.", soft_wrap=True)
    console.print(f"These are predictions, not measurements: constants and their sources are in {profile.path}"
                  + (f" (base {', '.join(str(f) for f in profile.files[:-1])})" if len(profile.files) > 1 else ""),
                  soft_wrap=True)
    if result["features_from_onnx"]:
        print(f"note: {result['features_from_onnx']} segment(s) had no stored cost features; computed from "
              "their ONNX files", file=sys.stderr)
