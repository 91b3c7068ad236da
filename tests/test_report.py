"""`rwkv2rknn report`: one self-contained HTML page per split/build, checked as text and as rendered pixels."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from rwkv2rknn.cli import main
from rwkv2rknn.manifest import Manifest
from rwkv2rknn.report import render_report, totals

NPU_GREEN = (0x2E, 0x7D, 0x32)
CPU_BLUE = (0x15, 0x65, 0xC0)


@pytest.fixture(scope="module")
def split_out(tmp_path_factory, model_factory) -> Path:
    """2 layers at n_embd 128 (at 64 the NPU segments are too small and fold back to the CPU), split only."""
    from rwkv2rknn.split import split_model

    out = tmp_path_factory.mktemp("report_split") / "out"
    split_model([model_factory(embd=128)], out, progress=False)
    return out


@pytest.fixture(scope="module")
def built_out(tmp_path_factory, split_out) -> Path:
    """The same split, built for rk3588 (compiled and verified in the rknn-toolkit2 simulator)."""
    pytest.importorskip("rknn.api", reason="rknn-toolkit2 is not installed")
    from rwkv2rknn.build import build_manifest
    from rwkv2rknn.verify import RUNTIME

    out = tmp_path_factory.mktemp("report_built") / "out"
    shutil.copytree(split_out, out)
    build_manifest(out, runtime=RUNTIME, target="rk3588", progress=False)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_report_names_every_segment_with_its_metrics(built_out, tmp_path):
    assert main(["report", str(built_out), "-o", str(tmp_path / "r.html")]) == 0
    text = (tmp_path / "r.html").read_text()
    m = Manifest.load(built_out)
    npu = [s for _, s in m.segments() if s["backend"] == "npu"]
    assert npu, "n_embd 128 should keep NPU segments"
    for _, seg in m.segments():
        assert seg["id"] in text
    for seg in npu:
        assert f"rel_l2 {seg['verify']['rel_l2']:.2e}" in text
    graphs = m.all_graphs()  # the decode plan's and the prefill plan's
    from rwkv2rknn.report import _anchor
    for g in graphs:  # one section and one drawing per graph
        assert f"id='{_anchor(g['name'])}'" in text
    # plus the predicted-time pictures: the plan against the CPU-only plan, and one bar per graph
    # + one bar chart of predicted time per segment in every graph's section
    assert text.count("<svg") == 2 * len(graphs) + 2
    assert "predicted time per token on board profile rk3588" in text and "not a board measurement" in text
    from rwkv2rknn.cost import estimate, load_profile
    est = estimate(m.data, load_profile("rk3588"))
    assert f"{est.decode_ms_per_token:.2f} ms, {est.npu_calls_per_token:g} NPU calls" in text
    # Every CPU placement with its reason.
    for g in graphs:
        for p in g["placement"]:
            if p["backend"] == "cpu":
                assert p["reason"].replace("'", "&#x27;") in text, p
    t = totals(m)
    assert t["npu_calls"] == len(npu)
    assert f"<td>{t['npu_calls']}</td><td>{100 * t['npu_share']:.1f}%</td>" in text
    assert "bytes crossing NPU&harr;CPU per token" in text


def test_report_is_self_contained(built_out):
    text = render_report(built_out)
    assert not re.search(r"https?://", text), "the page must not reference the network"
    assert not re.search(r"<link\b|<img\b|<iframe\b|@import|url\(|\bsrc\s*=", text, re.IGNORECASE)
    assert "<style>" in text and "<svg" in text


def test_report_default_output_path(split_out, tmp_path):
    out = _copy(split_out, tmp_path / "out")
    assert main(["report", str(out)]) == 0
    text = (out / "report.html").read_text()
    assert "not built yet" in text  # a split alone has no verify metrics yet, and says so


def test_report_takes_the_manifest_path_and_refuses_a_directory_as_output(split_out, tmp_path, capsys):
    out = _copy(split_out, tmp_path / "out")
    assert main(["report", str(out / "manifest.json")]) == 0  # as `build` and `run` take it
    assert (out / "report.html").is_file()
    assert main(["report", str(out), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and ".tmp" not in err


def test_report_without_manifest_names_the_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report"]) == 2
    err = capsys.readouterr().err
    assert "rwkv2rknn-out/manifest.json: no manifest here" in err and "-o rwkv2rknn-out" in err
    assert list(tmp_path.iterdir()) == []


def test_report_shows_fallbacks_and_survives_missing_segment_files(split_out, tmp_path):
    out = _copy(split_out, tmp_path / "out")
    path = out / "manifest.json"
    data = json.loads(path.read_text())
    seg = next(s for g in data["graphs"] for s in g["segments"] if s["backend"] == "npu")
    seg.update(backend="cpu", fallback_reason="compiler crashed (SIGSEGV) in test")
    gone = next(s for g in data["graphs"] for s in g["segments"] if s is not seg)
    (out / gone["onnx"]).unlink()
    path.write_text(json.dumps(data))
    text = render_report(out)
    assert "compiler crashed (SIGSEGV) in test" in text
    assert "1 fell back" in text
    assert f"cannot read {gone['onnx']}" in text and "onnx missing" in text


@pytest.fixture(scope="module")
def chromium() -> str:
    """The chromium binary, or a skip before any model is built."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.skip("chromium is not on PATH; `make setup` installs Debian's chromium where apt-get is available")


def _read_png(path: Path) -> np.ndarray:
    """PNG -> uint8 [H, W, 3], with whichever decoder is installed."""
    try:
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB"))
    except ImportError:
        pass
    try:
        import matplotlib.image as mpimg
    except ImportError:
        pytest.skip("no PNG decoder (Pillow or matplotlib) installed to check the screenshot")
    img = mpimg.imread(str(path))
    return (img[..., :3] * 255).round().astype(np.uint8)


def _near(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(img.astype(int) - np.array(rgb)).max(axis=-1) <= tol).sum())


@pytest.mark.slow
def test_report_renders_in_headless_chromium(chromium, built_out, tmp_path):
    html_path = tmp_path / "report.html"
    assert main(["report", str(built_out), "-o", str(html_path)]) == 0
    png = tmp_path / "shot.png"
    # Offline and with a fresh profile: the page must render from the file alone.
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1400,2000",
           html_path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert png.is_file(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    img = _read_png(png)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    non_white = (img.min(axis=-1) < 235).mean()
    assert non_white > 0.05, f"only {non_white:.1%} of the page is not white: blank render?"
    colours = len(np.unique(img.reshape(-1, 3) // 8, axis=0))
    assert colours > 40, f"only {colours} distinct colours"
    # NPU boxes in the drawings, not just the legend badge; CPU boxes too.
    assert _near(img, NPU_GREEN) > 3000, "too little NPU green: the drawing did not render"
    assert _near(img, CPU_BLUE) > 3000, "too little CPU blue: the drawing did not render"


def test_doctor_prints_versions_and_exits_0(capsys):
    from importlib.metadata import version

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for pkg in ("numpy", "onnx", "onnxruntime"):
        assert pkg in out and version(pkg) in out, pkg
    assert "rknn-sim" in out and "rknn-lite" in out and "ort" in out
