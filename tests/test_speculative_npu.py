"""Speculative decoding after `rwkv2rknn build`, in the rknn-toolkit2 simulator (slow: two builds per family).

The trained target (with a verify plan of 4 drafts) and its draft are built fp16; the build's whole-model check
covers the verify plan. Then 256 greedy tokens are decoded speculatively with both models' NPU segments in the
simulator, and every one of them is checked against plain greedy decoding in the simulator on the same history
(teacher forcing: the decode plan fed the speculative output token by token). Must show: at least 99% agree; where
one does not, the plain decode's top-two logits margin is reported (an fp16 near-tie: the two plans round at
different places).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES, heldout_bytes, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.rknn]
K = 4
N = 256


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("rknn.api", reason="rknn-toolkit2 is not installed (build compiles with it)")
    root = tmp_path_factory.mktemp("spec-npu")

    def make(family: str):
        outs = []
        for name, extra in ((f"{family}-tiny-trained", ["--verify-tokens", str(K)]), (f"{family}-tiny-draft", [])):
            for cmd in (["export", FIXTURES / f"{name}.pth", "-o", root / name],
                        ["split", root / name, "-o", root / f"{name}-out", *extra],
                        ["build", root / f"{name}-out"]):
                r = run_cli(*cmd, timeout=3600)
                assert r.returncode == 0, (cmd, r.stderr[-2000:])
            outs.append(root / f"{name}-out")
        return outs

    return make


@pytest.mark.parametrize("family", ["rwkv4", "rwkv7"])
def test_speculative_greedy_in_the_simulator_after_build(built, family):
    from rwkv2rknn.run.chain import Chain, runner_factory
    from rwkv2rknn.run.sampling import Sampling
    from rwkv2rknn.run.speculative import Speculator

    target, draft = built(family)
    from rwkv2rknn.manifest import Manifest

    check = Manifest.load(target).data["build"]["verify_model"]
    assert check["verify"]["rows"] == K + 1 and check["verify"]["logits_cosine_min"] >= 0.999, check
    prompt = list(heldout_bytes(64, 30000))
    with Chain(target, runner_factory(target, "rknn-sim")) as t, Chain(draft, runner_factory(draft, "rknn-sim")) as d:
        spec = Speculator(t, d, K)
        spec.start(prompt)
        got = list(spec.generate(Sampling(0.0, 1.0), N))
        st = spec.stats
        t.reset()
        logits = np.array(t.feed(prompt), dtype=np.float32)
        agree, ties = 0, []
        for i, tok in enumerate(got):
            order = np.argsort(logits)[::-1]
            if int(order[0]) == tok:
                agree += 1
            else:
                ties.append({"token": i, "plain": int(order[0]), "speculative": tok,
                             "margin": float(logits[order[0]] - logits[tok])})
            logits = np.array(t.step(tok), dtype=np.float32)
    print(f"{family}: {agree}/{N} agree, acceptance {st.acceptance:.3f}, {st.tokens_per_pass:.2f} tokens per "
          f"verify pass; disagreements (plain decode margin over the speculative token): {ties}")
    assert agree >= 0.99 * N, ties
    assert all(t["margin"] < 0.05 for t in ties), ties  # fp16 near-ties only (logits resolution ~0.008-0.03)
    assert 0 < st.accepted < st.drafted
