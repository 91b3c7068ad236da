"""`rwkv2rknn split` as a user runs it: manifests, segment counts, numbers against the source graphs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from rwkv2rknn.cli import main as cli_main
from rwkv2rknn.manifest import Manifest
from rwkv2rknn.feeds import random_feed
from rwkv2rknn.run.chain import Chain
from rwkv2rknn.split import split_model


def _fp32_session(path: Path) -> ort.InferenceSession:
    """The source graph with fp16 weights and I/O upcast to fp32: the reference a split must reproduce."""
    from onnx import numpy_helper

    m = onnx.load(str(path))
    for t in m.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for n in m.graph.node:
        for a in n.attribute:
            if a.name == "value" and a.t.data_type == onnx.TensorProto.FLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32)))
            if n.op_type == "Cast" and a.name == "to" and a.i == onnx.TensorProto.FLOAT16:
                a.i = onnx.TensorProto.FLOAT
    for v in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _assert_chain_matches_sources(out: Path, n_feeds: int = 3) -> None:
    manifest = Manifest.load(out / "manifest.json")
    rng = np.random.default_rng(0)
    with Chain(manifest) as chain:
        for g in manifest.graphs:
            ref = _fp32_session(manifest.resolve(g["source"]["path"]))
            paths = [manifest.resolve(s["onnx"]) for s in g["segments"]]
            for _ in range(n_feeds):
                feed = random_feed(g["inputs"], rng, paths)
                got = chain.run_graph(g["name"], feed)
                want = dict(zip([o.name for o in ref.get_outputs()], ref.run(None, feed)))
                for name, w in want.items():
                    err = np.abs(got[name] - w).max() / max(1.0, np.abs(w).max())
                    assert err <= 1e-5, f"{g['name']}:{name} relative error {err:.3g}"


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("policy", ["fused", "matmul", "layer", "cpu"])
def test_split_model_reproduces_every_graph(model_factory, tmp_path, dtype, policy):
    # 128 wide: at 64 the att MatMuls are too small to pay for an NPU call and fold back to the CPU
    model = model_factory(dtype=dtype, embd=128)
    # fp32 boundaries: the cut alone, exact (the board's fp16 boundaries: tests/passes/test_passes_boundary.py
    # and the whole-model checks)
    data, reports = split_model([model], tmp_path / "out", policy=policy, progress=False, npu_io="float32")
    assert [g["name"] for g in data["graphs"]] == ["embed", "mixing_0", "mixing_1", "head"]
    _assert_chain_matches_sources(tmp_path / "out")
    mixing = [r for r in reports if r.name.startswith("mixing")]
    if policy == "fused":
        assert all(r.npu_segments <= 2 and r.cpu_segments <= 3 for r in mixing)
        assert all(r.npu_share >= 0.99 for r in mixing)
    elif policy == "matmul":
        assert all(r.npu_segments == 7 for r in mixing)
    elif policy == "cpu":
        assert all(r.npu_segments == 0 and r.cpu_segments == 1 for r in reports)
    else:
        assert all(r.npu_segments == 1 and r.cpu_segments == 0 for r in mixing)


def test_weights_as_initializers_split_the_same(model_factory, tmp_path):
    model = model_factory(weights_as="initializers")
    split_model([model], tmp_path / "out", progress=False, npu_io="float32")
    _assert_chain_matches_sources(tmp_path / "out")


def test_manifest_contract(tiny_fp16, tmp_path):
    data, _ = split_model([tiny_fp16], tmp_path / "out", progress=False)
    assert data["format_version"] == 3 and data["target"] == "rk3588"
    m = data["model"]
    assert m["vocab_size"] == 256 and m["n_layer"] == 2 and m["n_embd"] == 64 and m["tokenizer"] == "bytes"
    assert m["token_input"] == {"graph": "embed", "name": "token"}
    links = [ln for ln in m["links"] if not ln["to"]["name"].endswith("@fp16")]
    assert [(ln["from"]["graph"], ln["to"]["graph"]) for ln in links] == [
        ("embed", "mixing_0"), ("mixing_0", "mixing_1"), ("mixing_1", "head")]
    # an fp16 copy a graph reads (its NPU segment's input) is linked from the same source
    for ln in m["links"]:
        if ln["to"]["name"].endswith("@fp16"):
            base = {**ln["to"], "name": ln["to"]["name"][:-len("@fp16")]}
            assert any(x["from"] == ln["from"] and x["to"] == base for x in links)
    assert [s["graph"] for s in m["state"]] == ["mixing_0", "mixing_1"]
    # fp16 sources start pp at 0: -1e30 does not survive float16 (shared/docs/llama-onnx-rwkv4.md)
    assert m["state"][0]["init"] == {"fill": 0.0, "rows": {}}
    for g in data["graphs"]:
        segs = g["segments"]
        assert all(s["id"].startswith(g["name"] + ".") for s in segs)
        # the first segment reads the graph's own input names, the graph outputs come out by name
        produced = {t["name"] for s in segs for t in s["outputs"]}
        assert {t["name"] for t in g["outputs"]} <= produced
        assert all(t["dtype"] in ("float32", "float16", "int32", "int64") for s in segs
                   for t in s["inputs"] + s["outputs"])
        for s in segs:  # the board's dtypes: an NPU segment reads and writes fp16 only
            if s["backend"] == "npu":
                assert {t["dtype"] for t in s["inputs"] + s["outputs"]} == {"float16"}
            onnx.checker.check_model(onnx.load(str(tmp_path / "out" / s["onnx"])))
    mixing = data["graphs"][1]
    assert {"input", "state_in"} <= {t["name"] for t in mixing["inputs"]}
    assert {t["name"]: t["dtype"] for t in mixing["inputs"]}["state_in"] == "float32"  # fp16 folding is off


def test_fp32_source_starts_pp_at_minus_1e30(tiny_fp32, tmp_path):
    data, _ = split_model([tiny_fp32], tmp_path / "out", progress=False)
    assert data["model"]["state"][0]["init"]["rows"] == {"4": -1e30}


def test_single_file_split_and_default_out(tiny_fp16, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["split", str(tiny_fp16 / "mixing_0.onnx"), "-q", "--npu-io", "float32"]) == 0
    data = json.loads((tmp_path / "rwkv2rknn-out" / "manifest.json").read_text())
    assert data["model"] is None and [g["name"] for g in data["graphs"]] == ["mixing_0"]
    _assert_chain_matches_sources(tmp_path / "rwkv2rknn-out")


def test_preview_writes_nothing_and_gives_reasons(tiny_fp16, tmp_path, capsys):
    assert cli_main(["split", str(tiny_fp16), "-o", str(tmp_path / "out"), "--preview", "-q"]) == 0
    assert not (tmp_path / "out").exists()
    text = capsys.readouterr().out
    assert "MatMul" in text and "Exp" in text and "precision" in text.lower()


def test_resplit_replaces_own_output_but_refuses_foreign_dir(tiny_fp16, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["split", str(tiny_fp16), "-o", str(out), "-q"]) == 0
    assert cli_main(["split", str(tiny_fp16), "-o", str(out), "-q", "--policy", "matmul"]) == 0
    assert json.loads((out / "manifest.json").read_text())["policy"] == "matmul"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli_main(["split", str(tiny_fp16), "-o", str(foreign), "-q"]) == 2
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def _run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rwkv2rknn", *args], capture_output=True, text=True, cwd=cwd)


def test_model_dir_with_gap_is_refused(tiny_fp16, tmp_path):
    bad = tmp_path / "gap"
    shutil.copytree(tiny_fp16, bad)
    (bad / "mixing_1.onnx").rename(bad / "mixing_2.onnx")
    r = _run_cli("split", str(bad), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and "gap" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_layers_of_different_widths_are_refused(model_factory, tmp_path):
    bad = tmp_path / "mixed"
    shutil.copytree(model_factory(), bad)
    shutil.copy(model_factory(embd=32) / "mixing_1.onnx", bad / "mixing_1.onnx")
    r = _run_cli("split", str(bad), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and "width" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_rewrite_keeps_files_the_user_added(tiny_fp16, tmp_path):
    """A directory rwkv2rknn made is replaced whole, but not over files someone put in it since."""
    out = tmp_path / "out"
    assert cli_main(["split", str(tiny_fp16), "-o", str(out), "-q"]) == 0
    # what later steps write there (build, report) is the tool's own: still replaceable
    (out / "rknn").mkdir()
    (out / "rknn" / "x.rknn").write_bytes(b"\0")
    (out / "report.html").write_text("<html></html>")
    assert cli_main(["split", str(tiny_fp16), "-o", str(out), "-q"]) == 0
    assert not (out / "report.html").exists()
    (out / "notes.txt").write_text("mine")
    assert cli_main(["split", str(tiny_fp16), "-o", str(out), "-q"]) == 2
    assert (out / "notes.txt").read_text() == "mine"
    assert cli_main(["split", str(tiny_fp16), "-o", str(out), "-q", "--force"]) == 0
    assert not (out / "notes.txt").exists()
