"""passes/norm_affine.py: a group norm's per-channel affine done on the flattened vector (exact; w8a8 builds)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from passes_testlib import export_checked, helper_graph, run_model

from passes.norm_affine import flat_norm_affine

H, N = 2, 64
RNG = np.random.default_rng(0)
W_GN, B_GN = RNG.standard_normal((H, N)), RNG.standard_normal((H, N))


def _groupnorm():
    nodes = [helper.make_node("ReduceMean", ["y"], ["mean"], name="m1", axes=[-1]),
             helper.make_node("Sub", ["y", "mean"], ["c"], name="sub"),
             helper.make_node("Pow", ["c", "two"], ["sq"], name="sq"),
             helper.make_node("ReduceMean", ["sq"], ["var"], name="m2", axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"], name="ae"),
             helper.make_node("Sqrt", ["ve"], ["std"], name="sqrt"),
             helper.make_node("Div", ["c", "std"], ["norm"], name="div"),
             helper.make_node("Mul", ["norm", "w"], ["scaled"], name="mulw"),
             helper.make_node("Add", ["scaled", "b"], ["out"], name="addb"),
             helper.make_node("Add", ["out", "bonus"], ["ob"], name="bonus_add"),  # RWKV-7: + (r k r_k) v
             helper.make_node("Reshape", ["ob", "flat"], ["z"], name="r")]
    return helper_graph(nodes, [("y", [H, N]), ("bonus", [H, N])], [("z", [H * N])],
                        [("eps", np.array(6.4e-4)), ("two", np.array(2.0)), ("w", W_GN), ("b", B_GN),
                         ("flat", np.array([H * N], np.int64))],
                        opset=13)


def test_flat_affine_is_exact_and_per_channel():
    feed = {"y": RNG.standard_normal((H, N)).astype(np.float32), "bonus": RNG.standard_normal((H, N)).astype(np.float32)}
    ref = run_model(export_checked(_groupnorm()), feed)
    g = flat_norm_affine(_groupnorm()).graph
    w = next(n for n in g.nodes if n.op == "Mul" and n.name.endswith(".Mul"))
    assert list(w.inputs[1].values.shape) == [H * N]  # the scale is per channel of the flat vector now
    got = run_model(export_checked(g), feed)
    np.testing.assert_array_equal(got["z"], ref["z"])


@pytest.mark.rknn
def test_the_quantizer_takes_it(tmp_path):
    """rknn-toolkit2 2.5.0 builds the rewritten group norm w8a8. (In an RWKV-7 layer's output segment the
    unrewritten one failed: 'meet unsupported exNorm element_affine broadcast type'; tests/test_rwkv7_trained.py
    builds those segments w8a8 without a fallback. This small graph alone builds either way.)"""
    pytest.importorskip("rknn.api")
    import onnx

    from rwkv2rknn.compile_worker import compile_segment, write_dataset

    samples = [{"y": RNG.standard_normal((H, N)).astype(np.float32),
                "bonus": RNG.standard_normal((H, N)).astype(np.float32)} for _ in range(4)]
    ds = write_dataset(tmp_path / "ds", samples, ["y", "bonus"])
    onnx.save(export_checked(flat_norm_affine(_groupnorm()).graph), str(tmp_path / "after.onnx"))
    compile_segment(tmp_path / "after.onnx", precision="w8a8", dataset=str(ds))
