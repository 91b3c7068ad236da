"""The pass infrastructure: one result type, a manager that names the pass that failed, honest `modified`."""
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper
from passes_testlib import helper_graph, rwkv_mixing_model

from passes.fp32 import fp16_to_fp32
from passes.infra import PassError, PassManager, PassResult, bind
from passes.legalize import legalize
from passes.legalize_max import legalize_max
from passes.normalize import name_nodes
from passes.pipeline import normalize


def _relu_graph():
    return helper_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], [("x", [4])], [("y", [4])])


def _note(text):
    def add_note(graph):
        return PassResult(graph, (text,), modified=False)
    return add_note


def _broken(graph):
    raise KeyError("no such tensor")


def test_a_failing_pass_is_named_with_the_passes_before_it_and_its_cause():
    manager = PassManager([_note("a"), name_nodes, _broken, _note("never")], name="outer")
    with pytest.raises(PassError) as err:
        manager(_relu_graph())
    assert err.value.path == ("outer", "_broken") and err.value.name == "_broken"
    assert err.value.done == ("add_note", "name_nodes")
    assert isinstance(err.value.cause, KeyError) and err.value.__cause__ is err.value.cause
    assert str(err.value).startswith("pass outer > _broken failed:")


def test_nested_pipelines_give_the_path_to_the_pass():
    inner = PassManager([name_nodes, bind(legalize_max, form="nope")], name="inner")
    with pytest.raises(PassError, match="inner > legalize_max") as err:
        PassManager([_note("x"), inner], name="outer")(_relu_graph())
    assert err.value.path == ("outer", "inner", "legalize_max")
    assert isinstance(err.value.cause, ValueError) and "nope" in str(err.value.cause)


def test_a_pass_that_returns_something_else_is_named():
    with pytest.raises(PassError, match="not a PassResult") as err:
        PassManager([lambda g: g], name="p")(_relu_graph())
    assert err.value.path == ("p", "<lambda>")


def test_notes_gather_in_order_and_modified_is_any():
    g = _relu_graph()
    result = PassManager([_note("one"), name_nodes, _note("two")])(g)
    assert result.graph is g and result.notes == ("one", "two") and result.modified is False
    g.nodes[0].name = ""
    assert PassManager([_note("one"), name_nodes])(g).modified is True


def test_modified_is_honest_normalize_twice_changes_nothing_the_second_time():
    g = gs.import_onnx(rwkv_mixing_model(16, fp16=True, weights_as="constant"))
    first = normalize(g)
    assert first.modified and first.graph is g
    second = normalize(first.graph)
    assert not second.modified, "a normalized graph goes through normalize unchanged"
    assert fp16_to_fp32(first.graph).modified is False


def test_legalize_is_a_pipeline_of_passes_with_notes():
    x = helper.make_node("Max", ["a", "b"], ["y"], name="max")
    g = helper_graph([x], [("a", [64]), ("b", [64])], [("y", [64])])
    result = legalize(g)
    assert result.modified and [n.node for n in result.notes] == ["max"] and result.notes[0].rewritten
    again = legalize(result.graph)
    assert not again.modified and not any(n.rewritten for n in again.notes)


def test_a_pass_error_in_normalize_names_the_pass():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(PassError, match=r"pass normalize > fix_input_shapes failed: graph input 'x'"):
        normalize(gs.import_onnx(m))
