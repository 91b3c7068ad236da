"""The whole user path, through the CLI: checkpoint -> export -> split -> build -> run, against references."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rwkv2rknn.families.rwkv4 import random_weights, save_bin, save_pth
from rwkv_ref import cosine

pytestmark = pytest.mark.rknn
TOKENS = [int(t) for t in np.random.default_rng(11).integers(0, 256, 16)]
LAYERS, EMBD, VOCAB = 2, 128, 256  # 128 wide: the att MatMuls are big enough to be worth an NPU call


def _cli(*args, module="rwkv2rknn"):
    r = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, f"{module} {args}: {r.stderr[-3000:]}"
    return r


def _logits(manifest: Path, backend: str, out: Path) -> np.ndarray:
    _cli(manifest, "--backend", backend, "--tokens", ",".join(map(str, TOKENS)), "--dump-logits", out,
         module="rwkv2rknn.run")
    return np.load(out)


def _rwkv_pip_logits(pth_stem: Path, out: Path) -> np.ndarray:
    code = ("import os, numpy as np\n"
            "os.environ['RWKV_JIT_ON'] = '0'; os.environ['RWKV_CUDA_ON'] = '0'\n"
            "from rwkv.model import RWKV\n"
            f"m = RWKV(model={str(pth_stem)!r}, strategy='cpu fp32')\n"
            f"logits, _ = m.forward({TOKENS}, None)\n"
            f"np.save({str(out)!r}, logits.float().numpy())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, RWKV_JIT_ON="0", RWKV_CUDA_ON="0"))
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(out)


def _npu_segments(manifest: Path) -> list[dict]:
    from rwkv2rknn.manifest import Manifest

    data = Manifest.load(manifest, check_files=False).data
    return [s for g in data["graphs"] for s in g["segments"] if s["backend"] == "npu"]


def test_pth_export_split_build_run_agrees_with_rwkv_package(tmp_path):
    pytest.importorskip("rwkv")
    save_pth(random_weights(LAYERS, EMBD, VOCAB, seed=3), tmp_path / "ckpt.pth")
    _cli("export", tmp_path / "ckpt.pth", "-o", tmp_path / "model", "-q")
    _cli("split", tmp_path / "model", "-o", tmp_path / "out", "-q", "--prefill-chunk", "0")
    manifest = tmp_path / "out" / "manifest.json"
    _cli("build", tmp_path / "out", "--target", "rk3588", "-q")
    assert _npu_segments(manifest), "the split put nothing on the NPU"

    reference = _rwkv_pip_logits(tmp_path / "ckpt", tmp_path / "pip.npy")
    ort_logits = _logits(manifest, "ort", tmp_path / "ort.npy")
    sim_logits = _logits(manifest, "rknn-sim", tmp_path / "sim.npy")
    # fp16 export -> fp32 segments: the graph weights went through float16 once
    assert cosine(ort_logits, reference) >= 0.9999
    assert cosine(sim_logits, reference) >= 0.999
    assert int(sim_logits.argmax()) == int(reference.argmax())


def test_fp32_pth_export_matches_rwkv_package_tightly(tmp_path):
    pytest.importorskip("rwkv")
    save_pth(random_weights(LAYERS, EMBD, VOCAB, seed=4), tmp_path / "ckpt.pth")
    _cli("export", tmp_path / "ckpt.pth", "-o", tmp_path / "model", "--dtype", "float32", "-q")
    # fp32 boundaries (--npu-io float32): exact on onnxruntime; the board's fp16 ones: within fp16 of it
    _cli("split", tmp_path / "model", "-o", tmp_path / "out", "-q", "--prefill-chunk", "0", "--npu-io", "float32")
    ours = _logits(tmp_path / "out" / "manifest.json", "ort", tmp_path / "ort.npy")
    reference = _rwkv_pip_logits(tmp_path / "ckpt", tmp_path / "pip.npy")
    assert cosine(ours, reference) >= 0.99999
    assert np.abs(ours - reference).max() <= 1e-3
    _cli("split", tmp_path / "model", "-o", tmp_path / "out16", "-q", "--prefill-chunk", "0")
    board = _logits(tmp_path / "out16" / "manifest.json", "ort", tmp_path / "ort16.npy")
    assert cosine(board, reference) >= 0.99999 and np.abs(board - reference).max() <= 4e-3


@pytest.mark.parametrize("tensor_dtype", ["float16", pytest.param("float32", marks=pytest.mark.slow)])
def test_rwkv_cpp_bin_builds_end_to_end(tmp_path, tensor_dtype):
    save_bin(random_weights(LAYERS, EMBD, VOCAB, seed=5), tmp_path / "model.bin", dtype=tensor_dtype)
    _cli("export", tmp_path / "model.bin", "-o", tmp_path / "model", "-q")
    _cli("split", tmp_path / "model", "-o", tmp_path / "out", "-q", "--prefill-chunk", "0")
    _cli("build", tmp_path / "out", "--target", "rk3588", "-q")
    npu = _npu_segments(tmp_path / "out" / "manifest.json")
    assert len(npu) >= 2 * LAYERS
    for seg in npu:
        assert (tmp_path / "out" / seg["rknn"]).stat().st_size > 0, seg["id"]
        assert seg["verify"]["cosine"] >= 0.999, (seg["id"], seg["verify"])
