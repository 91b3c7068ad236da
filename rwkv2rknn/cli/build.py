"""`rwkv2rknn build`: compile the NPU segments of OUT/manifest.json with rknn-toolkit2, verified."""

from __future__ import annotations

import os
import sys

from rwkv2rknn.manifest import DEFAULT_OUT, MANIFEST_NAME
from rwkv2rknn.cli import console as make_console


def register(sub) -> None:
    from rwkv2rknn.build import DEFAULT_TIMEOUT, RKNN_TARGETS

    p = sub.add_parser(
        "build",
        help="compile NPU segments to .rknn (isolated, cached, verified in the simulator)",
        description="Compile every NPU segment of OUT/manifest.json to OUT/rknn/<id>.rknn, each in its own "
        "child process. A segment whose compile crashes, fails or hangs is bisected and rebuilt; what still "
        "fails runs on the CPU, with the reason in the manifest. Each compiled segment is run in the "
        "rknn-toolkit2 simulator on real activations and compared with onnxruntime fp32 (rel_l2); a whole "
        "model then runs a text through the simulator chain and onnxruntime fp32 and compares logits. With "
        "--precision w8a8, a segment that loses too much in the simulator is built fp16 instead. Unchanged "
        "segments are not compiled again.",
    )
    p.add_argument("out", nargs="?", default=DEFAULT_OUT, metavar="OUT",
                   help=f"directory holding {MANIFEST_NAME} from `rwkv2rknn split` (default: {DEFAULT_OUT})")
    p.add_argument("--target", default="rk3588", metavar="PLATFORM",
                   help=f"rknn-toolkit2 target platform: {', '.join(RKNN_TARGETS)} (default: rk3588)")
    p.add_argument("--precision", default="fp16", choices=["fp16", "w8a8"],
                   help="fp16 (default) or w8a8 (int8 weights and activations, calibrated)")
    p.add_argument("--calib", metavar="FILE",
                   help="text (or a file of token ids) to calibrate w8a8 with and to check the whole model on "
                   "(default: a built-in text)")
    p.add_argument("--w8a8-max-rel-l2", type=float, default=None, metavar="X",
                   help="with w8a8: a segment whose simulator rel_l2 exceeds X is built fp16 instead "
                   "(default 0.05; inf keeps every segment w8a8)")
    p.add_argument("--w8a8-keep-fp16", action="append", default=None, metavar="GLOB",
                   help="with w8a8: build the segments whose id matches GLOB fp16 (repeatable; default 'head.*', "
                   "'none' for no exception): the head's int8 MatMul input moved the argmax on 1.5%% of held-out "
                   "bytes of a trained fixture (98.5%% agreement, fp16 100%%; docs/w8a8.md)")
    p.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                   help=f"compiles in parallel (default: CPU count, {os.cpu_count()})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds one compile may take before it counts as hung (default: {DEFAULT_TIMEOUT:g})")
    p.add_argument("--no-verify", action="store_true", help="skip the simulator check (not recommended)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def options(args):
    """The command line's BuildOptions (rwkv2rknn/options.py)."""
    from rwkv2rknn.options import BuildOptions

    return BuildOptions(target=args.target, precision=args.precision, calib=args.calib, jobs=args.jobs,
                        verify=not args.no_verify, timeout=args.timeout, progress=not args.quiet and sys.stderr.isatty(),
                        max_rel_l2=args.w8a8_max_rel_l2, keep_fp16=keep_fp16_patterns(args.w8a8_keep_fp16))


def run(args) -> int:

    from rwkv2rknn.build import build_manifest
    from rwkv2rknn.errors import UserError
    from rwkv2rknn.verify import RUNTIME

    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: must be at least 1")
    if args.w8a8_max_rel_l2 is not None and not args.w8a8_max_rel_l2 > 0:
        raise UserError(f"--w8a8-max-rel-l2 {args.w8a8_max_rel_l2}: give a positive bound (e.g. 0.05; inf keeps "
                        "every segment w8a8)")
    report = build_manifest(args.out, options(args), runtime=RUNTIME)
    print_summary(make_console(), report, args)
    return 0


DEFAULT_KEEP_FP16 = ("head.*",)


def keep_fp16_patterns(given: list[str] | None) -> tuple[str, ...]:
    """--w8a8-keep-fp16: the head by default; 'none' keeps nothing fp16 by name."""
    if given is None:
        return DEFAULT_KEEP_FP16
    return tuple(g for g in given if g.lower() != "none")


def print_summary(console, report, args) -> None:
    from rich.table import Table

    table = Table(title=f"build summary ({report.target}, {report.precision}, rknn-toolkit2 {report.toolkit})",
                  title_justify="left")
    for col in ("segments built", "cached", "fallen back to CPU", "bisected", "compiles", "worst rel_l2"):
        table.add_column(col, justify="right")
    worst = report.worst
    table.add_row(str(report.count("built")), str(report.count("cached")), str(report.count("fallback")),
                  str(report.count("bisected")), str(report.compiles),
                  "-" if worst is None else f"{worst[1]['rel_l2']:.2e} ({worst[0]}: {worst[1].get('worst_output')})")
    console.print(table)
    mixed = report.precisions
    if report.precision != "fp16" and mixed:
        kept = report.kept_fp16
        fell = mixed.get("fp16", 0) - kept
        notes = []
        if fell:
            notes.append(f"{fell} lost too much as {report.precision} in the simulator and {'was' if fell == 1 else 'were'} "
                         "built fp16; see precision_reason in the manifest, or --w8a8-max-rel-l2")
        if kept:
            notes.append(f"{kept} kept fp16 by --w8a8-keep-fp16")
        console.print("precision per segment: " + ", ".join(f"{n} {p}" for p, n in sorted(mixed.items()))
                      + (f" ({'; '.join(notes)})" if notes else ""), soft_wrap=True)
    for r in report.results:
        if r.status == "fallback":
            console.print(f"[yellow]fallback[/yellow] {r.id}: {r.reason}")
    check = report.verify_model
    if check and "error" not in check:
        pre = check.get("prefill")
        console.print(f"whole model ({check['tokens']} tokens, simulator vs onnxruntime fp32): logits cosine min "
                      f"{check['logits_cosine_min']:.6f}, argmax agrees on {100 * check['argmax_agree']:.1f}%"
                      + (f"; prefill plan ({pre['chunks']} x {pre['chunk']} tokens): cosine min "
                         f"{pre['logits_cosine_min']:.6f}" if pre else "")
                      + (f"; verify plan ({check['verify']['passes']} x {check['verify']['rows']} rows): cosine min "
                         f"{check['verify']['logits_cosine_min']:.6f}" if check.get("verify") else ""), soft_wrap=True)
    for w in report.warnings:
        console.print(f"[yellow]warning[/yellow] {w}", soft_wrap=True)
    if args.no_verify:
        console.print("[yellow]warning[/yellow] --no-verify: the compiled segments were not checked")
    manifest = args.out if args.out.endswith(".json") else os.path.join(args.out, MANIFEST_NAME)
    n = report.compiles
    console.print(f"{n} compile{'' if n == 1 else 's'} (segments, their bisected halves and the board-calibration "
                  f"probes) in {report.wall:.1f} s wall; "
                  f"run: python -m rwkv2rknn.run {manifest}",
                  soft_wrap=True)  # never break the command to copy across lines
