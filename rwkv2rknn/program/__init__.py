"""The execution program: the one thing every runner executes (docs/runtime-abi.md).

Lowered once from a split's plan and a build's record (rwkv2rknn/program/lower.py), written as
OUT/program.json, read by the runtime. It is flat and typed: a table of buffers (dtype, shape, role, views),
the recurrent states as ping-pong buffer pairs, and per plan (decode, prefill) a list of steps, each running
one segment (or converting one buffer) from input buffers into output buffers, with its dependencies.

This package imports only the standard library: the runtime reads it on the board.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROGRAM_VERSION = 2  # the newest this runtime executes; 2 adds the verify plan (a program without one is written as 1)
VERIFY_VERSION = 2
PROGRAM_NAME = "program.json"
ITEMSIZE = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1, "float64": 8}


class ProgramError(ValueError):
    """A program file this runtime cannot execute (the message says which file and what to do)."""


@dataclass
class Tensor:
    name: str
    dtype: str
    shape: list

    @property
    def elements(self) -> int:
        return int(math.prod(self.shape)) if self.shape else 1


@dataclass
class Segment:
    """One compiled piece: an ONNX file for onnxruntime (and the compiler), a .rknn for the NPU after build."""

    id: str
    device: str                 # where it runs on the board: "npu" or "cpu" (planned so, or fallen back)
    onnx: str                   # path relative to the program file
    inputs: list                # Tensor, in the order runners bind them
    outputs: list
    onnx_sha256: str | None = None
    rknn: str | None = None
    rknn_sha256: str | None = None
    precision: str | None = None
    core_mask: int | None = None
    casts: list = field(default_factory=list)  # conversions inside its own graph: {tensor, to, elements}
    planned: str = "npu"        # the split's backend
    fallback_reason: str | None = None
    calib: str | None = None    # w8a8: the calibration samples (the simulator rebuilds the segment from them)
    hybrid: dict | None = None  # a w8a8 build with only its heavy MatMuls int8: {int8_weight_share, fp16_layers}
    weights: list = field(default_factory=list)  # {name, file, dtype, shape}: initializers kept in shared files
    parallel: str | None = None  # an N-split piece: its group, run at once (one piece per core)
    slices: dict = field(default_factory=dict)  # piece output -> {of, start, stop}: columns of a whole output


@dataclass
class Buffer:
    id: int
    name: str                   # "<plan>/<graph>/<tensor>" (or "state/..."): for people and traces
    dtype: str
    shape: list
    role: str                   # token | activation | state | logits | input | output
    view_of: int | None = None  # a view: `nbytes` bytes of buffer `view_of` from byte `offset` (a row pick)
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return (int(math.prod(self.shape)) if self.shape else 1) * ITEMSIZE[self.dtype]


@dataclass
class Step:
    id: int
    op: str                     # "run": segment from inputs into outputs; "convert": inputs[0] -> outputs[0]
    inputs: list                # buffer ids (for "run": in the segment's input order)
    outputs: list
    device: str                 # "npu" or "cpu"
    graph: str = ""
    segment: str | None = None
    deps: list = field(default_factory=list)   # steps of the same plan run whose outputs this step reads
    overlap: bool = False       # nothing later in the run reads its outputs: may run beside the next steps
    parallel: str | None = None  # consecutive steps of one group run at once (N-split pieces, one per core)
    core_mask: int | None = None
    converted_bytes: int = 0    # fp32-side bytes converted by this step (casts in its graph, or the convert)


@dataclass
class State:
    name: str
    dtype: str
    shape: list
    pair: list                  # [a, b]: at even parity steps read a and write b; at odd parity the roles swap
    init_fill: float = 0.0
    init_rows: dict = field(default_factory=dict)
    shadow: list | None = None  # [a, b] of the fp16 copy an NPU segment reads (written with the state)


@dataclass
class Plan:
    name: str                   # "decode", "prefill" or "verify"
    tokens: int                 # tokens per run
    steps: list
    token: int | None = None    # buffer of the token ids
    logits: int | None = None   # buffer of the logits after the run's last token
    # {step, kind, where, tensor, bytes} per run; kind "cpu" (a cast in an onnxruntime graph or a convert step) or
    # "npu_runtime" (an fp32 boundary of an NPU segment, converted by the NPU's runtime on each call)
    conversions: list = field(default_factory=list)
    converted_bytes: int = 0    # per run
    # a verify plan (rows = tokens): per state {state, rows: [buffer ids]}, the state after rows 0..tokens-2; the
    # state after the last row is written where every plan writes it. commit(j) keeps the state after row j.
    state_rows: list = field(default_factory=list)

    @property
    def converted_bytes_per_token(self) -> float:
        return self.converted_bytes / max(1, self.tokens)


@dataclass
class Program:
    version: int
    producer: str
    target: str
    model: dict | None          # family, vocab_size, tokenizer, n_layer, n_embd, state_tuning (None: single graphs)
    segments: dict              # id -> Segment
    buffers: list               # Buffer, by id
    states: list                # State
    plans: dict                 # name -> Plan
    graphs: dict = field(default_factory=dict)   # single graphs: name -> {inputs, outputs, steps}
    source: dict = field(default_factory=dict)   # sha256 of the manifest and build record lowered from
    notes: list = field(default_factory=list)
    probes: list = field(default_factory=list)   # Segment: the calibration probe models a build made

    # -- reading ------------------------------------------------------------------------------------------
    @property
    def decode(self) -> Plan:
        return self.plans["decode"]

    @property
    def prefill(self) -> Plan | None:
        return self.plans.get("prefill")

    @property
    def verify(self) -> Plan | None:
        return self.plans.get("verify")

    def swap_map(self) -> dict:
        """buffer id -> its partner at odd parity (every ping-pong pair, both ways)."""
        out = {}
        for st in self.states:
            for pair in (st.pair, st.shadow):
                if pair:
                    a, b = pair
                    out[a], out[b] = b, a
        return out

    def to_json(self) -> dict:
        return {"format": "rwkv2rknn-program", "version": self.version, "producer": self.producer,
                "target": self.target, "model": self.model, "source": self.source, "notes": self.notes,
                "segments": {k: asdict(v) for k, v in self.segments.items()},
                "buffers": [asdict(b) for b in self.buffers],
                "states": [asdict(s) for s in self.states],
                "plans": {k: {**{f: v for f, v in asdict(p).items() if f != "state_rows" or v},
                              "converted_bytes_per_token": p.converted_bytes_per_token}
                          for k, p in self.plans.items()},
                "graphs": self.graphs, "probes": [asdict(p) for p in self.probes]}

    @classmethod
    def from_json(cls, d: dict, where: str = PROGRAM_NAME) -> Program:
        if not isinstance(d, dict) or d.get("format") != "rwkv2rknn-program":
            raise ProgramError(f"{where}: not an rwkv2rknn program; run `rwkv2rknn build` (or split) again")
        version = d.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ProgramError(f"{where}: program version {version!r} is not an integer; run `rwkv2rknn build` again")
        if version > PROGRAM_VERSION:
            raise ProgramError(f"{where}: program version {version} is newer than this rwkv2rknn understands "
                               f"({PROGRAM_VERSION}); upgrade rwkv2rknn on this machine")
        def segment(v: dict) -> Segment:
            return Segment(**{**v, "inputs": [Tensor(**t) for t in v["inputs"]],
                              "outputs": [Tensor(**t) for t in v["outputs"]]})

        try:
            segments = {k: segment(v) for k, v in d["segments"].items()}
            probes = [segment(v) for v in d.get("probes") or []]
            buffers = [Buffer(**b) for b in d["buffers"]]
            states = [State(**s) for s in d["states"]]
            plans = {k: Plan(**{**{f: v for f, v in p.items() if f != "converted_bytes_per_token"},
                                "steps": [Step(**s) for s in p["steps"]]})
                     for k, p in d["plans"].items()}
            prog = cls(version, d.get("producer", ""), d["target"], d.get("model"), segments, buffers, states,
                       plans, d.get("graphs") or {}, d.get("source") or {}, d.get("notes") or [], probes)
        except (KeyError, TypeError) as exc:
            raise ProgramError(f"{where}: malformed program ({type(exc).__name__}: {exc}); "
                               "run `rwkv2rknn build` (or split) again") from None
        prog.check(where)
        return prog

    def check(self, where: str = PROGRAM_NAME) -> None:
        """Structural checks a runner relies on: ids in range, each buffer written once per run, dtypes known."""
        n = len(self.buffers)
        for i, b in enumerate(self.buffers):
            if b.id != i or b.dtype not in ITEMSIZE:
                raise ProgramError(f"{where}: buffer {i} ({b.name}) is malformed; run `rwkv2rknn build` again")
            if b.view_of is not None and not (0 <= b.view_of < n and b.offset + b.nbytes
                                              <= self.buffers[b.view_of].nbytes):
                raise ProgramError(f"{where}: view {b.name} lies outside its buffer; run `rwkv2rknn build` again")
        for p in self.plans.values():
            written: set = set()
            for s in p.steps:
                if any(not 0 <= x < n for x in s.inputs + s.outputs):
                    raise ProgramError(f"{where}: step {s.id} of {p.name} names an unknown buffer")
                if s.op == "run" and s.segment not in self.segments:
                    raise ProgramError(f"{where}: step {s.id} runs unknown segment {s.segment}")
                if written & set(s.outputs):
                    raise ProgramError(f"{where}: a buffer is written twice in one {p.name} run")
                written |= set(s.outputs)


def save(program: Program, path: str | Path) -> None:
    """Write atomically (a temporary name, fsync, rename): a reader never sees half a program."""
    import os
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(program.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def load(path: str | Path) -> Program:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProgramError(f"{path}: cannot read the program ({exc}); run `rwkv2rknn build` (or split) again") from None
    return Program.from_json(data, str(path))


__all__ = ["ITEMSIZE", "PROGRAM_NAME", "PROGRAM_VERSION", "Buffer", "Plan", "Program", "ProgramError", "Segment",
           "State", "Step", "Tensor", "load", "save"]
