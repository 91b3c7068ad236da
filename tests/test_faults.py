"""Faults: a split killed mid-run, a swap killed between its two renames, and file modes of outputs.

(`build` killed mid-run: tests/test_build.py::test_sigkill_mid_build_leaves_a_valid_manifest_and_resumes.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rwkv2rknn import fsio
from rwkv2rknn.manifest import Manifest

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")


def _split(model: Path, out: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rwkv2rknn", "split", str(model), "-o", str(out), "-q",
                             *extra], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stage_with_segments(out: Path) -> Path | None:
    for p in out.parent.glob(f".{out.name}.*.tmp"):
        seg = p / "segments"
        if seg.is_dir() and any(seg.iterdir()):
            return p
    return None


@pytest.mark.parametrize("previous", [True, False], ids=["over-previous-output", "fresh"])
def test_sigkill_mid_split(model_factory, tmp_path, previous):
    model = model_factory(layers=8, embd=512)
    out = tmp_path / "out"
    before = None
    if previous:
        p = _split(model, out, "--policy", "matmul")
        assert p.wait(timeout=300) == 0, p.stderr.read()
        before = (out / "manifest.json").read_bytes()
    proc = _split(model, out)
    deadline = time.monotonic() + 120
    while _stage_with_segments(out) is None:
        assert proc.poll() is None, "split finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if previous:
        m = Manifest.load(out / "manifest.json")  # every file it names is there with its sha256
        assert (out / "manifest.json").read_bytes() == before and m.data["policy"] == "matmul"
    else:
        assert not out.exists()
    assert _stage_with_segments(out) is not None  # what the kill left behind...
    p = _split(model, out)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    assert Manifest.load(out / "manifest.json").data["policy"] == "fused"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]  # ...the rerun cleared


_KILL_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    from rwkv2rknn import fsio
    fsio._exchange = lambda a, b: False           # a filesystem without renameat2 exchange
    real = os.replace
    calls = []
    def replace(a, b):
        real(a, b)
        calls.append(a)
        if len(calls) == 1:                       # the previous output is moved away: die now
            os.kill(os.getpid(), signal.SIGKILL)
    fsio.os.replace = replace
    with fsio.staged_directory(sys.argv[1]) as stage:
        (stage / "manifest.json").write_text("new")
""")


def test_kill_between_the_two_renames_is_recovered(tmp_path):
    out = tmp_path / "out"
    with fsio.staged_directory(out) as stage:
        (stage / "manifest.json").write_text("old")
    r = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(out)], env=ENV, check=False)
    assert r.returncode == -signal.SIGKILL
    assert not out.exists()  # the window: only .out.old-PID and the staging directory are left
    assert any(p.name.startswith(".out.old-") for p in tmp_path.iterdir())
    # the next run puts the previous output back before anything else, so a failing run keeps it
    with pytest.raises(RuntimeError), fsio.staged_directory(out):
        assert (out / "manifest.json").read_text() == "old"
        raise RuntimeError("the new run fails")
    assert (out / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with fsio.staged_directory(out) as stage:
        (stage / "manifest.json").write_text("new")
    assert (out / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_exchange_swap_replaces_and_cleans(tmp_path):
    out = tmp_path / "out"
    for text in ("one", "two"):
        with fsio.staged_directory(out) as stage:
            (stage / "f").write_text(text)
    assert (out / "f").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_live_runs_staging_is_not_touched(tmp_path):
    out = tmp_path / "out"
    mine = tmp_path / f".out.{os.getpid()}.abcd1234.tmp"  # this process is alive
    mine.mkdir()
    with fsio.staged_directory(out) as stage:
        (stage / "f").write_text("x")
    assert mine.is_dir()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_output_modes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with fsio.staged_directory(tmp_path / "out") as stage:
            (stage / "segments").mkdir()
        fsio.write_json_atomic(tmp_path / "out" / "manifest.json", {"a": 1})
        with fsio.atomic_path(tmp_path / "logits.npy") as tmp, open(tmp, "wb") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    def mode(p):
        return p.stat().st_mode & 0o777
    assert mode(tmp_path / "out") == 0o777 & ~umask
    assert mode(tmp_path / "out" / "segments") == 0o777 & ~umask
    assert mode(tmp_path / "out" / "manifest.json") == 0o666 & ~umask
    assert mode(tmp_path / "logits.npy") == 0o666 & ~umask
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == {"a": 1}


def test_split_output_modes(tiny_fp16, tmp_path):
    old = os.umask(0o022)
    try:
        p = _split(tiny_fp16, tmp_path / "out")
        assert p.wait(timeout=300) == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o755
    for f in [out / "manifest.json", *(out / "segments").rglob("*")]:
        assert f.stat().st_mode & 0o777 == (0o755 if f.is_dir() else 0o644), f
