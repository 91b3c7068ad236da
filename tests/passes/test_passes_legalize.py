"""Legalize passes: onnxruntime on the rewritten graph against the original, onnx.checker, and the nodes left alone.

Error bounds (fp32, onnxruntime CPU):
- Exp -> Elu + 1 on x <= 0: Elu computes exp(x) - 1, exact by Sterbenz for exp(x) in [0.5, 1] and
  otherwise rounded at the scale of 1.0; adding 1 rounds once more at that scale. So the error is
  absolute, <= 1 ulp(1.0) = 2^-23 (measured 6.6e-8 against exp in float64 over [-100, 0]); relative to
  exp(x) it is the same near 0 and grows as exp(x) shrinks (3e-7 at 0.1, 3e-4 at 1e-4).
- Max in 4-D, Min as -Max(-a, -b), Div / Reciprocal in [1, 1, H, W] (numerator scaled by 1s and 2s):
  the same IEEE operations on the same operands (negation and power-of-two scaling are exact): bitwise equal.
- Max as a + Relu(b - a) (optional form): |error| <= 2^-23 * (|a| + |b|) (two roundings), NaN for infinite a.
- A whole RWKV-4 layer, 40 tokens from the initial state: max |diff| / max |ref| <= 2e-6 (measured 3e-7):
  the e-factors err by <= 2^-23 absolutely and the WKV denominator is >= 1.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper
from passes_testlib import export_checked, helper_graph, rel_err, rknn_build_and_run, run_model, rwkv_mixing_model

from passes.legalize import legalize
from passes.legalize_div import legalize_div
from passes.legalize_exp import legalize_exp
from passes.legalize_max import legalize_max
from passes.legalize_min import legalize_min
from passes.legalize_reciprocal import legalize_reciprocal
from passes.pipeline import normalize

ULP1 = 2.0 ** -23


def _run_both(g_before, legalize_fn, feeds):
    """(reference outputs, rewritten outputs, notes, rewritten graph); the source graph is exported first."""
    ref = run_model(export_checked(g_before), feeds)
    result = legalize_fn(g_before)
    g, notes = result.graph, result.notes
    g = g.cleanup().toposort()
    got = run_model(export_checked(g), feeds)
    return ref, got, notes, g


def _ops(g):
    return [n.op for n in g.nodes]


def _by_node(notes):
    return {n.node: n for n in notes}


def _wkv_graph(c, via_views=False):
    """e1 = exp(a - max(a, b)), e2 = exp(b - max(a, b)): the stable WKV form."""
    if via_views:
        nodes = [helper.make_node("Reshape", ["a", "s2"], ["a2"], name="ra"),
                 helper.make_node("Reshape", ["b", "s2"], ["b2"], name="rb"),
                 helper.make_node("Max", ["a2", "b2"], ["m2"], name="Max_0"),
                 helper.make_node("Reshape", ["m2", "s1"], ["m"], name="rm")]
        inits = [("s2", np.array([1, c], np.int64)), ("s1", np.array([c], np.int64))]
    else:
        nodes, inits = [helper.make_node("Max", ["a", "b"], ["m"], name="Max_0")], []
    nodes += [helper.make_node("Sub", ["a", "m"], ["da"], name="Sub_a"),
              helper.make_node("Exp", ["da"], ["e1"], name="Exp_a"),
              helper.make_node("Sub", ["b", "m"], ["db"], name="Sub_b"),
              helper.make_node("Exp", ["db"], ["e2"], name="Exp_b")]
    return helper_graph(nodes, [("a", [c]), ("b", [c])], [("e1", [c]), ("e2", [c])], inits)


def _wkv_feeds(c, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-40, 40, c).astype(np.float32)
    b = (a + rng.uniform(-20, 20, c)).astype(np.float32)
    b[:4] = a[:4]                        # ties: both factors 1
    b[4:8] = a[4:8] + np.float32(1e-6)   # arguments just below 0
    a[8:12] = -1e30                      # the initial pp
    return {"a": a, "b": b}


# -- Exp ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("via_views", [False, True])
def test_exp_of_stable_wkv_form_becomes_elu_plus_one(via_views):
    c = 256
    feeds = _wkv_feeds(c)
    ref, got, notes, g = _run_both(_wkv_graph(c, via_views), legalize_exp, feeds)
    assert "Exp" not in _ops(g) and _ops(g).count("Elu") == 2
    assert [n.node for n in notes if n.rewritten] == ["Exp_a", "Exp_b"]
    assert all("Max_0" in n.reason for n in notes)
    for k in ("e1", "e2"):
        assert np.max(np.abs(got[k].astype(np.float64) - ref[k])) <= ULP1, k
        near0 = ref[k] >= 0.5
        assert np.all(np.abs(got[k][near0] - ref[k][near0]) / ref[k][near0] <= 2 * ULP1)
        assert np.all((got[k] >= 0) & (got[k] <= 1))


def test_exp_grid_error_bound():
    """Elu(x) + 1 vs Exp(x) over x in [-100, 0]: absolute error <= 1 ulp of 1.0."""
    x = np.concatenate([-np.logspace(-12, 2, 20000), np.linspace(-30, 0, 20001)]).astype(np.float32)
    c = x.size
    g = helper_graph([helper.make_node("Max", ["x", "zero"], ["m"], name="Max_0"),
                helper.make_node("Sub", ["x", "m"], ["d"], name="Sub_0"),
                helper.make_node("Exp", ["d"], ["y"], name="Exp_0")],
               [("x", [c])], [("y", [c])], [("zero", np.zeros(c))])
    feeds = {"x": x}
    ref, got, notes, _ = _run_both(g, legalize_exp, feeds)
    assert notes[0].rewritten
    exact = np.exp(np.minimum(x, 0).astype(np.float64))
    assert np.max(np.abs(got["y"] - exact)) <= ULP1
    assert np.max(np.abs(got["y"].astype(np.float64) - ref["y"])) <= ULP1


def test_exp_other_provable_forms():
    c = 64
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["xm"], name="ReduceMax_0", axes=[-1]),   # softmax form
        helper.make_node("Sub", ["x", "xm"], ["d0"], name="Sub_0"),
        helper.make_node("Exp", ["d0"], ["y0"], name="Exp_softmax"),
        helper.make_node("Relu", ["x"], ["r"], name="Relu_0"),
        helper.make_node("Neg", ["r"], ["nr"], name="Neg_0"),
        helper.make_node("Exp", ["nr"], ["y1"], name="Exp_negrelu"),
        helper.make_node("Min", ["x", "zero"], ["mn"], name="Min_0"),
        helper.make_node("Exp", ["mn"], ["y2"], name="Exp_min"),
        helper.make_node("Abs", ["x"], ["ab"], name="Abs_0"),
        helper.make_node("Mul", ["ab", "minus3"], ["m3"], name="Mul_0"),
        helper.make_node("Exp", ["m3"], ["y3"], name="Exp_negabs"),
        helper.make_node("Add", ["nr", "minus3"], ["s"], name="Add_0"),
        helper.make_node("Exp", ["s"], ["y4"], name="Exp_sum"),
    ]
    g = helper_graph(nodes, [("x", [c])], [(f"y{k}", [c]) for k in range(5)],
               [("zero", np.array(0.0)), ("minus3", np.array(-3.0))])
    feeds = {"x": np.random.default_rng(1).uniform(-10, 10, c).astype(np.float32)}
    ref, got, notes, g2 = _run_both(g, legalize_exp, feeds)
    assert all(n.rewritten for n in notes) and len(notes) == 5, [str(n) for n in notes]
    assert "Exp" not in _ops(g2)
    for k in ref:
        assert np.max(np.abs(got[k].astype(np.float64) - ref[k])) <= ULP1, k


def test_exp_left_alone_when_the_argument_is_not_provably_nonpositive():
    c = 32
    nodes = [
        helper.make_node("Exp", ["a"], ["y0"], name="Exp_input"),
        helper.make_node("Sub", ["a", "b"], ["d1"], name="Sub_plain"),
        helper.make_node("Exp", ["d1"], ["y1"], name="Exp_plain"),
        helper.make_node("Max", ["c", "b"], ["m"], name="Max_other"),           # a is not an operand
        helper.make_node("Sub", ["a", "m"], ["d2"], name="Sub_other"),
        helper.make_node("Exp", ["d2"], ["y2"], name="Exp_other"),
        helper.make_node("Max", ["a", "b"], ["m2"], name="Max_ab"),
        helper.make_node("Sub", ["m2", "a"], ["d3"], name="Sub_reversed"),     # >= 0, not <= 0
        helper.make_node("Exp", ["d3"], ["y3"], name="Exp_reversed"),
    ]
    g = helper_graph(nodes, [("a", [c]), ("b", [c]), ("c", [c])], [(f"y{k}", [c]) for k in range(4)])
    before = _ops(g)
    result = legalize_exp(g)
    g, notes = result.graph, result.notes
    assert _ops(g) == before
    notes = _by_node(notes)
    assert set(notes) == {"Exp_input", "Exp_plain", "Exp_other", "Exp_reversed"}
    assert not any(n.rewritten for n in notes.values())
    assert all(n.reason.startswith("cannot prove its argument <= 0") for n in notes.values())
    assert "a is a graph input" in notes["Exp_input"].reason
    assert "Sub(a, b) [Sub_plain]" in notes["Exp_plain"].reason
    export_checked(g)


def test_exp_proof_after_max_rewrites():
    """The proof sees through the 4-D Max's Reshapes; after a + Relu(b - a) only a - max stays provable,
    which is why legalize() rewrites Exp before Max and uses the exact 4-D form."""
    g = legalize_max(_wkv_graph(16), form="4d").graph
    notes = legalize_exp(g).notes
    assert all(n.rewritten for n in notes)
    g = legalize_max(_wkv_graph(16), form="relu").graph
    notes = legalize_exp(g).notes
    assert [(n.node, n.rewritten) for n in notes] == [("Exp_a", True), ("Exp_b", False)]


# -- Max ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [[128], [1, 128], [2, 3, 8]])
def test_max_in_4d_is_exact(shape):
    rng = np.random.default_rng(2)
    a = rng.standard_normal(shape).astype(np.float32) * 100
    b = rng.standard_normal(shape).astype(np.float32) * 100
    a.reshape(-1)[:3] = [-np.inf, np.inf, -1e30]
    b.reshape(-1)[3] = a.reshape(-1)[3]
    g = helper_graph([helper.make_node("Max", ["a", "b"], ["y"], name="Max_0"),
                helper.make_node("Max", ["a", "half"], ["z"], name="Max_const")],
               [("a", shape), ("b", shape)], [("y", shape), ("z", shape)], [("half", np.array(0.5))])
    ref, got, notes, g2 = _run_both(g, legalize_max, {"a": a, "b": b})
    assert all(n.rewritten for n in notes)
    maxes = [n for n in g2.nodes if n.op == "Max"]
    assert [n.name for n in maxes] == ["Max_0", "Max_const"]   # the Max keeps its name
    assert all(len(n.outputs[0].shape) == 4 and n.outputs[0].shape[1] == np.prod(shape) for n in maxes)
    for k in ref:
        assert np.array_equal(got[k], ref[k]) and got[k].shape == ref[k].shape, k


def test_max_relu_form_bound_and_its_infinity_problem():
    c = 512
    rng = np.random.default_rng(3)
    a = (rng.standard_normal(c) * np.logspace(-3, 3, c)).astype(np.float32)
    b = (rng.standard_normal(c) * np.logspace(3, -3, c)).astype(np.float32)
    g = helper_graph([helper.make_node("Max", ["a", "b"], ["y"], name="Max_0")], [("a", [c]), ("b", [c])], [("y", [c])])
    ref, got, notes, g2 = _run_both(g, lambda gr: legalize_max(gr, form="relu"), {"a": a, "b": b})
    assert notes[0].rewritten and sorted(_ops(g2)) == ["Add", "Relu", "Sub"]
    err = np.abs(got["y"].astype(np.float64) - ref["y"])
    assert np.all(err <= ULP1 * (np.abs(a).astype(np.float64) + np.abs(b)))
    a[0] = -np.inf
    out = run_model(export_checked(g2), {"a": a, "b": b})["y"]
    assert np.isnan(out[0])   # -inf + Relu(b + inf) = -inf + inf: the 4-D form has no such case


def test_max_left_alone():
    nodes = [helper.make_node("Max", ["a4", "b4"], ["y0"], name="Max_4d"),
             helper.make_node("Max", ["a", "b", "c"], ["y1"], name="Max_three"),
             helper.make_node("Max", ["a", "s"], ["y2"], name="Max_broadcast")]
    g = helper_graph(nodes, [("a4", [1, 8, 1, 1]), ("b4", [1, 8, 1, 1]), ("a", [8]), ("b", [8]), ("c", [8]), ("s", [1])],
               [("y0", [1, 8, 1, 1]), ("y1", [8]), ("y2", [8])])
    before = _ops(g)
    result = legalize_max(g)
    g, notes = result.graph, result.notes
    assert _ops(g) == before
    why = {n.node: n.reason for n in notes if not n.rewritten}
    assert "already 4-D" in why["Max_4d"]
    assert "3 inputs" in why["Max_three"]
    assert "broadcasts" in why["Max_broadcast"]
    with pytest.raises(ValueError, match="form"):
        legalize_max(g, form="nope")


# -- Div ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,hw", [([128], [1, 1, 8, 16]), ([1, 96], [1, 1, 8, 12]), ([1024], [1, 1, 32, 32])])
def test_div_in_hw_layout_is_exact(shape, hw):
    rng = np.random.default_rng(4)
    num = rng.standard_normal(shape).astype(np.float32)
    den = (1 + np.abs(rng.standard_normal(shape))).astype(np.float32)
    g = helper_graph([helper.make_node("Div", ["n", "d"], ["y"], name="Div_1")], [("n", shape), ("d", shape)],
               [("y", shape)])
    ref, got, notes, g2 = _run_both(g, legalize_div, {"n": num, "d": den})
    assert notes[0].rewritten and str(hw) in notes[0].reason
    div = next(n for n in g2.nodes if n.op == "Div")
    assert div.name == "Div_1" and div.outputs[0].shape == hw
    assert np.array_equal(got["y"], ref["y"])


def test_div_left_alone():
    nodes = [
        helper.make_node("Div", ["x", "std"], ["y0"], name="Div_ln"),       # LayerNorm: [C] / [1]
        helper.make_node("Div", ["x", "k"], ["y1"], name="Div_const"),
        helper.make_node("Div", ["p", "q"], ["y2"], name="Div_prime"),
        helper.make_node("Div", ["h", "w"], ["y3"], name="Div_hw"),
    ]
    g = helper_graph(nodes,
                     [("x", [64]), ("std", [1]), ("p", [127]), ("q", [127]), ("h", [1, 1, 8, 8]), ("w", [1, 1, 8, 8])],
                     [("y0", [64]), ("y1", [64]), ("y2", [127]), ("y3", [1, 1, 8, 8])], [("k", np.full(64, 3.0))])
    before = _ops(g)
    result = legalize_div(g)
    g, notes = result.graph, result.notes
    assert _ops(g) == before
    why = {n.node: n.reason for n in notes if not n.rewritten}
    assert "exNorm" in why["Div_ln"] and "broadcasts" in why["Div_ln"]
    assert "constant divisor" in why["Div_const"]
    assert "no H x W split" in why["Div_prime"]
    assert "already" in why["Div_hw"]


def test_div_constant_numerator_is_scaled_out_of_the_broadcast_form():
    """Div(1, x): the compiler would fold a uniform numerator back to a scalar (CPU); a 1/2 pattern keeps it full."""
    c = 128
    x = np.random.default_rng(5).uniform(-4, 4, c).astype(np.float32)
    x[0], x[1] = 1e-30, -3e30
    g = helper_graph([helper.make_node("Div", ["one", "x"], ["y"], name="Div_0")], [("x", [c])], [("y", [c])],
               [("one", np.array(1.0))])
    ref, got, notes, g2 = _run_both(g, legalize_div, {"x": x})
    assert "scaled" in notes[0].reason
    num = next(n for n in g2.nodes if n.op == "Div").inputs[0].values
    assert num.shape == (1, 1, 8, 16) and set(np.unique(num)) == {1.0, 2.0}
    assert not (num == num[:, :, :1, :]).all() and not (num == num[:, :, :, :1]).all()
    assert np.array_equal(got["y"], ref["y"])


# -- Min, Reciprocal ---------------------------------------------------------------------------------

def test_min_becomes_negated_max_exactly():
    c = 64
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((2, c)).astype(np.float32) * 10
    a[:2] = [-np.inf, np.inf]
    g = helper_graph([helper.make_node("Min", ["a", "b"], ["y"], name="Min_0"),
                helper.make_node("Min", ["a", "zero"], ["z"], name="Min_1"),
                helper.make_node("Min", ["a", "b", "b"], ["w"], name="Min_three")],
               [("a", [c]), ("b", [c])], [("y", [c]), ("z", [c]), ("w", [c])], [("zero", np.array(0.0))])
    ref, got, notes, g2 = _run_both(g, legalize_min, {"a": a, "b": b})
    why = _by_node(notes)
    assert why["Min_0"].rewritten and why["Min_1"].rewritten
    assert not why["Min_three"].rewritten and "3 inputs" in why["Min_three"].reason
    assert _ops(g2).count("Min") == 1 and _ops(g2).count("Max") == 2
    for k in ref:
        assert np.array_equal(got[k], ref[k]), k
    g3 = legalize(g2).graph   # the new Max nodes then go 4-D
    assert all(len(n.outputs[0].shape) == 4 for n in g3.nodes if n.op == "Max")


def test_reciprocal_through_legalize_is_exact():
    c = 96
    x = (np.random.default_rng(7).uniform(0.1, 8, c) * np.where(np.arange(c) % 3, 1, -1)).astype(np.float32)
    g = helper_graph([helper.make_node("Reciprocal", ["x"], ["y"], name="Reciprocal_0")], [("x", [c])], [("y", [c])])
    ref = run_model(export_checked(g), {"x": x})
    result = legalize_reciprocal(g)
    g1, n1 = result.graph, result.notes
    assert n1[0].rewritten and _ops(g1) == ["Div"]
    g2 = legalize(g1).graph
    assert [n.op for n in g2.nodes] == ["Reshape", "Div", "Mul", "Reshape"]
    assert np.array_equal(run_model(export_checked(g2), {"x": x})["y"], ref["y"])


# -- a whole RWKV-4 layer -----------------------------------------------------------------------------

def _layers():
    yield "passes_testlib", rwkv_mixing_model(64)
    export = pytest.importorskip("rwkv2rknn.families.rwkv4")
    checkpoints = pytest.importorskip("rwkv2rknn.families.rwkv4")
    yield "rwkv2rknn.families.rwkv4", export.build_mixing(checkpoints.random_weights(1, 64, 256).layer(0), 0,
                                                          dtype="float16")


def test_legalize_rwkv4_layer_matches_onnxruntime_over_40_tokens():
    for label, src in _layers():
        ref_m = export_checked(normalize(gs.import_onnx(src)).graph)
        result = legalize(normalize(gs.import_onnx(src)).graph)
        g, notes = result.graph, result.notes
        m = export_checked(g)
        ops = _ops(g)
        assert "Exp" not in ops and ops.count("Elu") == 4, label
        assert all(len(n.outputs[0].shape) == 4 for n in g.nodes if n.op == "Max"), label
        done = sorted(n.op for n in notes if n.rewritten)
        assert done == ["Div", "Exp", "Exp", "Exp", "Exp", "Max", "Max"], (label, done)
        kept = [n for n in notes if not n.rewritten]
        assert len(kept) == 2 and all("exNorm" in n.reason for n in kept), label
        names = [n.name for n in g.nodes]
        assert len(set(names)) == len(names), label
        c = 64
        rng = np.random.default_rng(0)
        state = np.zeros((5, c), np.float32)
        state[4] = -1e30
        worst = {}
        for _ in range(40):
            feeds = {"input": rng.standard_normal(c).astype(np.float32), "state_in": state}
            want, got = run_model(ref_m, feeds), run_model(m, feeds)
            for k in want:
                worst[k] = max(worst.get(k, 0.0), rel_err(got[k], want[k]))
            state = want["state_out"]
        assert all(v <= 2e-6 for v in worst.values()), (label, worst)


@pytest.mark.rknn
@pytest.mark.slow
def test_legalized_layer_compiles_without_cpu_ops_and_matches_in_the_simulator(tmp_path, monkeypatch):
    """rknn-toolkit2's own table: the normalized layer has CPU ops (Max, Exp, Div), the legalized one none,
    and the simulator (fp16) matches onnxruntime fp32 with realistic states."""
    pytest.importorskip("rknn.api", reason="rknn-toolkit2 is not installed")
    monkeypatch.chdir(tmp_path)  # the verbose compiler writes check*.onnx into the working directory
    from rwkv2rknn.families.rwkv4 import random_weights
    from rwkv2rknn.families.rwkv4 import build_mixing

    c = 128
    src = build_mixing(random_weights(1, c, 256).layer(0), 0, dtype="float16")
    plain = export_checked(normalize(gs.import_onnx(src)).graph)
    legal = export_checked(legalize(normalize(gs.import_onnx(src)).graph).graph)
    rng = np.random.default_rng(0)
    hand = rng.standard_normal((5, c)).astype(np.float32)          # rows 0, 1: LN outputs of the last token
    hand[2] = np.abs(hand[2]) * 3                                    # aa
    hand[3] = 1 + np.abs(hand[3]) * 3                                # bb >= 1 once a token has been seen
    hand[4] = rng.uniform(0, 4, c)                                   # pp: a max of past k's
    initial = np.zeros((5, c), np.float32)
    initial[4] = -1e30                                               # -inf in fp16 on the NPU
    samples = [{"input": rng.standard_normal(c).astype(np.float32), "state_in": s} for s in (hand, initial)]

    table, _ = rknn_build_and_run(plain, tmp_path / "plain.onnx")
    assert table is not None
    assert table.op_counts("CPU") == {"Max": 2, "Exp": 4, "Div": 1}, table.cpu_ops
    table, outs = rknn_build_and_run(legal, tmp_path / "legal.onnx", samples, ["input", "state_in"])
    assert table is not None and table.ops > 50
    assert table.cpu_ops == [], table.cpu_ops
    for feed, got in zip(samples, outs):
        want = run_model(legal, feed)
        ref = run_model(plain, feed)
        assert [o.name for o in legal.graph.output] == ["output", "state_out"]
        for name, g in zip(("output", "state_out"), got):
            g = np.asarray(g, np.float64).reshape(ref[name].shape)
            r = ref[name].astype(np.float64)
            cos = float((g * r).sum() / (np.linalg.norm(g) * np.linalg.norm(r)))
            assert np.isfinite(g).all() and cos >= 0.9999, (name, cos)
            assert rel_err(want[name], ref[name]) <= 2e-6
