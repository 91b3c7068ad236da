"""fp16 WKV state on a long-memory stress model over 1,000 tokens (docs/wkv-precision.md).

Plan A (deep, --state-update cpu: the update fp32 on the CPU, the NPU reads an fp16 copy) must stay within
the bound at every checkpoint; plan B (deep, --state-update npu: the whole layer fp16 on the NPU) is
recorded drifting past it. Both are split and built with the real commands (`build --no-verify`: this
test is the verification) and run in the rknn-toolkit2 simulator against onnxruntime fp32 with the state
float32 between tokens, on the bytes of inspect.py. About 80 s per plan on a shared 2-core machine.
"""

from __future__ import annotations


import numpy as np
import pytest
from stress_model import (
    ARGMAX_AGREE_MIN,
    LOGITS_COSINE_MIN,
    ROWS,
    STATE_BOUND,
    decays_of_model,
    export_stress,
    fp16_state_safe,
    fp32_reference,
    measure,
    split_and_build,
    stress_weights,
    text_tokens,
)

N_TOKENS = 1000


def test_fp16_state_safe_rule():
    """The per-layer rule: a layer's slowest channel decides; short contexts are always safe."""
    w = stress_weights()
    for i in range(w.n_layer):  # every stress layer remembers hundreds of tokens
        d = w.decay(i)
        assert not fp16_state_safe(d, N_TOKENS) and not fp16_state_safe(d, 6)
        assert fp16_state_safe(d, 5)  # a 5-token context cannot accumulate more than 5 roundings
    assert fp16_state_safe(-np.exp(np.linspace(-1.0, 3.0, 64)), N_TOKENS)  # |w| >= 0.37: ~3 tokens of memory
    # RWKV-4's own init (raw -5 .. 3: |w| >= 6.7e-3) and random_weights (raw -3 .. 1.5: |w| >= 0.05) are not safe
    assert not fp16_state_safe(-np.exp(np.linspace(-5.0, 3.0, 64)), N_TOKENS)
    assert not fp16_state_safe(-np.exp(np.linspace(-3.0, 1.5, 64)), N_TOKENS)
    assert fp16_state_safe(np.array([-0.2]), 10**6) and not fp16_state_safe(np.array([-0.19]), 10**6)


@pytest.fixture(scope="module")
def stress_dir(tmp_path_factory):
    return export_stress(tmp_path_factory.mktemp("wkv") / "stress")


@pytest.fixture(scope="module")
def reference(stress_dir, tmp_path_factory):
    """The onnxruntime fp32 chain to compare with: a fused split, state float32 between tokens. (A
    --state-update npu split declares its state float16, so its own onnxruntime chain rounds it like the NPU.)"""
    return fp32_reference(stress_dir, tmp_path_factory.mktemp("ref") / "out")


def _built(stress_dir, tmp_path_factory, plan: str):
    pytest.importorskip("rknn.api", reason="rknn-toolkit2 is not installed")
    manifest = split_and_build(stress_dir, tmp_path_factory.mktemp(f"plan{plan}") / "out", plan, verify=False)
    from rwkv2rknn.manifest import Manifest

    data = Manifest.load(manifest, check_files=False).data
    segs = [s for g in data["graphs"] for s in g["segments"]]
    npu = [s for s in segs if s["backend"] == "npu"]
    # a segment that fell back would run fp32 on the CPU and make this test pass for nothing
    assert npu and all("rknn" in s and not s.get("fallback_reason") for s in npu), [s["id"] for s in npu]
    return manifest


def _worst(layers: list[dict]) -> float:
    return max(e[row] for e in layers for row in ROWS)


@pytest.mark.slow
@pytest.mark.rknn
def test_plan_a_state_update_on_cpu_stays_within_the_bound(stress_dir, reference, tmp_path_factory):
    manifest = _built(stress_dir, tmp_path_factory, "A")
    res = measure(manifest, text_tokens(N_TOKENS), reference=reference)
    # the model stresses what it should: bb in the hundreds, pp well above 10
    assert max(m["max_bb"] for m in res["ref_mag"]) > 200 and max(m["pp_max"] for m in res["ref_mag"]) > 12
    assert sorted(res["state"]) == list(range(50, N_TOKENS + 1, 50))
    for t, layers in res["state"].items():
        for k, e in enumerate(layers):
            for row in ROWS:
                assert e[row] < STATE_BOUND, f"plan A, token {t}, layer {k}, {row}: state rel error {e[row]:.2e}"
    worst = int(np.argmin(res["cos"]))
    assert res["cos"].min() >= LOGITS_COSINE_MIN, f"plan A: logits cosine {res['cos'].min():.6f} at token {worst + 1}"
    assert res["agree"].mean() >= ARGMAX_AGREE_MIN, f"plan A: argmax agrees on {100 * res['agree'].mean():.1f}%"


@pytest.mark.slow
@pytest.mark.rknn
def test_plan_b_state_update_on_npu_drifts_past_the_bound(stress_dir, reference, tmp_path_factory):
    """Recorded, not wanted: the fp16 update drifts (measured: worst layer 1.1-2.3% at 50 tokens, 88% at 1,000).

    Asserted with wide margins: past the bound by 10x at 1,000 tokens, growing (1,000 vs 100: about 20x
    measured, asserted 3x), and on the slowest layers first. Its logits still pass (cosine >= 0.9999 measured):
    the drift is in the state's scale (how much the past weighs against the current token), which the
    output reads only where the current token is comparable to the remembered mass.
    """
    manifest = _built(stress_dir, tmp_path_factory, "B")
    res = measure(manifest, text_tokens(N_TOKENS), reference=reference)
    worst_end, worst_100 = _worst(res["state"][N_TOKENS]), _worst(res["state"][100])
    assert worst_end > 10 * STATE_BOUND, worst_end
    assert worst_end > 3 * worst_100, (worst_100, worst_end)
    decays = decays_of_model(stress_dir)
    slowest = int(np.argmin([np.abs(w).min() for w in decays]))
    fastest = int(np.argmax([np.abs(w).min() for w in decays]))
    per_layer = [max(e[row] for row in ROWS) for e in res["state"][N_TOKENS]]
    assert per_layer[slowest] > 3 * per_layer[fastest], per_layer
    assert not any(fp16_state_safe(w, N_TOKENS) for w in decays)  # the rule agrees: no layer qualifies
