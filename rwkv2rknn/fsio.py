"""Crash-safe file output: write to a temporary name in the same directory, fsync, rename."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# A directory rwkv2rknn made carries this marker, so a later run may replace it without --force.
MARKER = ".rwkv2rknn"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def is_tool_output(directory: Path) -> bool:
    return (directory / MARKER).exists()


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike, force: bool = False, what: str = "output directory"):
    """Build a whole output directory under a temporary name and swap it in at the end.

    The final directory is replaced only when everything inside was written: an interrupted run
    leaves the previous output as it was. A directory holding files that rwkv2rknn did not make is
    refused unless `force`.
    """
    from rwkv2rknn.errors import UserError

    final = Path(final)
    if final.exists() and not final.is_dir():
        raise UserError(f"{final}: exists and is not a directory; choose another -o")
    if final.is_dir() and any(final.iterdir()) and not is_tool_output(final) and not force:
        raise UserError(
            f"{final}: {what} already holds files rwkv2rknn did not write; "
            "choose an empty or new directory, or pass --force to replace it"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield stage
        (stage / MARKER).write_text("made by rwkv2rknn; safe to replace\n")
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(stage, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
