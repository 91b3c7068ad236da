"""`rwkv2rknn split`: cut source graphs into NPU and CPU segments and write the manifest."""

from __future__ import annotations

import os
import time

from rich.console import Console
from rich.table import Table

from rwkv2rknn import policies
from rwkv2rknn.manifest import DEFAULT_OUT, MANIFEST_NAME


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
    p.add_argument("--npu-all", action="store_true",
                   help="let the NPU (fp16) take the WKV recurrence too (default keeps it fp32 on the CPU)")
    p.add_argument("--shape", action="append", metavar="NAME=D0,D1,...",
                   help="fix a dynamic input dimension, e.g. --shape input=1024 (repeatable)")
    p.add_argument("--preview", action="store_true", help="print the placement with reasons; write nothing")
    p.add_argument("--force", action="store_true", help="replace an output directory holding other files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from rwkv2rknn.split import parse_shapes, split_model

    console = Console(highlight=False)
    t0 = time.perf_counter()
    data, reports = split_model(args.model, args.out, policy=args.policy, target=args.target,
                                npu_all=args.npu_all, shapes=parse_shapes(args.shape), force=args.force,
                                preview=args.preview, progress=not args.quiet)
    if args.preview:
        for rep in reports:
            table = Table(title=f"{rep.name}: placement", title_justify="left")
            for col in ("node", "op", "segment", "backend", "reason"):
                table.add_column(col)
            for row in rep.placement:
                table.add_row(row["node"], row["op"], row["segment"], row["backend"], row["reason"])
            console.print(table)
    print_summary(console, reports)
    if not args.preview:
        n_segments = sum(r.npu_segments + r.cpu_segments for r in reports)
        console.print(f"wrote {os.path.join(args.out, MANIFEST_NAME)} ({n_segments} "
                      f"segments) in {time.perf_counter() - t0:.1f} s; next: rwkv2rknn build "
                      f"{'' if args.out == DEFAULT_OUT else args.out + ' '}--target {args.target}",
                      soft_wrap=True)  # never break the command to copy across lines
    return 0


def print_summary(console, reports) -> None:
    table = Table(title="split summary (per token)", title_justify="left")
    for col in ("graph", "npu segs", "cpu segs", "MatMul GFLOP", "on NPU", "NPU<->CPU bytes"):
        table.add_column(col, justify="right" if col != "graph" else "left")
    tot_flops = tot_npu = tot_bytes = tot_n = tot_c = 0
    for r in reports:
        table.add_row(r.name, str(r.npu_segments), str(r.cpu_segments), f"{r.matmul_flops / 1e9:.4f}",
                      f"{100 * r.npu_share:.1f}%", f"{r.crossing_bytes:,}")
        tot_flops += r.matmul_flops
        tot_npu += r.npu_matmul_flops
        tot_bytes += r.crossing_bytes
        tot_n += r.npu_segments
        tot_c += r.cpu_segments
    if len(reports) > 1:
        share = 100 * tot_npu / tot_flops if tot_flops else 0.0
        table.add_row("total", str(tot_n), str(tot_c), f"{tot_flops / 1e9:.4f}", f"{share:.1f}%",
                      f"{tot_bytes:,}", style="bold")
    console.print(table)
