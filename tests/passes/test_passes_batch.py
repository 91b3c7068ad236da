"""passes.batch: the M-token graph equals M runs of the single-token graph (RWKV-4 layers and small synthetic graphs)."""
import functools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from passes_testlib import rel_err, session

from passes.batch import batch_tokens, plan_batch
from passes.graphutil import static_shape
from passes.pipeline import normalize

export = pytest.importorskip("rwkv2rknn.families.rwkv4")
checkpoints = pytest.importorskip("rwkv2rknn.families.rwkv4")

RWKV4_STATE = [("state_in", "state_out")]
TOL = 1e-5


@functools.cache
def rwkv4_layer(c: int, dtype: str) -> gs.Graph:
    """A normalized RWKV-4 mixing graph of the project's exporter (random weights, layer 0)."""
    model = export.build_mixing(checkpoints.random_weights(1, c, 256).layer(0), 0, dtype=dtype)
    return normalize(gs.import_onnx(model)).graph


@functools.cache
def single_session(c: int, dtype: str):
    return session(gs.export_onnx(rwkv4_layer(c, dtype)))


@functools.cache
def batched_session(c: int, dtype: str, m: int):
    model = gs.export_onnx(batch_tokens(rwkv4_layer(c, dtype), m, RWKV4_STATE).graph)
    onnx.checker.check_model(model, full_check=True)
    return session(model)


def run_tokens(sess, feeds_per_token, state, state_in="state_in", state_out="state_out"):
    """The single-token graph run token by token: (outputs stacked per name, final state)."""
    outs = {}
    names = [o.name for o in sess.get_outputs()]
    for feeds in feeds_per_token:
        res = dict(zip(names, sess.run(names, {**feeds, state_in: state})))
        state = res.pop(state_out)
        for k, v in res.items():
            outs.setdefault(k, []).append(v)
    return {k: np.stack(v) for k, v in outs.items()}, state


def initial_state(c):
    s = np.zeros((5, c), np.float32)
    s[4] = -1e30
    return s


def synthetic_state(c, seed):
    """Shift rows ~ LayerNorm outputs, aa/bb positive, pp the max of recent k-like values."""
    rng = np.random.default_rng(seed)
    s = np.empty((5, c), np.float32)
    s[0:2] = rng.standard_normal((2, c))
    recent_k = rng.standard_normal((4, c)) * rng.uniform(0.5, 3)
    s[4] = recent_k.max(axis=0)
    s[3] = np.abs(rng.standard_normal(c)) * 3 + 0.1
    s[2] = rng.standard_normal(c) * s[3]
    return s


def warm_state(c, dtype, seed, tokens=3):
    """The state after a few random tokens from the initial state: the realistic case."""
    rng = np.random.default_rng(seed)
    _, s = run_tokens(single_session(c, dtype), [{"input": rng.standard_normal(c).astype(np.float32)}
                                                for _ in range(tokens)], initial_state(c))
    return s


def check_rwkv4(c, dtype, m, state, x):
    ref, ref_state = run_tokens(single_session(c, dtype), [{"input": x[t]} for t in range(m)], state)
    out, new_state = batched_session(c, dtype, m).run(["output", "state_out"], {"input": x, "state_in": state})
    assert out.shape == (m, c) and new_state.shape == (5, c)
    errs = {"output": max(rel_err(out[t], ref["output"][t]) for t in range(m))}
    for r in range(5):
        errs[f"state[{r}]"] = rel_err(new_state[r], ref_state[r])
    assert max(errs.values()) <= TOL, errs
    return errs


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("c", [64, 128])
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("start", ["initial", "synthetic", "warm"])
def test_rwkv4_batched_equals_token_by_token(c, dtype, m, start):
    rng = np.random.default_rng(c + m)
    state = {"initial": initial_state(c), "synthetic": synthetic_state(c, m),
             "warm": warm_state(c, dtype, m)}[start]
    x = rng.standard_normal((m, c)).astype(np.float32)
    check_rwkv4(c, dtype, m, state, x)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.sampled_from([1, 3, 4, 7]), seed=st.integers(0, 2**16), scale=st.floats(0.1, 10.0),
       pp=st.floats(-30.0, 30.0), initial=st.booleans())
def test_rwkv4_batched_property(m, seed, scale, pp, initial):
    c = 64
    rng = np.random.default_rng(seed)
    if initial:
        state = initial_state(c)
    else:
        state = synthetic_state(c, seed)
        state[0:2] *= scale
        state[2:4] *= scale
        state[4] += pp
    x = (rng.standard_normal((m, c)) * scale).astype(np.float32)
    check_rwkv4(c, "float32", m, state, x)


@pytest.mark.parametrize("m", [1, 16])
def test_rwkv4_batched_graph_is_static_checked_and_npu_shaped(m):
    g = rwkv4_layer(64, "float16")
    before = gs.export_onnx(g).SerializeToString()
    result = batch_tokens(g, m, RWKV4_STATE)
    bg, plan = result.graph, result.notes[0]
    assert gs.export_onnx(g).SerializeToString() == before  # the source graph is untouched
    model = gs.export_onnx(bg)
    onnx.checker.check_model(model, full_check=True)
    for t in bg.tensors().values():
        if isinstance(t, gs.Variable):
            assert t.dtype is not None and static_shape(t) is not None, t
    assert [(t.name, t.shape) for t in bg.inputs] == [("input", [m, 64]), ("state_in", [5, 64])]
    assert [(t.name, t.shape) for t in bg.outputs] == [("output", [m, 64]), ("state_out", [5, 64])]
    mms = [n for n in bg.nodes if n.op == "MatMul"]
    assert len(mms) == 7
    for n in mms:  # every projection is one [M, in] @ W[in, out]
        assert static_shape(n.inputs[0])[0] == m and len(static_shape(n.inputs[0])) == 2
        assert isinstance(n.inputs[1], gs.Constant) and n.inputs[1].values.ndim == 2
    kinds = {u.label: u.kind for u in plan.units}
    assert kinds == {"state_in[0]": "shift", "state_in[1]": "shift", "state_in[2]": "recurrent",
                     "state_in[3]": "recurrent", "state_in[4]": "recurrent"}
    # only the state updates are sequential: pp' = max(pp + w, k); aa' = f1*aa + f2*v; bb' = f1*bb + f2
    assert sorted(n.op for s in plan.scans for n in s.nodes) == ["Add", "Add", "Add", "Max", "Mul", "Mul"]
    assert "scan" in plan.summary()


def test_rwkv4_initializer_weights_and_layer_index():
    """Weights as initializers and a later layer give the same structure."""
    w = checkpoints.random_weights(3, 64, 256, seed=5)
    model = export.build_mixing(w.layer(2), 2, dtype="float32", weights_as="initializers")
    g = normalize(gs.import_onnx(model)).graph
    bg = batch_tokens(g, 4, RWKV4_STATE).graph
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    s = synthetic_state(64, 3)
    ref, ref_state = run_tokens(session(gs.export_onnx(g)), [{"input": x[t]} for t in range(4)], s)
    out, new_state = session(gs.export_onnx(bg)).run(["output", "state_out"], {"input": x, "state_in": s})
    assert rel_err(out, ref["output"]) <= TOL and rel_err(new_state, ref_state) <= TOL


def test_rwkv4_batched_graph_stays_small_on_a_1024_wide_layer():
    """The 430M model batches 24 such layers at split time: the graph grows by a few nodes per token only,
    and the seven projections stay seven [M, in] @ W MatMuls (speed is measured in benchmarks/, not here)."""
    g = rwkv4_layer(1024, "float16")
    sizes = {m: len(batch_tokens(g, m, RWKV4_STATE).graph.nodes) for m in (4, 16)}
    per_token = (sizes[16] - sizes[4]) / 12
    assert per_token <= 12, sizes
    bg = batch_tokens(g, 16, RWKV4_STATE).graph
    mm = [n for n in bg.nodes if n.op == "MatMul"]
    assert len(mm) == 7 and all(n.outputs[0].shape[0] == 16 for n in mm)


# ---- small synthetic graphs ---------------------------------------------------------------------------------

def _model(nodes, inputs, outputs, inits=(), opset=16):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _f(name, arr):
    return onnx.numpy_helper.from_array(np.asarray(arr, np.float32), name)


def _i(name, arr):
    return onnx.numpy_helper.from_array(np.asarray(arr, np.int64), name)


def _check_against_loop(model, m, state_pairs, token_inputs=None, seed=0):
    g = normalize(gs.import_onnx(model)).graph
    bg = batch_tokens(g, m, state_pairs, token_inputs).graph
    bm = gs.export_onnx(bg)
    onnx.checker.check_model(bm, full_check=True)
    rng = np.random.default_rng(seed)
    per_token = token_inputs if token_inputs is not None else \
        [t.name for t in g.inputs if t.name not in {a for a, _ in state_pairs}]
    arrays = {t.name: rng.standard_normal(([m] if t.name in per_token else []) + static_shape(t)).astype(np.float32)
              for t in g.inputs}
    states = {a: arrays[a] for a, _ in state_pairs}
    shared = {k: v for k, v in arrays.items() if k not in per_token and k not in states}
    sess1 = session(gs.export_onnx(g))
    names = [o.name for o in sess1.get_outputs()]
    outs = {}
    for t in range(m):
        res = dict(zip(names, sess1.run(names, {**shared, **states, **{k: arrays[k][t] for k in per_token}})))
        for a, b in state_pairs:
            states[a] = res.pop(b)
        for k, v in res.items():
            outs.setdefault(k, []).append(v)
    bres = dict(zip([o.name for o in bm.graph.output], session(bm).run(None, arrays)))
    for k, v in outs.items():
        assert bres[k].shape == (m,) + v[0].shape, k
        assert rel_err(bres[k], np.stack(v)) <= TOL, k
    for a, b in state_pairs:
        assert bres[b].shape == states[a].shape
        assert rel_err(bres[b], states[a]) <= TOL, b
    return bg


@pytest.mark.parametrize("m", [1, 3])
def test_whole_tensor_recurrence_with_shared_input(m):
    """s' = s * decay + x * bias (state not split into rows), `bias` the same for every token."""
    c = 8
    nodes = [helper.make_node("Mul", ["s", "decay"], ["sd"]), helper.make_node("Mul", ["x", "bias"], ["xb"]),
             helper.make_node("Add", ["sd", "xb"], ["s_new"]), helper.make_node("Tanh", ["s_new"], ["y"]),
             helper.make_node("ReduceSum", ["s", "axes"], ["ssum"], keepdims=1),
             helper.make_node("Mul", ["y", "ssum"], ["out"])]
    model = _model(nodes, [_vi("x", [c]), _vi("bias", [c]), _vi("s", [2, c])], [_vi("out", [2, c]), _vi("s_new", [2, c])],
                   [_f("decay", np.linspace(0.5, 0.9, c)), _i("axes", [-1])])
    bg = _check_against_loop(model, m, [("s", "s_new")], token_inputs=["x"])
    assert [t.shape for t in bg.inputs] == [[m, c], [c], [2, c]]


@pytest.mark.parametrize("m", [1, 4])
def test_row_swap_and_shift_rows(m):
    """State rows that only move (swap: a recurrence with no ops) and a plain shift row; a Gather with [i] index."""
    c = 4
    nodes = [helper.make_node("Gather", ["s", "i0"], ["r0"], axis=0),
             helper.make_node("Gather", ["s", "i1"], ["r1"], axis=0),
             helper.make_node("Gather", ["s", "i2v"], ["r2"], axis=0),   # [1, C] read
             helper.make_node("Add", ["r0", "x"], ["a"]), helper.make_node("Mul", ["a", "r2"], ["o"]),
             helper.make_node("Reshape", ["r1", "shape"], ["w0"]), helper.make_node("Reshape", ["r0", "shape"], ["w1"]),
             helper.make_node("Reshape", ["x", "shape"], ["w2"]),
             helper.make_node("Concat", ["w0", "w1", "w2"], ["s_new"], axis=0)]
    model = _model(nodes, [_vi("x", [c]), _vi("s", [3, c])], [_vi("o", [1, c]), _vi("s_new", [3, c])],
                   [_i("i0", 0), _i("i1", 1), _i("i2v", [2]), _i("shape", [1, -1])])
    plan = batch_tokens(normalize(gs.import_onnx(model)).graph, m, [("s", "s_new")]).notes[0]
    assert [u.kind for u in plan.units] == ["recurrent", "recurrent", "shift"]
    assert len(plan.scans) == 1 and plan.scans[0].nodes == []
    _check_against_loop(model, m, [("s", "s_new")])


@pytest.mark.parametrize("m", [2, 5])
def test_matrix_state_recurrence_with_batched_reads(m):
    """S' = S * w + v k^T (a [H, N, N] matrix state, RWKV-5/7 style); y = S' @ r per token, token-parallel."""
    h, n = 2, 3
    nodes = [helper.make_node("Reshape", ["k", "hn1"], ["k3"]), helper.make_node("Reshape", ["v", "hn1"], ["v3"]),
             helper.make_node("Transpose", ["k3"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["v3", "kt"], ["vk"]),
             helper.make_node("Reshape", ["w", "h1n"], ["w3"]),
             helper.make_node("Mul", ["S", "w3"], ["Sw"]), helper.make_node("Add", ["Sw", "vk"], ["S_new"]),
             helper.make_node("Reshape", ["r", "hn1"], ["r3"]), helper.make_node("MatMul", ["S_new", "r3"], ["y3"]),
             helper.make_node("Reshape", ["y3", "flat"], ["y"])]
    c = h * n
    model = _model(nodes, [_vi("k", [c]), _vi("v", [c]), _vi("w", [c]), _vi("r", [c]), _vi("S", [h, n, n])],
                   [_vi("y", [c]), _vi("S_new", [h, n, n])],
                   [_i("hn1", [h, n, 1]), _i("h1n", [h, 1, n]), _i("flat", [-1])])
    _check_against_loop(model, m, [("S", "S_new")])


def test_negative_recurrence_through_if_names_the_node():
    """A state update hidden in an If subgraph cannot be recognised as per-token ops: ValueError naming the node."""
    c = 4
    then_g = helper.make_graph([helper.make_node("Add", ["s", "x"], ["t_out"])], "then", [], [_vi("t_out", [c])])
    else_g = helper.make_graph([helper.make_node("Sub", ["s", "x"], ["e_out"])], "else", [], [_vi("e_out", [c])])
    nodes = [helper.make_node("If", ["cond"], ["s_new"], name="the_if", then_branch=then_g, else_branch=else_g),
             helper.make_node("Mul", ["s_new", "x"], ["y"])]
    model = _model(nodes, [_vi("x", [c]), _vi("s", [c])], [_vi("y", [c]), _vi("s_new", [c])],
                   [onnx.numpy_helper.from_array(np.array(True), "cond")])
    g = gs.import_onnx(model)
    with pytest.raises(ValueError, match="the_if.*recurrence"):
        plan_batch(g, [("s", "s_new")])


def test_negative_random_op_in_recurrence_names_the_node():
    c = 4
    nodes = [helper.make_node("RandomNormalLike", ["s"], ["noise"], name="noise_op"),
             helper.make_node("Add", ["s", "noise"], ["s1"]), helper.make_node("Add", ["s1", "x"], ["s_new"])]
    model = _model(nodes, [_vi("x", [c]), _vi("s", [c])], [_vi("s_new", [c])])
    with pytest.raises(ValueError, match="noise_op"):
        batch_tokens(gs.import_onnx(model), 2, [("s", "s_new")])


def test_negative_state_changes_shape_names_the_node():
    c = 4
    nodes = [helper.make_node("Concat", ["s", "x"], ["s_new"], axis=0, name="grow")]
    model = _model(nodes, [_vi("x", [c]), _vi("s", [c])], [_vi("s_new", [2 * c])])
    with pytest.raises(ValueError, match="'grow'"):
        batch_tokens(gs.import_onnx(model), 2, [("s", "s_new")])


def test_negative_token_parallel_op_without_rule_names_the_node():
    c = 6
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["x3"]),
             helper.make_node("Conv", ["x3", "k"], ["y3"], name="the_conv"),
             helper.make_node("Add", ["s", "x"], ["s_new"])]
    model = _model(nodes, [_vi("x", [c]), _vi("s", [c])], [_vi("y3", [1, 1, c - 2]), _vi("s_new", [c])],
                   [_i("shape", [1, 1, c]), _f("k", np.ones((1, 1, 3)))])
    with pytest.raises(ValueError, match="the_conv.*Conv"):
        batch_tokens(normalize(gs.import_onnx(model)).graph, 2, [("s", "s_new")])


def test_negative_bad_arguments():
    g = rwkv4_layer(64, "float32")
    with pytest.raises(ValueError, match="nope"):
        batch_tokens(g, 2, [("nope", "state_out")])
    with pytest.raises(ValueError, match="m must be"):
        batch_tokens(g, 0, RWKV4_STATE)
    with pytest.raises(ValueError, match="token inputs"):
        batch_tokens(g, 2, RWKV4_STATE, token_inputs=["state_in"])


def test_raw_unnormalized_export_also_batches():
    """Weight-first 1-D MatMuls and Constant nodes (the exporter's raw fp32 output) batch too."""
    model = export.build_mixing(checkpoints.random_weights(1, 64, 256).layer(0), 0, dtype="float32")
    bg = batch_tokens(gs.import_onnx(model), 5, RWKV4_STATE).graph
    bm = gs.export_onnx(bg)
    onnx.checker.check_model(bm, full_check=True)
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    s = synthetic_state(64, 1)
    ref, ref_state = run_tokens(session(model), [{"input": x[t]} for t in range(5)], s)
    out, new_state = session(bm).run(["output", "state_out"], {"input": x, "state_in": s})
    assert rel_err(out, ref["output"]) <= TOL and rel_err(new_state, ref_state) <= TOL


def test_batched_graph_goes_through_placement_partition_and_cut():
    from passes.cut import extract_segments
    from passes.partition import propose_segments
    from passes.placement import place
    from passes_testlib import run_model, run_segments

    m = 8
    bg = batch_tokens(rwkv4_layer(64, "float16"), m, RWKV4_STATE).graph
    feeds = {"input": np.random.default_rng(0).standard_normal((m, 64)).astype(np.float32),
             "state_in": synthetic_state(64, 0)}
    ref = run_model(gs.export_onnx(bg), feeds)
    cuts = extract_segments(bg, propose_segments(bg, place(bg), min_npu_flops=1))
    table = run_segments(cuts, feeds)
    for k in ref:
        assert rel_err(table[k], ref[k]) <= TOL, k
    assert "npu" in [c.backend for c in cuts]


# ---- RWKV-7 (rwkv2rknn.families.rwkv7, when present) ---------------------------------------------------------

RWKV7_STATE = [("state_in", "state_out"), ("wkv_in", "wkv_out")]


@functools.cache
def rwkv7_layer(c: int, index: int, dtype: str) -> gs.Graph:
    rwkv7 = pytest.importorskip("rwkv2rknn.families.rwkv7")
    w = rwkv7.random_weights7(2, c, 256)
    return normalize(gs.import_onnx(rwkv7.build_mixing7(w.layer(index), index, dtype=dtype))).graph


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("zero_state", [True, False])
def test_rwkv7_batched_equals_token_by_token(index, dtype, m, zero_state):
    c = 128
    g = rwkv7_layer(c, index, dtype)
    result = batch_tokens(g, m, RWKV7_STATE)
    bg, plan = result.graph, result.notes[0]
    assert [u.kind for u in plan.units] == ["shift", "shift", "recurrent"]
    bm = gs.export_onnx(bg)
    onnx.checker.check_model(bm, full_check=True)
    rng = np.random.default_rng(m + index)
    h = c // 64
    shift = np.zeros((2, c), np.float32) if zero_state else rng.standard_normal((2, c)).astype(np.float32)
    wkv = np.zeros((h, 64, 64), np.float32) if zero_state else (rng.standard_normal((h, 64, 64)) * 0.3).astype(np.float32)
    tokens = {"input": rng.standard_normal((m, c)).astype(np.float32)}
    if index:
        tokens["v_first"] = rng.standard_normal((m, c)).astype(np.float32)
    s1 = session(gs.export_onnx(g))
    names = [o.name for o in s1.get_outputs()]
    st, S, outs = shift, wkv, {}
    for t in range(m):
        res = dict(zip(names, s1.run(names, {**{k: v[t] for k, v in tokens.items()}, "state_in": st, "wkv_in": S})))
        st, S = res.pop("state_out"), res.pop("wkv_out")
        for k, v in res.items():
            outs.setdefault(k, []).append(v)
    sb = session(bm)
    got = dict(zip([o.name for o in sb.get_outputs()], sb.run(None, {**tokens, "state_in": shift, "wkv_in": wkv})))
    for k, v in outs.items():
        assert got[k].shape == (m, c) and rel_err(got[k], np.stack(v)) <= TOL, k
    assert rel_err(got["state_out"], st) <= TOL and rel_err(got["wkv_out"], S) <= TOL


def _node(op, ins, outs, **attrs):
    return helper.make_node(op, ins, outs if isinstance(outs, list) else [outs], **attrs)


@pytest.mark.parametrize("m", [1, 3])
def test_token_axis_rules_on_many_ops(m):
    """Token-parallel ops of many kinds (axes, shapes, both MatMul orders, Gemm, Einsum, int outputs) and a shift."""
    c = 6
    rng = np.random.default_rng(0)
    nodes = [
        _node("Reshape", ["x", "s23"], "x2"), _node("Transpose", ["x2"], "t", perm=[1, 0]),
        _node("Softmax", ["t"], "sm", axis=0), _node("Unsqueeze", ["sm", "ax0"], "uq"),
        _node("Squeeze", ["uq", "ax0"], "sq"), _node("Slice", ["sq", "one", "three", "axm2"], "sl"),
        _node("Split", ["sl", "ones2"], ["sp1", "sp2"], axis=1),
        _node("Slice", ["b", "zero", "two"], "b2"), _node("Reshape", ["b2", "s21"], "bcol"),
        _node("Concat", ["sp2", "sp1", "bcol"], "cat", axis=-1), _node("Gather", ["cat", "i10"], "gt", axis=1),
        _node("Einsum", ["gt", "We"], "e", equation="ij,jk->ik"),
        _node("Reshape", ["x", "s16"], "xrow"), _node("Gemm", ["xrow", "Wg", "bg"], "gm"),
        _node("Flatten", ["e"], "fl", axis=0), _node("Add", ["fl", "gm"], "add"),
        _node("ReduceSum", ["add", "axm1"], "rs", keepdims=0), _node("Expand", ["rs", "s3"], "ex"),
        _node("Greater", ["x", "s"], "gtr"), _node("Where", ["gtr", "x", "s"], "wh"),
        _node("CumSum", ["wh", "zero_s"], "cs"), _node("TopK", ["cs", "k2"], ["tkv", "tki"]),
        _node("Pad", ["tkv", "pads"], "pad"), _node("Tile", ["pad", "two"], "tl"),
        _node("MatMul", ["x", "Wm"], "mm"), _node("MatMul", ["Wm2", "x"], "mm2"),
        _node("LayerNormalization", ["x2", "lns", "lnb"], "ln", axis=-1),
        _node("ArgMax", ["x2"], "am", axis=1, keepdims=0), _node("Shape", ["x2"], "shp"),
        _node("Cast", ["shp"], "shpf", to=TensorProto.FLOAT), _node("Gather", ["shpf", "last"], "shpf_last"),
        _node("Mul", ["ln", "shpf_last"], "ln2"),
        _node("Tanh", ["mm"], "s_new"),
    ]
    inits = [_i("s23", [2, 3]), _i("ax0", [0]), _i("one", [1]), _i("three", [3]), _i("axm2", [-2]), _i("ones2", [1, 1]),
             _i("zero", [0]), _i("two", [2]), _i("s21", [2, 1]), _i("i10", [1, 0]), _i("s16", [1, 6]),
             _i("axm1", [-1]), _i("s3", [3]), _i("zero_s", 0), _i("k2", [2]), _i("pads", [1, 1]), _i("last", 1),
             _f("We", rng.standard_normal((2, 2))), _f("Wg", rng.standard_normal((6, 4))), _f("bg", rng.standard_normal(4)),
             _f("Wm", rng.standard_normal((6, 6))), _f("Wm2", rng.standard_normal((3, 6))),
             _f("lns", rng.standard_normal(3)), _f("lnb", rng.standard_normal(3))]
    outs = [_vi("tl", [8]), _vi("ex", [3]), _vi("mm2", [3]), _vi("ln2", [2, 3]), _vi("e", [2, 2]),
            helper.make_tensor_value_info("tki", TensorProto.INT64, [2]),
            helper.make_tensor_value_info("am", TensorProto.INT64, [2]), _vi("s_new", [c])]
    model = _model(nodes, [_vi("x", [c]), _vi("b", [c]), _vi("s", [c])], outs, inits, opset=17)
    _check_against_loop(model, m, [("s", "s_new")], token_inputs=["x"])


@pytest.mark.parametrize("m", [1, 4])
def test_token_axis_rules_opset11_attributes(m):
    """Opset-11 forms: axes as attributes (ReduceMean, Squeeze, Unsqueeze), Split sizes as an attribute."""
    c = 4
    nodes = [_node("Unsqueeze", ["x"], "u", axes=[0, -1]), _node("ReduceMean", ["u"], "rm", axes=[-2], keepdims=1),
             _node("Squeeze", ["rm"], "sq", axes=[0, 2]), _node("Squeeze", ["u"], "sq_all"),
             _node("Split", ["sq_all"], ["p", "q"], axis=0, split=[1, 3]), _node("ReduceMax", ["q"], "qm", keepdims=0),
             _node("Add", ["s", "qm"], "s_add"), _node("Mul", ["s_add", "decay"], "s_new"),
             _node("Mul", ["p", "s"], "y")]
    model = _model(nodes, [_vi("x", [c]), _vi("s", [c])],
                   [_vi("sq", [1]), _vi("y", [c]), _vi("s_new", [c])], [_f("decay", [0.9] * c)], opset=11)
    _check_against_loop(model, m, [("s", "s_new")])
