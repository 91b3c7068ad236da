"""Bad inputs through the real command line: exit 2, a short stderr naming the culprit, nothing written.

Every case builds its inputs in a fresh directory, snapshots it (paths, mtimes, sha256), runs the CLI
in a subprocess with that directory as cwd, and checks the snapshot is unchanged afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

from rwkv2rknn.manifest import Manifest

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")


# -- shared inputs (built once per module) ----------------------------------------------------------

@pytest.fixture(scope="module")
def res(tiny_fp16, model_factory, tmp_path_factory):
    """Shared, read-only inputs: the tiny model, a split of it, a narrower model, a dynamic graph."""
    from rwkv2rknn.split import split_model

    root = tmp_path_factory.mktemp("errors_res")
    split_model([tiny_fp16], root / "split", progress=False)
    dyn = onnx.load(str(model_factory(dtype="float32") / "mixing_0.onnx"))
    for v in list(dyn.graph.input) + list(dyn.graph.output):
        dims = v.type.tensor_type.shape.dim
        dims[-1].ClearField("dim_value")
        dims[-1].dim_param = "C"
    onnx.save(dyn, str(root / "dynamic.onnx"))
    return {"model": tiny_fp16, "narrow": model_factory(embd=32), "split": root / "split",
            "dynamic": root / "dynamic.onnx"}


def _copy_model(res, d: Path) -> Path:
    return Path(shutil.copytree(res["model"], d / "model"))


def _copy_split(res, d: Path) -> Path:
    return Path(shutil.copytree(res["split"], d / "out"))


def _edit_manifest(out: Path, fn) -> None:
    data = json.loads((out / "manifest.json").read_text())
    fn(data)
    (out / "manifest.json").write_text(json.dumps(data))


def _first_segment(out: Path) -> Path:
    data = json.loads((out / "manifest.json").read_text())
    return out / data["graphs"][1]["segments"][0]["onnx"]


def _big_tokenizer(path: Path, size: int = 300) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {f"w{i}": i for i in range(size - 1)}
    vocab["[UNK]"] = size - 1
    Tokenizer(WordLevel(vocab, unk_token="[UNK]")).save(str(path))
    return path


# -- the cases ------------------------------------------------------------------------------------

def _missing(res, d):
    return ["split", "nope.onnx", "-o", "out"], "nope.onnx"


def _text_file(res, d):
    (d / "notes.onnx").write_text("this is a README, not a model\n" * 20)
    return ["split", "notes.onnx", "-o", "out"], "notes.onnx"


def _empty(res, d):
    (d / "empty.onnx").write_bytes(b"")
    return ["split", "empty.onnx", "-o", "out"], "empty.onnx"


def _truncated(res, d):
    data = (res["model"] / "mixing_0.onnx").read_bytes()
    (d / "half.onnx").write_bytes(data[: len(data) // 2])
    return ["split", "half.onnx", "-o", "out"], "half.onnx"


def _dynamic(res, d):
    shutil.copy(res["dynamic"], d / "dyn.onnx")
    return ["split", "dyn.onnx", "-o", "sub/out"], ["dyn.onnx", "--shape input="]


def _shape_typo(res, d):
    shutil.copy(res["dynamic"], d / "dyn.onnx")
    return ["split", "dyn.onnx", "-o", "out", "--shape", "input=64", "--shape", "state_in=5,64",
            "--shape", "inptu=64"], "inptu"


def _shape_changes_static(res, d):
    shutil.copy(res["model"] / "mixing_0.onnx", d / "m.onnx")
    return ["split", "m.onnx", "-o", "out", "--shape", "input=32"], ["--shape input=32", "m.onnx"]


def _gap(res, d):
    m = _copy_model(res, d)
    (m / "mixing_1.onnx").rename(m / "mixing_2.onnx")
    return ["split", "model", "-o", "out"], ["model", "mixing_1.onnx"]


def _widths(res, d):
    m = _copy_model(res, d)
    shutil.copy(res["narrow"] / "mixing_1.onnx", m / "mixing_1.onnx")
    return ["split", "model", "-o", "out"], "mixing_1.onnx"


def _renamed_io(res, d):
    m = _copy_model(res, d)
    g = onnx.load(str(m / "mixing_1.onnx"))
    old = g.graph.input[0].name
    g.graph.input[0].name = "x_in"
    for n in g.graph.node:
        n.input[:] = ["x_in" if i == old else i for i in n.input]
    onnx.save(g, str(m / "mixing_1.onnx"))
    return ["split", "model", "-o", "out"], "mixing_1.onnx"


def _foreign_out(res, d):
    (d / "out").mkdir()
    (d / "out" / "thesis.tex").write_text("years of work\n")
    return ["split", str(res["model"]), "-o", "out"], ["out", "--force"]


def _out_under_a_file(res, d):
    (d / "notes.txt").write_text("a file, not a directory\n")
    return ["split", str(res["model"]), "-o", "notes.txt/out"], "notes.txt"


def _build_no_manifest(res, d):
    (d / "out").mkdir()
    return ["build", "out"], "out/manifest.json"


def _build_target(res, d):
    _copy_split(res, d)
    return ["build", "out", "--target", "rk9999"], "--target"


def _split_target(res, d):
    return ["split", str(res["model"]), "-o", "out", "--target", "rk9999"], "--target"


def _report_board(res, d):
    _copy_split(res, d)
    return ["report", "out", "--board", "rk9999"], "--board rk9999"


def _prefill_chunk_too_big(res, d):
    return ["split", str(res["model"]), "-o", "out", "--prefill-chunk", "100000"], "--prefill-chunk"


def _state_update_without_deep(res, d):
    return ["split", str(res["model"]), "-o", "out", "--state-update", "npu"], "--policy deep"


def _w8a8_bound_negative(res, d):
    _copy_split(res, d)
    return ["build", "out", "--precision", "w8a8", "--w8a8-max-rel-l2", "-1"], "--w8a8-max-rel-l2"


def _run_version_string(res, d):
    out = _copy_split(res, d)
    _edit_manifest(out, lambda m: m.update(format_version=str(m["format_version"])))
    return ["-m", "rwkv2rknn.run", "out", "--tokens", "1"], ["manifest.json", "not an integer"]


def _out_not_creatable(res, d):
    # a directory name longer than any filesystem allows (permissions would not stop root)
    return ["split", str(res["model"]), "-o", f"{'x' * 300}/out"], ["xxxxxxxx", "File name too long"]


def _newer(res, d):
    out = _copy_split(res, d)
    _edit_manifest(out, lambda m: m.update(format_version=99))
    return out


def _run_newer(res, d):
    _newer(res, d)
    return ["-m", "rwkv2rknn.run", "out", "--tokens", "1"], "manifest.json"


def _build_newer(res, d):
    _newer(res, d)
    return ["build", "out"], "manifest.json"


def _run_missing_segment(res, d):
    _first_segment(_copy_split(res, d)).unlink()
    return ["-m", "rwkv2rknn.run", "out", "--tokens", "1"], "mixing_0.s0.onnx"


def _build_missing_segment(res, d):
    _first_segment(_copy_split(res, d)).unlink()
    return ["build", "out"], "mixing_0.s0.onnx"


def _altered(res, d):
    seg = _first_segment(_copy_split(res, d))
    data = bytearray(seg.read_bytes())
    data[-1] ^= 1
    seg.write_bytes(bytes(data))


def _run_altered(res, d):
    _altered(res, d)
    return ["-m", "rwkv2rknn.run", "out", "--tokens", "1"], ["mixing_0.s0.onnx", "sha256"]


def _build_altered(res, d):
    _altered(res, d)
    return ["build", "out"], ["mixing_0.s0.onnx", "sha256"]


def _rknn_lite(res, d):
    _copy_split(res, d)
    return ["-m", "rwkv2rknn.run", "out", "--backend", "rknn-lite", "--tokens", "1"], "rknn-lite"


def _token_range(res, d):
    _copy_split(res, d)
    return ["-m", "rwkv2rknn.run", "out", "--tokens", "1,256"], ["--tokens", "256"]


def _big_vocab(res, d):
    _copy_split(res, d)
    _big_tokenizer(d / "big.json")
    return ["-m", "rwkv2rknn.run", "out", "--tokenizer", "big.json", "--prompt", "w1 w2"], "big.json"


def _split_big_vocab(res, d):
    m = _copy_model(res, d)
    _big_tokenizer(m / "tokenizer.json")
    return ["split", "model", "-o", "out"], "tokenizer.json"


def _garbage_pth(res, d):
    (d / "model.pth").write_bytes(os.urandom(4096))
    return ["export", "model.pth", "-o", "out"], "model.pth"


def _garbage_bin(res, d):
    (d / "model.bin").write_bytes(os.urandom(4096))
    return ["export", "model.bin", "-o", "out"], "model.bin"


@dataclass
class Case:
    id: str
    setup: Callable  # (res, workdir) -> (argv, words stderr must contain)


CASES = [
    Case("missing-path", _missing),
    Case("text-not-onnx", _text_file),
    Case("empty-file", _empty),
    Case("truncated-onnx", _truncated),
    Case("dynamic-dims-no-shape", _dynamic),
    Case("shape-unknown-name", _shape_typo),
    Case("shape-changes-static-dim", _shape_changes_static),
    Case("layer-gap", _gap),
    Case("layer-widths-differ", _widths),
    Case("mixing-io-renamed", _renamed_io),
    Case("out-dir-foreign-files", _foreign_out),
    Case("out-dir-under-a-file", _out_under_a_file),
    Case("build-no-manifest", _build_no_manifest),
    Case("build-unknown-target", _build_target),
    Case("split-unknown-target", _split_target),
    Case("report-unknown-board", _report_board),
    Case("split-prefill-chunk-too-big", _prefill_chunk_too_big),
    Case("split-state-update-without-deep", _state_update_without_deep),
    Case("build-w8a8-bound-negative", _w8a8_bound_negative),
    Case("run-format-version-string", _run_version_string),
    Case("split-out-not-creatable", _out_not_creatable),
    Case("run-newer-manifest", _run_newer),
    Case("build-newer-manifest", _build_newer),
    Case("run-missing-segment", _run_missing_segment),
    Case("build-missing-segment", _build_missing_segment),
    Case("run-segment-sha256", _run_altered),
    Case("build-segment-sha256", _build_altered),
    Case("run-rknn-lite-here", _rknn_lite),
    Case("run-token-out-of-vocab", _token_range),
    Case("run-tokenizer-vocab-too-big", _big_vocab),
    Case("split-tokenizer-vocab-too-big", _split_big_vocab),
    Case("export-garbage-pth", _garbage_pth),
    Case("export-garbage-bin", _garbage_bin),
]


def snapshot(root: Path) -> dict:
    """{relative path: (kind, mode, mtime_ns, sha256)} for everything under root."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            snap[str(p.relative_to(root))] = (p.is_dir(), st.st_mode, st.st_mtime_ns, digest)
    return snap


def cli(argv, cwd, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *argv] if argv[0] == "-m" else [sys.executable, "-m", "rwkv2rknn", *argv]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300, check=False, **kw)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_and_writes_nothing(case, res, tmp_path):
    argv, words = case.setup(res, tmp_path)
    words = [words] if isinstance(words, str) else words
    before = snapshot(tmp_path)
    before_shared = snapshot(res["split"].parent)
    r = cli(argv, tmp_path)
    print(f"[{case.id}] exit {r.returncode}: {r.stderr.strip()}")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert 1 <= len(err) <= 3, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    assert snapshot(tmp_path) == before, "the command created, changed or removed files"
    assert snapshot(res["split"].parent) == before_shared
    assert not (tmp_path / "out").exists() or "out" in before
    assert not (tmp_path / "sub").exists()


# -- the positive halves ------------------------------------------------------------------------------

def test_dynamic_dims_with_shape_split(res, tmp_path):
    shutil.copy(res["dynamic"], tmp_path / "dyn.onnx")
    r = cli(["split", "dyn.onnx", "-o", "out", "-q", "--shape", "input=64", "--shape", "state_in=5,64"], tmp_path)
    assert r.returncode == 0, r.stderr
    m = Manifest.load(tmp_path / "out" / "manifest.json")
    assert m.graphs[0]["inputs"][0]["shape"] == [64]


def test_out_dir_replacement(res, tmp_path):
    out = tmp_path / "out"
    # a previous rwkv2rknn output is replaced without --force, and its old files are gone
    r = cli(["split", str(res["model"]), "-o", "out", "-q", "--policy", "matmul"], tmp_path)
    assert r.returncode == 0, r.stderr
    old = {p.name for p in (out / "segments").iterdir()}
    r = cli(["split", str(res["model"]), "-o", "out", "-q"], tmp_path)
    assert r.returncode == 0, r.stderr
    new = {p.name for p in (out / "segments").iterdir() if p.is_file()}
    assert len(old) > len(new)  # matmul cuts more segments than fused; the manifest check below shows only new files remain
    m = Manifest.load(out / "manifest.json")
    assert m.data["policy"] == "fused"
    assert {Path(s["onnx"]).name for _, s in m.segments()} == new
    # the shared weights directory holds exactly the files the new segments refer to (no stale weights)
    held = {p.name for p in (out / "segments" / "weights").iterdir()}
    assert held == {Path(t["file"]).name for _, s in m.segments() for t in s.get("external_weights", [])}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or .old directories left
    # a directory of somebody else's files: refused above; replaced with --force
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work\n")
    r = cli(["split", str(res["model"]), "-o", "foreign", "-q", "--force"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (foreign / "thesis.tex").exists()
    Manifest.load(foreign / "manifest.json")
