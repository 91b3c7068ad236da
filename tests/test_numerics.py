"""The verify metric: rel_l2 with a precision floor does not cry wolf on near-zero outputs, and catches real errors."""

from __future__ import annotations

import numpy as np

from rwkv2rknn.numerics import (
    WARN_REL_L2,
    atol_for,
    compare_outputs,
    cosine,
    rel_l2,
    summarize,
)


def _fp16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def test_near_zero_output_scores_bad_cosine_but_fine_rel_l2():
    # A trained model's deep token-shift row: ~1e-6, used next to O(1) activations.
    rng = np.random.default_rng(0)
    activ = rng.standard_normal(256).astype(np.float32)
    ref = (rng.standard_normal(256) * 1e-6).astype(np.float32)
    got = ref + (rng.standard_normal(256) * 3e-8).astype(np.float32) * 40  # noise well under fp16 resolution at 1.0
    assert cosine(got, ref) < 0.9  # the old metric cries wolf
    stats = compare_outputs([got, _fp16(activ)], [ref, activ], ["shift_row", "x"], [activ], "fp16")
    v = summarize(stats)
    assert v["rel_l2"] <= WARN_REL_L2["fp16"], v
    assert stats["shift_row"].rel_l2 < 1e-2


def test_real_error_is_flagged_and_named():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(512).astype(np.float32)
    ref = rng.standard_normal(512).astype(np.float32)
    good = _fp16(ref)
    bad = ref * 0.9  # a 10% scale error: cosine stays 1.0, rel_l2 does not
    assert cosine(bad, ref) > 0.999999
    v = summarize(compare_outputs([good, bad], [ref, ref], ["good", "bad"], [x], "fp16"))
    assert v["worst_output"] == "bad"
    assert 0.09 < v["rel_l2"] < 0.11
    assert v["rel_l2"] > WARN_REL_L2["fp16"]


def test_fp16_rounding_is_well_inside_the_bound():
    rng = np.random.default_rng(2)
    for scale in (1e-3, 1.0, 300.0):
        ref = (rng.standard_normal(1024) * scale).astype(np.float32)
        assert rel_l2(_fp16(ref), ref, atol_for("fp16", scale)) < 1e-3


def test_rel_l2_edge_cases():
    assert rel_l2(np.zeros(4), np.zeros(4), 0.0) == 0.0
    assert rel_l2(np.ones(4), np.zeros(4), 0.0) == float("inf")
    assert rel_l2(np.array([np.nan, 1.0]), np.ones(2), 1e-3) == float("inf")
    # the floor: a tiny reference with an error of the floor's size scores ~1, not 1e6
    assert 0.5 < rel_l2(np.full(100, 1e-3), np.full(100, 1e-9), 1e-3) < 1.5
