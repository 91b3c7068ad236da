"""The examples/ scripts run as a user runs them, and say what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import onnx

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
