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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`.

    The file gets the mode a plain open() would give (0666 minus the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


# What later steps write into an output directory (build, report); theirs to replace as well.
_LATER_OUTPUTS = ("rknn/", "report.html", "build.json", "program.json")
_MARKER_HEAD = "made by rwkv2rknn; safe to replace. Files it wrote:"


def is_tool_output(directory: Path) -> bool:
    return (directory / MARKER).exists()


def _relative_files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() or p.is_symlink()}


def foreign_files(directory: Path) -> list[str]:
    """Files in a directory rwkv2rknn made that it did not write itself (a tokenizer copied in, notes)."""
    lines = (directory / MARKER).read_text().splitlines()
    if not lines or lines[0] != _MARKER_HEAD:
        return []  # a marker without a file list: trust it as a whole
    written = set(lines[1:]) | {MARKER}
    return sorted(f for f in _relative_files(directory) - written
                  if not any(f == o or (o.endswith("/") and f.startswith(o)) for o in _LATER_OUTPUTS))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(final: Path) -> list[tuple[Path, int]]:
    """Staging (.NAME.PID.xxxx.tmp) and swapped-out (.NAME.old-PID) directories of `final`, with PIDs."""
    found = []
    stage_prefix, old_prefix = f".{final.name}.", f".{final.name}.old-"
    if not final.parent.is_dir():
        return found
    for p in final.parent.iterdir():
        rest = None
        if p.name.startswith(old_prefix):
            rest = p.name[len(old_prefix):]
        elif p.name.startswith(stage_prefix):
            parts = p.name[len(stage_prefix):].split(".")  # PID, mkdtemp's random part, "tmp"
            rest = parts[0] if len(parts) == 3 and parts[2] == "tmp" else None
        if rest is not None and rest.isdigit() and p.is_dir():
            found.append((p, int(rest)))
    return found


def recover_directory(final: str | os.PathLike) -> None:
    """Undo what a killed run left beside `final`: put a swapped-out previous output back when `final`
    is missing, and delete dead runs' staging directories."""
    final = Path(final)
    dead = [(p, pid) for p, pid in _leftovers(final) if not _pid_alive(pid)]
    olds = [p for p, _ in dead if ".old-" in p.name and is_tool_output(p)]
    if olds and not final.exists():
        keep = max(olds, key=lambda p: p.stat().st_mtime)
        os.replace(keep, final)
    for p, _ in dead:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike, force: bool = False, what: str = "output directory"):
    """Build a whole output directory under a temporary name and swap it in at the end.

    The final directory is replaced only when everything inside was written: an interrupted run
    leaves the previous output as it was. The swap is one atomic renameat2(RENAME_EXCHANGE) where the
    kernel and filesystem allow it; elsewhere it takes two renames, and a run killed between them
    leaves the previous output as `.NAME.old-PID`, which the next run on NAME puts back first.
    A directory holding files that rwkv2rknn did not make is refused unless `force`.
    """
    from rwkv2rknn.errors import UserError

    final = Path(final)
    if final.name in ("", ".", ".."):  # a directory cannot be swapped while it is the working directory
        raise UserError(f"{final}: the output must be a directory of its own, e.g. -o out/")
    recover_directory(final)
    if final.exists() and not final.is_dir():
        raise UserError(f"{final}: exists and is not a directory; choose another -o")
    if final.is_dir() and any(final.iterdir()) and not force:
        if not is_tool_output(final):
            raise UserError(
                f"{final}: {what} already holds files rwkv2rknn did not write; "
                "choose an empty or new directory, or pass --force to replace it"
            )
        added = foreign_files(final)
        if added:
            raise UserError(
                f"{final}: holds {added[0]}{f' and {len(added) - 1} more file(s)' if len(added) > 1 else ''} "
                "that rwkv2rknn did not write and a new output would delete; move them away, "
                "choose another -o, or pass --force"
            )
    for p in final.parents:
        if p.exists() and not p.is_dir():
            raise UserError(f"{p}: is a file, not a directory; choose another -o")
    made = [p for p in reversed(final.parents) if not p.exists()]  # parents this run creates
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent))
    except OSError as exc:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()
        raise UserError(f"{final}: cannot create the {what} here ({exc.strerror or exc}); choose another -o") from None
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700; an output directory is an ordinary one
    done = False
    try:
        yield stage
        (stage / MARKER).write_text("\n".join([_MARKER_HEAD, *sorted(_relative_files(stage))]) + "\n")
        if final.exists() and _exchange(stage, final):
            shutil.rmtree(stage, ignore_errors=True)  # now the previous output
        else:
            old = None
            if final.exists():
                old = final.parent / f".{final.name}.old-{os.getpid()}"
                os.replace(final, old)
            os.replace(stage, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        done = True
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        if not done:  # a failed run leaves no trace, not even the parent directories it made
            for p in reversed(made):
                with contextlib.suppress(OSError):
                    p.rmdir()
