"""`rwkv2rknn split`: cut source graphs into NPU and CPU segments and write the manifest."""

from __future__ import annotations

import os
import sys
import time

from rich.table import Table

from rwkv2rknn import policies
from rwkv2rknn.manifest import DEFAULT_OUT, MANIFEST_NAME
from rwkv2rknn.cli import console as make_console


def register(sub) -> None:
    p = sub.add_parser(
        "split",
        help="cut graphs into NPU/CPU segments and write OUT/manifest.json",
        description="Normalize the graphs (fp16 folding off, static shapes, 2-D MatMuls), place every node "
        "on the NPU or the CPU with a reason, group them into few large segments, cut each into its own "
        "ONNX model and write OUT/manifest.json. MODEL is a llama.onnx-style model directory "
        "(embed.onnx, mixing_*.onnx, head.onnx) or one or more .onnx files.",
    )
    p.add_argument("model", nargs="+", metavar="MODEL", help="model directory or .onnx file(s)")
    p.add_argument("-o", "--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    p.add_argument("--policy", default="fused", choices=policies.names(), help=policies.help_text())
    p.add_argument("--target", default="rk3588", help="rknn-toolkit2 target platform (default: rk3588)")
    p.add_argument("--board", default="rk3588", metavar="NAME|FILE",
                   help="board profile the predicted times (and --policy auto) use: rk3588 (default; Python RKNNLite), "
                   "rk3588-c (librknnrt's C API), rk3588-2023, or a .toml file (e.g. from board calibration)")
    p.add_argument("--layers-per-call", type=int, default=None, metavar="K",
                   help="deep: layers merged into one NPU model (default: as many as a 448 MiB fp32 budget allows, "
                   "balanced; the head joins the last group when it fits)")
    p.add_argument("--state-update", default="cpu", choices=["cpu", "npu"],
                   help="deep: where the recurrent-state update runs: cpu (default: fp32, one CPU call after each "
                   "NPU call; 0.2-0.3%% state error over 1,000 tokens, no drift) or npu (kept fp16 inside the NPU "
                   "model between calls: no conversion, but the state drifts on long-memory channels, 88%% after "
                   "1,000 tokens on a stress model: docs/wkv-precision.md; no prefill plan by default)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="M",
                   help="prompt tokens per call in a prefill plan written beside the decode plan (whole models; "
                   "default by width: 16, 64 from 1024 wide, 128 from 2048; 0: no prefill plan; at most 256). "
                   "The NPU is 10-50x faster per token at M >= 16 than at M = 1")
    p.add_argument("--verify-tokens", type=int, default=0, metavar="K",
                   help="add a verify plan for speculative decoding with a draft model (`run --draft`): K drafted "
                   "tokens checked in one call of K+1 rows, logits and state after every row (default 0: none; at most "
                   "15). Pick K with `rwkv2rknn estimate OUT --draft DRAFT_OUT` (docs/speculative.md)")
    p.add_argument("--npu-io", default="float16", choices=["float16", "float32"],
                   help="dtype of the buffers at NPU segments' boundaries: float16 (default: the NPU's own; CPU "
                   "segments convert inside their graphs, nothing is converted per NPU call) or float32 (every "
                   "boundary as the source declares it: exact on onnxruntime, converted by the NPU runtime on every "
                   "call)")
    p.add_argument("--no-nsplit", action="store_true",
                   help="never split a single-row NPU segment into three pieces, one per NPU core (default: split "
                   "where the board profile predicts it faster than one model on one core or on core mask 0_1_2)")
    p.add_argument("--npu-all", action="store_true",
                   help="let the NPU (fp16) take the WKV recurrence too (default keeps it fp32 on the CPU)")
    p.add_argument("--shape", action="append", metavar="NAME=D0,D1,...",
                   help="fix a dynamic input dimension, e.g. --shape input=1024 (repeatable)")
    p.add_argument("--preview", action="store_true", help="print the placement with reasons; write nothing")
    p.add_argument("--force", action="store_true", help="replace an output directory holding other files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def options(args):
    """The command line's SplitOptions (rwkv2rknn/options.py)."""
    from rwkv2rknn.options import SplitOptions
    from rwkv2rknn.split import parse_shapes

    return SplitOptions(policy=args.policy, target=args.target, npu_all=args.npu_all, shapes=parse_shapes(args.shape),
                        force=args.force, preview=args.preview, progress=not args.quiet, board=args.board,
                        layers_per_call=args.layers_per_call, state_update=args.state_update,
                        prefill_chunk=args.prefill_chunk, npu_io=args.npu_io, nsplit=not args.no_nsplit,
                        verify_tokens=args.verify_tokens)


def run(args) -> int:
    from rwkv2rknn.split import split_model

    console = make_console()
    policy = policies.get(args.policy)
    for note in policy.cli_notes(args.state_update):
        print(f"rwkv2rknn split: note: {note}", file=sys.stderr)
    t0 = time.perf_counter()
    data, reports = split_model(args.model, args.out, options(args))
    if args.preview:
        for rep in reports:
            for note in rep.notes:
                console.print(f"{rep.name}: legalize {note}", soft_wrap=True)
            table = Table(title=f"{rep.name}: placement", title_justify="left")
            for col in ("node", "op", "segment", "backend", "reason"):
                table.add_column(col)
            for row in rep.placement:
                table.add_row(row["node"], row["op"], row["segment"], row["backend"], row["reason"])
            console.print(table)
    board = data.get("board", args.board)
    predicted = data.get("predicted") or {}
    print_summary(console, [r for r in reports if r.plan == "decode"], auto=policy.chooses,
                  title=f"split summary, decode plan (per token; predicted ms on board profile {board})",
                  overlap_ms=predicted.get("decode_overlap_ms", 0.0))
    prefill = [r for r in reports if r.plan == "prefill"]
    if prefill:
        chunk = (data.get("prefill") or {}).get("chunk")
        print_summary(console, prefill, auto=policy.chooses,
                      title=f"prefill plan ({chunk} prompt tokens per call; predicted ms per prompt token on board "
                            f"profile {board})", overlap_ms=predicted.get("prefill_overlap_ms", 0.0))
    verify = [r for r in reports if r.plan == "verify"]
    if verify:
        rows = (data.get("verify") or {}).get("rows")
        print_summary(console, verify, auto=policy.chooses,
                      title=f"verify plan ({rows} rows per call: the last token and {rows - 1} drafts; predicted ms "
                            f"per row on board profile {board})")
    print_prediction(console, data, args.board)
    if not args.preview:
        n_segments = sum(r.npu_segments + r.cpu_segments for r in reports)
        console.print(f"wrote {os.path.join(args.out, MANIFEST_NAME)} ({n_segments} "
                      f"segments) in {time.perf_counter() - t0:.1f} s; next: rwkv2rknn build "
                      f"{'' if args.out == DEFAULT_OUT else args.out + ' '}--target {args.target}",
                      soft_wrap=True)  # never break the command to copy across lines
    return 0


def print_summary(console, reports, auto: bool = False, title: str = "split summary, decode plan (per token)",
                  overlap_ms: float = 0.0) -> None:
    table = Table(title=title, title_justify="left")
    cols = ["graph"] + (["policy"] if auto else []) + ["npu segs", "cpu segs", "MatMul GFLOP", "on NPU",
                                                       "NPU<->CPU bytes", "predicted ms"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("graph", "policy") else "right")
    tot_flops = tot_npu = tot_bytes = tot_n = tot_c = 0
    tot_ms = 0.0
    for r in reports:
        table.add_row(r.name, *([r.policy] if auto else []), str(r.npu_segments), str(r.cpu_segments),
                      f"{r.matmul_flops / 1e9:.4f}", f"{100 * r.npu_share:.1f}%", f"{r.crossing_bytes:,}",
                      f"{r.predicted_ms:.3f}")
        tot_flops += r.matmul_flops
        tot_npu += r.npu_matmul_flops
        tot_bytes += r.crossing_bytes
        tot_n += r.npu_segments
        tot_c += r.cpu_segments
        tot_ms += r.predicted_ms
    if overlap_ms:
        table.add_row("CPU steps beside NPU steps", *([""] if auto else []), "", "", "", "", "", f"{overlap_ms:.3f}")
        tot_ms += overlap_ms
    if len(reports) > 1:
        share = 100 * tot_npu / tot_flops if tot_flops else 0.0
        table.add_row("total", *([""] if auto else []), str(tot_n), str(tot_c), f"{tot_flops / 1e9:.4f}",
                      f"{share:.1f}%", f"{tot_bytes:,}", f"{tot_ms:.2f}", style="bold")
    console.print(table)


def print_prediction(console, data: dict, board: str) -> None:
    """One line: predicted decode and prefill ms/token on the board, against the CPU-only plan."""
    from rwkv2rknn.cost.estimate import estimate, verdict
    from rwkv2rknn.cost.profile import load_profile

    profile = load_profile(board)
    est = estimate(data, profile)
    cpu = estimate(data, profile, all_cpu=True)
    calls = est.npu_calls_per_token
    versus = verdict(est.decode_ms_per_token, cpu.decode_ms_per_token)
    console.print(f"PREDICTED on board profile {profile.name} (not measured): decode {est.decode_ms_per_token:.1f} "
                  f"ms/token with {calls:g} NPU call{'' if calls == 1 else 's'}, prefill {est.prefill_ms_per_token:.1f} "
                  f"ms/token; the plan {versus} the CPU-only plan ({cpu.decode_ms_per_token:.1f} ms/token). "
                  "Details: rwkv2rknn estimate", soft_wrap=True)
