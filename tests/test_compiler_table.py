"""rwkv2rknn.compiler_table on real rknn-toolkit2 2.5.0 verbose-build logs (tests/data/compiler_tables) and on damaged text.

The logs were captured from `RKNN(verbose=True)` builds for rk3588 and trimmed to the table:
- matmul_exp_max_128.log: MatMul(x[1,128], W) -> Exp -> Max(., y) -> Sigmoid, with the fuse_ops trace
  and the colour-coded warning lines around it;
- rwkv4_layer128.log: one normalized RWKV-4 layer (C=128, passes.pipeline.normalize);
- rwkv4_layer128_legalized.log: the same layer after passes.legalize.legalize.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from rwkv2rknn.compiler_table import CompilerTable, capture_fds, parse_compiler_table, parse_compiler_tables

DATA = Path(__file__).resolve().parent / "data" / "compiler_tables"
LAYER_CPU_OPS = ["Max:Max_0", "Exp:Exp_0", "Exp:Exp_1", "Div:Div_1", "Max:Max_1", "Exp:Exp_2", "Exp:Exp_3"]


def _log(name):
    return (DATA / name).read_text(encoding="utf-8")


def _key(t: CompilerTable):
    return (t.to_json(), t.memory,
            [(r.index, r.label, r.target, r.data_type, r.input_shapes, r.output_shapes,
              r.cycles_ddr, r.cycles_npu, r.cycles_total, r.rw_kb) for r in t.rows])


def _wrap(text, width, strip=False):
    out = []
    for line in text.split("\n"):
        chunks = [line[i:i + width] for i in range(0, len(line), width)] or [""]
        out += [c.rstrip() if strip else c for c in chunks]
    return "\n".join(out)


def _unprefixed(text):
    return "\n".join(re.sub(r"^[DIWE] RKNN: \[[^\]]*\] ", "", line) for line in text.split("\n"))


def test_small_graph_log():
    t = parse_compiler_table(_log("matmul_exp_max_128.log"))
    assert t is not None
    assert t.to_json() == {"ops": 8, "cpu_ops": ["Exp:e", "Max:m"], "cycles": 1407}
    assert json.loads(json.dumps(t.to_json())) == t.to_json()
    assert t.memory == {"internal_kb": 1.0, "weight_kb": 34.25}
    conv = next(r for r in t.rows if r.op_type == "Conv")
    assert (conv.index, conv.name, conv.target, conv.data_type) == (3, "h#2", "NPU", "FLOAT16")
    assert (conv.cycles_ddr, conv.cycles_npu, conv.cycles_total, conv.rw_kb) == (1407, 512, 1407, 32.0)
    assert conv.input_shapes == [(1, 128, 1, 1), (128, 128, 1, 1)] and conv.output_shapes == [(1, 128, 1, 1)]
    assert conv.full_name == "Conv:h#2"
    # graph inputs/outputs are listed as CPU "operators" but are not ops
    assert [r.op_type for r in t.rows if r.is_io] == ["InputOperator", "InputOperator", "OutputOperator"]
    assert len(t.rows) == 11 and t.ops == 8
    assert t.columns == ["ID", "OpType", "DataType", "Target", "InputShape", "OutputShape", "Cycles(DDR/NPU/Total)",
                         "RW(KB)", "FullName"]


def test_rwkv_layer_logs():
    raw = parse_compiler_table(_log("rwkv4_layer128.log"))
    legal = parse_compiler_table(_log("rwkv4_layer128_legalized.log"))
    assert raw.to_json() == {"ops": 63, "cpu_ops": LAYER_CPU_OPS, "cycles": 18249}
    assert legal.to_json() == {"ops": 63, "cpu_ops": [], "cycles": 18249}
    assert raw.op_counts("CPU") == {"Max": 2, "Exp": 4, "Div": 1}
    assert legal.op_counts("NPU")["Elu"] == 4 and legal.op_counts("NPU")["Div"] == 1
    # the seven 1x1 Convs (MatMuls) are the only rows with cycles
    assert sorted(r.cycles_total for r in raw.rows if r.cycles_total) == [1407, 1407, 1407, 1407, 1418, 5596, 5607]
    fused = {r.op_type for r in raw.rows if r.cycles_total}
    assert fused == {"Conv", "ConvSigmoid", "ConvAdd", "ConvRelu", "ConvMul"}
    assert raw.memory == {"internal_kb": 11.0, "weight_kb": 424.625}
    assert raw.rw_kb == pytest.approx(429.0)
    s = raw.summary()
    assert s["cpu_op_types"] == {"Max": 2, "Exp": 4, "Div": 1} and s["memory"]["weight_kb"] == 424.625
    split = next(r for r in raw.rows if r.op_type == "Split")
    assert split.output_shapes == [(1, 128, 1, 1)]  # "(1,128,1,1),..." : the truncated tail is dropped


@pytest.mark.parametrize("name", ["matmul_exp_max_128.log", "rwkv4_layer128.log", "rwkv4_layer128_legalized.log"])
def test_colour_codes_prefixes_and_crlf(name):
    text = _log(name)
    ref = _key(parse_compiler_table(text))
    assert _key(parse_compiler_table(_unprefixed(text))) == ref
    assert _key(parse_compiler_table(text.replace("\n", "\r\n"))) == ref
    assert _key(parse_compiler_table(text.encode())) == ref
    coloured = re.sub(r"\b(CPU|NPU)\b", lambda m: f"\x1b[1;33m{m.group(1)}\x1b[0m", text)
    assert _key(parse_compiler_table(coloured)) == ref
    lost_esc = coloured.replace("\x1b", "")  # a pipe that dropped ESC leaves "[1;33m"
    assert _key(parse_compiler_table(lost_esc)) == ref


@pytest.mark.parametrize("width", [46, 60, 80, 100, 120, 133, 160, 169, 200])
@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize("prefixed", [True, False])
def test_hard_wrapped_lines(width, strip, prefixed):
    """A terminal or pipe that wraps at `width` (and maybe strips trailing blanks) loses nothing."""
    text = _log("rwkv4_layer128.log")
    ref = _key(parse_compiler_table(text))
    src = text if prefixed else _unprefixed(text)
    got = parse_compiler_table(_wrap(src, width, strip))
    assert got is not None and _key(got) == ref


def test_unknown_columns_and_name_with_spaces():
    text = _log("matmul_exp_max_128.log")
    lines = []
    for line in text.split("\n"):
        m = re.match(r"^(D RKNN: \[[^\]]*\] )(.*)$", line)
        if m and m.group(2).startswith("ID "):
            line = m.group(1) + m.group(2).replace("RW(KB)", "Time(us)  RW(KB)")
        elif m and re.match(r"^\d+\s", m.group(2)):
            body = re.sub(r"(\d+/\d+/\d+)(\s+)", r"\g<1>  7  ", m.group(2), count=1)
            line = m.group(1) + body.replace("Exp:e ", "Exp:my exp node").rstrip()
        lines.append(line)
    t = parse_compiler_table("\n".join(lines))
    assert t.cpu_ops == ["Exp:my exp node", "Max:m"] and t.cycles == 1407
    assert t.rows[3].extra == {"Time(us)": "7"} and t.rows[3].rw_kb == 32.0


def test_toolkit_1x_column_layout():
    """Older toolkits print separate "DDR Cycles / NPU Cycles / Total Cycles" columns (synthetic sample)."""
    text = """D RKNN: [10:00:00.000] ID   OpType   DataType Target InputShape   OutputShape  DDR Cycles  NPU Cycles  Total Cycles  Task Number  RW(KB)  FullName
D RKNN: [10:00:00.000] 0    InputOperator  FLOAT16  CPU  \\  (1,64)  0  0  0  0  0  InputOperator:x
D RKNN: [10:00:00.000] 1    Conv     FLOAT16  NPU    (1,64,1,1),(64,64,1,1)  (1,64,1,1)  300  128  300  1  8  Conv:mm
D RKNN: [10:00:00.000] 2    Exp      FLOAT16  CPU    (1,64,1,1)  (1,64,1,1)  0  0  0  0  0  Exp:e
D RKNN: [10:00:00.000] ------------------------------------------------------------------------"""  # noqa: E501
    t = parse_compiler_table(text)
    assert t.to_json() == {"ops": 2, "cpu_ops": ["Exp:e"], "cycles": 300}
    assert (t.rows[1].cycles_ddr, t.rows[1].cycles_npu, t.rows[1].cycles_total) == (300, 128, 300)
    assert t.rows[1].extra == {"Task Number": "1"}


@pytest.mark.parametrize("text", [
    "", None, 42, b"\xff\xfe\x00garbage", "I rknn building ...\nE build: compile failed\n",
    "D RKNN: [00:00:00.000] ID   OpType   DataType Target\nD RKNN: [00:00:00.000] ---------------\n",
    "ID OpType Target\nnot a row\n", "\x00" * 100, "OpType Target " * 1000,
])
def test_no_table_is_none(text):
    assert parse_compiler_table(text) is None
    assert parse_compiler_tables(text) == []


def test_table_cut_short_and_log_before_the_table():
    text = _log("rwkv4_layer128.log")
    rows = text.split("\n")
    at = next(k for k, line in enumerate(rows) if " 30   " in line)
    t = parse_compiler_table("\n".join(rows[:at]))
    assert t is not None and t.rows[-1].index == 29 and t.cpu_ops == ["Max:Max_0", "Exp:Exp_0"]
    head = next(k for k, line in enumerate(rows) if "Network Layer Information Table" in line)
    assert parse_compiler_table("\n".join(rows[:head + 1])) is None


def test_several_builds_in_one_log_last_one_wins():
    a, b = _log("rwkv4_layer128.log"), _log("rwkv4_layer128_legalized.log")
    tables = parse_compiler_tables(a + "\nrwkv2rknn: building precision=fp16\n" + b)
    assert [t.to_json()["cpu_ops"] for t in tables] == [LAYER_CPU_OPS, []]
    assert [t.memory["internal_kb"] for t in tables] == [11.0, 12.0]
    assert parse_compiler_table(a + b).cpu_ops == []


def test_random_damage_never_raises():
    text = _log("rwkv4_layer128.log")
    rnd = random.Random(0)
    for _ in range(200):
        i, j = sorted(rnd.randrange(len(text) + 1) for _ in range(2))
        parse_compiler_tables(text[i:j])
        chars = list(text)
        for _ in range(50):
            chars[rnd.randrange(len(chars))] = rnd.choice(" \n-0123456789()/:,CPUNabc\x1b[")
        t = parse_compiler_table("".join(chars))
        if t is not None:
            json.dumps(t.to_json())
            json.dumps(t.summary())


def test_capture_fds_sees_raw_writes():
    import os

    with capture_fds() as cap:
        os.write(1, b"D RKNN: [00:00:00.000] ID OpType DataType Target FullName\n")
        os.write(2, b"D RKNN: [00:00:00.000] 0 Exp FLOAT16 CPU Exp:e\n")
        print("D RKNN: [00:00:00.000] ----------")
    t = parse_compiler_table(cap.text)
    assert t.cpu_ops == ["Exp:e"]
