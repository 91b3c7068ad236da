"""A long run: 2,000 tokens through the onnxruntime chain of a split fp16-exported model stay finite and on track."""

from __future__ import annotations

import numpy as np
import pytest
from rwkv_ref import RefModel, cosine

from rwkv2rknn.families.rwkv4 import random_weights
from rwkv2rknn.run.chain import Chain
from rwkv2rknn.split import split_model

N_TOKENS = 2000


@pytest.fixture(scope="module")
def manifest(tiny_fp16, tmp_path_factory):
    out = tmp_path_factory.mktemp("longrun") / "out"
    split_model([tiny_fp16], out, progress=False)
    return out / "manifest.json"


def test_2000_tokens_stay_finite(manifest):
    rng = np.random.default_rng(0)
    # random text, then one token repeated (aa/bb accumulate the same key), then random again
    tokens = np.concatenate([rng.integers(0, 256, 800), np.full(600, 97), rng.integers(0, 256, 600)])
    assert len(tokens) == N_TOKENS
    ref = RefModel(random_weights(2, 64, 256, seed=0))  # fp64, canonical (not fp16-rounded) weights
    ref_state = None
    with Chain(manifest) as chain:
        assert all(float(s[4].max()) == 0.0 for s in chain.get_state())  # fp16 source: pp starts at 0
        worst = 1.0
        for i, tok in enumerate(tokens):
            logits = chain.step(int(tok))
            if not np.isfinite(logits).all():
                pytest.fail(f"token {i}: logits not finite")
            if i % 50 == 0 or i == N_TOKENS - 1:
                for s in chain.get_state():
                    assert np.isfinite(s).all(), f"token {i}: state not finite"
                    assert s.dtype == np.float32 and s.shape == (5, 64)
            want, ref_state = ref.forward(int(tok), ref_state)
            worst = min(worst, cosine(logits, want))
    # fp16-rounded weights against fp64 math: close all the way, no drift over 2,000 tokens
    print(f"worst logits cosine against fp64 over {N_TOKENS} tokens: {worst:.6f}")
    assert worst > 0.999, worst
