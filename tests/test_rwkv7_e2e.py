"""RWKV-7 through every command: a random .pth the `rwkv` package reads -> export -> split -> run (onnxruntime,
and the simulator after build) against the package's RWKV_x070, plus estimate and report."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from rwkv_ref import cosine
from test_rwkv7 import _load_x070_package

from rwkv2rknn.families.rwkv7 import random_weights7, save_pth7
from rwkv2rknn.manifest import Manifest
from rwkv2rknn.run.chain import Chain, runner_factory

TOKENS = [3, 17, 250, 100, 7, 7, 42, 511, 0, 64, 128, 5, 300, 2, 90, 11]


def cli(*args, module="rwkv2rknn"):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True)



@pytest.fixture(scope="module")
def pth(tmp_path_factory):
    d = tmp_path_factory.mktemp("r7")
    save_pth7(random_weights7(2, 128, 512, seed=5), d / "m.pth")
    return d / "m.pth"


@pytest.fixture(scope="module")
def package_logits(pth):
    mp = pytest.MonkeyPatch()
    try:
        module = _load_x070_package(mp)
        model = module.RWKV(model=str(pth)[:-4], strategy="cpu fp32")
        state, out = None, []
        for t in TOKENS:
            logits, state = model.forward([t], state)
            out.append(logits.detach().double().numpy())
        return np.stack(out)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def split_dir(pth, tmp_path_factory):
    root = tmp_path_factory.mktemp("r7cli")
    r = cli("export", pth, "-o", root / "model", "-q")
    assert r.returncode == 0, r.stderr
    assert "RWKV-7" in r.stderr
    r = cli("split", root / "model", "-o", root / "out", "-q")
    assert r.returncode == 0, r.stderr
    return root / "out"


def _chain_logits(manifest, backend, tokens=TOKENS):
    m = Manifest.load(manifest)
    with Chain(m, runner_factory(m, backend)) as chain:
        return np.stack([chain.step(t).astype(np.float64) for t in tokens])


def test_export_split_run_matches_the_rwkv_package(split_dir, package_logits):
    data = json.loads((split_dir / "manifest.json").read_text())
    model = data["model"]
    assert model["family"] == "rwkv7" and model["vocab_size"] == 512
    assert [s["input"] for s in model["state"][:2]] == ["state_in", "wkv_in"]
    assert model["state"][1]["shape"] == [2, 64, 64]
    assert {"from": {"graph": "mixing_0", "name": "v_first"}, "to": {"graph": "mixing_1", "name": "v_first"}} \
        in model["links"]
    # projections and LoRAs on the NPU, the matrix-state update fp32 on the CPU (the precision rule)
    for g in data["graphs"]:
        if g["name"].startswith("mixing_"):
            npu_flops = sum(s["matmul_flops"] for s in g["segments"] if s["backend"] == "npu")
            assert npu_flops >= 0.9 * sum(s["matmul_flops"] for s in g["segments"])
            cpu_ops = {p["op"] for p in g["placement"] if p["backend"] == "cpu"}
            assert "Exp" in cpu_ops  # the decay, and the state update after it
    got = _chain_logits(split_dir / "manifest.json", "ort")
    worst = min(cosine(a, b) for a, b in zip(got, package_logits))
    print(f"RWKV-7 ort chain vs the rwkv package over {len(TOKENS)} tokens: worst cosine {worst:.8f}")
    assert worst >= 0.9999
    assert int(got[-1].argmax()) == int(package_logits[-1].argmax())


def test_prefill_plan_and_cli_run(split_dir, package_logits):
    m = Manifest.load(split_dir / "manifest.json")
    assert m.prefill and m.prefill["chunk"] == 16
    with Chain(m) as chain:
        via_prefill = chain.feed(TOKENS).astype(np.float64)
    assert cosine(via_prefill, package_logits[-1]) >= 0.9999
    r = cli(split_dir / "manifest.json", "--backend", "ort", "--tokens", ",".join(map(str, TOKENS)), "--max-tokens",
            "4", "--temperature", "0", module="rwkv2rknn.run")
    assert r.returncode == 0, r.stderr


def test_estimate_and_report_name_the_family(split_dir):
    r = cli("estimate", split_dir, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["decode_ms_per_token"] > 0 and d["prefill_ms_per_token"] > 0
    r = cli("report", split_dir, "-o", split_dir.parent / "r.html")
    assert r.returncode == 0, r.stderr
    assert "RWKV-7, 2 layers" in (split_dir.parent / "r.html").read_text()


@pytest.mark.rknn
def test_build_and_simulator_match_the_package(split_dir, package_logits):
    pytest.importorskip("rknn.api")
    r = cli("build", split_dir, "-q")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stdout, r.stdout
    sim = _chain_logits(split_dir / "manifest.json", "rknn-sim")
    worst = min(cosine(a, b) for a, b in zip(sim, package_logits))
    print(f"RWKV-7 simulator chain vs the rwkv package: worst cosine {worst:.6f}")
    assert worst >= 0.999
    assert int(sim[-1].argmax()) == int(package_logits[-1].argmax())


def test_deep_is_one_npu_call_per_group_and_matches_the_package(pth, tmp_path, package_logits):
    """Deep for RWKV-7: the matrix-state products legalized (Mul + ReduceSum), the state update's fp32 copy
    on the CPU after each NPU call (the new state feeds y = S' @ r, so the copy writes wkv_out)."""
    from rwkv2rknn.split import split_model

    r = cli("export", pth, "-o", tmp_path / "model", "-q")
    assert r.returncode == 0, r.stderr
    data, _ = split_model([tmp_path / "model"], tmp_path / "out", policy="deep", progress=False)
    groups = [g for g in data["graphs"] if g["name"].startswith("group_")]
    assert groups and all([s["backend"] for s in g["segments"]] == ["npu", "cpu"] for g in groups)
    cpu_ops = {p["op"] for g in groups for p in g["placement"] if p["backend"] == "cpu"}
    assert {"Mul", "ReduceSum"} <= cpu_ops and "MatMul" not in cpu_ops  # the fp32 state update, no projection
    got = _chain_logits(tmp_path / "out" / "manifest.json", "ort")
    worst = min(cosine(a, b) for a, b in zip(got, package_logits))
    print(f"RWKV-7 deep (ort) vs the rwkv package: worst cosine {worst:.8f}")
    assert worst >= 0.9999
