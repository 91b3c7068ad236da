"""passes/state_rule.py: the nodes that only update a recurrent state are found from the graph, and get their own
full-precision reads of the state; the layer splits into one NPU part and one CPU update part that reproduce it."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from passes_testlib import groupings, run_model, run_segments

from passes.cut import extract_segments
from passes.partition import propose_segments
from passes.pipeline import normalize
from passes.placement import Placement, place
from passes.state_rule import clone_state_cone, update_only_nodes
from rwkv2rknn.families.rwkv4 import random_weights
from rwkv2rknn.families.rwkv4 import build_mixing

C = 64


def _layer():
    return normalize(gs.import_onnx(build_mixing(random_weights(1, C, 64, seed=1).layer(0), 0, dtype="float16"))).graph


def _split_reproduces(g, ref_model, on_cpu: set[str], feed: dict):
    """Place `g` whole-model style with `on_cpu` pinned to the CPU, cut it (one NPU part, one CPU update part),
    run the parts in order and compare with the unsplit model; returns the cuts."""
    placement = place(g, npu_all=True, whole_models=True)
    for n in g.nodes:
        if n.name in on_cpu:
            placement[n.name] = Placement("cpu", "update")
    segs = propose_segments(g, placement, groupings()["deep"])
    assert [s.backend for s in segs] == ["npu", "cpu"]
    cuts = extract_segments(g, segs)
    want = run_model(ref_model, feed)
    env = run_segments(cuts, feed)
    for name in ("output", "state_out"):
        np.testing.assert_allclose(env[name], want[name], rtol=1e-6, atol=1e-6)
    # the CPU update reads the fp32 state input itself, not an NPU output
    assert "state_in" in {t.name for t in cuts[1].inputs}
    return cuts


def test_update_nodes_are_the_aa_bb_pp_update_only():
    g = _layer()
    update = update_only_nodes(g, ["state_in"], ["state_out"])
    ops = sorted(n.op for n in g.nodes if n.name in update)
    # pp' = max(pp + w, k); e1, e2 = exp(. - pp'); aa' = e1 aa + e2 v; bb' = e1 bb + e2; rows reshaped, concatenated
    assert ops.count("Exp") == 2 and ops.count("Max") == 1 and ops.count("Concat") == 1
    assert "Div" not in ops and "MatMul" not in ops  # the WKV output and the projections are not updates
    outputs_of_update = {t.name for n in g.nodes if n.name in update for t in n.outputs}
    assert "state_out" in outputs_of_update and "output" not in outputs_of_update
    # every update node depends on the state and reaches no output but state_out
    assert update_only_nodes(g, [], ["state_out"]) == set()


def test_clones_give_the_update_its_own_reads_and_the_split_reproduces_the_layer():
    """At M=1 the update shares only the reads of the state rows with the output side: those are cloned."""
    g = _layer()
    ref_model = gs.export_onnx(g.copy())
    update = update_only_nodes(g, ["state_in"], ["state_out"])
    shared = [n for n in g.nodes if n.op == "Gather" and n.name not in update]
    grown = {n.node for n in clone_state_cone(g, [("state_in", "state_out")]).notes}
    clones = [n for n in g.nodes if n.name in grown - update]
    assert clones and all(c.op == "Gather" and c.inputs[0].name == "state_in" for c in clones)
    assert len(clones) <= len(shared)
    for n in g.nodes:  # no update node reads a state row through a node the NPU side also uses
        if n.name in grown:
            for t in n.inputs:
                for p in t.inputs:
                    assert p.name in grown or p.op not in ("Gather",), (n.name, p.name)
    rng = np.random.default_rng(0)
    state = rng.standard_normal((5, C)).astype(np.float32)
    state[2:4] = np.abs(state[2:4]) + 1
    _split_reproduces(g, ref_model, grown, {"input": rng.standard_normal(C).astype(np.float32), "state_in": state})


def test_batched_layer_gets_its_own_fp32_scan_for_the_final_state():
    """Over M tokens the update shares the scan's intermediate states with the outputs: the CPU gets a copy of
    the scan (from the fp32 state input and the NPU's k, v), so the state it writes never passes through fp16."""
    from passes.batch import batch_tokens
    from passes.state_rule import recurrent_rows

    pairs = [("state_in", "state_out")]
    g = _layer()
    rows = recurrent_rows(g, pairs)
    assert rows == {"state_in": {2, 3, 4}}  # aa, bb, pp; rows 0 and 1 are token shifts
    m = 4
    b = batch_tokens(g, m, pairs).graph
    ref_model = gs.export_onnx(b.copy())
    cpu = {n.node for n in clone_state_cone(b, pairs, rows).notes}
    on_cpu = [n for n in b.nodes if n.name in cpu]
    assert any(n.name.endswith(".fp32") for n in on_cpu)  # copies of the shared scan steps
    assert sum(n.op == "Max" for n in on_cpu) == m  # one pp' max per token: the whole scan runs on the CPU
    assert not any(n.op == "MatMul" for n in b.nodes if n.name in cpu)  # projections stay on the NPU side
    rng = np.random.default_rng(1)
    state = rng.standard_normal((5, C)).astype(np.float32)
    state[2:4] = np.abs(state[2:4]) + 1
    _split_reproduces(b, ref_model, cpu, {"input": rng.standard_normal((m, C)).astype(np.float32), "state_in": state})
