"""The speculative-decoding estimate (rwkv2rknn/cost/speculative.py, `rwkv2rknn estimate OUT --draft DRAFT_OUT`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURES, run_cli

from rwkv2rknn.cost.profile import load_profile
from rwkv2rknn.cost.speculative import speculative_estimate, tokens_per_pass, verify_pass_ms

_PLANS: dict = {}


def _plan(tmp_path_factory, name: str, verify: int = 0, write: bool = False):
    """The trained fixture `name` exported once and split (preview: the plan's data; write: an OUT directory)."""
    from rwkv2rknn import families
    from rwkv2rknn.split import split_model

    key = (name, verify, write)
    if key not in _PLANS:
        model = _PLANS.get(("model", name))
        if model is None:
            model = tmp_path_factory.mktemp(f"cost-{name}") / "model"
            fam, w = families.load_checkpoint(FIXTURES / f"{name}.pth")
            fam.export(w, model, dtype="float16", weights_as="constants", force=False, progress=False)
            _PLANS[("model", name)] = model
        out = model.parent / f"out-{verify}"
        data, _ = split_model([model], out, verify_tokens=verify, preview=not write, progress=False,
                              prefill_chunk=0)
        _PLANS[key] = out if write else data
    return _PLANS[key]


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_tokens_per_pass_is_the_mean_of_the_acceptance_process(p, k):
    """(1 - p^(k+1)) / (1 - p) against drafts kept independently with probability p, one bonus token per pass."""
    rng = np.random.default_rng(0)
    kept = rng.random((200_000, k)) < p
    first_reject = np.where(kept.all(axis=1), k, np.argmin(kept, axis=1))
    assert tokens_per_pass(p, k) == pytest.approx(float(np.mean(first_reject + 1)), rel=0.01)


def test_a_verify_plan_priced_at_other_rows_matches_plans_built_for_them(tmp_path_factory):
    """The estimate prices one verify plan (4 drafts) at k + 1 rows for every k; against plans split for k = 1, 2
    and 8 on both runtime profiles it is within 5% (measured: 2-4%)."""
    from rwkv2rknn.cost.estimate import program_of

    base = _plan(tmp_path_factory, "rwkv7-tiny-trained", 4)
    for k in (1, 2, 8):
        built = _plan(tmp_path_factory, "rwkv7-tiny-trained", k)
        for board in ("rk3588", "rk3588-c"):
            prof = load_profile(board)
            want = verify_pass_ms(built, program_of(built), prof, k + 1, "fp16")
            got = verify_pass_ms(base, program_of(base), prof, k + 1, "fp16")
            assert got == pytest.approx(want, rel=0.05), (k, board)


def test_the_curve_and_the_pick(tmp_path_factory):
    target = _plan(tmp_path_factory, "rwkv7-tiny-trained", 4)
    draft = _plan(tmp_path_factory, "rwkv7-tiny-draft")
    est = speculative_estimate(target, draft, load_profile("rk3588-c"), "fp16", ps=(0.0, 0.5, 0.7, 0.9),
                               ks=range(1, 9))
    by = {(pt.p, pt.k): pt for pt in est.curve}
    for p in (0.0, 0.5, 0.7, 0.9):
        pts = [by[(p, k)] for k in range(1, 9)]
        assert est.best[p].ms_per_token == min(pt.ms_per_token for pt in pts)  # k picked: the cheapest
        for pt in pts:  # the parts add up
            assert pt.ms_per_token * pt.tokens_per_pass == pytest.approx(
                pt.draft_ms + pt.verify_ms + pt.rollback_ms + pt.snapshot_ms)
    # a draft nothing of which is kept only costs: one token per pass, the verify pass and the drafts on top
    assert est.best[0.0].tokens_per_pass == 1.0 and est.best[0.0].ms_per_token > est.plain_ms_per_token
    best = [est.best[p].ms_per_token for p in (0.5, 0.7, 0.9)]
    assert best == sorted(best, reverse=True)  # more kept drafts, less time per token
    assert est.best[0.9].k >= est.best[0.5].k
    assert est.verify_ms[8] > est.verify_ms[1]


def test_estimate_cli_with_a_draft(tmp_path_factory):
    target = _plan(tmp_path_factory, "rwkv7-tiny-trained", 4, write=True)
    draft = _plan(tmp_path_factory, "rwkv7-tiny-draft", 0, write=True)
    r = run_cli("estimate", target, "--draft", draft, "--acceptance", "0.65", "--precision", "w8a8", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    spec = res["speculative"]
    assert set(spec) == {"rk3588", "rk3588-c"}
    for est in spec.values():
        assert est["predicted"] is True and est["precision"] == "w8a8"
        assert {float(p) for p in est["best"]} == {0.5, 0.6, 0.65, 0.7, 0.8, 0.9}
        assert 1 <= est["best"]["0.65"]["k"] <= 15
    r = run_cli("estimate", target, "--draft", draft, "--board", "rk3588-c")
    assert r.returncode == 0 and "PREDICTED" in r.stdout and "k picked per board profile" in r.stdout, r.stderr
    for args in (["--acceptance", "0.7"], ["--draft", draft, "--acceptance", "1.5"]):
        r = run_cli("estimate", target, *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli("estimate", draft, "--draft", draft)  # no verify plan
    assert r.returncode == 2 and "--verify-tokens" in r.stderr, r.stderr


def test_per_token_acceptance_inverts_tokens_per_pass():
    from rwkv2rknn.run.speculative import per_token_acceptance

    for k in (1, 4, 15):
        for p in (0.0, 0.2, 0.55, 0.77, 0.99):
            assert per_token_acceptance(tokens_per_pass(p, k), k) == pytest.approx(p, abs=1e-9)
    assert per_token_acceptance(None, 4) is None and per_token_acceptance(5.0, 4) == 1.0
