"""partition + cut: running the segments in order on onnxruntime reproduces the normalized source graph."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from passes_testlib import groupings, mixing_feeds, rel_err, run_model, run_segments, rwkv_mixing_model

from passes.cut import CutSegment, TensorInfo, extract_segments
from passes.partition import Segment, propose_segments
from passes.pipeline import normalize
from passes.placement import place
from passes.stats import boundary_bytes, flops_share, matmul_flops

GROUPINGS = groupings()  # policy name -> its Grouping
POLICIES = list(GROUPINGS)

TOL = 1e-5


def _prove(g, feeds, policy, npu_all=False, min_npu_flops=1):
    """Cut g under policy, run the segments, compare with g itself; returns the cuts."""
    ref = run_model(gs.export_onnx(g), feeds)
    segs = propose_segments(g, place(g, npu_all=npu_all), GROUPINGS[policy], min_npu_flops=min_npu_flops)
    assert sum(len(s.nodes) for s in segs) == len(g.nodes)
    cuts = extract_segments(g, segs)
    table = run_segments(cuts, feeds)
    for name, want in ref.items():
        assert name in table, name
        assert table[name].dtype == want.dtype and table[name].shape == want.shape
        assert rel_err(table[name], want) <= TOL, (policy, name, rel_err(table[name], want))
    src_inputs = {t.name for t in g.inputs}
    for c in cuts:
        assert isinstance(c, CutSegment) and all(isinstance(i, TensorInfo) for i in c.inputs + c.outputs)
        assert c.model.ir_version == (g.ir_version or c.model.ir_version)
        assert {o.domain: o.version for o in c.model.opset_import}[""] == g.opset
        for i in c.inputs:
            assert isinstance(i.dtype, str) and all(isinstance(d, int) for d in i.shape)
    # graph inputs keep their names at the boundary; graph outputs come out of some segment by name
    produced = {o.name for c in cuts for o in c.outputs}
    for t in g.outputs:
        assert t.name in produced or t.name in src_inputs
    return cuts


@pytest.fixture(scope="module")
def mixing():
    return normalize(gs.import_onnx(rwkv_mixing_model(64))).graph


@pytest.mark.parametrize("policy", POLICIES)
def test_mixing_graph_every_policy(mixing, policy):
    cuts = _prove(mixing, mixing_feeds(64), policy)
    npu = [c for c in cuts if c.backend == "npu"]
    cpu = [c for c in cuts if c.backend == "cpu"]
    if policy == "fused":
        assert [c.backend for c in cuts] == ["cpu", "npu", "cpu", "npu", "cpu"]
        assert flops_share(cuts) == 1.0
    elif policy == "matmul":
        assert len(npu) == 7 and all(c.nodes == 1 for c in npu)
    elif policy == "cpu":
        assert len(cuts) == 1 and cuts[0].backend == "cpu"
    elif policy == "deep":  # under the fp32 precision rule: fused's segments, the NPU first, no fold-back
        assert cuts[0].backend == "npu" and flops_share(cuts) == 1.0
    else:
        assert len(cuts) == 1 and cuts[0].backend == "npu"
    assert sum(c.matmul_flops for c in cuts) == sum(matmul_flops(n) for n in mixing.nodes)
    assert len(cpu) <= (8 if policy == "matmul" else 4 if policy == "deep" else 3)
    assert boundary_bytes(cuts)["total"] > 0 or policy == "cpu"


def test_mixing_graph_npu_all(mixing):
    cuts = _prove(mixing, mixing_feeds(64), "fused", npu_all=True)
    assert [c.backend for c in cuts].count("npu") == 1


def test_fp16_source_segments_match_normalized():
    g = normalize(gs.import_onnx(rwkv_mixing_model(32, fp16=True, weights_as="init"))).graph
    for policy in POLICIES:
        _prove(g, mixing_feeds(32), policy)


def test_small_npu_runs_go_back_to_cpu(mixing):
    segs = propose_segments(mixing, place(mixing), GROUPINGS["fused"], min_npu_flops=10 ** 12)
    assert [s.backend for s in segs] == ["cpu"]
    assert len(segs[0].nodes) == len(mixing.nodes)
    assert all(isinstance(s, Segment) for s in segs)


def _handmade():
    """Pitfalls: input passed straight out, one value as two outputs, an output also used later."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")
    vi = lambda n, s=(2, 4): helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s))
    nodes = [
        helper.make_node("Identity", ["x"], ["x_out"]),          # graph input straight to an output
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Exp", ["h"], ["e"]),
        helper.make_node("Identity", ["e"], ["e_out1"]),          # one value as two outputs
        helper.make_node("Identity", ["e"], ["e_out2"]),
        helper.make_node("MatMul", ["e", "w"], ["h2"]),
        helper.make_node("Tanh", ["h2"], ["t"]),                  # t is an output AND used later
        helper.make_node("MatMul", ["t", "w"], ["h3"]),
        helper.make_node("Add", ["h3", "t"], ["y"]),
    ]
    m = helper.make_model(helper.make_graph(nodes, "hand", [vi("x")],
                                            [vi("x_out"), vi("e_out1"), vi("e_out2"), vi("t"), vi("y")], [w]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("policy", POLICIES)
def test_handmade_pitfalls(policy):
    src = _handmade()
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)}
    g = normalize(gs.import_onnx(src)).graph
    ref = run_model(src, feeds)
    assert all(rel_err(run_model(gs.export_onnx(g), feeds)[k], ref[k]) <= TOL for k in ref)
    cuts = _prove(g, feeds, policy)
    if policy == "fused":
        assert [c.backend for c in cuts].count("npu") == 2


def test_missing_boundary_shape_fails_loudly():
    x = gs.Variable("x", np.float32, [2, 4])
    h = gs.Variable("h", None, None)
    y = gs.Variable("y", np.float32, [2, 4])
    w = gs.Constant("w", np.ones((4, 4), np.float32))
    n1 = gs.Node("MatMul", name="mm", inputs=[x, w], outputs=[h])
    n2 = gs.Node("Exp", name="exp", inputs=[h], outputs=[y])
    g = gs.Graph(nodes=[n1, n2], inputs=[x], outputs=[y], opset=17)
    with pytest.raises(ValueError, match="'h'"):
        extract_segments(g, [Segment("npu", [n1], ""), Segment("cpu", [n2], "")])


def test_segments_out_of_order_rejected(mixing):
    segs = propose_segments(mixing, place(mixing), GROUPINGS["matmul"])
    with pytest.raises(ValueError):
        extract_segments(mixing, segs[::-1])


# ---- random DAGs -------------------------------------------------------------------------------
C = 4
UNARY = ["Tanh", "Sigmoid", "Relu", "Neg", "ExpTanh", "LogSig"]
BINARY = ["Add", "Sub", "MulTanh", "Max", "DivSafe"]
KINDS = UNARY + BINARY + ["MatMulW", "MatMulW1D", "MatMulXY", "Center", "ReduceSum", "GatherIdx",
                          "ReshapeRoundTrip"]


@st.composite
def random_dags(draw):
    fp16 = draw(st.booleans())
    weights_as = draw(st.sampled_from(["constant", "init"]))
    n_ops = draw(st.integers(1, 18))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    ft = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    npf = np.float16 if fp16 else np.float32
    nodes, inits = [], []
    pool = ["x", "y"]
    k = [0]

    def fresh(p="t"):
        k[0] += 1
        return f"{p}{k[0]}"

    def const(arr, float_=True):
        name = fresh("c")
        arr = np.asarray(arr).astype(npf) if float_ else np.asarray(arr)
        t = numpy_helper.from_array(arr, name)
        if weights_as == "constant" and float_:
            nodes.append(helper.make_node("Constant", [], [name], value=t))
        else:
            inits.append(t)
        return name

    def op(o, ins, **attrs):
        out = fresh()
        nodes.append(helper.make_node(o, ins, [out], **attrs))
        return out

    def pick():
        return pool[draw(st.integers(0, len(pool) - 1))]

    for _ in range(n_ops):
        kind = draw(st.sampled_from(KINDS))
        a = pick()
        if kind in ("Tanh", "Sigmoid", "Relu", "Neg"):
            out = op(kind, [a])
        elif kind == "ExpTanh":
            out = op("Exp", [op("Tanh", [a])])
        elif kind == "LogSig":
            out = op("Log", [op("Add", [op("Sigmoid", [a]), const(1.0)])])
        elif kind == "MulTanh":
            out = op("Mul", [a, op("Tanh", [pick()])])
        elif kind == "DivSafe":
            out = op("Div", [a, op("Add", [op("Tanh", [pick()]), const(1.5)])])
        elif kind in BINARY:
            out = op(kind, [a, pick()])
        elif kind == "MatMulW":
            out = op("MatMul", [a, const(rng.standard_normal((C, C)) / C)])
        elif kind == "MatMulW1D":  # llama.onnx style: weight first, 1-D row, rebuilt with Reshape/Concat
            r0 = op("Gather", [a, const(np.array(0, np.int64), False)], axis=0)
            r1 = op("Gather", [pick(), const(np.array(1, np.int64), False)], axis=0)
            m = op("MatMul", [const(rng.standard_normal((C, C)) / C), r0])
            shp = const(np.array([1, -1], np.int64), False)
            out = op("Concat", [op("Reshape", [m, shp]), op("Reshape", [r1, shp])], axis=0)
        elif kind == "MatMulXY":  # non-constant operands
            g2 = op("MatMul", [op("Tanh", [a]), op("Transpose", [op("Tanh", [pick()])], perm=[1, 0])])
            out = op("Mul", [op("MatMul", [g2, op("Tanh", [a])]), const(1.0 / C)])
        elif kind == "Center":
            out = op("Sub", [a, op("ReduceMean", [a], axes=[-1], keepdims=1)])
        elif kind == "ReduceSum":
            out = op("Add", [a, op("ReduceSum", [a, const(np.array([0], np.int64), False)], keepdims=1)])
        elif kind == "GatherIdx":  # integer graph input as index
            out = op("Gather", [a, "idx"], axis=0)
        else:
            s1 = const(np.array([2 * C], np.int64), False)
            s2 = const(np.array([2, C], np.int64), False)
            out = op("Reshape", [op("Reshape", [a, s1]), s2])
        pool.append(out)
    outs = [pool[-1]]
    for t in draw(st.lists(st.sampled_from(pool[2:]), max_size=3, unique=True)):
        if t not in outs:
            outs.append(t)  # outputs also used inside
    if draw(st.booleans()):
        nodes.append(helper.make_node("Identity", ["x"], ["x_passthrough"]))
        outs.append("x_passthrough")
    if draw(st.booleans()):
        nodes.append(helper.make_node("Identity", [pool[-1]], ["dup_a"]))
        nodes.append(helper.make_node("Identity", [pool[-1]], ["dup_b"]))
        outs += ["dup_a", "dup_b"]
    vi = lambda n: helper.make_tensor_value_info(n, ft, [2, C])
    graph = helper.make_graph(nodes, "rand",
                              [vi("x"), vi("y"), helper.make_tensor_value_info("idx", TensorProto.INT64, [2])],
                              [vi(o) for o in outs], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    policy = draw(st.sampled_from(POLICIES))
    npu_all = draw(st.booleans())
    min_flops = draw(st.sampled_from([1, 200, 10 ** 9]))
    return m, fp16, policy, npu_all, min_flops


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_dags(), st.integers(0, 1000))
def test_random_dags(case, seed):
    src, fp16, policy, npu_all, min_flops = case
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((2, C)).astype(np.float32),
             "y": rng.standard_normal((2, C)).astype(np.float32),
             "idx": rng.integers(0, 2, size=2).astype(np.int64)}
    g = normalize(gs.import_onnx(src)).graph
    if not fp16:  # an fp32 source must be reproduced by its normalized form
        ref, got = run_model(src, feeds), run_model(gs.export_onnx(g), feeds)
        for k in ref:
            assert rel_err(got[k], ref[k]) <= TOL, k
    _prove(g, feeds, policy, npu_all=npu_all, min_npu_flops=min_flops)
