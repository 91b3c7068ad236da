"""`rwkv2rknn doctor`: which toolchain pieces are here, and which backends can run on this machine."""

from __future__ import annotations

from rich.table import Table

from rwkv2rknn.cli import console as make_console
from rwkv2rknn.run.doctor import collect


def register(sub) -> None:
    p = sub.add_parser("doctor", help="show toolchain versions and which backends can run here",
                       description="Print the versions of the packages rwkv2rknn uses, the NPU driver and "
                       "librknnrt on a board, and which runtime backends can run on this machine and why "
                       "not the others. Always exits 0. On a board install without the compiler: "
                       "python -m rwkv2rknn.run --doctor.")
    p.set_defaults(func=run)


def run(args) -> int:
    info = collect()
    console = make_console()
    console.print(f"python {info['python']} on {info['machine']}")
    table = Table(title="packages", title_justify="left")
    table.add_column("package")
    table.add_column("version")
    for pkg, ver in info["packages"].items():
        table.add_row(pkg, ver or "[dim]not installed[/dim]")
    table.add_row("NPU driver", info["npu_driver"] or "[dim]not found (not a board)[/dim]")
    table.add_row("librknnrt", info["librknnrt"] or "[dim]not found (not a board)[/dim]")
    console.print(table)
    table = Table(title="runtime backends (python -m rwkv2rknn.run --backend ...)", title_justify="left")
    table.add_column("backend")
    table.add_column("here")
    table.add_column("why")
    for name, (ok, why) in info["backends"].items():
        table.add_row(name, "yes" if ok else "no", why)
    console.print(table)
    return 0
