"""The passes on graphs from the project's own RWKV-4 exporter (rwkv2rknn.families.rwkv4): every file, every policy."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from passes_testlib import groupings, rel_err, run_model, run_segments

from passes.cut import extract_segments
from passes.partition import propose_segments
from passes.pipeline import normalize
from passes.placement import place

GROUPINGS = groupings()  # policy name -> its Grouping
POLICIES = list(GROUPINGS)

export = pytest.importorskip("rwkv2rknn.families.rwkv4")
checkpoints = pytest.importorskip("rwkv2rknn.families.rwkv4")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    export.export_model(checkpoints.random_weights(2, 64, 256), out, dtype="float16", progress=False)
    return out


def _feeds(g, rng):
    feeds = {}
    for t in g.inputs:
        if np.dtype(t.dtype).kind == "f":
            feeds[t.name] = rng.standard_normal(t.shape).astype(np.float32)
        else:
            feeds[t.name] = np.array([7], dtype=np.dtype(t.dtype))
    return feeds


@pytest.mark.parametrize("name", ["embed", "mixing_0", "mixing_1", "head"])
def test_exported_graphs_cut_exactly(exported, name):
    g = normalize(gs.import_onnx(onnx.load(str(exported / f"{name}.onnx")))).graph
    feeds = _feeds(g, np.random.default_rng(0))
    if "state_in" in feeds:
        feeds["state_in"][2:4] = np.abs(feeds["state_in"][2:4])
    ref = run_model(gs.export_onnx(g), feeds)
    pl = place(g)
    for policy in POLICIES:
        cuts = extract_segments(g, propose_segments(g, pl, GROUPINGS[policy], min_npu_flops=1))
        table = run_segments(cuts, feeds)
        for k in ref:
            assert rel_err(table[k], ref[k]) <= 1e-5, (name, policy, k)
        if name.startswith("mixing") and policy == "fused":
            kinds = [c.backend for c in cuts]
            assert kinds.count("npu") <= 2 and kinds.count("cpu") <= 3, kinds
        if name.startswith("mixing") and policy == "matmul":
            assert [c.backend for c in cuts].count("npu") == 7
