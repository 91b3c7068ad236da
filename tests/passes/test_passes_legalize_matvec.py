"""legalize_matvec: MatMul(A [..., M, K], B [..., K, 1]) of two computed tensors -> ReduceSum(Mul(A, B_row), last axis).

Why (measured with rknn-toolkit2 2.5.0, rk3588, fp16, verbose build table; H heads of N = 64):
- the placement table sends a MatMul without a constant weight to the CPU, so in a deep RWKV-7 model each
  state product S @ kk, S_new @ r was an NPU->CPU->NPU hop (2 layers: 5 NPU segments per call);
- the compiler itself keeps every form tried on the NPU, with no CPU op in the table:
  MatMul 3-D [H, N, N] @ [H, N, 1] and 4-D [1, H, N, N] @ [1, H, N, 1] both become exMatMul (a Transpose of A
  first): 726 cycles at H = 2, 5,801 at H = 16, 11,602 at H = 32;
  Mul + ReduceSum(last axis), 3-D or 4-D: Mul, Transpose, Conv (the ReduceSum): 785 / 6,240 / 12,474 cycles
  (+8%; the Mul shows 0 cycles like every elementwise op); Mul + ReduceSum over H of [1, H*N, K, 1] or W of
  [1, H*N, 1, K]: the same Conv, 785 cycles; Mul + a grouped 1x1 Conv of ones: split into H*N Convs, 4,096 cycles;
  the batched prefill product [16, 2, 64, 64] @ [16, 2, 64, 1]: MatMul 11,602, Mul + ReduceSum 12,474 cycles;
- in the normalized 128-wide RWKV-7 layer (2 heads), legalized: 0 CPU ops either way; with the MatMuls 88 ops,
  20,849 cycles; with this pass 94 ops (3 more Transposes), 20,989 cycles.
The pass keeps each product at its own rank: the compiler takes 3-D and 4-D alike.

Error bounds (fp32, onnxruntime CPU): MatMul and Mul + ReduceSum each sum the same K products in some order,
so each lies within gamma_K * sum_k |a_k b_k| of the exact dot product (gamma_K = K u / (1 - K u),
u = 2^-24); they differ by at most 2 gamma_K sum_k |a_k b_k| (checked elementwise). A whole RWKV-7 layer
(legalize, which also turns the decay's Exp into Elu + 1), 24 tokens from the zero state, each graph feeding
its own states back: max |diff| / max |ref| <= 2e-5 for every output (measured <= 7e-7).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper
from passes_testlib import export_checked, helper_graph, rel_err, rknn_build_and_run, run_model

from passes.legalize import legalize
from passes.legalize_matvec import legalize_matvec
from passes.pipeline import normalize
from passes.placement import place

U = 2.0 ** -24


def _ops(g):
    return [n.op for n in g.nodes]


def _matvec_graph(sa, sb, opset=16):
    """y = MatMul(a + 0, b + 0): both operands computed (not graph inputs, not constants)."""
    nodes = [helper.make_node("Add", ["a_in", "zero"], ["a"], name="Add_a"),
             helper.make_node("Add", ["b_in", "zero"], ["b"], name="Add_b"),
             helper.make_node("MatMul", ["a", "b"], ["y"], name="MatMul_0")]
    sy = sa[:-1] + [sb[-1]]
    return helper_graph(nodes, [("a_in", sa), ("b_in", sb)], [("y", sy)], [("zero", np.zeros(1))], opset)


@pytest.mark.parametrize("sa,sb,opset", [
    ([8, 5], [5, 1], 16),                # 2-D
    ([2, 64, 64], [2, 64, 1], 16),       # the RWKV-7 state product, 2 heads
    ([16, 64, 64], [16, 64, 1], 16),     # 16 heads (C = 1024)
    ([3, 2, 16, 8], [3, 2, 8, 1], 16),   # 4-D, M != K (a batched prefill form)
    ([2, 64, 64], [2, 64, 1], 11),       # ReduceSum with an `axes` attribute
])
def test_matvec_matches_onnxruntime_within_the_summation_bound(sa, sb, opset):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(sa) * np.exp(rng.uniform(-3, 3, sa))).astype(np.float32)
    b = rng.standard_normal(sb).astype(np.float32)
    g = _matvec_graph(sa, sb, opset)
    ref = run_model(export_checked(g), {"a_in": a, "b_in": b})["y"]
    result = legalize_matvec(g)
    g, notes = result.graph, result.notes
    assert [(n.node, n.rewritten) for n in notes] == [("MatMul_0", True)]
    assert "MatMul" not in _ops(g) and _ops(g).count("Mul") == 1 and _ops(g).count("ReduceSum") == 1
    red = next(n for n in g.nodes if n.op == "ReduceSum")
    assert red.name == "MatMul_0" and red.outputs[0].name == "y"          # keeps the MatMul's name
    assert (red.attrs.get("axes") == [-1]) == (opset < 13)
    mul = next(n for n in g.nodes if n.op == "Mul")
    assert list(mul.outputs[0].shape) == sa and list(mul.inputs[1].shape) == sb[:-2] + [1, sb[-2]]
    got = run_model(export_checked(g), {"a_in": a, "b_in": b})["y"]
    assert got.shape == ref.shape
    k = sb[-2]
    gamma = k * U / (1 - k * U)
    bound = 2 * gamma * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    assert np.all(np.abs(got - ref) <= bound), float(np.max(np.abs(got - ref) / bound))
    assert np.all(np.abs(got - exact) <= bound / 2)
    placement = place(g, npu_all=True, whole_models=True)
    assert all(p.backend == "npu" for p in placement.values()), placement


def test_non_column_and_other_matmuls_are_left_alone_with_a_reason():
    nodes = [
        helper.make_node("Add", ["a_in", "zero"], ["a"], name="Add_a"),
        helper.make_node("MatMul", ["a", "m"], ["y0"], name="MatMul_matrix"),       # [2,64,64] @ [2,64,3]
        helper.make_node("MatMul", ["a", "col"], ["y1"], name="MatMul_broadcast"),  # [2,64,64] @ [64,1]
        helper.make_node("MatMul", ["a", "vec"], ["y2"], name="MatMul_vector"),     # [2,64,64] @ [64]
        helper.make_node("MatMul", ["w", "x"], ["y3"], name="MatMul_weight"),       # constant weight: skipped
    ]
    g = helper_graph(nodes, [("a_in", [2, 64, 64]), ("m", [2, 64, 3]), ("col", [64, 1]), ("vec", [64]), ("x", [64])],
               [("y0", [2, 64, 3]), ("y1", [2, 64, 1]), ("y2", [2, 64]), ("y3", [32])],
               [("zero", np.zeros(1)), ("w", np.ones((32, 64)))])
    before = _ops(g)
    result = legalize_matvec(g)
    g, notes = result.graph, result.notes
    assert _ops(g) == before
    why = {n.node: n.reason for n in notes}
    assert not any(n.rewritten for n in notes)
    assert set(why) == {"MatMul_matrix", "MatMul_broadcast", "MatMul_vector"}   # the weight MatMul: no note
    assert "3 columns, not 1" in why["MatMul_matrix"]
    assert "batch dimensions" in why["MatMul_broadcast"] and "broadcast" in why["MatMul_broadcast"]
    assert "1-D" in why["MatMul_vector"]
    export_checked(g)


# -- a normalized RWKV-7 layer ------------------------------------------------------------------------------

C, VOCAB = 128, 512


@pytest.fixture(scope="module")
def rwkv7_layers():
    """(plain, legalized) normalized ONNX models of layers 0 and 1 of a random 128-wide RWKV-7, and the notes."""
    from rwkv2rknn.families.rwkv7 import build_mixing7, random_weights7

    w = random_weights7(2, C, VOCAB)
    out = []
    for i in range(2):
        src = build_mixing7(w.layer(i), i, dtype="float16")
        plain = export_checked(normalize(gs.import_onnx(src)).graph)
        result = legalize(normalize(gs.import_onnx(src)).graph)
        legal, notes = result.graph, result.notes
        out.append((plain, export_checked(legal), notes))
    return out


def _run_tokens(models, tokens, seed=0):
    """Feed `tokens` random inputs through layer 0 then layer 1, each model chain with its own states.

    Returns per token the feeds and outputs of each layer: [(feeds0, out0, feeds1, out1)]."""
    rng = np.random.default_rng(seed)
    heads = C // 64
    states = [{"state_in": np.zeros((2, C), np.float32), "wkv_in": np.zeros((heads, 64, 64), np.float32)}
              for _ in models]
    steps = []
    for _ in range(tokens):
        f0 = {"input": rng.standard_normal(C).astype(np.float32), **states[0]}
        o0 = run_model(models[0], f0)
        f1 = {"input": o0["output"], "v_first": o0["v_first"], **states[1]}
        o1 = run_model(models[1], f1)
        steps.append((f0, o0, f1, o1))
        for s, o in zip(states, (o0, o1)):
            s["state_in"], s["wkv_in"] = o["state_out"], o["wkv_out"]
    return steps


def test_rwkv7_layer_after_legalize_matches_onnxruntime_and_places_everything_on_the_npu(rwkv7_layers):
    for i, (_, legal, notes) in enumerate(rwkv7_layers):
        done = [n for n in notes if n.op == "MatMul"]
        assert len(done) == 2 and all(n.rewritten for n in done), [str(n) for n in done]
        assert all("[2, 64, 64] times column [2, 64, 1]" in n.reason for n in done)
        g = gs.import_onnx(legal)
        assert not [n for n in g.nodes if n.op == "MatMul" and not any(isinstance(t, gs.Constant) for t in n.inputs)], i
        placement = place(g, npu_all=True, whole_models=True)
        cpu = {k: p.reason for k, p in placement.items() if p.backend == "cpu"}
        assert cpu == {}, cpu
        names = [n.name for n in g.nodes]
        assert len(set(names)) == len(names)
    ref = _run_tokens([p for p, _, _ in rwkv7_layers], 24)
    got = _run_tokens([q for _, q, _ in rwkv7_layers], 24)
    worst = {}
    for (_, r0, _, r1), (_, g0, _, g1) in zip(ref, got):
        for layer, (r, g) in enumerate(((r0, g0), (r1, g1))):
            for k in r:
                worst[(layer, k)] = max(worst.get((layer, k), 0.0), rel_err(g[k], r[k]))
    assert all(v <= 2e-5 for v in worst.values()), worst
    assert np.abs(ref[-1][3]["wkv_out"]).max() > 0.1   # the state has grown: the products are not trivially 0


@pytest.mark.rknn
@pytest.mark.slow
def test_legalized_rwkv7_layer_compiles_without_cpu_ops_and_matches_in_the_simulator(rwkv7_layers, tmp_path, monkeypatch):
    """rknn-toolkit2's own table for the legalized 128-wide layer 1 (value residual included): no MatMul, ReduceSum
    or Mul on the CPU (in fact no CPU op at all); the fp16 simulator against onnxruntime fp32 with the states and
    v_first that 8 tokens produce: cosine >= 0.999 on output, state_out and wkv_out."""
    pytest.importorskip("rknn.api", reason="rknn-toolkit2 is not installed")
    monkeypatch.chdir(tmp_path)  # the verbose compiler writes check*.onnx into the working directory
    plain, legal, _ = rwkv7_layers[1]
    steps = _run_tokens([p for p, _, _ in rwkv7_layers], 9, seed=1)
    samples = [steps[k][2] for k in (0, 8)]   # the zero state, and the states after 8 tokens
    assert np.abs(samples[1]["wkv_in"]).max() > 0.1
    in_names = [i.name for i in legal.graph.input]
    out_names = [o.name for o in legal.graph.output]
    assert in_names == ["input", "state_in", "wkv_in", "v_first"] and out_names == ["output", "state_out", "wkv_out"]
    table, outs = rknn_build_and_run(legal, tmp_path / "legal.onnx", samples, in_names)
    assert table is not None and table.ops > 50
    assert not [op for op in table.cpu_ops if op.split(":")[0] in ("MatMul", "ReduceSum", "Mul", "exMatMul")], table.cpu_ops
    assert table.cpu_ops == [], table.cpu_ops
    assert table.op_counts("NPU").get("exMatMul", 0) == 0   # the state products are Mul + Conv, no MatMul left
    for feed, got in zip(samples, outs):
        want = run_model(plain, feed)
        for name, g in zip(out_names, got):
            g = np.asarray(g, np.float64).reshape(want[name].shape)
            r = want[name].astype(np.float64)
            cos = float((g * r).sum() / (np.linalg.norm(g) * np.linalg.norm(r)))
            assert np.isfinite(g).all() and cos >= 0.999, (name, cos)
