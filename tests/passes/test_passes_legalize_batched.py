"""Legalizing a layer batched over M tokens: the sign proofs see through the stacked scan (Concat of per-token
maxima) so every Exp of the WKV becomes Elu + 1, and the rewritten graph computes what the batched one does."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from passes_testlib import run_model

from passes.batch import batch_tokens
from passes.legalize import legalize
from passes.pipeline import normalize
from passes.signs import nonpositive
from rwkv2rknn.families.rwkv4 import random_weights
from rwkv2rknn.families.rwkv4 import build_mixing

C, M = 64, 5


def _batched():
    g = normalize(gs.import_onnx(build_mixing(random_weights(1, C, 64, seed=2).layer(0), 0, dtype="float16"))).graph
    return batch_tokens(g, M, [("state_in", "state_out")]).graph


def _run(graph, feed):
    """The graph's outputs in order, on onnxruntime (passes_testlib.run_model)."""
    out = run_model(gs.export_onnx(graph), feed)
    return [out[t.name] for t in graph.outputs]


def test_every_exp_of_the_batched_wkv_is_proven_and_rewritten():
    b = _batched()
    exps = [n for n in b.nodes if n.op == "Exp"]
    assert exps and all(nonpositive(n.inputs[0]) for n in exps)
    rng = np.random.default_rng(0)
    state = rng.standard_normal((5, C)).astype(np.float32)
    state[2:4] = np.abs(state[2:4]) + 1
    feed = {"input": rng.standard_normal((M, C)).astype(np.float32), "state_in": state}
    want = _run(b, feed)
    result = legalize(_batched())
    legal, notes = result.graph, result.notes
    assert not any(n.op == "Exp" for n in legal.nodes)
    assert all(n.rewritten for n in notes if n.op in ("Exp", "Max"))
    for got, w in zip(_run(legal, feed), want):
        np.testing.assert_allclose(got, w, rtol=2e-6, atol=2e-6)


def test_a_stack_that_is_not_a_per_token_max_proves_nothing():
    g = gs.Graph(opset=16)
    a = gs.Variable("a", dtype=np.float32, shape=[2, 3])
    parts = [gs.Variable(f"p{i}", dtype=np.float32, shape=[3]) for i in range(2)]
    rows = [gs.Variable(f"r{i}", dtype=np.float32, shape=[3]) for i in range(2)]
    m = gs.Variable("m", dtype=np.float32, shape=[6])
    m2 = gs.Variable("m2", dtype=np.float32, shape=[2, 3])
    d = gs.Variable("d", dtype=np.float32, shape=[2, 3])
    other = gs.Variable("o", dtype=np.float32, shape=[3])
    # row 1 of the stack takes the max with row 0 of a: not a bound of a's row 1
    g.nodes += [gs.Node("Gather", inputs=[a, gs.Constant(f"i{i}", np.array(1 - i if i == 1 else i))], outputs=[rows[i]],
                        attrs={"axis": 0}) for i in range(2)]
    g.nodes += [gs.Node("Max", inputs=[rows[i], other], outputs=[parts[i]]) for i in range(2)]
    g.nodes += [gs.Node("Concat", inputs=parts, outputs=[m], attrs={"axis": 0}),
                gs.Node("Reshape", inputs=[m, gs.Constant("s", np.array([2, 3]))], outputs=[m2]),
                gs.Node("Sub", inputs=[a, m2], outputs=[d])]
    assert nonpositive(d) is None
