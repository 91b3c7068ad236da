"""Parse the per-op table ("Network Layer Information Table") that rknn-toolkit2 prints on a verbose build.

`RKNN(verbose=True).build(...)` writes, on the raw file descriptors 1/2, log lines such as (2.5.0)::

    D RKNN: [..] ID  OpType  DataType Target InputShape  OutputShape  Cycles(DDR/NPU/Total)  RW(KB)  FullName
    D RKNN: [..] 16  Conv    FLOAT16  NPU    (1,128,1,1),(128,128,1,1)  (1,128,1,1)  1407/512/1407  32  Conv:MatMul_1#2
    D RKNN: [..] 29  Exp     FLOAT16  CPU    (1,128,1,1)  (1,128,1,1)  0/0/0  0  Exp:Exp_0

followed by a feature-tensor table, a const-tensor table and "Total Internal/Weight Memory Size" lines.
`parse_compiler_table(text)` returns a `CompilerTable` (or None when the text holds no such table) and
never raises. What the table gives a cost model, and what it does not:

- per op: where the compiler placed it (`target`), its estimated cycles (DDR-bound / NPU-bound / the
  larger, "Total"), bytes read+written (`rw_kb`) and its input/output shapes in the compiler's layout;
- only Conv-like ops (MatMul-as-Conv, ConvAdd, ...) carry cycles: elementwise NPU ops and every CPU op
  show 0/0/0, so the sum underestimates whatever is not a weight stream, and a CPU op's real cost
  (an NPU->CPU->NPU hop inside one rknn_run) is not in the figure at all: count `cpu_ops` instead;
- `memory`: the "Total Internal Memory Size" (activations) and "Total Weight Memory Size", in KB.
  The 2.5.0 log prints no total-cycles line: `cycles` is the sum of the per-op "Total" column.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field

# The compiler's own markers for graph inputs/outputs: always listed with Target CPU, they are not ops.
IO_OPS = ("InputOperator", "OutputOperator")

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\[\d{1,2}(?:;\d{1,2})*m")  # also colour codes whose ESC was lost
# "D RKNN: [02:58:06.787] " (2.x), "I RKNN: ", "W RKNN: [..] " ...; kept generic.
_PREFIX = re.compile(r"^\s*(?:[DIWEF]\s+)?RKNN:\s*(?:\[[^\]]*\]\s?)?")
_ROW_START = re.compile(r"^\s*(\d+)\s+([A-Za-z_][\w.:#/-]*)(?:\s|$)")
_SEPARATOR = re.compile(r"^\s*(?:-+|[-=+]{3,})\s*$")
_CYCLES3 = re.compile(r"^(\d+)/(\d+)/(\d+)$")
_INT = re.compile(r"^-?\d+$")
_NUM = re.compile(r"^-?\d+(?:\.\d+)?$")
_MEMORY = re.compile(r"Total\s+(\w+)\s+Memory\s+Size\s*:\s*([\d.]+)\s*([KMG]?B)", re.IGNORECASE)
_UNIT_KB = {"B": 1 / 1024, "KB": 1.0, "MB": 1024.0, "GB": 1024.0 * 1024.0}
_TARGETS = ("CPU", "NPU", "GPU")
# Header words that belong to the word before them ("DDR Cycles", "Task Number" in 1.x tables).
_HEADER_SUFFIXES = ("Cycles", "Number", "Usage", "Usage(%)")


@dataclass
class OpRow:
    """One row of the table. Ints/floats are None where the column is absent or unreadable."""

    index: int
    op_type: str
    name: str                      # the FullName after "Type:", e.g. "MatMul_1#2" (the ONNX node name + compiler suffix)
    target: str | None             # "CPU" | "NPU" (as printed)
    cycles_ddr: int | None = None
    cycles_npu: int | None = None
    cycles_total: int | None = None
    rw_kb: float | None = None
    data_type: str | None = None
    input_shapes: list = field(default_factory=list)   # [(1, 128, 1, 1), ...]; a "..." (truncated) entry is dropped
    output_shapes: list = field(default_factory=list)
    full_name: str | None = None   # as printed, e.g. "Conv:MatMul_1#2"
    extra: dict = field(default_factory=dict)          # unknown columns, by header name

    @property
    def is_io(self) -> bool:
        return self.op_type in IO_OPS

    @property
    def label(self) -> str:
        """"OpType:name" with the table's OpType column, e.g. "Exp:Exp_0", "ConvSigmoid:MatMul_0#2"."""
        return f"{self.op_type}:{self.name}" if self.name else self.op_type


@dataclass
class CompilerTable:
    rows: list                                  # OpRow, in the table's order
    memory: dict = field(default_factory=dict)  # {"internal_kb": 11.0, "weight_kb": 424.625} when printed
    columns: list = field(default_factory=list)  # header names as printed

    @property
    def ops(self) -> int:
        """Number of ops, not counting the InputOperator/OutputOperator markers."""
        return sum(1 for r in self.rows if not r.is_io)

    @property
    def cpu_ops(self) -> list:
        """"OpType:name" of every op the compiler placed on the CPU (InputOperator/OutputOperator excluded)."""
        return [r.label for r in self.rows if r.target == "CPU" and not r.is_io]

    @property
    def cycles(self) -> int:
        """Sum of the per-op "Total" cycles (0 for rows without a cycles figure)."""
        return sum(r.cycles_total or 0 for r in self.rows)

    @property
    def rw_kb(self) -> float:
        """Sum of the per-op RW(KB) column: the DDR traffic the compiler estimates."""
        return float(sum(r.rw_kb or 0.0 for r in self.rows))

    def op_counts(self, target: str | None = None) -> dict:
        """OpType -> count (optionally only ops placed on `target`), markers excluded."""
        out: dict = {}
        for r in self.rows:
            if not r.is_io and (target is None or r.target == target):
                out[r.op_type] = out.get(r.op_type, 0) + 1
        return out

    def to_json(self) -> dict:
        """The manifest's `compiler` entry: {"ops": n, "cpu_ops": ["Exp:Exp_0", ...], "cycles": total}."""
        return {"ops": self.ops, "cpu_ops": self.cpu_ops, "cycles": self.cycles}

    def summary(self) -> dict:
        """to_json() plus what else the log gives a cost model (memory, DDR traffic, placement by op type)."""
        return {**self.to_json(), "rw_kb": self.rw_kb, "memory": dict(self.memory),
                "npu_op_types": self.op_counts("NPU"), "cpu_op_types": self.op_counts("CPU")}


def _header_columns(line: str) -> list:
    cols: list = []
    for tok in line.split():
        if cols and tok in _HEADER_SUFFIXES and not cols[-1].endswith(")"):
            cols[-1] = f"{cols[-1]} {tok}"
        else:
            cols.append(tok)
    return cols


def _shapes(text):
    out = []
    for m in re.finditer(r"\(([^()]*)\)", text or ""):
        dims = [d.strip() for d in m.group(1).split(",") if d.strip()]
        if dims and all(_INT.match(d) for d in dims):
            out.append(tuple(int(d) for d in dims))
    return out


def _key(col: str) -> str:
    return re.sub(r"[^a-z0-9]", "", col.lower())


def _cycles_from(values: dict, tokens: list):
    """(ddr, npu, total) from a "Cycles(DDR/NPU/Total)" column, separate 1.x columns, or any d/d/d token."""
    for col, v in values.items():
        k = _key(col)
        if k.startswith("cycles") and v and _CYCLES3.match(v):
            return tuple(int(x) for x in _CYCLES3.match(v).groups())
    sep = {}
    for col, v in values.items():
        k = _key(col)
        for part, names in (("ddr", ("ddrcycles",)), ("npu", ("npucycles",)), ("total", ("totalcycles", "maxcycles"))):
            if k in names and v and _INT.match(v):
                sep[part] = int(v)
    if sep:
        return sep.get("ddr"), sep.get("npu"), sep.get("total")
    for tok in tokens:  # columns misaligned: the only token shaped like a/b/c
        m = _CYCLES3.match(tok)
        if m:
            return tuple(int(x) for x in m.groups())
    return None, None, None


_SHAPE_TOKEN = re.compile(r"^(\\|\([\d,]*\)(,\([\d,]*\))*(,\.\.\.)?)$")


def _row_score(tokens: list, cols: list) -> int:
    """How much a token list looks like a row of this header (picks how wrapped pieces are glued)."""
    n = len(cols)
    score = 3 if len(tokens) == n else -abs(len(tokens) - n)
    for k, col in enumerate(cols[:len(tokens)]):
        key, tok = _key(col), tokens[k]
        if key == "target" and tok in _TARGETS:
            score += 2
        elif key.startswith("cycles") and _CYCLES3.match(tok):
            score += 1
        elif key in ("inputshape", "outputshape") and _SHAPE_TOKEN.match(tok):
            score += 1
    if tokens and ":" in tokens[-1]:
        score += 1
    return score


def _parse_row(tokens: list, cols: list):
    if len(tokens) < 2 or not _INT.match(tokens[0]):
        return None
    values: dict = {}
    n = len(cols)
    if len(tokens) > n >= 1:  # a name with spaces: the tail belongs to the last column
        tokens = tokens[:n - 1] + [" ".join(tokens[n - 1:])]
    for col, tok in zip(cols, tokens):
        values[col] = tok
    by_key = {_key(c): c for c in cols}

    def get(*keys):
        for k in keys:
            c = by_key.get(k)
            if c is not None and values.get(c) not in (None, "\\"):
                return values[c]
        return None

    target = get("target")
    if target not in _TARGETS:
        found = [t for t in tokens[2:] if t in _TARGETS]
        target = found[0] if found else target
    full = get("fullname", "name")
    if full is None and tokens and ":" in tokens[-1]:
        full = tokens[-1]
    op_type = get("optype", "op") or tokens[1]
    name = full.split(":", 1)[1] if full and ":" in full else (full or "")
    ddr, npu, total = _cycles_from(values, tokens)
    rw = get("rwkb", "rw")
    known = {"id", "optype", "op", "datatype", "target", "inputshape", "outputshape", "fullname", "name", "rwkb", "rw"}
    extra = {c: v for c, v in values.items()
             if _key(c) not in known and not _key(c).startswith("cycles") and not _key(c).endswith("cycles")}
    return OpRow(index=int(tokens[0]), op_type=op_type, name=name, target=target,
                 cycles_ddr=ddr, cycles_npu=npu, cycles_total=total,
                 rw_kb=float(rw) if rw and _NUM.match(rw) else None,
                 data_type=get("datatype"), input_shapes=_shapes(get("inputshape")),
                 output_shapes=_shapes(get("outputshape")), full_name=full, extra=extra)


_KNOWN_COLUMNS = ("ID", "OpType", "DataType", "Target", "InputShape", "OutputShape", "Cycles(DDR/NPU/Total)",
                  "RW(KB)", "FullName")
_LOG_LINE = re.compile(r"^\s*(?:[DIWEF]\s|<{3,}|>{3,})")
_MAX_AMBIGUOUS = 8


class _Line:
    """One logical log line: the pieces a hard wrap cut it into (log prefix and colour codes removed)."""

    __slots__ = ("pieces", "prefixed")

    def __init__(self, piece: str, prefixed: bool):
        self.pieces, self.prefixed = [piece], prefixed

    @property
    def text(self) -> str:
        return "".join(self.pieces).rstrip()


def _logical_lines(text: str) -> list:
    """Undo hard wraps of prefixed log lines: a piece without a log prefix after a prefixed line continues it."""
    out: list = []
    for raw in text.split("\n"):
        raw = _ANSI.sub("", raw.replace("\r", ""))
        m = _PREFIX.match(raw)
        prefixed = bool(m and m.group(0).strip())
        body = raw[m.end():] if prefixed else raw
        if not prefixed and out and out[-1].prefixed and not _LOG_LINE.match(body):
            out[-1].pieces.append(body)
        else:
            out.append(_Line(body, prefixed))
    return out


def _best_join(pieces: list, score) -> str:
    """Glue wrapped pieces: directly where whitespace shows the cut, else with or without a space, best score."""
    if len(pieces) == 1:
        return pieces[0].rstrip()
    ambiguous = [k for k in range(1, len(pieces))
                 if pieces[k - 1][-1:].strip() and pieces[k][:1].strip()]
    if len(ambiguous) > _MAX_AMBIGUOUS:
        return "".join(pieces).rstrip()
    best, best_score = None, None
    for mask in range(1 << len(ambiguous)):
        glue = {k: (" " if mask >> j & 1 else "") for j, k in enumerate(ambiguous)}
        text = pieces[0] + "".join(glue.get(k, "") + pieces[k] for k in range(1, len(pieces)))
        sc = score(text)
        if best_score is None or sc > best_score:
            best, best_score = text, sc
    return best.rstrip()


def _header_score(text: str) -> int:
    words = text.split()
    return sum(2 for c in _KNOWN_COLUMNS if c in words) - len(words)


def _is_header(text: str) -> bool:
    words = text.split()
    return "OpType" in words and "Target" in words


def _looks_like_header_start(text: str) -> bool:
    words = text.split()
    return "OpType" in words or (bool(words) and words[0] == "ID" and len(words) >= 2)


def _parse_tables(lines: list) -> list:
    """[(index of the header line, CompilerTable)] for every table with at least one row."""
    tables = []
    i, n = 0, len(lines)
    while i < n:
        head = _best_join(lines[i].pieces, _header_score)
        if not _looks_like_header_start(head):
            i += 1
            continue
        at = i
        pieces = list(lines[i].pieces)
        i += 1
        # A header wrapped without log prefixes (a pasted table): glue lines on until it is complete.
        while i < n and not lines[i].prefixed and lines[i].text.strip() and not _SEPARATOR.match(lines[i].text) \
                and not _ROW_START.match(lines[i].text) and len(pieces) < 8 \
                and (not _is_header(head) or re.fullmatch(r"[\sA-Za-z()/%_-]+", lines[i].text)):
            pieces += lines[i].pieces
            head = _best_join(pieces, _header_score)
            i += 1
        if not _is_header(head):
            continue
        cols = _header_columns(head)

        def score(text, cols=cols):
            return _row_score(text.split(), cols)

        rows: list = []  # lists of pieces
        last_id = -1
        while i < n:
            line = lines[i]
            text = line.text
            if not text.strip():  # blank: a wrapped row's padding, or nothing
                i += 1
                continue
            if _SEPARATOR.match(text):
                i += 1
                if rows:
                    break
                continue
            if _is_header(_best_join(line.pieces, _header_score)):
                break
            start = _ROW_START.match(text)
            if start:
                # Without log prefixes, the rest of a wrapped row can start with a number too ("2   Conv:MatMul_3"):
                # the table numbers its rows 0, 1, 2, ..., so a number that does not come next continues the row.
                if rows and not line.prefixed and int(start.group(1)) != last_id + 1:
                    rows[-1] = rows[-1] + line.pieces
                else:
                    rows.append(list(line.pieces))
                    last_id = int(start.group(1))
            elif rows and not line.prefixed and not _LOG_LINE.match(text):
                rows[-1] = rows[-1] + line.pieces
            else:
                break
            i += 1
        parsed = [r for r in (_parse_row(_best_join(p, score).split(), cols) for p in rows) if r is not None]
        if parsed:
            tables.append((at, CompilerTable(rows=parsed, columns=cols)))
    return tables


def _memory(lines: list) -> dict:
    mem = {}
    for line in lines:
        m = _MEMORY.search(line)
        if m:
            kind, value, unit = m.group(1).lower(), float(m.group(2)), m.group(3).upper()
            mem[f"{kind}_kb"] = value * _UNIT_KB.get(unit, 1.0)
    return mem


def parse_compiler_tables(text) -> list:
    """Every per-op table in `text`, in order (one per build); [] when there is none. Never raises."""
    try:
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8", errors="replace")
        if not isinstance(text, str):
            return []
        lines = _logical_lines(text)
        found = _parse_tables(lines)
        # The memory totals a build prints follow its table: they belong to the table before them.
        bounds = [at for at, _ in found[1:]] + [len(lines)]
        for (at, table), end in zip(found, bounds):
            table.memory = _memory(line.text for line in lines[at:end])
        return [t for _, t in found]
    except Exception:  # noqa: BLE001 (a log is untrusted text: no input may crash a build report)
        return []


def parse_compiler_table(text) -> CompilerTable | None:
    """The last per-op table in a verbose build log (the last build's), or None when there is none."""
    tables = parse_compiler_tables(text)
    return tables[-1] if tables else None


class CapturedOutput:
    text: str = ""


@contextlib.contextmanager
def capture_fds(fds: tuple = (1, 2)):
    """Capture what is written to the raw file descriptors (the toolkit's C++ logger bypasses sys.stdout).

    >>> with capture_fds() as cap:
    ...     rknn.build(do_quantization=False)
    >>> table = parse_compiler_table(cap.text)
    """
    cap = CapturedOutput()
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as tmp:
        saved = [os.dup(fd) for fd in fds]
        try:
            for fd in fds:
                os.dup2(tmp.fileno(), fd)
            yield cap
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            for fd, keep in zip(fds, saved):
                os.dup2(keep, fd)
                os.close(keep)
            tmp.seek(0)
            cap.text = tmp.read().decode("utf-8", errors="replace")


__all__ = ["CapturedOutput", "CompilerTable", "IO_OPS", "OpRow", "capture_fds", "parse_compiler_table",
           "parse_compiler_tables"]
