"""passes/nsplit.py: a single-row NPU segment as three models over column ranges, one per NPU core."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from passes_testlib import export_checked, helper_graph, rknn_build_and_run, run_model

from passes.nsplit import nsplit, plan_columns

C, V = 64, 400


def _head():
    """LayerNorm-ish prefix, then one heavy MatMul and a column-wise bias + sigmoid: one stage."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Mul", ["x", "g"], ["xg"], name="n0"),
             helper.make_node("MatMul", ["xg", "W"], ["y"], name="n1"),
             helper.make_node("Add", ["y", "b"], ["yb"], name="n2"),
             helper.make_node("Sigmoid", ["yb"], ["out"], name="n3"),
             helper.make_node("Relu", ["xg"], ["side"], name="n4")]
    return helper_graph(nodes, [("x", [1, C])], [("out", [1, V]), ("side", [1, C])],
                        [("g", rng.standard_normal((1, C))), ("W", rng.standard_normal((C, V)) / 8),
                         ("b", rng.standard_normal((V,)))])


def _chain():
    """Two heavy MatMuls in a row (an FFN): not one stage."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", "K"], ["k"], name="n0"),
             helper.make_node("Relu", ["k"], ["kr"], name="n1"),
             helper.make_node("MatMul", ["kr", "Vw"], ["out"], name="n2")]
    return helper_graph(nodes, [("x", [1, C])], [("out", [1, C])],
                        [("K", rng.standard_normal((C, 4 * C))), ("Vw", rng.standard_normal((4 * C, C)))])


def _assemble(pieces, ref):
    got = {}
    for p in pieces:
        res = run_model(p.model, {"x": FEED["x"]})
        for name, v in res.items():
            if p.outputs[name] is None:
                got[name] = v
            else:
                whole, c0, c1 = p.outputs[name]
                got.setdefault(whole, np.zeros_like(ref[whole]))[..., c0:c1] = v
    return got


FEED = {"x": np.random.default_rng(2).standard_normal((1, C)).astype(np.float32)}


def test_three_pieces_reproduce_the_segment():
    model = export_checked(_head())
    ref = run_model(model, FEED)
    pieces = nsplit(model, 3, min_bytes=1)
    assert [p.columns for p in pieces] == [(0, 144), (144, 272), (272, 400)]  # 16-aligned, the rest last
    got = _assemble(pieces, ref)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name])
    # each piece streams a third of the weight; the side output comes from the first piece only
    sizes = [sum(int(np.prod(t.dims)) for t in p.model.graph.initializer if t.name.startswith("W")) for p in pieces]
    assert sizes == [C * 144, C * 128, C * 128]
    assert [o.name for o in pieces[1].model.graph.output] == ["out#1"]


def test_more_than_one_stage_is_left_whole():
    assert plan_columns(export_checked(_chain()), min_bytes=1) is None
    assert nsplit(export_checked(_chain()), 3, min_bytes=1) is None


def test_small_weights_are_not_split():
    assert nsplit(export_checked(_head()), 3, min_bytes=10 ** 9) is None


@pytest.mark.rknn
def test_pieces_compile_and_run_in_the_simulator(tmp_path):
    pytest.importorskip("rknn.api")
    model = export_checked(_head())
    ref = run_model(model, FEED)
    pieces = nsplit(model, 3, min_bytes=1)
    got = {}
    for p in pieces:
        _, outs = rknn_build_and_run(p.model, tmp_path / f"p{p.index}.onnx", [FEED], ["x"])
        for vi, v in zip(p.model.graph.output, outs[0]):
            if p.outputs[vi.name] is None:
                got[vi.name] = v
            else:
                whole, c0, c1 = p.outputs[vi.name]
                got.setdefault(whole, np.zeros(ref[whole].shape, np.float32))[..., c0:c1] = np.asarray(v).reshape(
                    ref[whole][..., c0:c1].shape)
    for name in ref:
        a, b = got[name].ravel().astype(np.float64), ref[name].ravel().astype(np.float64)
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.9999, name
