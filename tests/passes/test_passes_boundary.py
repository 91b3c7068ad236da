"""passes/boundary.py: NPU segments read and write fp16, CPU segments convert inside their own graph."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper
from passes_testlib import export_checked, helper_graph, run_model, run_segments

from passes.boundary import FP16_SUFFIX, board_boundaries
from passes.cut import TensorInfo, extract_segments
from passes.partition import Segment

C = 16


def _graph():
    """A layer-like graph: state in/out, an NPU-ish MatMul, a CPU recurrence, an NPU-ish output projection.

    state_in -> [cpu s0: Mul] -> m ; x, m -> [npu s1: Add, MatMul W1] -> k
    k, state_in -> [cpu s2: Exp-ish Sigmoid, Add] -> state_out (fp32 recurrence), r
    r, x -> [npu s3: MatMul W2, Add] -> y  (read by the next graph)
    """
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Mul", ["state_in", "half"], ["m"], name="n0"),
             helper.make_node("Add", ["x", "m"], ["xm"], name="n1"),
             helper.make_node("MatMul", ["xm", "W1"], ["k"], name="n2"),
             helper.make_node("Sigmoid", ["k"], ["sk"], name="n3"),
             helper.make_node("Add", ["sk", "state_in"], ["state_out"], name="n4"),
             helper.make_node("Mul", ["state_out", "k"], ["r"], name="n5"),
             helper.make_node("MatMul", ["r", "W2"], ["o"], name="n6"),
             helper.make_node("Add", ["o", "x"], ["y"], name="n7")]
    return helper_graph(nodes, [("x", [1, C]), ("state_in", [1, C])], [("y", [1, C]), ("state_out", [1, C])],
                        [("half", np.full((1, C), 0.5)), ("W1", rng.standard_normal((C, C)) / 4),
                         ("W2", rng.standard_normal((C, C)) / 4)])


def _cut(g: gs.Graph, backends=("cpu", "npu", "cpu", "npu")):
    g.toposort()
    nodes = list(g.nodes)
    groups = [nodes[0:1], nodes[1:3], nodes[3:6], nodes[6:8]]
    return extract_segments(g, [Segment(b, ns, "test") for b, ns in zip(backends, groups)])


def _infos(ts):
    return [TensorInfo(t.name, np.dtype(t.dtype).name, list(t.shape)) for t in ts]


def _feed(rng):
    return {"x": rng.standard_normal((1, C)).astype(np.float32),
            "state_in": rng.standard_normal((1, C)).astype(np.float32)}


def test_npu_io_is_fp16_cpu_converts_inside_and_the_fp32_state_gets_a_shadow():
    g = _graph()
    ref_model = export_checked(_graph())
    cuts = _cut(g)
    res = board_boundaries(cuts, _infos(g.inputs), _infos(g.outputs), state_pairs=[("state_in", "state_out")])
    npu = [c for c in res.cuts if c.backend == "npu"]
    for c in npu:  # every float boundary of an NPU segment is fp16
        assert {t.dtype for t in c.inputs + c.outputs} == {"float16"}, c.inputs + c.outputs
    # the state is written by the CPU (fp32) and read by the NPU (s1 reads m? no: s0 reads it) -> the shadow
    # exists only if an NPU segment reads the state; here s0 (CPU) and s2 (CPU) read it: no shadow
    assert res.shadows == {}
    assert res.output_dtypes == {"y": "float16", "state_out": "float32"}
    # the CPU segment that reads the NPU's k declares it fp16 and casts inside: one conversion, counted
    s2 = res.cuts[2]
    assert {t.name: t.dtype for t in s2.inputs}["k"] == "float16"
    assert ("k", "to_fp32", C) in res.casts[2]
    # values: the board's (fp16 at NPU boundaries), close to the fp32 source
    rng = np.random.default_rng(1)
    feed = _feed(rng)
    ref = run_model(ref_model, feed)
    # a graph input the NPU reads in fp16 comes as `<name>@fp16`, converted by whoever feeds the graph
    assert res.input_dtypes["x" + FP16_SUFFIX] == "float16"
    feed["x" + FP16_SUFFIX] = feed["x"].astype(np.float16)
    table = run_segments(res.cuts, feed)
    assert table["y"].dtype == np.float16 and table["state_out"].dtype == np.float32
    for name in ("y", "state_out"):
        a, b = table[name].astype(np.float64), ref[name].astype(np.float64)
        assert np.abs(a - b).max() <= 4e-3 * max(1.0, np.abs(b).max()), name


def test_a_state_the_npu_reads_is_shadowed_by_its_cpu_writer():
    g = _graph()
    # s0 on the NPU: it reads state_in, which the CPU (s2) writes in fp32
    cuts = _cut(g, ("npu", "npu", "cpu", "npu"))
    res = board_boundaries(cuts, _infos(g.inputs), _infos(g.outputs), state_pairs=[("state_in", "state_out")])
    si, so = "state_in" + FP16_SUFFIX, "state_out" + FP16_SUFFIX
    assert res.shadows == {"state_in": (si, so)}
    assert si in [t.name for t in res.cuts[0].inputs]
    assert res.output_dtypes[so] == "float16" and res.output_dtypes["state_out"] == "float32"
    assert res.input_dtypes[si] == "float16" and res.input_dtypes["state_in"] == "float32"
    rng = np.random.default_rng(2)
    feed = _feed(rng)
    feed[si] = feed["state_in"].astype(np.float16)
    feed["x" + FP16_SUFFIX] = feed["x"].astype(np.float16)
    table = run_segments(res.cuts, feed)
    # the shadow written in the same pass is the fp32 state rounded once
    np.testing.assert_array_equal(table[so], table["state_out"].astype(np.float16))


def test_fixed_boundary_keeps_its_dtype_and_cpu_only_plans_are_untouched():
    g = _graph()
    cuts = _cut(g)
    res = board_boundaries(cuts, _infos(g.inputs), _infos(g.outputs), fixed={"x", "y", "state_in", "state_out"})
    assert {t.name: t.dtype for t in res.cuts[1].inputs}["x"] == "float32"  # the user feeds fp32
    assert {t.name: t.dtype for t in res.cuts[3].outputs}["y"] == "float32"
    g2 = _graph()
    cpu = _cut(g2, ("cpu",) * 4)
    res2 = board_boundaries(cpu, _infos(g2.inputs), _infos(g2.outputs), state_pairs=[("state_in", "state_out")])
    assert [c.model for c in res2.cuts] == [c.model for c in cpu] and not any(res2.casts)


def test_a_link_input_in_fp16_is_read_as_fp16_by_the_cpu():
    g = _graph()
    cuts = _cut(g, ("cpu", "cpu", "cpu", "cpu"))
    res = board_boundaries(cuts, _infos(g.inputs), _infos(g.outputs), input_dtypes={"x": "float16"})
    readers = [c for c in res.cuts if "x" in [t.name for t in c.inputs]]
    assert readers and all({t.name: t.dtype for t in c.inputs}["x"] == "float16" for c in readers)
    feed = _feed(np.random.default_rng(3))
    feed["x"] = feed["x"].astype(np.float16)
    ref = run_model(export_checked(_graph()), {"x": feed["x"].astype(np.float32), "state_in": feed["state_in"]})
    table = run_segments(res.cuts, feed)
    np.testing.assert_allclose(table["y"], ref["y"], rtol=1e-5, atol=1e-6)
