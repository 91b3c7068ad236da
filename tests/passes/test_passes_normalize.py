"""normalize pipeline and its passes: same function in fp32, static shapes, 2-D MatMuls, onnx.checker clean."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from passes_testlib import mixing_feeds, rel_err, run_model, rwkv_mixing_model

from passes.graphutil import static_shape
from passes.matmul2d import cancel_reshapes
from passes.normalize import name_nodes
from passes.pipeline import PassError, normalize


def _model(nodes, inputs, outputs, inits=(), opset=16):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits)),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _check_normalized(g):
    m = gs.export_onnx(g)
    onnx.checker.check_model(m, full_check=True)
    names = [n.name for n in g.nodes]
    assert all(names) and len(set(names)) == len(names)
    assert not [n for n in g.nodes if n.op == "Constant"]
    for t in g.tensors().values():
        if isinstance(t, gs.Constant):
            assert t.values.dtype != np.float16, t.name
        else:
            assert t.dtype is not None and static_shape(t) is not None, t
            assert np.dtype(t.dtype) != np.float16, t.name
    for n in g.nodes:
        if n.op == "Cast":
            assert n.attrs["to"] not in (TensorProto.FLOAT16,), n
        if n.op == "MatMul":
            assert len(static_shape(n.inputs[0])) == 2 and isinstance(n.inputs[1], gs.Constant)
    return m


@pytest.mark.parametrize("weights_as", ["constant", "init"])
@pytest.mark.parametrize("fp16", [True, False])
def test_mixing_graph_normalizes(fp16, weights_as):
    src = rwkv_mixing_model(32, fp16=fp16, weights_as=weights_as)
    g = normalize(gs.import_onnx(src)).graph
    m = _check_normalized(g)
    ops = [n.op for n in g.nodes]
    assert "Cast" not in ops and ops.count("MatMul") == 7 and ops.count("Max") == 2
    feeds = mixing_feeds(32)
    if fp16:
        ref = run_model(src, {k: v.astype(np.float16) for k, v in feeds.items()}, basic=True)
        tol = 1e-2  # the source computes in fp16; normalized computes the same function in fp32
    else:
        ref = run_model(src, feeds)
        tol = 1e-5
    out = run_model(m, feeds)
    for k in ref:
        assert out[k].dtype == np.float32
        assert rel_err(out[k], ref[k]) <= tol, k


def test_symbolic_input_needs_shape():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n"])
    src = _model([helper.make_node("Relu", ["x"], ["y"])], [x], [y])
    with pytest.raises(PassError, match="'x'") as err:  # the pipeline names the pass that refused
        normalize(gs.import_onnx(src))
    assert err.value.path == ("normalize", "fix_input_shapes") and isinstance(err.value.cause, ValueError)
    g = normalize(gs.import_onnx(src), shapes={"x": [7]}).graph
    _check_normalized(g)
    assert g.outputs[0].shape == [7] and np.dtype(g.outputs[0].dtype) == np.float32


def test_casts_to_int_stay_and_int_to_fp16_becomes_fp32():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4])
    nodes = [helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT32),
             helper.make_node("Cast", ["i"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("Add", ["h", "x"], ["y"])]
    src = _model(nodes, [x], [y])
    g = normalize(gs.import_onnx(src)).graph
    m = _check_normalized(g)
    casts = [n.attrs["to"] for n in g.nodes if n.op == "Cast"]
    assert sorted(casts) == sorted([TensorProto.INT32, TensorProto.FLOAT])
    xv = np.array([1.7, -2.2, 3.0, 0.5], np.float32)
    assert np.allclose(run_model(m, {"x": xv})["y"], np.trunc(xv) + xv)


def test_matmul_rewrites_both_orientations_and_shares_weights():
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "w1")   # [out, in]
    w2 = numpy_helper.from_array(rng.standard_normal((6, 5)).astype(np.float32), "w2")   # [in, out]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [6])
    nodes = [helper.make_node("MatMul", ["w1", "x"], ["a"]),
             helper.make_node("MatMul", ["w1", "x"], ["a2"]),
             helper.make_node("Add", ["a", "a2"], ["z"]),
             helper.make_node("MatMul", ["z", "w2"], ["y"])]
    src = _model(nodes, [x], [y, z], [w1, w2])
    g = normalize(gs.import_onnx(src)).graph
    m = _check_normalized(g)
    mms = [n for n in g.nodes if n.op == "MatMul"]
    assert len(mms) == 3
    assert mms[0].inputs[1] is mms[1].inputs[1]  # transposed once
    feeds = {"x": rng.standard_normal(4).astype(np.float32)}
    ref, out = run_model(src, feeds), run_model(m, feeds)
    for k in ref:
        assert out[k].shape == ref[k].shape and rel_err(out[k], ref[k]) <= 1e-5


def test_cancel_reshapes():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])
    shapes = [numpy_helper.from_array(np.array(s, np.int64), n)
              for s, n in (([12], "s1"), ([3, 4], "s2"), ([4, 3], "s3"), ([4, 3], "s4"))]
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "s1"], ["a"]),
             helper.make_node("Reshape", ["a", "s2"], ["b"]),
             helper.make_node("Reshape", ["b", "s3"], ["c"]),
             helper.make_node("Reshape", ["c", "s4"], ["d"]),   # same shape: removed
             helper.make_node("Neg", ["d"], ["y"])]
    src = _model(nodes, [x], [y], shapes)
    g = normalize(gs.import_onnx(src)).graph
    m = _check_normalized(g)
    assert [n.op for n in g.nodes].count("Reshape") == 1
    feeds = {"x": np.arange(12, dtype=np.float32).reshape(2, 6) - 5}
    assert np.array_equal(run_model(m, feeds)["y"], run_model(src, feeds)["y"])


def test_cancel_reshapes_keeps_zero_dims():
    g = gs.Graph(opset=16)
    x = gs.Variable("x", np.float32, [2, 3])
    a = gs.Variable("a", np.float32, [3, 2])
    b = gs.Variable("b", np.float32, [3, 2])
    g.nodes = [gs.Node("Reshape", inputs=[x, gs.Constant("s", np.array([3, 2], np.int64))], outputs=[a]),
               gs.Node("Reshape", inputs=[a, gs.Constant("z", np.array([0, 2], np.int64))], outputs=[b])]
    g.inputs, g.outputs = [x], [b]
    cancel_reshapes(g)
    assert g.nodes[1].inputs[0] is a  # 0 copies a dim from the input: not bypassed


def test_name_nodes_unique():
    g = gs.Graph(opset=16)
    x = gs.Variable("x", np.float32, [2])
    ts = [gs.Variable(f"t{i}", np.float32, [2]) for i in range(4)]
    g.nodes = [gs.Node("Relu", name=nm, inputs=[x], outputs=[t]) for nm, t in zip(["", "a", "a", "Relu_0"], ts)]
    names = [n.name for n in name_nodes(g).graph.nodes]
    assert all(names) and len(set(names)) == 4


def test_input_passthrough_and_constant_output():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [3])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT16, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [3])
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(3, np.float16))),
             helper.make_node("Identity", ["x"], ["y"])]
    src = _model(nodes, [x], [y, c])
    g = normalize(gs.import_onnx(src)).graph
    m = _check_normalized(g)
    out = run_model(m, {"x": np.array([1, 2, 3], np.float32)})
    assert np.array_equal(out["y"], [1, 2, 3]) and np.array_equal(out["c"], [1, 1, 1])
