"""`rwkv2rknn report`: a self-contained HTML page showing where every node of every graph runs."""

from __future__ import annotations

from pathlib import Path

from rwkv2rknn.manifest import DEFAULT_OUT


def register(sub) -> None:
    p = sub.add_parser("report", help="write an HTML partition report (drawing, reasons, verify metrics)",
                       description="Render OUT/manifest.json as one self-contained HTML file: a drawing of "
                       "each graph coloured by backend, segment boundaries, the reason for every CPU "
                       "placement, verify metrics, fallbacks and per-token totals.")
    p.add_argument("out", nargs="?", default=DEFAULT_OUT, help=f"split/build output directory (default: {DEFAULT_OUT})")
    p.add_argument("-o", "--output", default=None, help="HTML file to write (default: OUT/report.html)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rwkv2rknn.report import write_report

    target = Path(args.output) if args.output else Path(args.out) / "report.html"
    path = write_report(args.out, target)
    print(f"wrote {path}")
    return 0
