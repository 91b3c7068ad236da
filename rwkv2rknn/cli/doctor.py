"""`rwkv2rknn doctor`: which toolchain pieces are here, and which backends can run on this machine."""

from __future__ import annotations

import importlib
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from rich.table import Table
from rwkv2rknn.cli import console as make_console

PACKAGES = ["numpy", "onnx", "onnxruntime", "onnx-graphsurgeon", "rknn-toolkit2", "rknn-toolkit-lite2",
            "tokenizers", "torch", "rwkv"]
# Where the board's NPU driver and runtime library announce their versions.
DRIVER_VERSION_FILE = Path("/sys/kernel/debug/rknpu/version")
LIBRKNNRT_PATHS = [Path("/usr/lib/librknnrt.so"), Path("/usr/lib64/librknnrt.so"),
                   Path("/usr/lib/aarch64-linux-gnu/librknnrt.so")]


def register(sub) -> None:
    p = sub.add_parser("doctor", help="show toolchain versions and which backends can run here",
                       description="Print the versions of the packages rwkv2rknn uses, the NPU driver and "
                       "librknnrt on a board, and which runtime backends can run on this machine and why "
                       "not the others. Always exits 0.")
    p.set_defaults(func=run)


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _importable(module: str) -> tuple[bool, str]:
    try:
        importlib.import_module(module)
        return True, ""
    except Exception as exc:  # a broken install is a finding, not a crash
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _librknnrt_version() -> str | None:
    for path in LIBRKNNRT_PATHS:
        if path.exists():
            data = path.read_bytes()
            marker = data.find(b"librknnrt version: ")
            if marker >= 0:
                return data[marker + 19: marker + 60].split(b"\0")[0].decode(errors="replace").strip()
            return f"present ({path})"
    return None


def collect() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(), "packages": {},
            "backends": {}}
    for pkg in PACKAGES:
        info["packages"][pkg] = _version(pkg)
    try:
        info["npu_driver"] = DRIVER_VERSION_FILE.read_text().strip()
    except OSError:
        info["npu_driver"] = None
    info["librknnrt"] = _librknnrt_version()
    ok, why = _importable("onnxruntime")
    info["backends"]["ort"] = (ok, "onnxruntime imports" if ok else why)
    ok, why = _importable("rknn.api")
    info["backends"]["rknn-sim"] = (ok, "rknn-toolkit2 imports; its x86 simulator runs NPU segments and "
                                    "`build` can compile" if ok else f"rknn-toolkit2 not usable ({why}); "
                                    "run `make setup` or see README (PC side)")
    ok, why = _importable("rknnlite.api")
    if ok and info["npu_driver"] is None:
        info["backends"]["rknn-lite"] = (False, "rknn-toolkit-lite2 imports but no NPU driver was found "
                                         f"({DRIVER_VERSION_FILE}); this is not an RK3588 board")
    else:
        info["backends"]["rknn-lite"] = (ok, "rknn-toolkit-lite2 imports (the board runtime)" if ok else
                                         "rknn-toolkit-lite2 not installed: only on the board "
                                         "(aarch64): pip install rknn-toolkit-lite2")
    return info


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
