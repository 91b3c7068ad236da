"""passes/fp16_io.py: chosen fp32 graph inputs/outputs become float16 at the boundary, cast inside the graph."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from passes_testlib import export_checked, helper_graph, run_model

from passes.fp16_io import fp16_boundary


def _graph():
    nodes = [helper.make_node("Mul", ["state_in", "two"], ["state_out"], name="Mul_0"),
             helper.make_node("Add", ["x", "state_in"], ["y"], name="Add_0")]
    return helper_graph(nodes, [("x", [8]), ("state_in", [8])], [("state_out", [8]), ("y", [8])],
                        [("two", np.full(8, 2.0))])


def test_named_boundary_is_fp16_and_the_values_are_the_fp32_graph_rounded_once():
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal(8).astype(np.float32), "state_in": rng.standard_normal(8).astype(np.float32)}
    ref = run_model(export_checked(_graph()), feed)
    g = fp16_boundary(_graph(), ["state_in", "state_out"]).graph
    m = export_checked(g)
    dtypes = {v.name: v.type.tensor_type.elem_type for v in list(m.graph.input) + list(m.graph.output)}
    assert dtypes == {"x": 1, "state_in": 10, "state_out": 10, "y": 1}  # FLOAT = 1, FLOAT16 = 10
    assert sum(n.op_type == "Cast" for n in m.graph.node) == 2
    s16 = feed["state_in"].astype(np.float16)
    got = run_model(m, {"x": feed["x"], "state_in": s16})
    assert got["state_out"].dtype == np.float16
    # the state enters as fp16 (exactly representable in fp32), the graph computes in fp32, the output rounds once
    want = run_model(export_checked(_graph()), {"x": feed["x"], "state_in": s16.astype(np.float32)})
    np.testing.assert_array_equal(got["state_out"], want["state_out"].astype(np.float16))
    np.testing.assert_array_equal(got["y"], want["y"])
    assert np.abs(got["y"] - ref["y"]).max() <= np.abs(feed["state_in"]).max() * 2.0 ** -11


def test_unknown_or_non_fp32_name_is_refused():
    with pytest.raises(ValueError, match="no float32 graph input or output named 'nope'"):
        fp16_boundary(_graph(), ["state_in", "nope"])
