"""Where the runtime gets its program: OUT/program.json, checked against the files it names.

An output made before programs existed (a format-2 manifest, build results inline) is lowered in memory: the
lowering is plain data work (rwkv2rknn/program/lower.py), not the compiler. So is an output whose program is
older than its manifest or build record (a build stopped before it wrote the program).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rwkv2rknn.artifacts import source_hashes
from rwkv2rknn.errors import UserError
from rwkv2rknn.program import PROGRAM_NAME, Program, ProgramError, load

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 3  # the newest plan format this runtime lowers


def lower_output(root: Path) -> Program:
    """The program of OUT from its manifest (format 2 or 3) and build record, in memory."""
    from rwkv2rknn.artifacts import load_record, split_legacy
    from rwkv2rknn.program.lower import LoweringError, lower

    path = root / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a valid manifest ({exc}); rerun `rwkv2rknn split`") from None
    if not isinstance(data, dict) or "format_version" not in data:
        raise UserError(f"{path}: not an rwkv2rknn manifest (no format_version); rerun `rwkv2rknn split`")
    version = data["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{path}: format_version {version!r} is not an integer; rerun `rwkv2rknn split`")
    if version > MANIFEST_FORMAT:
        raise UserError(f"{path}: manifest format {version} is newer than this rwkv2rknn understands "
                        f"({MANIFEST_FORMAT}); upgrade rwkv2rknn or split again with this version")
    try:
        if version < 3:
            plan, record = split_legacy(data)
        else:
            plan, record = data, load_record(root)
        return lower(plan, record, source=source_hashes(root))
    except (LoweringError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: cannot make its execution program ({type(exc).__name__}: {exc}); "
                        "rerun `rwkv2rknn split` and `rwkv2rknn build`") from None


def open_program(source) -> tuple[Program, Path]:
    """(program, the directory its paths start from) from a Program pair, an object with .program() and .root
    (the compiler's Manifest), or a path: OUT, OUT/manifest.json or OUT/program.json."""
    if isinstance(source, tuple):
        return source
    if hasattr(source, "program") and hasattr(source, "root"):
        return source.program(), Path(source.root)
    path = Path(source)
    root = path if path.is_dir() or not path.suffix else path.parent
    prog_path = root / PROGRAM_NAME
    if prog_path.exists():
        try:
            program = load(prog_path)
        except ProgramError as exc:
            raise UserError(str(exc)) from None
        if program.source and program.source != source_hashes(root) and (root / MANIFEST_NAME).exists():
            return lower_output(root), root  # the manifest or build record changed since: lower them again
        return program, root
    if (root / MANIFEST_NAME).exists():
        return lower_output(root), root
    raise UserError(f"{root / MANIFEST_NAME}: no manifest here; run `rwkv2rknn split MODEL -o {root}` first")


def check_files(program: Program, root: Path, backend: str) -> None:
    """Every file this backend will open exists and has the sha256 the program names (refuse altered files)."""
    board = backend in ("rknn-lite", "rknn-c")
    for seg in program.segments.values():
        use = [("rknn", seg.rknn, seg.rknn_sha256)] if (board and seg.device == "npu" and seg.rknn) else \
            [("onnx", seg.onnx, seg.onnx_sha256)]
        for _, rel, sha in use:
            f = root / rel
            if not f.exists():
                raise UserError(f"{root / PROGRAM_NAME}: segment {seg.id} names {rel}, which is missing; "
                                "copy the whole output directory, or split/build again")
            if sha and _file_sha256(f) != sha:
                raise UserError(f"{f}: sha256 differs from the program (file altered or partly copied); "
                                "copy it again, or split/build again")


def _file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


__all__ = ["MANIFEST_NAME", "check_files", "lower_output", "open_program", "source_hashes"]
