"""Which runtime pieces are here and which backends can run: `python -m rwkv2rknn.run --doctor` (and, with the
compiler installed, `rwkv2rknn doctor`). Standard library only: it must work on a bare board install."""

from __future__ import annotations

import importlib
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ["numpy", "onnxruntime", "tokenizers", "rknn-toolkit-lite2", "onnx", "onnx-graphsurgeon",
            "rknn-toolkit2", "torch", "rwkv"]
# Where the board's NPU driver and runtime library announce their versions.
DRIVER_VERSION_FILE = Path("/sys/kernel/debug/rknpu/version")
LIBRKNNRT_PATHS = [Path("/usr/lib/librknnrt.so"), Path("/usr/lib64/librknnrt.so"),
                   Path("/usr/lib/aarch64-linux-gnu/librknnrt.so")]


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
    paths = ([Path(os.environ["LIBRKNNRT_PATH"])] if os.environ.get("LIBRKNNRT_PATH") else []) + LIBRKNNRT_PATHS
    for path in paths:
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
    try:
        from rwkv2rknn.run.librknnrt import load_library

        load_library()
        c_ok, c_why = True, "librknnrt loads (LIBRKNNRT_PATH or /usr/lib/librknnrt.so): the C API, zero-copy"
    except Exception as exc:  # noqa: BLE001
        c_ok, c_why = False, f"librknnrt does not load ({str(exc).splitlines()[0][:160]}): only on the board"
    info["backends"]["rknn-c"] = (c_ok, c_why)
    ok, why = _importable("rknnlite.api")
    if ok and info["npu_driver"] is None:
        info["backends"]["rknn-lite"] = (False, "rknn-toolkit-lite2 imports but no NPU driver was found "
                                         f"({DRIVER_VERSION_FILE}); this is not an RK3588 board")
    else:
        info["backends"]["rknn-lite"] = (ok, "rknn-toolkit-lite2 imports (the board's Python runtime)" if ok else
                                         "rknn-toolkit-lite2 not installed: only on the board "
                                         "(aarch64): pip install rknn-toolkit-lite2")
    return info


def print_text(info: dict) -> None:
    print(f"python {info['python']} on {info['machine']}")
    for pkg, ver in info["packages"].items():
        print(f"  {pkg:<20} {ver or 'not installed'}")
    print(f"  {'NPU driver':<20} {info['npu_driver'] or 'not found (not a board)'}")
    print(f"  {'librknnrt':<20} {info['librknnrt'] or 'not found (not a board)'}")
    print("runtime backends (python -m rwkv2rknn.run --backend ...):")
    for name, (ok, why) in info["backends"].items():
        print(f"  {name:<10} {'yes' if ok else 'no ':<4} {why}")
