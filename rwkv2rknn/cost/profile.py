"""Board profiles: the constants of the cost model as data, each with its value and where it comes from.

A profile is a TOML file. Every constant is a table with `value` and `source` (and optionally `unit`):

    name = "rk3588"
    description = "..."
    [npu_call_us]
    value = 200.0
    unit = "us"
    source = "judgement: ..."

Shipped profiles live in `rwkv2rknn/cost/profiles/`. A user's file (e.g. one `rwkv2rknn.cost.calibrate`
wrote on a board) may set `base = "rk3588"` (a shipped name or a path relative to the file) and override
any subset of the constants. `load_profile` merges, validates and returns a `BoardProfile`.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema

from rwkv2rknn.errors import UserError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = "rk3588"
_MAX_BASE_DEPTH = 8

# name -> (kind, unit, meaning). kind: "number" (>= 0), "positive", "integer", "curve", "masks".
CONSTANTS: dict[str, tuple[str, str, str]] = {
    "npu_clock_hz": ("positive", "Hz", "NPU clock the compiler's estimated cycles are counted in"),
    "npu_cycle_scale": ("positive", "", "board clock periods per compiler-estimated cycle (one core)"),
    "npu_stream_gbps_1core": ("positive", "GB/s", "weight streaming rate of one NPU core at M=1"),
    "npu_stream_gbps_3core": ("positive", "GB/s", "weight streaming rate of three NPU cores at M=1, N split over "
                                                  "three models pinned one per core"),
    "npu_stream_gbps_mask7": ("positive", "GB/s", "weight streaming rate of one model run with core mask 0_1_2 "
                                                  "(the runtime spreads its Conv work) at M=1"),
    "npu_fp16_gflops": ("curve", "[rows, GFLOPS]", "fp16 MatMul throughput of one NPU core against rows per call"),
    "npu_multicore_compute_speedup": ("positive", "x", "compute speedup of multi-core op kinds on three cores"),
    "npu_int8_compute_speedup": ("positive", "x", "int8 (w8a8) MatMul throughput over fp16"),
    "npu_pad_rows": ("integer", "rows", "rows the compiler pads a MatMul's M to (cycles are per padded call)"),
    "npu_call_us": ("number", "us", "fixed cost of one NPU call (one inference of one RKNN model)"),
    "npu_multicore_call_us": ("number", "us", "extra fixed cost of a call with core mask 0_1_2"),
    "npu_core_masks": ("masks", "", "core masks the runtime may use: 1 = NPU_CORE_0, 7 = NPU_CORE_0_1_2"),
    "npu_parallel_us": ("number", "us", "starting and joining the pieces of an N-split segment, one per core"),
    "npu_op_us": ("number", "us", "one elementwise op inside an NPU model"),
    "npu_context_bytes": ("number", "B", "memory the NPU runtime holds per loaded model beyond its weights, its "
                                          "internal tensors and the program's buffers (command buffers)"),
    "npu_hop_us": ("number", "us", "one CPU-fallback op inside an NPU model (NPU -> CPU -> NPU)"),
    "conv_in_ns_per_byte": ("number", "ns/B", "the NPU runtime converting an fp32 input to the NPU's fp16/layout, "
                                              "per fp32 byte"),
    "conv_out_ns_per_byte": ("number", "ns/B", "the NPU runtime converting an NPU output back to fp32, per fp32 byte"),
    "cpu_convert_ns_per_byte": ("number", "ns/B", "an fp32 <-> fp16 conversion in a CPU loop (a Cast in an "
                                                  "onnxruntime graph, a convert step), per fp32 byte"),
    "npu_io_copy_ns_per_byte": ("number", "ns/B", "copying an NPU call's inputs in and outputs out, per byte (0 where "
                                                  "the runtime binds the program's buffers)"),
    "npu_output_fp32_ns_per_byte": ("number", "ns/B", "a runtime that hands every NPU output back as fp32: its "
                                                      "conversion, per fp32 byte (0 where outputs stay fp16)"),
    "cpu_stream_gbps": ("positive", "GB/s", "CPU weight streaming rate for onnxruntime segments"),
    "cpu_gflops": ("positive", "GFLOPS", "CPU fp32 MatMul throughput for onnxruntime segments"),
    "cpu_call_us": ("number", "us", "fixed cost of one onnxruntime call (session.run from Python)"),
    "cpu_op_us": ("number", "us", "one non-MatMul op inside an onnxruntime segment"),
}
CORE_MASK_NAMES = {1: "NPU_CORE_0", 7: "NPU_CORE_0_1_2"}

_VALUE_SCHEMAS = {
    "number": {"type": "number", "minimum": 0},
    "positive": {"type": "number", "exclusiveMinimum": 0},
    "integer": {"type": "integer", "minimum": 1},
    "curve": {"type": "array", "minItems": 1,
              "items": {"type": "array", "minItems": 2, "maxItems": 2,
                        "items": {"type": "number", "exclusiveMinimum": 0}}},
    "masks": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"enum": [1, 7]}},
}
_FIX = {
    "number": "give a number >= 0", "positive": "give a number > 0", "integer": "give an integer >= 1",
    "curve": "give a list of [rows, GFLOPS] pairs, e.g. [[1, 56.25], [16, 900.0]]",
    "masks": "give a list of core masks from 1 (NPU_CORE_0) and 7 (NPU_CORE_0_1_2)",
}
_MEASURED = {
    "type": "object",
    "required": ["ms"],
    "properties": {"ms": {"type": "number", "minimum": 0}, "core_mask": {"type": "integer"},
                   "repeats": {"type": "integer", "minimum": 1}, "backend": {"type": "string"},
                   "source": {"type": "string"}},
    "additionalProperties": False,
}
_META = {"name": {"type": "string", "minLength": 1}, "description": {"type": "string"},
         "base": {"type": "string", "minLength": 1},
         "measured_segments": {"type": "object", "additionalProperties": _MEASURED}}


def _constant_schema(kind: str) -> dict:
    return {"type": "object", "required": ["value", "source"],
            "properties": {"value": _VALUE_SCHEMAS[kind], "source": {"type": "string", "minLength": 1},
                           "unit": {"type": "string"}, "note": {"type": "string"}},
            "additionalProperties": False}


SCHEMA = {
    "type": "object",
    "properties": {**_META, **{k: _constant_schema(kind) for k, (kind, _, _) in CONSTANTS.items()}},
    "additionalProperties": False,
}
_VALIDATOR = None


@dataclass(frozen=True)
class BoardProfile:
    """Merged, validated constants. `profile.npu_call_us` etc. read values; `sources[name]` says why."""

    name: str
    path: Path
    description: str
    values: dict
    sources: dict
    files: tuple = ()  # every file merged, base first
    measured_segments: dict = field(default_factory=dict)

    def __getattr__(self, key):
        values = object.__getattribute__(self, "values")
        if key in values:
            return values[key]
        raise AttributeError(key)

    def gflops(self, rows: float) -> float:
        """One core's fp16 MatMul GFLOPS at `rows` per call: linear between curve points, flat outside."""
        pts = sorted((float(r), float(g)) for r, g in self.values["npu_fp16_gflops"])
        if rows <= pts[0][0]:
            return pts[0][1] * rows / pts[0][0] if pts[0][0] > 1 else pts[0][1]
        for (r0, g0), (r1, g1) in zip(pts, pts[1:]):
            if rows <= r1:
                return g0 + (g1 - g0) * (rows - r0) / (r1 - r0)
        return pts[-1][1]

    def to_dict(self) -> dict:
        return {"name": self.name, "file": str(self.path), "files": [str(f) for f in self.files],
                "constants": {k: {"value": self.values[k], "unit": CONSTANTS[k][1], "source": self.sources[k]}
                              for k in CONSTANTS}}


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def _resolve(name_or_path: str | os.PathLike, relative_to: Path | None = None) -> Path:
    text = os.fspath(name_or_path)
    shipped = PROFILE_DIR / f"{text}.toml"
    if os.sep not in text and "/" not in text and not text.endswith(".toml") and shipped.is_file():
        return shipped
    path = Path(text)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if path.is_file():
        return path
    if path.exists():
        raise UserError(f"{path}: is not a file; give a board profile .toml file or one of "
                        f"{', '.join(shipped_profiles())}")
    raise UserError(f"--board {text}: no such profile or file; choose one of {', '.join(shipped_profiles())} "
                    "or give the path of a profile .toml (e.g. one written on a board by "
                    "python -m rwkv2rknn.run OUT --backend rknn-lite --calibrate FILE.toml)")


def _read(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc}); fix the file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text TOML file; give a board profile .toml") from None
    _check(data, path)
    return data


def _check(data: dict, path: Path) -> None:
    """Schema check of one file (before merging): names the file and the bad key in one line."""
    global _VALIDATOR
    for key in data:
        if key not in SCHEMA["properties"]:
            near = difflib.get_close_matches(key, list(SCHEMA["properties"]), n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"known constants: {', '.join(CONSTANTS)}"
            raise UserError(f"{path}: unknown key {key!r}; {hint}")
    if _VALIDATOR is None:
        cls = jsonschema.validators.validator_for(SCHEMA)
        cls.check_schema(SCHEMA)
        _VALIDATOR = cls(SCHEMA)
    err = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(data))
    if err is None:
        return
    where = ".".join(str(p) for p in err.absolute_path) or "top level"
    top = str(err.absolute_path[0]) if err.absolute_path else ""
    if top in CONSTANTS:
        kind = CONSTANTS[top][0]
        fix = _FIX[kind] if where.startswith(f"{top}.value") else f"write [{top}] with value = ... and source = \"...\""
    elif top == "measured_segments":
        fix = "each entry needs ms = <number>"
    else:
        fix = "see rwkv2rknn/cost/profiles/rk3588.toml for the format"
    raise UserError(f"{path}: {where}: {err.message}; {fix}")


def load_profile(name_or_path: str | os.PathLike = DEFAULT_PROFILE) -> BoardProfile:
    """A shipped profile by name (`rk3588`, `rk3588-2023`) or a TOML file; `base` chains are merged."""
    chain: list[tuple[Path, dict]] = []
    path = _resolve(name_or_path)
    seen = set()
    while True:
        real = path.resolve()
        if real in seen or len(chain) >= _MAX_BASE_DEPTH:
            raise UserError(f"{chain[0][0]}: base profiles form a loop or are nested deeper than "
                            f"{_MAX_BASE_DEPTH}; point base at a shipped profile")
        seen.add(real)
        data = _read(path)
        chain.append((path, data))
        if "base" not in data:
            break
        try:
            path = _resolve(data["base"], relative_to=path.parent)
        except UserError:
            raise UserError(f"{path}: base = {data['base']!r}: no such profile; use one of "
                            f"{', '.join(shipped_profiles())} or a path relative to this file") from None
    values, sources, measured = {}, {}, {}
    for _, data in reversed(chain):  # base first, overrides last
        for key in CONSTANTS:
            if key in data:
                values[key] = data[key]["value"]
                sources[key] = data[key]["source"]
        measured.update(data.get("measured_segments", {}))
    top_path, top = chain[0]
    missing = [k for k in CONSTANTS if k not in values]
    if missing:
        raise UserError(f"{top_path}: missing constant {missing[0]!r} ({CONSTANTS[missing[0]][2]}); add "
                        f"[{missing[0]}] with value and source, or set base = \"{DEFAULT_PROFILE}\"")
    name = top.get("name") or next((d.get("name") for _, d in chain if d.get("name")), top_path.stem)
    description = top.get("description") or next((d.get("description") for _, d in chain
                                                  if d.get("description")), "")
    return BoardProfile(name=name, path=top_path, description=description, values=values, sources=sources,
                        files=tuple(p for p, _ in reversed(chain)), measured_segments=measured)


__all__ = ["CONSTANTS", "CORE_MASK_NAMES", "DEFAULT_PROFILE", "PROFILE_DIR", "BoardProfile", "load_profile",
           "shipped_profiles"]
