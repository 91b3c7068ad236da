"""`rwkv2rknn report`: a self-contained HTML page showing where every node of every graph runs."""

from __future__ import annotations

from pathlib import Path

from rwkv2rknn.manifest import DEFAULT_OUT


def register(sub) -> None:
    p = sub.add_parser("report", help="write an HTML partition report (drawing, reasons, verify metrics)",
                       description="Render OUT/manifest.json as one self-contained HTML file: a drawing of "
                       "each graph coloured by backend, segment boundaries, the reason for every CPU "
                       "placement, verify metrics, fallbacks, per-token totals and where a token's predicted "
                       "time goes (stacked bars per graph, and per policy for --policy auto splits).")
    p.add_argument("out", nargs="?", default=DEFAULT_OUT, metavar="OUT",
                   help=f"split/build output directory, or its manifest.json (default: {DEFAULT_OUT})")
    p.add_argument("-o", "--output", default=None, help="HTML file to write (default: OUT/report.html)")
    p.add_argument("--board", default=None, metavar="NAME|FILE",
                   help="board profile for the predicted time per token (default: the one split used)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rwkv2rknn.report import write_report

    out = Path(args.out)
    if out.name.endswith(".json"):  # OUT/manifest.json, as `build` and `run` accept it
        out = out.parent
    target = Path(args.output) if args.output else out / "report.html"
    if target.is_dir():
        from rwkv2rknn.errors import UserError

        raise UserError(f"{target}: is a directory; give -o a file name, e.g. -o {target / 'report.html'}")
    if args.board is not None:  # a wrong profile is the user's error here too, not a note inside the page
        from rwkv2rknn.cost.profile import load_profile

        load_profile(args.board)
    path = write_report(args.out, target, args.board)
    print(f"wrote {path}")
    return 0
