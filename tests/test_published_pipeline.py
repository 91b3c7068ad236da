"""Split graphs made the way the published llama.onnx files were (torch export -> onnxsim -> fp16 converter).

Our own exporter imitates that layout by hand; these graphs carry the real tool chain's details
(torch node names and value_info, shared index initializers, Constant/initializer mix, the fp16
converter's Cast-wrapped Max, int32 token Gather). `rwkv2rknn split` must accept them unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from published_pipeline import DOC_MIXING_OPS, WEIGHTS_AS, make_published_model, op_count_diff
from rwkv_ref import RefModel, cosine, run_chain
from test_split import _assert_chain_matches_sources

from rwkv2rknn.families.rwkv4 import random_weights
from rwkv2rknn.cli import main as cli_main
from rwkv2rknn.manifest import Manifest
from rwkv2rknn.run.chain import Chain
from rwkv2rknn.split import split_model

# the published tool chain: dev extras (published_pipeline imports them lazily)
for _mod in ("torch", "onnxsim", "onnxconverter_common"):
    pytest.importorskip(_mod)

LAYERS, VOCAB = 2, 256
TOKENS = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 0]  # 16 byte tokens


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(embd, weights_as, keep_io_types) -> model directory from the published pipeline (built once)."""
    made = {}

    def get(embd: int, weights_as: str = "parameters", keep_io_types: bool = False) -> Path:
        key = (embd, weights_as, keep_io_types)
        if key not in made:
            out = tmp_path_factory.mktemp(f"published_C{embd}_{weights_as}_io{int(keep_io_types)}") / "m"
            made[key] = make_published_model(random_weights(LAYERS, embd, VOCAB, seed=0), out,
                                             keep_io_types=keep_io_types, weights_as=weights_as)
        return made[key]
    return get


@pytest.mark.parametrize("weights_as", WEIGHTS_AS)
def test_pipeline_gives_the_published_structure(published, weights_as):
    d = published(64, weights_as)
    m = onnx.load(str(d / "mixing_0.onnx"))
    diff = op_count_diff(m)
    if weights_as == "tensors":
        assert diff == {}  # exactly the doc's op counts
    else:
        # Parameters come out as initializers (the doc: accept both); every other count is the doc's.
        assert set(diff) <= {"Constant"}, diff
    floats = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    consts = sum(1 for n in m.graph.node if n.op_type == "Constant")
    assert len(floats) + consts == DOC_MIXING_OPS["Constant"]
    io = {v.name: v.type.tensor_type.elem_type for v in list(m.graph.input) + list(m.graph.output)}
    assert io == {"input": 10, "state_in": 10, "output": 10, "state_out": 10}  # fp16 I/O
    assert m.ir_version == 8 and [(o.domain, o.version) for o in m.opset_import] == [("", 16)]
    e = onnx.load(str(d / "embed.onnx"))
    assert e.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT32


@pytest.mark.parametrize("policy", ["fused", "matmul", "layer"])
@pytest.mark.parametrize("weights_as", WEIGHTS_AS)
@pytest.mark.parametrize("embd", [64, 128])
def test_split_reproduces_every_published_graph(published, tmp_path, embd, weights_as, policy):
    out = tmp_path / "out"
    # fp32 boundaries: the cut alone is exact (the board's fp16 boundaries: the whole-model tests below)
    assert cli_main(["split", str(published(embd, weights_as)), "-o", str(out), "--policy", policy, "-q",
                     "--npu-io", "float32"]) == 0
    _assert_chain_matches_sources(out)


def test_fp32_io_variant_splits_too(published, tmp_path):
    """keep_io_types=True: fp32 graph I/O with Casts to/from fp16 right at the boundaries."""
    d = published(64, "parameters", keep_io_types=True)
    m = onnx.load(str(d / "mixing_0.onnx"))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    split_model([d], tmp_path / "out", progress=False, npu_io="float32")
    _assert_chain_matches_sources(tmp_path / "out")


@pytest.mark.parametrize("weights_as", WEIGHTS_AS)
def test_fused_split_of_published_graphs_keeps_matmuls_on_npu(published, tmp_path, weights_as):
    _, reports = split_model([published(128, weights_as)], tmp_path / "out", policy="fused", progress=False)
    mixing = [r for r in reports if r.name.startswith("mixing")]
    assert len(mixing) == LAYERS
    for r in mixing:
        assert r.npu_segments <= 2 and r.cpu_segments <= 3, (r.name, r.npu_segments, r.cpu_segments)
        assert r.npu_share >= 0.99, (r.name, r.npu_share)


@pytest.mark.parametrize("weights_as", WEIGHTS_AS)
def test_published_files_themselves_match_reference(published, weights_as):
    """The helper's graphs are RWKV-4: run as published (fp16, ORT_ENABLE_BASIC; the default level
    refuses them), they agree with the numpy reference. Guards the helper, not the splitter."""
    got = run_chain(published(64, weights_as), TOKENS)
    ref = RefModel(random_weights(LAYERS, 64, VOCAB, seed=0)).run(TOKENS)
    assert min(cosine(g, r) for g, r in zip(got, ref)) >= 0.999


@pytest.mark.parametrize("policy", ["fused", "matmul", "layer"])
@pytest.mark.parametrize("weights_as", WEIGHTS_AS)
def test_whole_model_chain_matches_reference(published, tmp_path, weights_as, policy):
    embd = 64
    out = tmp_path / "out"
    data, _ = split_model([published(embd, weights_as)], out, policy=policy, progress=False)
    # fp16 sources start pp at 0, the reference at -1e30: with aa = bb = 0 both describe the same
    # (empty) WKV history, so the outputs agree (shared/docs/llama-onnx-rwkv4.md).
    assert data["model"]["state"][0]["init"] == {"fill": 0.0, "rows": {}}
    ref = RefModel(random_weights(LAYERS, embd, VOCAB, seed=0)).run(TOKENS)  # fp64, canonical weights
    with Chain(Manifest.load(out / "manifest.json")) as chain:
        got = np.stack([chain.step(t).copy() for t in TOKENS])
    worst = min(cosine(g, r) for g, r in zip(got, ref))
    assert worst >= 0.999, worst
    # the fp32 recurrence must also reach the reference's next-token choice on every step
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


@pytest.mark.rknn
def test_published_graphs_build_and_run_in_the_simulator(published, tmp_path):
    """The torch-named boundary tensors (/Add_13_output_0, ...) go through rknn-toolkit2 unchanged."""
    pytest.importorskip("rknn.api")
    from rwkv2rknn.build import build_manifest
    from rwkv2rknn.verify import RUNTIME
    from rwkv2rknn.run.chain import runner_factory

    out = tmp_path / "out"
    split_model([published(128, "tensors")], out, policy="fused", prefill_chunk=0, progress=False)
    build_manifest(out, runtime=RUNTIME, jobs=2, progress=False)
    manifest = Manifest.load(out / "manifest.json")
    npu = [s for _, s in manifest.segments() if s["backend"] == "npu"]
    assert len(npu) >= LAYERS and all("rknn" in s and not s.get("fallback_reason") for s in npu)
    assert all(s["verify"]["cosine"] >= 0.999 for s in npu), [s["verify"] for s in npu]
    ref = RefModel(random_weights(LAYERS, 128, VOCAB, seed=0)).run(TOKENS[:8])
    with Chain(manifest, runner_factory(manifest, "rknn-sim")) as chain:
        got = np.stack([chain.step(t).copy() for t in TOKENS[:8]])
    assert min(cosine(g, r) for g, r in zip(got, ref)) >= 0.999


@pytest.mark.rknn
@pytest.mark.slow
def test_trained_model_from_published_pipeline_builds_clean(tmp_path):
    """The trained fixture exported the published way (torch -> onnxsim -> fp16 converter), then the CLI as a
    user types it: a healthy trained model builds with no warning, every NPU segment within rel_l2 1e-2 and
    the whole model within logits cosine 0.999 of onnxruntime fp32 (about 90 s)."""
    pytest.importorskip("rknn.api")
    from conftest import TRAINED_PTH, run_cli

    from rwkv2rknn.families.rwkv4 import load_checkpoint

    model = make_published_model(load_checkpoint(TRAINED_PTH), tmp_path / "model", weights_as="tensors")
    out = tmp_path / "out"
    split = run_cli("split", model, "-o", out)
    assert split.returncode == 0, split.stderr[-3000:]
    build = run_cli("build", out)
    assert build.returncode == 0, build.stderr[-3000:]
    printed = build.stdout + build.stderr
    assert "warning" not in printed.lower(), printed[-3000:]
    manifest = Manifest.load(out / "manifest.json")
    npu = [s for _, s in manifest.segments() if s["backend"] == "npu"]
    assert npu and all(s["verify"]["rel_l2"] <= 1e-2 for s in npu), [(s["id"], s["verify"]) for s in npu]
    check = manifest.data["build"]["verify_model"]
    print(f"\npublished-pipeline trained model: {len(npu)} NPU segments, worst rel_l2 "
          f"{max(s['verify']['rel_l2'] for s in npu):.2e}; whole model {check}")
    assert check["tokens"] >= 16 and check["logits_cosine_min"] >= 0.999 and check["argmax_agree"] == 1.0
