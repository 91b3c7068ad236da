"""passes/merge.py: a chain of graphs merged into one computes what the chain computes, names prefixed per part."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from passes.merge import merge_graphs
from passes.pipeline import normalize
from rwkv2rknn.families.rwkv4 import random_weights
from rwkv2rknn.families.rwkv4 import build_head, build_mixing

C, V = 64, 96


def _layers(n):
    w = random_weights(n, C, V, seed=3)
    mix = [normalize(gs.import_onnx(build_mixing(w.layer(i), i, dtype="float16"))).graph for i in range(n)]
    return mix, normalize(gs.import_onnx(build_head(w.head(), dtype="float16"))).graph


def _session(graph):
    model = gs.export_onnx(graph)
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _state(rng):
    s = rng.standard_normal((5, C)).astype(np.float32)
    s[2:4] = np.abs(s[2:4]) + 0.5
    return s


def test_merged_layers_and_head_equal_the_chain():
    rng = np.random.default_rng(0)
    mix, head = _layers(3)
    singles = [_session(g) for g in mix] + [_session(head)]
    x = rng.standard_normal(C).astype(np.float32)
    states = [_state(rng) for _ in mix]
    # the chain, graph by graph
    h, want = x, {}
    for i, sess in enumerate(singles[:-1]):
        h, st = sess.run(None, {"input": h, "state_in": states[i]})
        want[f"mixing_{i}.state_out"] = st
    (want["head.output"],) = singles[-1].run(None, {"x": h})

    mix, head = _layers(3)  # merge consumes its graphs
    parts = [(f"mixing_{i}", g) for i, g in enumerate(mix)] + [("head", head)]
    links = [(f"mixing_{i}", "output", f"mixing_{i + 1}", "input") for i in range(2)]
    links.append(("mixing_2", "output", "head", "x"))
    merged = merge_graphs(parts, links, name="group_0")
    assert [t.name for t in merged.inputs] == ["mixing_0.input", "mixing_0.state_in", "mixing_1.state_in",
                                               "mixing_2.state_in"]
    assert sorted(t.name for t in merged.outputs) == sorted(want)
    assert all(n.name.split(".")[0] in {"mixing_0", "mixing_1", "mixing_2", "head"} for n in merged.nodes)
    feed = {"mixing_0.input": x, **{f"mixing_{i}.state_in": s for i, s in enumerate(states)}}
    sess = _session(merged)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-6, atol=1e-6, err_msg=name)


def test_merge_refuses_bad_links():
    mix, _ = _layers(2)
    with pytest.raises(ValueError, match="unknown part"):
        merge_graphs([("a", mix[0])], [("a", "output", "b", "input")])
    mix, _ = _layers(2)
    with pytest.raises(ValueError, match="backwards"):
        merge_graphs([("a", mix[0]), ("b", mix[1])], [("b", "output", "a", "input")])
    mix, _ = _layers(2)
    with pytest.raises(ValueError, match="no output 'nope'"):
        merge_graphs([("a", mix[0]), ("b", mix[1])], [("a", "nope", "b", "input")])
    mix, _ = _layers(2)
    with pytest.raises(ValueError, match="unique"):
        merge_graphs([("a", mix[0]), ("a", mix[1])], [])
