"""The manifest: the JSON contract between the compiler (split, build) and the hybrid runtime."""

from __future__ import annotations

import json
from pathlib import Path

from rwkv2rknn.artifacts import BUILD_NAME, join, load_record, record_of, split_legacy
from rwkv2rknn.errors import UserError
from rwkv2rknn.fsio import sha256_file, write_json_atomic

# 3: the plan only; what `build` makes lives in build.json beside it (rwkv2rknn/artifacts.py), the execution
#    program in program.json (rwkv2rknn/program); boundary dtypes are the board's (fp16 at NPU segments),
#    states may carry an fp16 `shadow`, segments `boundary_casts`.
# 2: a graph entry may stand for several source graphs merged into one (`covers`, `sources`: the deep
#    policy); segments may carry `cost`, `compiler`, `core_mask`, `calib`. Formats 1 and 2 still load.
FORMAT_VERSION = 3
# The directory `split` writes and `build` reads when the user names none.
DEFAULT_OUT = "rwkv2rknn-out"
MANIFEST_NAME = "manifest.json"

_TENSOR = {
    "type": "object",
    "required": ["name", "dtype", "shape"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "dtype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    },
}
_SOURCE = {
    "type": "object",
    "required": ["path", "sha256"],
    "properties": {"path": {"type": "string"}, "sha256": {"type": "string"}, "name": {"type": "string"}},
}
_REF = {
    "type": "object",
    "required": ["graph", "name"],
    "properties": {"graph": {"type": "string"}, "name": {"type": "string"}},
}
_GRAPH = {
        "type": "object",
        "required": ["name", "inputs", "outputs", "segments"],
        "oneOf": [{"required": ["source"]}, {"required": ["sources", "covers"]}],
        "properties": {
            "name": {"type": "string"},
            "source": _SOURCE,
            "sources": {"type": "array", "minItems": 1, "items": _SOURCE},
            "covers": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "policy": {"type": "string"},
            "inputs": {"type": "array", "items": _TENSOR},
            "outputs": {"type": "array", "items": _TENSOR},
            "segments": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["id", "backend", "onnx", "inputs", "outputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "backend": {"enum": ["npu", "cpu"]},
                        "onnx": {"type": "string"},
                        "sha256": {"type": "string"},
                        "inputs": {"type": "array", "items": _TENSOR},
                        "outputs": {"type": "array", "items": _TENSOR},
                        "rknn": {"type": "string"},
                        "rknn_sha256": {"type": "string"},
                        "verify": {
                            "type": "object",
                            "properties": {
                                "cosine": {"type": "number"},
                                "max_abs": {"type": "number"},
                                "rel_l2": {"type": "number", "minimum": 0},
                                "worst_output": {"type": "string"},
                                "scale": {"type": "number"},
                            },
                        },
                        "fallback_reason": {"type": "string"},
                        "precision": {"enum": ["fp16", "w8a8"]},
                        "precision_reason": {"type": "string"},
                        "calib": {"type": "string"},
                        "cost": {"type": "object"},
                        "compiler": {
                            "type": "object",
                            "required": ["ops", "cpu_ops", "cycles"],
                            "properties": {"ops": {"type": "integer", "minimum": 0},
                                           "cpu_ops": {"type": "array", "items": {"type": "string"}},
                                           "cycles": {"type": "integer", "minimum": 0}},
                        },
                        "core_mask": {"enum": [0, 1, 2, 3, 4, 7]},
                    },
                },
            },
        },
    }
SCHEMA = {
    "type": "object",
    "required": ["format_version", "target", "graphs"],
    "properties": {
        "format_version": {"type": "integer", "minimum": 1},
        "target": {"type": "string"},
        "policy": {"type": "string"},
        "graphs": {"type": "array", "minItems": 1, "items": _GRAPH},
        "prefill": {
            "type": "object",
            "required": ["chunk", "graphs", "order", "links", "state", "token_input", "logits"],
            "properties": {
                "chunk": {"type": "integer", "minimum": 2},
                "graphs": {"type": "array", "minItems": 1, "items": _GRAPH},
                "order": {"type": "array", "items": {"type": "string"}},
                "links": {"type": "array", "items": {"type": "object", "required": ["from", "to"],
                                                     "properties": {"from": _REF, "to": _REF,
                                                                    "last": {"type": "boolean"}}}},
                "state": {"type": "array", "items": {"type": "object",
                                                     "required": ["graph", "input", "output", "dtype"]}},
                "token_input": _REF,
                "logits": _REF,
            },
        },
        "verify": {  # rwkv2rknn/verify_plan.py: k drafted tokens per call, logits and state after every row
            "type": "object",
            "required": ["rows", "graphs", "order", "links", "state", "token_input", "logits"],
            "properties": {
                "rows": {"type": "integer", "minimum": 2},
                "graphs": {"type": "array", "minItems": 1, "items": _GRAPH},
                "order": {"type": "array", "items": {"type": "string"}},
                "state": {"type": "array", "items": {"type": "object",
                                                     "required": ["graph", "input", "output", "dtype",
                                                                  "row_outputs"]}},
                "token_input": _REF,
                "logits": _REF,
            },
        },
        "model": {
            "type": ["object", "null"],
            "required": ["vocab_size", "token_input", "logits", "links", "state"],
            "properties": {
                "vocab_size": {"type": "integer", "minimum": 1},
                "family": {"type": "string"},
                # how a state-tuning file's time_state becomes a layer state (rwkv2rknn.families.StateTuning)
                "state_tuning": {"type": ["object", "null"], "required": ["input", "axes"],
                                 "properties": {"input": {"type": "string"},
                                                "axes": {"type": "array", "items": {"type": "integer"}}}},
                "n_layer": {"type": "integer"},
                "n_embd": {"type": "integer"},
                "tokenizer": {"type": ["string", "null"]},
                "token_input": _REF,
                "logits": _REF,
                "links": {
                    "type": "array",
                    "items": {"type": "object", "required": ["from", "to"],
                              "properties": {"from": _REF, "to": _REF}},
                },
                "state": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["graph", "input", "output", "shape", "dtype", "init"],
                        "properties": {
                            "graph": {"type": "string"},
                            "input": {"type": "string"},
                            "output": {"type": "string"},
                            "shape": {"type": "array", "items": {"type": "integer"}},
                            "dtype": {"type": "string"},
                            "init": {
                                "type": "object",
                                "required": ["fill"],
                                "properties": {
                                    "fill": {"type": "number"},
                                    "rows": {"type": "object",
                                             "additionalProperties": {"type": "number"}},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def _plan_graphs(data: dict) -> list[dict]:
    """The decode plan's graphs, then the prefill plan's (manifest data as loaded)."""
    from rwkv2rknn.artifacts import plan_graphs

    return plan_graphs(data)


def runs_on(seg: dict) -> str:
    """Where a segment runs: "npu", or "cpu" (planned so, or an NPU segment whose compile failed)."""
    return "cpu" if seg["backend"] == "cpu" or seg.get("fallback_reason") else "npu"


def tensor_spec(name: str, dtype: str, shape) -> dict:
    return {"name": name, "dtype": str(dtype), "shape": [int(d) for d in shape]}


class Manifest:
    """A split's plan (manifest.json) and its build record (build.json), with the directory paths start from.

    `data` is the combined view (the plan with each segment's build results in it: what the cost model, the
    report and the build read); `plan` and `record` are the two files as they are. `save()` (the build's) writes
    the record and the program, never the plan (a format-2 manifest is rewritten once as format 3).
    """

    def __init__(self, data: dict, path: str | Path, plan: dict | None = None, record: dict | None = None,
                 legacy: bool = False):
        self.data = data
        self.path = Path(path)
        self.root = self.path.parent
        self.plan = plan if plan is not None else data
        self.record = record
        self.legacy = legacy

    # -- access ---------------------------------------------------------------------------------
    @property
    def graphs(self) -> list[dict]:
        return self.data["graphs"]

    @property
    def prefill(self) -> dict | None:
        """The prefill plan (M prompt tokens per call), or None."""
        return self.data.get("prefill")

    def all_graphs(self) -> list[dict]:
        """The decode plan's graphs, then the prefill plan's."""
        return _plan_graphs(self.data)

    @property
    def model(self) -> dict | None:
        return self.data.get("model")

    @property
    def target(self) -> str:
        return self.data["target"]

    def segments(self):
        """Every (graph, segment) pair: the decode plan in execution order, then the prefill plan."""
        for g in self.all_graphs():
            for s in g["segments"]:
                yield g, s

    def resolve(self, rel: str) -> Path:
        return self.root / rel

    def relative(self, path: str | Path) -> str:
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def current_record(self) -> dict | None:
        """The build record as the combined view now holds it (None before any build)."""
        if self.record is None and "build" not in self.data:
            return None
        return record_of(self.data, self.plan)

    def program(self):
        """The execution program of the plan and the current build record (rwkv2rknn/program)."""
        from rwkv2rknn import __version__
        from rwkv2rknn.program.lower import lower
        from rwkv2rknn.artifacts import source_hashes

        return lower(self.plan, self.current_record(), producer=f"rwkv2rknn {__version__}",
                     source=source_hashes(self.root))

    # -- io -------------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the build record (and, once, a format-2 manifest's plan as format 3), then the program."""
        from rwkv2rknn.program import PROGRAM_NAME, save as save_program

        validate(self.data, self.path)
        if self.legacy:
            validate(self.plan, self.path)
            write_json_atomic(self.path, self.plan)
            self.legacy = False
        record = self.current_record()
        if record is not None:
            record["manifest_sha256"] = sha256_file(self.path)
            write_json_atomic(self.root / BUILD_NAME, record)
            self.record = record
        save_program(self.program(), self.root / PROGRAM_NAME)

    @classmethod
    def load(cls, path: str | Path, check_files: bool = True) -> Manifest:
        """Load and validate; refuse newer formats, missing files and files whose sha256 changed."""
        path = Path(path)
        if path.is_dir() or (not path.exists() and not path.name.endswith(".json")):
            path = path / MANIFEST_NAME
        if not path.exists():
            raise UserError(f"{path}: no manifest here; run `rwkv2rknn split MODEL -o {path.parent}` first")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: not a valid manifest ({exc}); rerun `rwkv2rknn split`") from None
        if not isinstance(data, dict) or "format_version" not in data:
            raise UserError(f"{path}: not an rwkv2rknn manifest (no format_version); rerun `rwkv2rknn split`")
        if not isinstance(data["format_version"], int) or isinstance(data["format_version"], bool):
            raise UserError(f"{path}: format_version {data['format_version']!r} is not an integer; "
                            "rerun `rwkv2rknn split`")
        if data["format_version"] > FORMAT_VERSION:
            raise UserError(
                f"{path}: manifest format {data['format_version']} is newer than this rwkv2rknn "
                f"understands ({FORMAT_VERSION}); upgrade rwkv2rknn or split again with this version"
            )
        validate(data, path)
        legacy = data["format_version"] < 3
        if legacy:
            plan, record = split_legacy(data)
        else:
            plan = data
            try:
                record = load_record(path.parent)
            except ValueError as exc:
                raise UserError(str(exc)) from None
        joined = join(plan, record)
        validate(joined, path)
        m = cls(joined, path, plan, record, legacy)
        if check_files:
            m.check_files()
        return m

    def check_files(self) -> None:
        for _, seg in self.segments():
            for key, hkey in (("onnx", "sha256"), ("rknn", "rknn_sha256")):
                if key not in seg:
                    continue
                f = self.resolve(seg[key])
                if not f.exists():
                    raise UserError(
                        f"{self.path}: segment {seg['id']} names {seg[key]}, which is missing; "
                        "copy the whole output directory, or split/build again"
                    )
                if hkey in seg and sha256_file(f) != seg[hkey]:
                    raise UserError(
                        f"{f}: sha256 differs from {self.path.name} (file altered or partly copied); "
                        "copy it again, or split/build again"
                    )


_VALIDATOR = None


def as_manifest(manifest) -> Manifest:
    """A Manifest as it is, or loaded from a path."""
    return manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)


def validate(data: dict, path: str | Path = "manifest") -> None:
    global _VALIDATOR
    import jsonschema

    if _VALIDATOR is None:  # checking the schema itself costs more than a manifest: do it once
        cls = jsonschema.validators.validator_for(SCHEMA)
        cls.check_schema(SCHEMA)
        _VALIDATOR = cls(SCHEMA)
    try:
        _VALIDATOR.validate(data)
    except jsonschema.ValidationError as exc:  # noqa: F821 (imported above, lazily)
        where = "/".join(str(p) for p in exc.absolute_path) or "top level"
        raise UserError(f"{path}: invalid manifest at {where}: {exc.message}; rerun `rwkv2rknn split`") from None
    ids = [s["id"] for g in _plan_graphs(data) for s in g["segments"]]
    if len(ids) != len(set(ids)):
        raise UserError(f"{path}: segment ids are not unique; rerun `rwkv2rknn split`")
