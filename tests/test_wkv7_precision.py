"""RWKV-7's matrix state in fp16: the chosen placement holds the bound (docs/wkv7-precision.md).

The choice: the state update fp32 on the CPU with the decay w computed there from the NPU's fp16 activations
(what `--policy fused` does). The bound, per layer: ||S - S_ref|| / ||S_ref|| and each token-shift row under 1% at
every 50-token checkpoint, logits cosine >= 0.999 at every step and argmax agreement >= 99%, against onnxruntime
fp32 (`--policy cpu --npu-io float32`) on the long-memory stress variant (tests/stress_model7.py).

The fast test runs a split's own onnxruntime chain: it computes in fp32 but rounds every tensor that crosses an
fp16 boundary (NPU segments' inputs and outputs, an fp16 state) as the board does, and that rounding is what
decides the drift: it reproduced the simulator's state error to within 1% of its value at 1,000 tokens for
`deep --state-update cpu`, whose CPU update reads w from the NPU in fp16 (docs/wkv7-precision.md). The slow test
builds the placement and runs it in the simulator over 1,000 held-out bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
from stress_model7 import (
    ARGMAX_AGREE_MIN,
    LOGITS_COSINE_MIN,
    STATE_BOUND,
    delta_form,
    export7,
    fp32_reference,
    heldout_tokens,
    measure7,
    stress_weights7,
)

SHORT = 300  # tokens of the fast test: deep --state-update cpu crosses the bound by 250 on the stress variant


@pytest.fixture(scope="module")
def stress_dir(tmp_path_factory):
    return export7(stress_weights7(), tmp_path_factory.mktemp("wkv7") / "stress")


@pytest.fixture(scope="module")
def reference(stress_dir, tmp_path_factory):
    return fp32_reference(stress_dir, tmp_path_factory.mktemp("ref7") / "out")


def _split(model_dir, out_dir, **kw):
    from rwkv2rknn.split import split_model

    split_model([model_dir], out_dir, force=True, progress=False, prefill_chunk=0, **kw)
    return out_dir / "manifest.json"


def _violations(res: dict, name: str) -> list[str]:
    bad = []
    for t, layers in sorted(res["state"].items()):
        for k, e in enumerate(layers):
            for key in ("wkv", "ffn_shift", "att_shift"):
                if e[key] >= STATE_BOUND:
                    bad.append(f"{name}: token {t}, layer {k}, {key}: rel error {e[key]:.2e}")
    if res["cos"].min() < LOGITS_COSINE_MIN:
        bad.append(f"{name}: logits cosine {res['cos'].min():.6f} at token {int(np.argmin(res['cos'])) + 1}")
    if res["agree"].mean() < ARGMAX_AGREE_MIN:
        bad.append(f"{name}: argmax agrees on {100 * res['agree'].mean():.1f}%")
    return bad


def test_the_stress_variant_remembers(stress_dir):
    """What makes it a stress: a quarter of the channels hold w = 1 in fp16 (it is not), S in the hundreds."""
    from stress_model7 import FIXTURE7

    from rwkv2rknn.families.rwkv7 import DECAY_SCALE, load_pth7

    w, base = stress_weights7(), load_pth7(FIXTURE7)
    slow = w.slow_channels
    assert slow.size == w.n_embd // 4
    for i in range(w.n_layer):
        one_minus_w = -np.expm1(-DECAY_SCALE / (1 + np.exp(-w.layer(i)["att.w0"].astype(np.float64))))
        assert (one_minus_w[slow] < 2.44e-4).all()  # below half fp16's step next to 1: stored as exactly 1
        assert (np.float16(1) - one_minus_w[slow]).astype(np.float16).max() == np.float16(1)
        other = np.setdiff1d(np.arange(w.n_embd), slow)
        np.testing.assert_array_equal(w.layer(i)["att.w0"][other], base.layer(i)["att.w0"][other])


def test_fused_placement_holds_the_bound(stress_dir, reference, tmp_path):
    """The chosen placement: the recurrence and the decay's Exp fp32 on the CPU; the NPU's tensors fp16."""
    manifest = _split(stress_dir, tmp_path / "fused", policy="fused")
    res = measure7(manifest, heldout_tokens(SHORT), reference, backend="ort")
    assert sorted(res["state"]) == list(range(50, SHORT + 1, 50))
    assert not _violations(res, "fused")
    # the margin the choice rests on: measured 0.02-0.03% on this model (simulator at 1,000 tokens: 0.03-0.13%)
    assert max(e["wkv"] for e in res["state"][SHORT]) < STATE_BOUND / 10


@pytest.mark.xfail(strict=True, reason="deep --state-update cpu reads the decay w from the NPU in fp16 (w = 1 on "
                   "slow channels); docs/wkv7-precision.md, 'Things that look wrong in the tool' 1")
def test_deep_cpu_update_holds_the_bound(stress_dir, reference, tmp_path):
    manifest = _split(stress_dir, tmp_path / "deep", policy="deep", state_update="cpu")
    res = measure7(manifest, heldout_tokens(SHORT), reference, backend="ort")
    assert not _violations(res, "deep --state-update cpu")


def test_delta_form_is_the_same_function(stress_dir, reference, tmp_path):
    """The experiment's rewrite (S + (S (w - 1) - rm + v k^T)) changes nothing in fp32."""
    m = delta_form(stress_dir, tmp_path / "delta")
    res = measure7(fp32_reference(m, tmp_path / "delta-ref"), heldout_tokens(50), reference, backend="ort")
    assert res["cos"].min() > 1 - 1e-9
    assert max(e["wkv"] for e in res["state"][50]) < 1e-5


@pytest.mark.slow
@pytest.mark.rknn
def test_fused_placement_holds_the_bound_in_the_simulator(stress_dir, reference, tmp_path):
    pytest.importorskip("rknn.api", reason="rknn-toolkit2 is not installed")
    manifest = _split(stress_dir, tmp_path / "fused", policy="fused")
    _build(manifest.parent)
    res = measure7(manifest, heldout_tokens(1000), reference, backend="rknn-sim")
    assert not _violations(res, "fused (simulator)")


def _build(out_dir):
    """`rwkv2rknn build OUT --no-verify` (this test is the verification); no NPU segment may fall back."""
    import subprocess
    import sys

    from rwkv2rknn.manifest import Manifest

    proc = subprocess.run([sys.executable, "-m", "rwkv2rknn", "build", str(out_dir), "-q", "--jobs", "1",
                           "--no-verify"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = Manifest.load(out_dir / "manifest.json", check_files=False).data
    npu = [s for g in data["graphs"] for s in g["segments"] if s["backend"] == "npu"]
    # a segment that fell back would run fp32 on the CPU and make the test pass for nothing
    assert npu and all("rknn" in s and not s.get("fallback_reason") for s in npu), [s["id"] for s in npu]
