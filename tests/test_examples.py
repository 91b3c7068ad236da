"""The examples/ scripts run as a user runs them, and say what they promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "passes_as_library.py"


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _max_diff(out: str) -> float:
    m = re.search(r"max abs difference ([0-9.eE+-]+)", out)
    assert m, out
    return float(m.group(1))


def test_passes_as_library_demo_graph():
    out = _run()
    assert "built-in demo" in out
    # The Gather and the precision-pinned Max/Sub/Exp go to the CPU with their reasons; the MLP to the NPU.
    assert re.search(r"embed\s+Gather\s+cpu\s+Gather: index lookup", out)
    assert re.search(r"exp\s+Exp\s+cpu\s+Exp: kept fp32 on CPU \(precision rule\)", out)
    assert re.search(r"fc1\s+MatMul\s+npu", out)
    segs = re.findall(r"^  s(\d+)  (npu|cpu) ", out, re.MULTILINE)
    assert [b for _, b in segs] == ["cpu", "npu", "cpu", "npu"], out
    assert "summary: 4 segments, 2 on the NPU, 100.0% of MatMul FLOPs on the NPU" in out
    assert _max_diff(out) < 1e-5


def test_passes_as_library_on_an_exported_graph(model_factory, tmp_path):
    src = model_factory(embd=128) / "mixing_0.onnx"
    out = _run(str(src), "-o", str(tmp_path / "segs"))
    assert f"graph: {src}" in out
    segs = re.findall(r"^  s(\d+)  (npu|cpu) ", out, re.MULTILINE)
    assert ("npu" in [b for _, b in segs]) and ("cpu" in [b for _, b in segs])
    saved = sorted((tmp_path / "segs").glob("s*.onnx"))
    assert len(saved) == len(segs)
    for path in saved:
        onnx.checker.check_model(onnx.load(str(path)))
    assert _max_diff(out) < 0.1  # the source computes in float16, the segments in float32


QUICKSTART = REPO / "examples" / "quickstart.sh"


def _quickstart(tmp_path, **env) -> str:
    proc = subprocess.run(["bash", str(QUICKSTART)], capture_output=True, text=True, cwd=REPO, timeout=1800,
                          check=False, env={**os.environ, "DEMO_OUT": str(tmp_path / "demo"), **env})
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    out = proc.stdout
    m = re.search(r"ort vs rknn-sim logits: cosine ([0-9.]+), max abs \S+, argmax (\d+) / (\d+)", out)
    assert m, out[-3000:]
    assert float(m.group(1)) >= 0.999 and m.group(2) == m.group(3), m.group(0)
    assert (tmp_path / "demo" / "report.html").stat().st_size > 0
    return out


@pytest.mark.slow  # ~70 s: a 4 x 128 build and a simulator run
@pytest.mark.rknn
def test_quickstart_on_the_trained_fixture_writes_text(tmp_path):
    pytest.importorskip("rknn.api", reason="rknn-toolkit2 is not installed")
    out = _quickstart(tmp_path, DEMO_TOKENS="64")
    assert "export the checkpoint" in out and "rwkv4-tiny-trained.pth" in out
    # the generated text: after the step-5 banner, before the bench line; it starts with the prompt
    m = re.search(r"^== 5\. .*?\n(def .*?)^backend ort: prefill", out, re.MULTILINE | re.DOTALL)
    assert m, out[-3000:]
    text = m.group(1)[len("def "):]
    printable = sum(ch.isascii() and (ch.isprintable() or ch in "\t\n\r") for ch in text) / max(len(text), 1)
    print(f"\nquickstart generated: {m.group(1)!r} ({printable:.1%} printable)")
    assert len(text) >= 32 and printable >= 0.95, (printable, text)
    assert re.search(r"\b(self|return|if|for|in|None|import)\b", text), text


@pytest.mark.slow  # ~40 s, and the trained quickstart above covers the same steps
@pytest.mark.rknn
def test_quickstart_random_option_still_runs(tmp_path):
    pytest.importorskip("rknn.api", reason="rknn-toolkit2 is not installed")
    out = _quickstart(tmp_path, DEMO_RANDOM="1", DEMO_LAYERS="1", DEMO_EMBD="128", DEMO_TOKENS="8")
    assert "export a random 1x128 RWKV-4 model" in out
