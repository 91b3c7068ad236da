"""The prefill plan: M prompt tokens per call give the same logits and state as feeding them one by one."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rwkv_ref import cosine

from rwkv2rknn.cli import main as cli_main
from rwkv2rknn.manifest import Manifest
from rwkv2rknn.run.chain import Chain, runner_factory
from rwkv2rknn.split import split_model

_SPLITS: dict = {}


def _split(src, tmp_path_factory, chunk: int, **kw):
    key = (str(src), chunk, tuple(sorted(kw.items())))
    if key not in _SPLITS:
        out = tmp_path_factory.mktemp("prefill") / "out"
        split_model([src], out, prefill_chunk=chunk, progress=False, **kw)
        _SPLITS[key] = out / "manifest.json"
    return _SPLITS[key]


def _both(manifest, tokens, backend="ort"):
    """(logits and state via the prefill plan, the same token by token)."""
    m = Manifest.load(manifest)
    with Chain(m, runner_factory(m, backend)) as chain:
        a = chain.feed(tokens).astype(np.float64)
        sa = [s.astype(np.float64) for s in chain.get_state()]
        chain.reset()
        b = chain.feed(tokens, prefill=False).astype(np.float64)
        sb = [s.astype(np.float64) for s in chain.get_state()]
    return (a, sa), (b, sb)


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("chunk", [4, 16])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(min_value=1, max_value=40), seed=st.integers(0, 2**16))
def test_any_prompt_length_matches_token_by_token(model_factory, tmp_path_factory, chunk, n, seed):
    # fp32 boundaries: the batching surgery alone, exact; the board's fp16 boundaries: the test below
    manifest = _split(model_factory(layers=2, embd=64), tmp_path_factory, chunk, npu_io="float32")
    tokens = [int(t) for t in np.random.default_rng(seed).integers(0, 256, n)]
    (a, sa), (b, sb) = _both(manifest, tokens)
    assert _rel(a, b) <= 1e-4
    for x, y in zip(sa, sb):
        assert _rel(x, y) <= 1e-4


@pytest.mark.parametrize("policy, kw", [("fused", {}), ("matmul", {}), ("layer", {}), ("cpu", {}),
                                        ("deep", {"layers_per_call": 2}), ("auto", {})])
def test_40_tokens_on_the_trained_model_every_policy(trained_model, tmp_path_factory, heldout, policy, kw):
    manifest = _split(trained_model, tmp_path_factory, 16, policy=policy, npu_io="float32", **kw)
    data = json.loads(manifest.read_text())
    pre = data["prefill"]
    assert pre["chunk"] == 16 and all(g["name"].startswith("prefill.") for g in pre["graphs"])
    assert all(s["id"].startswith("prefill.") for g in pre["graphs"] for s in g["segments"])
    assert pre["links"][-1]["last"] is True and pre["logits"]["name"].endswith("output")
    tokens = list(heldout(40))
    (a, sa), (b, sb) = _both(manifest, tokens)
    assert _rel(a, b) <= 1e-4, policy
    for x, y in zip(sa, sb):
        assert _rel(x, y) <= 1e-4, policy


@pytest.mark.parametrize("policy, kw", [("fused", {}), ("deep", {"layers_per_call": 2})])
def test_board_dtypes_prefill_agrees_within_fp16(trained_model, tmp_path_factory, heldout, policy, kw):
    """With the board's buffers (fp16 at NPU boundaries) the two plans round at different places: they agree to
    fp16's resolution, and the fp32 states they carry stay within it."""
    manifest = _split(trained_model, tmp_path_factory, 16, policy=policy, **kw)
    tokens = list(heldout(40))
    (a, sa), (b, sb) = _both(manifest, tokens)
    assert cosine(a, b) >= 0.99999 and _rel(a, b) <= 5e-3, policy
    assert int(a.argmax()) == int(b.argmax())
    for x, y in zip(sa, sb):
        assert _rel(x, y) <= 5e-3, policy


def test_deep_prefill_makes_one_npu_call_per_group_per_chunk(model_factory, tmp_path_factory):
    manifest = _split(model_factory(layers=4, embd=128), tmp_path_factory, 16, policy="deep", layers_per_call=2)
    data = json.loads(manifest.read_text())
    groups = [g for g in data["prefill"]["graphs"] if g["name"].startswith("prefill.group_")]
    assert [g["covers"] for g in groups] == [["mixing_0", "mixing_1"], ["mixing_2", "mixing_3"]]
    for g in groups:
        assert [s["backend"] for s in g["segments"]] == ["npu", "cpu"]  # the scan's fp32 copy on the CPU
        assert g["tokens_per_call"] == 16
    assert data["prefill"]["order"][-1] == "prefill.head"  # the decode head is merged into a group


def test_prefill_table_prices_per_prompt_token_like_the_estimate(model_factory, tmp_path):
    """The split summary's prefill rows add up to the estimate's prefill ms/token: deep's own head runs once per
    chunk, so it counts 1/chunk per prompt token (it was priced once per token: 1.07 against 0.8 ms)."""
    from rwkv2rknn.cost.estimate import estimate
    from rwkv2rknn.cost.profile import load_profile

    data, reports = split_model([model_factory(layers=4, embd=128)], tmp_path / "out", policy="deep",
                                layers_per_call=2, prefill_chunk=16, progress=False, preview=True)
    est = estimate(data, load_profile(data["board"]))
    table = sum(r.predicted_ms for r in reports if r.plan == "prefill") + est.prefill.breakdown["overlap"]
    head = [r for r in reports if r.plan == "prefill" and r.name == "prefill.head"]
    assert head
    assert table == pytest.approx(est.prefill_ms_per_token, rel=0.02), (table, est.prefill_ms_per_token)


def test_no_prefill_plan_with_chunk_0_and_errors(model_factory, tmp_path, capsys):
    src = model_factory(layers=2, embd=64)
    data, _ = split_model([src], tmp_path / "a", prefill_chunk=0, progress=False)
    assert "prefill" not in data
    assert cli_main(["split", str(src), "--prefill-chunk", "1", "-o", str(tmp_path / "b")]) == 2
    assert "--prefill-chunk 1" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert cli_main(["split", str(src / "mixing_0.onnx"), "--prefill-chunk", "8", "-o", str(tmp_path / "c")]) == 2
    assert "whole model" in capsys.readouterr().err


def test_bench_json_reports_prefill_from_the_prefill_plan(model_factory, tmp_path_factory):
    manifest = _split(model_factory(layers=2, embd=128), tmp_path_factory, 16)
    r = subprocess.run([sys.executable, "-m", "rwkv2rknn.run", str(manifest), "--backend", "ort", "--bench",
                        "--json", "-q", "--tokens", ",".join(str(i % 256) for i in range(40)), "--max-tokens", "8"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["prefill_chunk"] == 16 and res["prompt_tokens"] == 40
    assert res["prefill_ms_per_token"] > 0 and res["decode_ms_per_token"] > 0
    assert "prefill plan, 16 per call" in r.stdout


@pytest.mark.rknn
def test_40_tokens_through_the_prefill_plan_in_the_simulator(trained_model, tmp_path, heldout):
    """The issue's Must show: after build, 40 prompt tokens (not a multiple of the chunk) through the prefill
    plan in the simulator give the logits of token-by-token feeding (cosine >= 0.999, same argmax)."""
    pytest.importorskip("rknn.api")
    out = tmp_path / "out"
    split_model([trained_model], out, prefill_chunk=16, progress=False)
    assert cli_main(["build", str(out), "-q"]) == 0
    m = Manifest.load(out / "manifest.json")
    pre = [s for g in m.prefill["graphs"] for s in g["segments"] if s["backend"] == "npu"]
    assert pre and all("rknn" in s and s["verify"]["rel_l2"] <= 1e-2 for s in pre)
    assert len({s["build_key"] for _, s in m.segments() if "build_key" in s}) == len(
        [1 for _, s in m.segments() if "build_key" in s])  # decode and prefill segments: different cache keys
    check = m.data["build"]["verify_model"]["prefill"]
    assert check["logits_cosine_min"] >= 0.999
    tokens = list(heldout(40))
    (a, _), (b, _) = _both(out / "manifest.json", tokens, "rknn-sim")
    (c, _), _ = _both(out / "manifest.json", tokens, "ort")
    print(f"40 tokens in the simulator: prefill vs token by token cosine {cosine(a, b):.6f}, vs fp32 {cosine(a, c):.6f}")
    assert cosine(a, b) >= 0.999 and cosine(a, c) >= 0.999
    assert int(a.argmax()) == int(b.argmax()) == int(c.argmax())


@pytest.mark.parametrize("policy", ["cpu", "matmul", "fused"])
def test_no_overlapped_step_is_read_through_a_view_before_it_ends(model_factory, tmp_path_factory, policy):
    """A CPU step the program marks `overlap` runs on a worker while later steps go on; none of them may read
    what it writes, also not through a view (the prefill head reads the last row of the last layer's output).
    Found on RWKV-5/6 `--policy cpu` prefill: the head read the row before the layer had written it."""
    from rwkv2rknn.program.lower import lower

    m = Manifest.load(_split(model_factory(), tmp_path_factory, 4, policy=policy))
    program = lower(m.data)
    bufs = program.buffers

    def base(b):
        return {b} | ({bufs[b].view_of} if bufs[b].view_of is not None else set())

    for plan in program.plans.values():
        for i, step in enumerate(plan.steps):
            if not step.overlap:
                continue
            written = set().union(*(base(b) for b in step.outputs))
            for later in plan.steps[i + 1:]:
                read = set().union(*(base(b) for b in later.inputs))
                assert not written & read, (plan.name, step.segment, later.segment)
    assert any(s.inputs and bufs[s.inputs[0]].view_of is not None for s in program.prefill.steps)  # a row view
