"""Scale: a 10,000-node graph goes through every pass without recursion; the 430M-shape segment targets."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper
from passes_testlib import groupings, mixing_feeds, rel_err, run_model, run_segments, rwkv_mixing_model

from passes.cut import extract_segments
from passes.partition import propose_segments
from passes.pipeline import normalize
from passes.placement import place
from passes.stats import boundary_bytes, flops_share

GROUPINGS = groupings()  # policy name -> its Grouping
POLICIES = list(GROUPINGS)


def _deep_chain(n=10_000, c=16):
    rng = np.random.default_rng(0)
    nodes, x = [], "x"
    for i in range(n):
        if i % 50 == 0:
            w = f"W{i}"
            arr = (rng.standard_normal((c, c)) / 4).astype(np.float16)
            nodes.append(helper.make_node("Constant", [], [w], value=numpy_helper.from_array(arr, w)))
            nodes.append(helper.make_node("MatMul", [w, x], [f"t{i}"]))
        elif i % 7 == 0:
            nodes += [helper.make_node("Exp", [x], [f"e{i}"]), helper.make_node("Tanh", [f"e{i}"], [f"t{i}"])]
        else:
            nodes.append(helper.make_node("Tanh", [x], [f"t{i}"]))
        x = f"t{i}"
    g = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [c])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT16, [c])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 16)])
    m.ir_version = 8
    return m


def test_ten_thousand_nodes():
    g = normalize(gs.import_onnx(_deep_chain())).graph
    assert len(g.nodes) >= 10_000
    pl = place(g)
    feeds = {"x": np.linspace(-1, 1, 16).astype(np.float32)}
    ref = run_model(gs.export_onnx(g), feeds)
    for policy in POLICIES:
        segs = propose_segments(g, pl, GROUPINGS[policy], min_npu_flops=1)
        cuts = extract_segments(g, segs)
        assert sum(c.nodes for c in cuts) == len(g.nodes)
        if len(cuts) < 10:  # running hundreds of tiny sessions adds nothing the small tests don't cover
            out = run_segments(cuts, feeds)
            for k in ref:
                assert rel_err(out[k], ref[k]) <= 1e-5


def test_430m_shape_mixing_graph():
    c = 1024
    g = normalize(gs.import_onnx(rwkv_mixing_model(c, fp16=True, weights_as="constant"))).graph
    pl = place(g)
    feeds = mixing_feeds(c)
    ref = run_model(gs.export_onnx(g), feeds)
    counts = {}
    for policy in POLICIES:
        cuts = extract_segments(g, propose_segments(g, pl, GROUPINGS[policy]))
        out = run_segments(cuts, feeds)
        for k in ref:
            assert rel_err(out[k], ref[k]) <= 1e-5, (policy, k)
        for s in cuts:
            onnx.checker.check_model(s.model)
        npu = sum(s.backend == "npu" for s in cuts)
        cpu = sum(s.backend == "cpu" for s in cuts)
        counts[policy] = (npu, cpu, flops_share(cuts), boundary_bytes(cuts)["total"])
    npu, cpu, share, _ = counts["fused"]
    assert npu <= 2 and cpu <= 3 and share >= 0.99
    assert counts["matmul"][0] == 7
    assert counts["layer"][:2] == (1, 0)
    print(counts)
