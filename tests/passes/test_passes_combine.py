"""passes/combine.py: parallel elementwise branches (the token-shift mixes) stacked into [k, C] ops."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from passes_testlib import export_checked, helper_graph, rknn_build_and_run, run_model

from passes.combine import combine_parallel

C = 64
RNG = np.random.default_rng(0)
MIX = {q: RNG.standard_normal(C) for q in "rwkvag"}
W = {q: RNG.standard_normal((C, C)) / 8 for q in "rwkvag"}


def _rwkv7_mixes():
    """h + (h_prev - h) * x_q for six q, each into a MatMul (what the layer does with them)."""
    nodes = [helper.make_node("Sub", ["h_prev", "h"], ["d"], name="sub")]
    outs = []
    for q in "rwkvag":
        nodes += [helper.make_node("Mul", ["d", f"x_{q}"], [f"dm_{q}"], name=f"mul_{q}"),
                  helper.make_node("Add", ["h", f"dm_{q}"], [f"m_{q}"], name=f"add_{q}"),
                  helper.make_node("MatMul", [f"m_{q}", f"W_{q}"], [f"y_{q}"], name=f"mm_{q}")]
        outs.append((f"y_{q}", [1, C]))
    inits = [(f"x_{q}", MIX[q].reshape(1, C)) for q in "rwkvag"] + [(f"W_{q}", W[q]) for q in "rwkvag"]
    return helper_graph(nodes, [("h", [1, C]), ("h_prev", [1, C])], outs, inits)


def _rwkv4_mixes():
    """x * mix_q + xx * (1 - mix_q) for k, v, r."""
    nodes, outs, inits = [], [], []
    for q in "kvr":
        nodes += [helper.make_node("Mul", ["x", f"mix_{q}"], [f"a_{q}"], name=f"ma_{q}"),
                  helper.make_node("Mul", ["xx", f"inv_{q}"], [f"b_{q}"], name=f"mb_{q}"),
                  helper.make_node("Add", [f"a_{q}", f"b_{q}"], [f"m_{q}"], name=f"add_{q}")]
        outs.append((f"m_{q}", [C]))
        inits += [(f"mix_{q}", MIX[q]), (f"inv_{q}", 1 - MIX[q])]
    return helper_graph(nodes, [("x", [C]), ("xx", [C])], outs, inits)


def _ops(g) -> int:
    return sum(n.op not in ("Reshape", "MatMul") for n in g.nodes)


@pytest.mark.parametrize("make, before, after", [(_rwkv7_mixes, 13, 4), (_rwkv4_mixes, 9, 4)])
def test_combined_graph_computes_the_same(make, before, after):
    feed = {"h": RNG.standard_normal((1, C)), "h_prev": RNG.standard_normal((1, C)),
            "x": RNG.standard_normal(C), "xx": RNG.standard_normal(C)}
    g = make()
    names = [t.name for t in g.inputs]
    feed = {k: v.astype(np.float32) for k, v in feed.items() if k in names}
    ref = run_model(export_checked(make()), feed)
    assert _ops(g) == before
    combined = combine_parallel(g).graph
    assert _ops(combined) == after
    got = run_model(export_checked(combined), feed)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name])


def test_a_branch_read_elsewhere_ends_the_group_there():
    g = _rwkv7_mixes()
    extra = next(t for t in g.tensors().values() if t.name == "dm_r")
    g.outputs.append(extra)  # the first Mul's output is also a graph output: the Adds stay apart
    combined = combine_parallel(g).graph
    assert sum(n.op == "Split" for n in combined.nodes) == 1 and sum(n.op == "Add" for n in combined.nodes) == 6


@pytest.mark.rknn
def test_the_npu_keeps_the_combined_ops(tmp_path):
    """rknn-toolkit2 2.5.0 compiles the stacked Mul/Add and the Split on the NPU: its table shows no CPU op."""
    pytest.importorskip("rknn.api")
    model = export_checked(combine_parallel(_rwkv7_mixes()).graph)
    feed = {"h": RNG.standard_normal((1, C)).astype(np.float32), "h_prev": RNG.standard_normal((1, C)).astype(np.float32)}
    table, outs = rknn_build_and_run(model, tmp_path / "m.onnx", [feed], ["h", "h_prev"])
    assert table.cpu_ops == [], table.cpu_ops
    ref = run_model(model, feed)
    for vi, v in zip(model.graph.output, outs[0]):
        a, b = np.asarray(v, np.float64).ravel(), ref[vi.name].astype(np.float64).ravel()
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.9999
