"""placement: table-driven support predicate, reasons, and the fp32 precision rule on an RWKV layer."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest
from passes_testlib import rwkv_mixing_model

from passes.pipeline import normalize
from passes.placement import TARGETS, Placement, place


@pytest.fixture(scope="module")
def mixing():
    return normalize(gs.import_onnx(rwkv_mixing_model(32))).graph


def _by_op(g, pl, op):
    return [pl[n.name].backend for n in g.nodes if n.op == op]


def test_every_node_has_a_reason(mixing):
    pl = place(mixing)
    assert set(pl) == {n.name for n in mixing.nodes}
    for n in mixing.nodes:
        p = pl[n.name]
        assert isinstance(p, Placement) and p.backend in ("npu", "cpu")
        assert p.reason.startswith(n.op + ":"), p


def test_precision_rule_pins_the_recurrence(mixing):
    g, pl = mixing, place(mixing)
    assert set(_by_op(g, pl, "MatMul")) == {"npu"}
    assert set(_by_op(g, pl, "Exp")) == {"cpu"} and set(_by_op(g, pl, "Max")) == {"cpu"}
    assert pl[next(n for n in g.nodes if n.op == "Exp").name].reason == "Exp: kept fp32 on CPU (precision rule)"
    assert set(_by_op(g, pl, "Gather")) == {"cpu"}
    assert set(_by_op(g, pl, "Concat")) == {"cpu"}
    assert set(_by_op(g, pl, "ReduceMean")) == {"npu"}  # LN1 and LN2
    assert set(_by_op(g, pl, "Relu")) == {"npu"}        # FFN
    divs = [pl[n.name].backend for n in g.nodes if n.op == "Div"]
    assert sorted(divs) == ["cpu", "npu", "npu"]        # wkv Div on CPU, the two LN Divs on the NPU
    # The four state rows built from fp32 results, and the Concat, stay on the CPU.
    concat = next(n for n in g.nodes if n.op == "Concat")
    assert all(pl[t.inputs[0].name].backend == "cpu" for t in concat.inputs)


def test_npu_all_turns_the_rule_off(mixing):
    pl = place(mixing, npu_all=True)
    assert set(_by_op(mixing, pl, "Exp")) == {"npu"} and set(_by_op(mixing, pl, "Max")) == {"npu"}
    assert set(_by_op(mixing, pl, "Gather")) == {"cpu"}


def _single(op, inputs, out_dtype=np.float32, out_shape=(2, 4), **attrs):
    y = gs.Variable("y", out_dtype, list(out_shape))
    node = gs.Node(op, name="n0", inputs=inputs, outputs=[y], attrs=attrs)
    g = gs.Graph(nodes=[node], inputs=[t for t in inputs if isinstance(t, gs.Variable)], outputs=[y], opset=16)
    return place(g)["n0"]


def test_table_rules():
    a = gs.Variable("a", np.float32, [2, 4])
    b = gs.Variable("b", np.float32, [4, 4])
    w = gs.Constant("w", np.ones((4, 4), np.float32))
    assert _single("MatMul", [a, w]).backend == "npu"
    assert _single("MatMul", [a, b]) == Placement("cpu", "MatMul: weight is not constant")
    i = gs.Variable("i", np.int64, [2, 4])
    assert _single("Add", [i, i], out_dtype=np.int64).backend == "cpu"
    assert "float only" in _single("Add", [i, i], out_dtype=np.int64).reason
    r5 = gs.Variable("r5", np.float32, [1, 1, 1, 2, 4])
    assert "rank 5" in _single("Relu", [r5], out_shape=(1, 1, 1, 2, 4)).reason
    assert "not in the rk3588 NPU op table" in _single("NonMaxSuppression", [a]).reason
    assert _single("Gather", [a, gs.Constant("k", np.array(0, np.int64))], out_shape=(4,)).backend == "cpu"


def test_targets():
    assert set(TARGETS) >= {"rk3588", "rk3566", "rk3568", "rk3562", "rk3576", "rv1103", "rv1106"}
    g = normalize(gs.import_onnx(rwkv_mixing_model(16))).graph
    base = place(g)
    for t in TARGETS:
        assert place(g, target=t).keys() == base.keys()
    with pytest.raises(ValueError, match="unknown target"):
        place(g, target="rk9999")
