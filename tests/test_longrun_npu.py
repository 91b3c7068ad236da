"""A long run on the fp16 NPU path: 1,000 held-out tokens through the simulator chain of the trained fixture,
token by token against onnxruntime fp32 on the same manifest (tests/test_longrun.py covers onnxruntime only)."""

from __future__ import annotations

import numpy as np
import pytest
from rwkv_ref import cosine

from rwkv2rknn.manifest import Manifest
from rwkv2rknn.run.chain import Chain, runner_factory

# ~50 s for the 1,000 steps, plus the shared fp16 CLI build (30-70 s here) when it runs alone
pytestmark = [pytest.mark.rknn, pytest.mark.slow]
N_TOKENS = 1000
OFFSET = 8192  # into the held-out text: past the first file's header, other bytes than tests/test_trained.py's


def _nll(logits: np.ndarray, nxt: int) -> float:
    x = logits.astype(np.float64)
    x = x - x.max()
    return float(np.log(np.exp(x).sum()) - x[nxt])


def test_1000_heldout_tokens_simulator_tracks_onnxruntime(trained_cli_build, heldout):
    ns = trained_cli_build
    assert ns.build.returncode == 0, ns.build.stderr[-3000:]
    m = Manifest.load(ns.manifest)
    assert m.data["build"]["precision"] == "fp16"
    assert any(s["backend"] == "npu" and "rknn" in s for _, s in m.segments()), "nothing built for the NPU"
    tokens = list(heldout(N_TOKENS, offset=OFFSET))
    cos = np.empty(N_TOKENS)
    agree = np.empty(N_TOKENS, dtype=bool)
    nll_sim, nll_ort = [], []
    with Chain(m, runner_factory(m, "rknn-sim")) as sim, Chain(m, runner_factory(m, "ort")) as ort:
        assert sim.backend == "rknn-sim" and ort.backend == "ort"
        for i, tok in enumerate(tokens):
            got = np.array(sim.step(tok), dtype=np.float64)
            ref = np.array(ort.step(tok), dtype=np.float64)
            if not np.isfinite(got).all():
                pytest.fail(f"token {i}: simulator logits not finite")
            for k, s in enumerate(sim.get_state()):
                if not np.isfinite(s).all():
                    pytest.fail(f"token {i}: simulator state {k} not finite")
            cos[i] = cosine(got, ref)
            agree[i] = got.argmax() == ref.argmax()
            if i + 1 < N_TOKENS:
                nll_sim.append(_nll(got, tokens[i + 1]))
                nll_ort.append(_nll(ref, tokens[i + 1]))
    worst = int(np.argmin(cos))
    print(f"\n{N_TOKENS} held-out tokens, rknn-sim (fp16) vs onnxruntime fp32: worst logits cosine {cos[worst]:.9f} "
          f"(1 - cos {1 - cos[worst]:.1e}) at step {worst}, mean {cos.mean():.9f}; argmax agrees on {agree.mean():.1%} "
          f"({int((~agree).sum())} differ); cross-entropy {np.mean(nll_sim):.4f} vs {np.mean(nll_ort):.4f} nats/byte")
    assert cos.min() >= 0.999, (worst, float(cos[worst]))
    assert agree.mean() >= 0.99, float(agree.mean())
