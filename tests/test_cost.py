"""The cost model: board profiles, segment features, the estimator's arithmetic, calibration, the CLI,
and backtests against the published 430M figures (2023 attempt ~500 ms/token, rwkv.cpp 61 ms/token)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rwkv2rknn.cost import CATEGORIES, CONSTANTS, estimate, load_profile, price_segment, segment_features
from rwkv2rknn.cost.calibrate import PROBE_SHAPES, calibrate, probe_models
from rwkv2rknn.cost.estimate import with_features
from rwkv2rknn.cost.plan import repeat_layers
from rwkv2rknn.preview import features_plan
from rwkv2rknn.cost.profile import shipped_profiles
from rwkv2rknn.errors import UserError

F32 = TensorProto.FLOAT
PUBLISHED_2023_MS = 500.0   # the 2023 attempt (one NPU call per MatMul, SDK 1.5.2, Python), 430M
PUBLISHED_RWKV_CPP_MS = 61.0  # rwkv.cpp on the RK3588 CPU, 430M


# -- profiles ---------------------------------------------------------------------------------------------------

def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_shipped_profiles_load_with_every_constant_and_an_honest_source():
    assert {"rk3588", "rk3588-2023"} <= set(shipped_profiles())
    for name in ("rk3588", "rk3588-2023"):
        p = load_profile(name)
        assert p.name == name
        assert set(p.values) == set(CONSTANTS)
        for key, src in p.sources.items():
            # every source names a doc / repository / issue, or says it is derived or a judgement
            assert any(m in src for m in (".md", "#", "judgement", "derived", "README", ".toml", "gemlog")), (key, src)
    new, old = load_profile("rk3588"), load_profile("rk3588-2023")
    assert new.npu_call_us < old.npu_call_us  # SDK 2.x C-side calls are cheaper than the 2023 Python path
    assert 7 in new.npu_core_masks and old.npu_core_masks == [1]
    assert load_profile().name == "rk3588"  # the default


def test_gflops_curve_pads_small_m_and_is_flat_past_the_last_point():
    p = load_profile("rk3588")
    top = p.npu_fp16_gflops[-1][1]
    assert p.gflops(16) == pytest.approx(top)
    assert p.gflops(1) == pytest.approx(top / 16)     # M=1 is padded to 16 rows: 1/16 of the throughput
    assert p.gflops(8) == pytest.approx(top / 2)
    assert p.gflops(4096) == pytest.approx(top)


def test_user_file_overrides_a_subset_over_a_base(tmp_path):
    f = write(tmp_path / "mine.toml", 'base = "rk3588"\nname = "my-board"\n'
              '[npu_call_us]\nvalue = 77.5\nsource = "measured on this board 2025-01-01"\n')
    p = load_profile(str(f))
    base = load_profile("rk3588")
    assert p.name == "my-board" and p.npu_call_us == 77.5
    assert p.sources["npu_call_us"] == "measured on this board 2025-01-01"
    assert p.cpu_stream_gbps == base.cpu_stream_gbps and p.sources["cpu_stream_gbps"] == base.sources["cpu_stream_gbps"]
    assert [x.name for x in p.files] == ["rk3588.toml", "mine.toml"]
    # a base given as a path relative to the file
    g = write(tmp_path / "child.toml", 'base = "mine.toml"\n[cpu_op_us]\nvalue = 1.0\nsource = "x"\n')
    q = load_profile(g)
    assert q.npu_call_us == 77.5 and q.cpu_op_us == 1.0 and len(q.files) == 3


@pytest.mark.parametrize("text, key", [
    ('base = "rk3588"\n[npu_cal_us]\nvalue = 1.0\nsource = "x"\n', "npu_cal_us"),          # typo
    ('base = "rk3588"\n[npu_call_us]\nvalue = -1.0\nsource = "x"\n', "npu_call_us.value"),  # negative
    ('base = "rk3588"\n[npu_call_us]\nvalue = "fast"\nsource = "x"\n', "npu_call_us.value"),
    ('base = "rk3588"\n[npu_call_us]\nvalue = 1.0\n', "npu_call_us"),                      # no source
    ('base = "rk3588"\n[npu_call_us]\nvalue = 1.0\nsource = ""\n', "npu_call_us.source"),
    ('base = "rk3588"\n[npu_core_masks]\nvalue = [1, 3]\nsource = "x"\n', "npu_core_masks.value"),
    ('base = "rk3588"\n[npu_fp16_gflops]\nvalue = [[1]]\nsource = "x"\n', "npu_fp16_gflops.value"),
    ('base = "rk3588"\n[npu_stream_gbps_1core]\nvalue = 0\nsource = "x"\n', "npu_stream_gbps_1core.value"),
    ('name = "alone"\n[npu_call_us]\nvalue = 1.0\nsource = "x"\n', "missing constant"),      # no base, incomplete
    ('base = "rk9999"\n', "base = 'rk9999'"),
    ('base = "rk3588"\nnpu_call_us = 5\n', "npu_call_us"),                                  # not a table
    ("this is = not [toml\n", "not valid TOML"),
])
def test_bad_profile_files_are_one_line_errors_naming_file_and_key(tmp_path, text, key):
    f = write(tmp_path / "bad.toml", text)
    with pytest.raises(UserError) as exc:
        load_profile(f)
    msg = str(exc.value)
    assert str(f) in msg and key in msg and "\n" not in msg, msg


def test_base_loop_and_unknown_names_are_refused(tmp_path):
    write(tmp_path / "a.toml", 'base = "b.toml"\n')
    write(tmp_path / "b.toml", 'base = "a.toml"\n')
    with pytest.raises(UserError, match="loop"):
        load_profile(tmp_path / "a.toml")
    with pytest.raises(UserError, match="rk3588-2023"):  # lists the shipped profiles
        load_profile("no-such-board")
    with pytest.raises(UserError, match="not a file"):
        load_profile(tmp_path)


# -- features ---------------------------------------------------------------------------------------------------

def model(nodes, inputs, outputs, inits=(), value_info=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits), value_info=list(value_info))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def vi(name, shape, et=F32):
    return helper.make_tensor_value_info(name, et, shape)


def const(name, shape, dtype=np.float32):
    return numpy_helper.from_array(np.ones(shape, dtype), name)


def test_features_of_a_constant_matmul():
    m = model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", [1, 8])], [vi("y", [1, 4])],
              [const("w", [8, 4])])
    f = segment_features(m, "npu")
    assert f["matmul_flops"] == 2 * 8 * 4 and f["rows"] == 1 and f["matmuls"] == 1
    assert f["weight_bytes"] == {"stored": 128, "fp32": 128, "fp16": 64}
    assert f["input_bytes"] == 32 and f["output_bytes"] == 16
    assert f["multicore"] is True and f["multicore_weight_share"] == 1.0  # a 1x1 Conv: multi-core capable
    assert f["cpu_ops"] == [] and f["elementwise_ops"] == 0 and f["op_counts"] == {"MatMul": 1}
    json.dumps(f)  # stored in the manifest: must be JSON


def test_features_rows_and_a_variable_weight_matmul_is_not_multicore():
    m = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [16, 8])], [vi("y", [16, 4])],
              [const("w", [8, 4])])
    assert segment_features(m)["rows"] == 16
    m2 = model([helper.make_node("MatMul", ["x", "v"], ["y"])], [vi("x", [1, 8]), vi("v", [8, 4])],
               [vi("y", [1, 4])])
    f = segment_features(m2)
    assert f["multicore"] is False and f["matmul_flops"] == 64 and f["weight_bytes"]["fp16"] == 0


def test_support_table_predicts_the_cpu_ops_inside_an_npu_model():
    # x: 1-D like RWKV-4 activations. Exp, Max 1-D, the WKV num/den Div, Reciprocal, a Cast to an integer,
    # Pow are CPU; Max 4-D, Div by a constant, Add/Relu and a float-to-float Cast stay on the NPU.
    nodes = [
        helper.make_node("Exp", ["x"], ["e"], name="exp"),
        helper.make_node("Max", ["x", "e"], ["mx"], name="max2d"),
        helper.make_node("Div", ["mx", "e"], ["wkv"], name="wkvdiv"),
        helper.make_node("Div", ["wkv", "two"], ["half"], name="constdiv"),
        helper.make_node("Reciprocal", ["half"], ["rc"], name="recip"),
        helper.make_node("Pow", ["rc", "two"], ["pw"], name="pow"),
        helper.make_node("Relu", ["pw"], ["r"], name="relu"),
        helper.make_node("Add", ["r", "x"], ["y"], name="add"),
        helper.make_node("Max", ["a4", "b4"], ["m4"], name="max4d"),
        helper.make_node("Cast", ["y"], ["yc"], name="cast", to=TensorProto.INT32),
        helper.make_node("Cast", ["m4"], ["m16"], name="fcast", to=TensorProto.FLOAT16),
    ]
    m = model(nodes, [vi("x", [64]), vi("a4", [1, 4, 1, 16]), vi("b4", [1, 4, 1, 16])],
              [vi("yc", [64], TensorProto.INT32), vi("m16", [1, 4, 1, 16], TensorProto.FLOAT16)],
              [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    f = segment_features(m, "npu")  # no value_info: shapes come from inference
    cpu = {c["node"]: c for c in f["cpu_ops"]}
    assert set(cpu) == {"exp", "max2d", "wkvdiv", "recip", "pow", "cast"}
    assert "1-D" in cpu["max2d"]["reason"] and "WKV" in cpu["wkvdiv"]["reason"]
    assert all(c["reason"] for c in f["cpu_ops"])
    assert f["npu_ops"] == 5  # constdiv, relu, add, max4d, fcast
    assert f["elementwise_ops"] == 11 and f["elementwise_elems"] == 9 * 64 + 64 + 64


def test_layernorm_pattern_is_one_npu_op_and_gather_rules():
    eps = numpy_helper.from_array(np.array(1e-5, np.float32), "eps")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    table = const("table", [100, 16])
    idx = numpy_helper.from_array(np.array(3, np.int64), "idx")
    nodes = [
        helper.make_node("Gather", ["table", "idx"], ["row"], name="gconst"),
        helper.make_node("Gather", ["table", "tok"], ["row2"], name="gvar"),
        helper.make_node("Add", ["row", "row2"], ["x"], name="add0"),
        helper.make_node("ReduceMean", ["x"], ["mean"], name="rm1", axes=[-1]),
        helper.make_node("Sub", ["x", "mean"], ["c"], name="sub"),
        helper.make_node("Pow", ["c", "two"], ["sq"], name="pow"),
        helper.make_node("ReduceMean", ["sq"], ["var"], name="rm2", axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="addeps"),
        helper.make_node("Sqrt", ["ve"], ["std"], name="sqrt"),
        helper.make_node("Div", ["c", "std"], ["y"], name="div"),
        helper.make_node("ReduceMean", ["y"], ["z"], name="rm_alone", axes=[-1]),
    ]
    m = model(nodes, [vi("tok", [], TensorProto.INT64)], [vi("y", [16]), vi("z", [1])], [eps, two, table, idx])
    f = segment_features(m, "npu")
    assert f["layernorm_patterns"] == 1
    # a lone ReduceMean over the last axis also stays on the NPU (measured with 2.5.0)
    assert sorted(c["node"] for c in f["cpu_ops"]) == ["gvar"]
    assert f["npu_ops"] == 4  # gconst, add0, the exNorm, rm_alone
    assert f["gather_table_bytes"] == 100 * 16 * 4
    assert f["weight_bytes"]["stored"] == 4 + 4 + 8  # eps, two, idx: the gathered table is not streamed


def test_features_of_an_exported_whole_layer_match_the_compilers_table(model_factory):
    """The 2.5.0 verbose build puts Max x2, Exp x4 and the WKV Div of a whole layer on the CPU (rknn-toolkit2.md)."""
    plan = features_plan([model_factory()], policy="layer", graphs=["mixing_0"])
    (seg,) = plan["graphs"][0]["segments"]
    f = seg["cost"]
    ops = sorted(c["op"] for c in f["cpu_ops"])
    assert ops == ["Div", "Exp", "Exp", "Exp", "Exp", "Max", "Max"]
    assert f["layernorm_patterns"] == 2 and f["matmuls"] == 7 and f["multicore"] is True
    assert f["matmul_flops"] == seg["matmul_flops"]  # agrees with passes.stats via split's cut


# -- the estimator's arithmetic on a hand-made manifest ------------------------------------------------------------

UNIT_PROFILE = """
name = "unit"
[npu_clock_hz]
value = 1.0e9
source = "test"
[npu_cycle_scale]
value = 2.0
source = "test"
[npu_stream_gbps_1core]
value = 1.0
source = "test"
[npu_stream_gbps_3core]
value = 2.0
source = "test"
[npu_stream_gbps_mask7]
value = 2.0
source = "test"
[npu_fp16_gflops]
value = [[16, 1600.0]]
source = "test"
[npu_multicore_compute_speedup]
value = 3.0
source = "test"
[npu_pad_rows]
value = 16
source = "test"
[npu_call_us]
value = 100.0
source = "test"
[npu_multicore_call_us]
value = 50.0
source = "test"
[npu_core_masks]
value = [1, 7]
source = "test"
[npu_op_us]
value = 10.0
source = "test"
[npu_hop_us]
value = 1000.0
source = "test"
[conv_in_ns_per_byte]
value = 1.0
source = "test"
[conv_out_ns_per_byte]
value = 2.0
source = "test"
[cpu_stream_gbps]
value = 1.0
source = "test"
[cpu_gflops]
value = 1.0
source = "test"
[cpu_call_us]
value = 20.0
source = "test"
[cpu_op_us]
value = 5.0
source = "test"
[cpu_convert_ns_per_byte]
value = 0.5
source = "test"
[npu_io_copy_ns_per_byte]
value = 0.0
source = "test"
[npu_output_fp32_ns_per_byte]
value = 0.0
source = "test"
[npu_parallel_us]
value = 0.0
source = "test"
[npu_int8_compute_speedup]
value = 1.0
source = "test"
[npu_context_bytes]
value = 0
source = "test"
"""


@pytest.fixture
def unit_profile(tmp_path):
    return load_profile(write(tmp_path / "unit.toml", UNIT_PROFILE))


def feats(**kw):
    from rwkv2rknn.cost.features import FEATURES_VERSION

    f = {"version": FEATURES_VERSION, "rows": 1, "nodes": 1, "matmuls": 0, "matmul_flops": 0, "elementwise_elems": 0,
         "weight_bytes": {"stored": 0, "fp32": 0, "fp16": 0}, "input_bytes": 0, "output_bytes": 0, "npu_ops": 0,
         "cpu_ops": [], "multicore_weight_share": 0.0, "multicore_flops_share": 0.0}
    f.update(kw)
    return f


SEG_A = feats(nodes=6, matmuls=1, matmul_flops=2_000_000, weight_bytes={"stored": 2_000_000, "fp32": 2_000_000,
              "fp16": 1_000_000}, input_bytes=1000, output_bytes=2000, npu_ops=3,
              cpu_ops=[{"node": "e1", "op": "Exp", "reason": "r"}, {"node": "e2", "op": "Exp", "reason": "r"}],
              multicore_weight_share=1.0, multicore_flops_share=1.0)
SEG_B = feats(nodes=10, matmuls=1, matmul_flops=4_000_000, weight_bytes={"stored": 2_000_000, "fp32": 2_000_000,
              "fp16": 1_000_000})
SEG_C = feats(nodes=2, weight_bytes={"stored": 1000, "fp32": 1000, "fp16": 500}, input_bytes=4, output_bytes=4)


def hand_manifest(compiler=None, fallback=True):
    a = {"id": "g1.s0", "backend": "npu", "onnx": "a.onnx", "inputs": [], "outputs": [], "cost": SEG_A}
    if compiler:
        a["compiler"] = compiler
    c = {"id": "g2.s0", "backend": "npu", "onnx": "c.onnx", "inputs": [], "outputs": [], "cost": SEG_C}
    if fallback:
        c["fallback_reason"] = "compiler crashed"
    return {"format_version": 1, "target": "rk3588", "policy": "fused", "graphs": [
        {"name": "g1", "segments": [a, {"id": "g1.s1", "backend": "cpu", "onnx": "b.onnx", "inputs": [],
                                        "outputs": [], "cost": SEG_B}]},
        {"name": "g2", "segments": [c]}]}


def test_fp16_boundaries_are_not_converted(unit_profile):
    """A state kept fp16 between calls (deep --state-update npu) costs no conversion; fp32 bytes do."""
    base = feats(input_bytes=4000, output_bytes=4000, convert_in_bytes=4000, convert_out_bytes=4000)
    half = feats(input_bytes=4000, output_bytes=4000, convert_in_bytes=1000, convert_out_bytes=0)
    full = price_segment(base, unit_profile, "npu").breakdown["conversion"]
    part = price_segment(half, unit_profile, "npu").breakdown["conversion"]
    p = unit_profile
    assert full == pytest.approx(4000e-9 * (p.conv_in_ns_per_byte + p.conv_out_ns_per_byte))
    assert part == pytest.approx(1000e-9 * p.conv_in_ns_per_byte)


def test_estimator_arithmetic_by_hand(unit_profile):
    # A on the NPU, 1 core: stream 1e6 B / 1 GB/s = 1 ms; compute 2e6 / 100 GFLOPS (1600 * 1/16) = 0.02 ms
    # -> 1 ms; 3 NPU ops 0.03; 2 hops 2 ms; conversion 1000*1 + 2000*2 ns = 0.005; call 0.1 => 3.135 ms.
    # 3 cores: stream 0.5 ms, ops 0.03, hops 2, conversion 0.005, call 0.15 => 2.685 ms: core mask 7.
    price = price_segment(SEG_A, unit_profile, "npu")
    assert price.variants[1] * 1e3 == pytest.approx(3.135)
    assert price.variants[7] * 1e3 == pytest.approx(2.685)
    assert price.core_mask == 7 and price.hops == 2
    b = {k: v * 1e3 for k, v in price.breakdown.items()}
    assert b["npu_stream"] == pytest.approx(0.5) and b["npu_compute"] == pytest.approx(0.03)
    assert b["hops"] == pytest.approx(2.0) and b["conversion"] == pytest.approx(0.005)
    assert b["npu_call"] == pytest.approx(0.15) and b["cpu_compute"] == 0

    e = estimate(hand_manifest(), unit_profile)
    # B on the CPU: compute 4e6 / 1 GFLOPS = 4 ms > stream 2 ms; 9 non-MatMul ops * 5 us; call 0.02 => 4.065
    # C fell back to the CPU: stream 1000 B = 0.001; 2 ops 0.01; call 0.02 => 0.031
    assert e.decode_ms_per_token == pytest.approx(2.685 + 4.065 + 0.031)
    assert sum(e.breakdown.values()) == pytest.approx(e.decode_ms_per_token)
    assert set(e.breakdown) == set(CATEGORIES)
    assert e.breakdown["cpu_call"] == pytest.approx(0.04) and e.breakdown["npu_call"] == pytest.approx(0.15)
    assert e.npu_calls_per_token == 1 and e.cpu_calls_per_token == 2
    g1, g2 = e.decode.graphs
    assert g1.ms_per_token == pytest.approx(2.685 + 4.065) and g2.ms_per_token == pytest.approx(0.031)
    assert [s.core_mask for s in g1.segments] == [7, None] and g2.segments[0].runs_on == "cpu"
    assert e.prefill_ms_per_token == e.decode_ms_per_token and "no prefill plan" in e.prefill_plan
    assert "PREDICTION" in e.label and e.board == "unit"
    json.dumps(e.to_dict())


def test_one_core_only_profile_and_w8a8(unit_profile, tmp_path):
    one = load_profile(write(tmp_path / "one.toml", f'base = "{tmp_path / "unit.toml"}"\n'
                             '[npu_core_masks]\nvalue = [1]\nsource = "test"\n'))
    price = price_segment(SEG_A, one, "npu")
    assert price.core_mask == 1 and price.seconds * 1e3 == pytest.approx(3.135)
    w8 = price_segment(SEG_A, one, "npu", precision="w8a8")  # int8 weights: half the bytes to stream
    assert w8.breakdown["npu_stream"] * 1e3 == pytest.approx(0.5)


def test_compiler_table_replaces_matmul_time_and_hops(unit_profile):
    e = estimate(hand_manifest(compiler={"ops": 9, "cpu_ops": ["e1"], "cycles": 300_000}), unit_profile)
    a = e.decode.graphs[0].segments[0]
    # cycles: 300k * 2 / 1 GHz = 0.6 ms on one core; three cores scale it like the features (0.5 / 1);
    # 1 real hop; the table's second Exp ran on the NPU: 4 NPU ops.
    assert a.compiler_table and a.hops == 1
    assert a.one_core_ms == pytest.approx(0.6 + 0.04 + 1.0 + 0.005 + 0.1)
    assert a.three_core_ms == pytest.approx(0.3 + 0.04 + 1.0 + 0.005 + 0.15)
    assert a.core_mask == 7 and a.ms == pytest.approx(a.three_core_ms)


def test_tokens_per_call_streams_weights_once_and_scales_activations(unit_profile):
    p1 = price_segment(SEG_A, unit_profile, "npu", tokens_per_call=1)
    p4 = price_segment(SEG_A, unit_profile, "npu", tokens_per_call=4)
    b1, b4 = p1.breakdown, p4.breakdown
    assert b4["npu_stream"] == pytest.approx(b1["npu_stream"])       # weights once per call
    assert b4["conversion"] == pytest.approx(4 * b1["conversion"])   # activations x4
    assert b4["npu_call"] == pytest.approx(b1["npu_call"])
    # The NPU segment's fixed costs (call, hops, weights) spread over 16 tokens; the CPU segment B is
    # compute-bound (4e6 FLOPs per token at 1 GFLOPS) and does not get cheaper per token.
    e1 = estimate(hand_manifest(), unit_profile, tokens_per_call=1)
    e16 = estimate(hand_manifest(), unit_profile, tokens_per_call=16)
    a1, a16 = e1.decode.graphs[0].segments[0].ms, e16.decode.graphs[0].segments[0].ms
    assert a16 / 16 < a1 / 4 and a16 > a1
    assert e16.decode.graphs[0].segments[1].ms == pytest.approx(16 * 4.0 + 0.045 + 0.02)
    assert e16.decode_ms_per_token < e1.decode_ms_per_token
    assert e16.npu_calls_per_token == pytest.approx(1 / 16)
    assert sum(e16.breakdown.values()) == pytest.approx(e16.decode_ms_per_token)
    # CPU: compute scales with T (4e6 FLOPs per token at 1 GFLOPS)
    c16 = price_segment(SEG_B, unit_profile, "cpu", tokens_per_call=16)
    assert c16.breakdown["cpu_compute"] * 1e3 == pytest.approx(64.0 + 0.045)
    with pytest.raises(UserError):
        estimate(hand_manifest(), unit_profile, tokens_per_call=0)


def test_prefill_plan_in_the_manifest_is_priced_per_chunk(unit_profile):
    data = hand_manifest()
    rows16 = dict(SEG_A, rows=16, matmul_flops=16 * 2_000_000, input_bytes=16 * 1000, output_bytes=16 * 2000)
    data["prefill"] = {"chunk": 16, "graphs": [{"name": "g1", "segments": [
        {"id": "p.s0", "backend": "npu", "onnx": "p.onnx", "inputs": [], "outputs": [], "cost": rows16}]}]}
    e = estimate(data, unit_profile)
    # one call of 16 rows: stream 0.5 (3 cores); compute 32e6 / (1600 GFLOPS * 3) = 0.00667 < stream;
    # ops 0.03; hops 2; conversion 16 * 0.005 = 0.08; call 0.15 => 2.76 ms per call, / 16 per token
    assert e.prefill_ms_per_token == pytest.approx(2.76 / 16)
    assert "16 tokens per call" in e.prefill_plan and e.prefill.tokens_per_call == 16
    assert e.decode_ms_per_token == pytest.approx(2.685 + 4.065 + 0.031)


def test_all_cpu_prices_each_graph_as_one_onnxruntime_session(unit_profile):
    e = estimate(hand_manifest(), unit_profile, all_cpu=True)
    # g1 merged: stored 4e6 B = 4 ms stream < 6e6 FLOPs at 1 GFLOPS = 6 ms; 14 non-MatMul ops * 5 us; 1 call
    assert e.decode.graphs[0].ms_per_token == pytest.approx(6.0 + 0.07 + 0.02)
    assert e.npu_calls_per_token == 0 and e.cpu_calls_per_token == 2 and e.all_cpu
    assert e.breakdown["npu_call"] == 0 and e.breakdown["conversion"] == 0


def test_missing_features_use_the_loader_once_or_fail_clearly(unit_profile):
    data = hand_manifest()
    del data["graphs"][0]["segments"][0]["cost"]
    with pytest.raises(UserError, match="g1.s0"):
        estimate(data, unit_profile)
    calls = []
    onnx_a = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [1, 8])], [vi("y", [1, 4])],
                   [const("w", [8, 4])])

    def loader(graph, seg):
        calls.append(seg["id"])
        return onnx_a

    filled, computed = with_features(data, loader)
    assert computed == 1 and calls == ["g1.s0"] and "cost" not in data["graphs"][0]["segments"][0]
    e = estimate(filled, unit_profile)
    e2 = estimate(data, unit_profile, loader=loader)
    assert e.decode_ms_per_token == pytest.approx(e2.decode_ms_per_token)
    assert e2.decode.graphs[0].segments[0].features_from == "onnx"


def test_measured_segments_in_a_profile_are_reported_beside_the_prediction(unit_profile, tmp_path):
    f = write(tmp_path / "m.toml", f'base = "{tmp_path / "unit.toml"}"\n'
              '[measured_segments."g1.s0"]\nms = 1.5\n[measured_segments."g1.s1"]\nms = 2.5\n'
              '[measured_segments."g2.s0"]\nms = 0.5\n')
    e = estimate(hand_manifest(), load_profile(f))
    assert e.decode.graphs[0].segments[0].measured_ms == 1.5
    assert e.decode.measured_ms_per_token == pytest.approx(4.5)
    assert estimate(hand_manifest(), unit_profile).decode.measured_ms_per_token is None


# -- calibration --------------------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class StandIn:
    """A runner whose every call advances a fake clock by call + bytes * conversion + weights / rate."""

    def __init__(self, clock, call_s, conv_s_per_byte, weight_bytes=0, rate=1.0, core_mask=None):
        self.clock, self.call, self.conv, self.w, self.rate = clock, call_s, conv_s_per_byte, weight_bytes, rate
        self.core_mask = core_mask
        self.active = False
        self.calls = 0

    def activate(self):
        self.active = True
        return self

    def deactivate(self):
        self.active = False

    def infer_list(self, arrays):
        assert self.active, "calibrate must activate a runner before using it"
        self.calls += 1
        n_in = sum(a.nbytes for a in arrays)
        n_out = 4 * 1024 if self.w else n_in
        self.clock.t += self.call + (n_in + n_out) * self.conv + self.w / self.rate
        return [np.zeros(1, np.float32)]


def test_probe_models_are_valid_and_run_on_onnxruntime():
    import onnxruntime as ort

    probes = probe_models()
    assert set(probes) == set(PROBE_SHAPES)
    for name, m in probes.items():
        onnx.checker.check_model(m)
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.ones(PROBE_SHAPES[name], np.float32)
        (y,) = sess.run(None, {"x": x})
        assert y.shape == ((1, 1024) if name == "matmul1024" else tuple(PROBE_SHAPES[name]))
    w = [t for t in probes["matmul1024"].graph.initializer][0]
    assert list(w.dims) == [1024, 1024]
    assert list(probes["add262144"].graph.initializer[0].dims) == [1]  # no weights to stream


def test_calibrate_recovers_the_constants_of_a_stand_in_board(tmp_path, model_factory):
    from rwkv2rknn.split import split_model

    out = tmp_path / "split"
    split_model([model_factory()], out, policy="fused", progress=False)
    clock = FakeClock()
    call, conv, rate1, rate3 = 300e-6, 2e-9, 10e9, 25e9
    probes = {"add16": StandIn(clock, call, conv), "add262144": StandIn(clock, call, conv),
              "matmul1024": StandIn(clock, call, conv, 2 * 1024 * 1024, rate1),
              "matmul1024@7": StandIn(clock, call, conv, 2 * 1024 * 1024, rate3)}
    made = []

    def make_runner(graph, seg):
        r = StandIn(clock, 1e-3 if seg["backend"] == "npu" else 2e-3, 0.0, core_mask=7)
        made.append(r)
        return r

    target = tmp_path / "board.toml"
    prof = calibrate(out, make_runner, probes, target, repeats=5, warmup=2, clock=clock, today="2025-01-02")
    assert prof.conv_in_ns_per_byte == pytest.approx(2.0) and prof.conv_out_ns_per_byte == pytest.approx(2.0)
    assert prof.npu_call_us == pytest.approx(300.0)
    assert prof.npu_stream_gbps_1core == pytest.approx(10.0)
    assert prof.npu_stream_gbps_3core == pytest.approx(25.0)
    assert "measured on this board 2025-01-02 by rwkv2rknn calibrate" in prof.sources["npu_call_us"]
    base = load_profile("rk3588")
    assert prof.cpu_stream_gbps == base.cpu_stream_gbps and prof.files[0].name == "rk3588.toml"
    assert all(r.calls == 7 and not r.active for r in made)  # warmup + repeats, deactivated
    data = json.loads((out / "manifest.json").read_text())
    ids = [s["id"] for g in data["graphs"] + data.get("prefill", {}).get("graphs", []) for s in g["segments"]]
    assert set(prof.measured_segments) == set(ids)
    npu_id = next(s["id"] for g in data["graphs"] for s in g["segments"] if s["backend"] == "npu")
    assert prof.measured_segments[npu_id]["ms"] == pytest.approx(1.0)
    assert prof.measured_segments[npu_id]["core_mask"] == 7
    # the file is TOML a person can read, and the estimator reports the timings beside the prediction
    assert 'base = "rk3588"' in target.read_text()
    e = estimate(data, prof, loader=lambda g, s: onnx.load(str(out / s["onnx"])))
    decode_ids = {s["id"] for g in data["graphs"] for s in g["segments"]}
    assert e.decode.measured_ms_per_token == pytest.approx(
        sum(v["ms"] for k, v in prof.measured_segments.items() if k in decode_ids))


def test_calibrate_refuses_missing_probes_and_keeps_underivable_constants(tmp_path):
    with pytest.raises(UserError, match="add262144"):
        calibrate(None, None, {"add16": StandIn(FakeClock(), 1e-4, 0)}, tmp_path / "x.toml")
    assert not (tmp_path / "x.toml").exists()
    clock = FakeClock()
    # a board whose big input costs nothing more: no conversion figure can be derived; the base's stays
    prof = calibrate(None, None, {"add16": StandIn(clock, 1e-4, 0.0), "add262144": StandIn(clock, 1e-4, 0.0)},
                     tmp_path / "y.toml", repeats=3, clock=clock)
    assert prof.npu_call_us == pytest.approx(100.0)
    assert prof.conv_in_ns_per_byte == load_profile("rk3588").conv_in_ns_per_byte
    assert "conv_in_ns_per_byte" in prof.description


def test_calibrate_drives_real_runners(tmp_path):
    """The interface is the runtime's: OrtRunner probes work unchanged (timings not asserted)."""
    from rwkv2rknn.run.runners import OrtRunner

    probes = {name: OrtRunner(m) for name, m in probe_models().items()}
    prof = calibrate(None, None, probes, tmp_path / "host.toml", repeats=3, warmup=1)
    assert prof.name.startswith("rk3588-measured-")


# -- the CLI -------------------------------------------------------------------------------------------------------

def cli(*args):
    return subprocess.run([sys.executable, "-m", "rwkv2rknn", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory, model_factory):
    from rwkv2rknn.split import split_model

    out = tmp_path_factory.mktemp("est") / "out"
    split_model([model_factory()], out, policy="fused", progress=False)
    return out


def test_cli_estimate_text_says_predicted_and_that_a_tiny_model_loses(tiny_split):
    r = cli("estimate", str(tiny_split), "--segments")
    assert r.returncode == 0, r.stderr
    assert "predicted (board profile rk3588, not measured)" in r.stdout
    # 64 wide: per-call costs dwarf the work: the plan must be predicted to lose to the CPU
    assert "LOSES to the CPU-only plan" in r.stdout
    assert "mixing_1.s1" in r.stdout and "rk3588.toml" in r.stdout


def test_cli_estimate_json_last_line(tiny_split, tmp_path):
    r = cli("estimate", str(tiny_split / "manifest.json"), "--board", "rk3588-2023", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("decode_ms_per_token", "prefill_ms_per_token", "npu_calls_per_token", "breakdown", "board",
                "graphs", "cpu_only", "loses_to_cpu_only", "label"):
        assert key in d
    assert d["predicted"] is True and d["board"] == "rk3588-2023" and d["loses_to_cpu_only"] is True
    assert sum(d["breakdown"].values()) == pytest.approx(d["decode_ms_per_token"])
    # the graphs add up to the plan, less what overlapping CPU steps with NPU steps saves (a plan-wide figure)
    assert sum(g["ms_per_token"] for g in d["graphs"]) + d["breakdown"]["overlap"] == pytest.approx(
        d["decode_ms_per_token"])
    manifest = json.loads((tiny_split / "manifest.json").read_text())
    n_npu = sum(s["backend"] == "npu" for g in manifest["graphs"] for s in g["segments"])
    assert n_npu >= 1 and d["npu_calls_per_token"] == n_npu and [g["name"] for g in d["graphs"]][0] == "embed"
    assert all(s["core_mask"] in (None, 1) for g in d["graphs"] for s in g["segments"])
    # a user's profile file
    f = write(tmp_path / "b.toml", 'base = "rk3588"\n[npu_call_us]\nvalue = 0.0\nsource = "what if"\n')
    d2 = json.loads(cli("estimate", str(tiny_split), "--board", str(f), "--json").stdout.strip().splitlines()[-1])
    assert d2["board_file"] == str(f) and d2["breakdown"]["npu_call"] == 0


def test_cli_estimate_errors_are_one_line(tiny_split, tmp_path):
    r = cli("estimate", str(tiny_split), "--board", "rk1234")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "rk1234" in r.stderr
    bad = write(tmp_path / "bad.toml", 'base = "rk3588"\n[npu_call_us]\nvalue = -5\nsource = "x"\n')
    r = cli("estimate", str(tiny_split), "--board", str(bad))
    assert r.returncode == 2 and "npu_call_us" in r.stderr and str(bad) in r.stderr
    r = cli("estimate", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "no manifest" in r.stderr


# -- backtests on the 430M shape (24 x 1024, vocab 50277) ---------------------------------------------------------
# Cheap path (default run): export 2 layers of the shape, split them in memory (features only, no files) and
# repeat the mixing layer to 24: every layer of one shape has identical structure and tensor shapes, so its
# features are identical and the (additive) estimator prices 24 copies exactly as the real 24-layer split;
# test_backtest_430m_full_split checks that equality on a real 24-layer split.

def within(pred: float, published: float, factor: float) -> bool:
    return published / factor <= pred <= published * factor


@pytest.fixture(scope="module")
def plan430_matmul(model_factory):
    m2 = model_factory(layers=2, embd=1024, vocab=50277)
    return repeat_layers(features_plan([m2], policy="matmul"), 24)


def test_backtest_2023_attempt_matmul_policy_430m(plan430_matmul):
    e = estimate(plan430_matmul, load_profile("rk3588-2023"))
    assert e.npu_calls_per_token == 24 * 7 + 1  # every MatMul its own NPU call, as in 2023
    assert within(e.decode_ms_per_token, PUBLISHED_2023_MS, 2.0), e.decode_ms_per_token
    assert e.breakdown["npu_call"] > e.breakdown["npu_stream"]  # the diagnosis: too many small calls


def test_backtest_rwkv_cpp_all_cpu_430m(plan430_matmul, model_factory):
    e = estimate(plan430_matmul, load_profile("rk3588"), all_cpu=True)
    assert e.npu_calls_per_token == 0 and e.cpu_calls_per_token == 26
    assert within(e.decode_ms_per_token, PUBLISHED_RWKV_CPP_MS, 1.5), e.decode_ms_per_token
    # the same through the policy a user picks: split --policy cpu
    m2 = model_factory(layers=2, embd=1024, vocab=50277)
    plan = repeat_layers(features_plan([m2], policy="cpu"), 24)
    c = estimate(plan, load_profile("rk3588"))
    assert c.npu_calls_per_token == 0 and c.cpu_calls_per_token == 26
    # within 1%: the matmul plan's graph went through the NPU-side rewrites (passes/combine.py stacks the mixes:
    # exact, a few Concat/Split more for a CPU), the cpu policy's did not
    assert c.decode_ms_per_token == pytest.approx(e.decode_ms_per_token, rel=1e-2)


def test_auto_is_never_predicted_worse_than_any_single_policy(model_factory):
    from rwkv2rknn import policies
    from rwkv2rknn.options import SplitOptions
    from rwkv2rknn.split import split_plan

    m2 = model_factory(layers=3, embd=512, vocab=4096)
    board = load_profile("rk3588")
    auto = features_plan([m2], policy="auto")
    got = estimate(auto, board).decode_ms_per_token
    for p in policies.concrete():
        other = estimate(features_plan([m2], policy=p.name), board).decode_ms_per_token
        assert got <= other + 1e-9, (p.name, got, other)
    top = auto["auto"]
    assert set(top["candidates"]) == {"auto", "deep", "cpu"} and top["predicted_ms"] == min(top["candidates"].values())
    assert top["reason"].startswith("lowest predicted decode time")
    per_graph = auto if top["chosen"] == "auto" else split_plan([m2], "unused", policies.get("auto"),
                                                                SplitOptions(preview=True, progress=False))[0]
    for g in per_graph["graphs"]:
        rec = g["auto"]
        assert rec["chosen"] == g["policy"] and rec["runner_up"]["policy"] != rec["chosen"]
        assert rec["predicted_ms"] == min(rec["candidates"].values())
        assert rec["reason"].startswith("lowest predicted time")


@pytest.mark.slow
def test_backtest_430m_full_split(tmp_path):
    """The real thing through the CLI: export 24 x 1024 (~25 s), split --policy matmul (~30 s, 1.7 GB),
    estimate under both profiles; and the cheap 2-layer path gives the same numbers."""
    m = tmp_path / "m430"
    r = cli("export", "--random", "--layers", "24", "--embd", "1024", "--vocab", "50277", "-o", str(m))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "s430"
    r = cli("split", str(m), "--policy", "matmul", "-o", str(out), "-q")
    assert r.returncode == 0, r.stderr
    d23 = json.loads(cli("estimate", str(out), "--board", "rk3588-2023", "--json").stdout.strip().splitlines()[-1])
    assert d23["npu_calls_per_token"] == 169
    assert within(d23["decode_ms_per_token"], PUBLISHED_2023_MS, 2.0), d23["decode_ms_per_token"]
    d = json.loads(cli("estimate", str(out), "--board", "rk3588", "--json").stdout.strip().splitlines()[-1])
    assert within(d["cpu_only"]["decode_ms_per_token"], PUBLISHED_RWKV_CPP_MS, 1.5), d["cpu_only"]
    # the cheap path: 2 layers of the same shape, repeated
    for layer in range(2, 24):
        (m / f"mixing_{layer}.onnx").unlink()
    cheap = repeat_layers(features_plan([m], policy="matmul"), 24)
    e = estimate(cheap, load_profile("rk3588-2023"))
    assert e.decode_ms_per_token == pytest.approx(d23["decode_ms_per_token"], rel=1e-9)
    c = estimate(cheap, load_profile("rk3588"), all_cpu=True)
    assert c.decode_ms_per_token == pytest.approx(d["cpu_only"]["decode_ms_per_token"], rel=1e-9)
    assert not math.isnan(d["prefill_ms_per_token"])


def test_estimate_precision_w8a8_prices_a_split_as_if_built_int8(tiny_split):
    """Before a build: --precision w8a8 halves the weights streamed (a w8a8 model quantizes its fp16 inputs inside,
    on the NPU: no conversion is added); a build's recorded precision would replace the assumption."""
    fp16 = json.loads(cli("estimate", str(tiny_split), "--board", "rk3588-c", "--json").stdout.strip().splitlines()[-1])
    w8 = json.loads(cli("estimate", str(tiny_split), "--board", "rk3588-c", "--precision", "w8a8",
                        "--json").stdout.strip().splitlines()[-1])
    assert fp16["precision"] == "fp16" and w8["precision"] == "w8a8"
    assert w8["breakdown"]["npu_stream"] == pytest.approx(fp16["breakdown"]["npu_stream"] / 2)
    assert w8["conversion"] == fp16["conversion"] and w8["decode_ms_per_token"] < fp16["decode_ms_per_token"]
    r = cli("estimate", str(tiny_split), "--precision", "int4")
    assert r.returncode == 2 and "--precision" in r.stderr
