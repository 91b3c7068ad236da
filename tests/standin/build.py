"""Compile the stand-in librknnrt and the layout-check program with gcc (tests only)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADER = HERE / "rknn_standin.h"
LIBRARY_SOURCE = HERE / "librknnrt_standin.c"
LAYOUT_SOURCE = HERE / "layout_check.c"


def gcc() -> str | None:
    """The C compiler to use ($CC, else gcc on PATH), or None when there is none."""
    return shutil.which(os.environ.get("CC") or "gcc")


def _compile(source: Path, out: Path, *flags: str) -> Path:
    cc = gcc()
    if cc is None:
        raise RuntimeError("no C compiler: install gcc (or set CC) to build the librknnrt stand-in")
    newest = max(p.stat().st_mtime for p in (source, HEADER))
    if out.exists() and out.stat().st_mtime >= newest:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")  # never let a loaded .so be rewritten in place
    cmd = [cc, "-O1", "-Wall", "-Wextra", "-pthread", f"-I{HERE}", *flags, "-o", str(tmp), str(source), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    os.replace(tmp, out)
    return out


def build_library(out_dir: str | os.PathLike) -> Path:
    """Build librknnrt_standin.so into out_dir (unless it is up to date) and return its path."""
    return _compile(LIBRARY_SOURCE, Path(out_dir) / "librknnrt_standin.so", "-shared", "-fPIC")


def build_layout_check(out_dir: str | os.PathLike) -> Path:
    return _compile(LAYOUT_SOURCE, Path(out_dir) / "layout_check")


def c_layout(out_dir: str | os.PathLike) -> dict[str, int]:
    """{"struct sizeof": n, "struct.field": offset} as gcc lays out rknn_standin.h."""
    exe = build_layout_check(out_dir)
    text = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, value in (line.rsplit(" ", 1) for line in text.splitlines())}
