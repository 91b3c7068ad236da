"""`rwkv2rknn build`: isolated compiles, bisection on crashes, simulator verification, cache, resumption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from build_testlib import make_manifest, run_chain_ort

from rwkv2rknn.cli import main
from rwkv2rknn.manifest import Manifest

pytest.importorskip("rknn.api", reason="rknn-toolkit2 is not installed")
pytestmark = pytest.mark.rknn

REPO = Path(__file__).resolve().parent.parent


def _segments(path):
    """The decode plan's segments with what the build made of them (the plan joined with build.json)."""
    data = Manifest.load(path, check_files=False).data
    return [s for g in data["graphs"] for s in g["segments"]]


def _npu_checked(manifest_path, threshold=0.999):
    m = Manifest.load(manifest_path)  # validates and checks every file's sha256
    npu = [s for _, s in m.segments() if s["backend"] == "npu"]
    assert npu
    for s in npu:
        assert m.resolve(s["rknn"]).is_file(), s["id"]
        assert s["verify"]["cosine"] >= threshold, s
        assert s["toolkit"] and s["precision"]
    return m


def _split_tiny(tmp_path_factory, out: Path) -> Path:
    from conftest import make_model

    from rwkv2rknn.split import split_model

    src = make_model(tmp_path_factory, layers=2, embd=64, vocab=256, dtype="float16")
    split_model([src], out, policy="fused", target="rk3588", prefill_chunk=0, progress=False)
    return out / "manifest.json"


def _logits(manifest_path, tokens=(1, 50, 200, 7)):
    from rwkv2rknn.run.chain import Chain, runner_factory

    m = Manifest.load(manifest_path)
    with Chain(m, runner_factory(m, "ort")) as chain:
        return np.stack([chain.step(t).copy() for t in tokens])


# -- hand-made manifests: fast ---------------------------------------------------------------------

def test_build_handmade_verifies_and_second_build_compiles_nothing(tmp_path, capsys):
    from rwkv2rknn.build import build_manifest
    from rwkv2rknn.verify import RUNTIME

    mpath = make_manifest(tmp_path / "out")
    first = build_manifest(tmp_path / "out", runtime=RUNTIME, jobs=2, progress=False)
    assert first.compiles == 2 and first.count("built") == 2
    m = _npu_checked(mpath)
    assert m.data["build"] == {"target": "rk3588", "precision": "fp16", "toolkit": first.toolkit}
    assert {s["id"]: s.get("rknn") for _, s in m.segments()} == {
        "g.s0": None, "g.s1": "rknn/g.s1.rknn", "g.s2": "rknn/g.s2.rknn"}
    before = mpath.read_bytes()

    assert main(["build", str(tmp_path / "out"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "0 compiles (" in out
    assert mpath.read_bytes() == before  # nothing changed, nothing written

    # A changed segment (its onnx differs) is stale: exactly that one compiles again.
    import onnx
    seg = tmp_path / "out" / "segments" / "g.s2.onnx"
    model = onnx.load(seg)
    model.doc_string = "edited"
    onnx.save(model, seg)
    data = json.loads(mpath.read_text())
    from rwkv2rknn.fsio import sha256_file
    data["graphs"][0]["segments"][2]["sha256"] = sha256_file(seg)
    mpath.write_text(json.dumps(data))
    again = build_manifest(tmp_path / "out", runtime=RUNTIME, jobs=2, progress=False)
    assert again.compiles == 1 and again.count("cached") == 1 and again.count("built") == 1
    _npu_checked(mpath)


def test_inject_crash_bisects_to_cpu_and_keeps_numbers(tmp_path, monkeypatch, capsys):
    mpath = make_manifest(tmp_path / "out")
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    before = run_chain_ort(mpath, {"x": x})["y"]
    monkeypatch.setenv("RWKV2RKNN_INJECT_CRASH", "g.s1")
    assert main(["build", str(tmp_path / "out"), "-q", "--jobs", "2"]) == 0
    captured = capsys.readouterr()
    segs = {s["id"]: s for s in _segments(mpath)}
    # g.s1 held 4 MatMuls: bisected twice down to single-MatMul pieces, which all crash too.
    assert [sid for sid in segs] == ["g.s0", "g.s1.a.a", "g.s1.a.b", "g.s1.b.a", "g.s1.b.b", "g.s2"]
    for sid in ("g.s1.a.a", "g.s1.a.b", "g.s1.b.a", "g.s1.b.b"):
        assert segs[sid]["backend"] == "cpu"
        assert segs[sid]["fallback_reason"] == "compiler crashed: SIGSEGV"
        assert (tmp_path / "out" / segs[sid]["onnx"]).is_file()
        assert segs[sid]["bisected_from"] == "g.s1"
    assert segs["g.s2"]["backend"] == "npu" and segs["g.s2"]["verify"]["cosine"] >= 0.999
    assert "compiler crashed: SIGSEGV" in captured.out
    Manifest.load(mpath)
    after = run_chain_ort(mpath, {"x": x})["y"]
    np.testing.assert_array_equal(before, after)
    placement = Manifest.load(mpath).data["graphs"][0]["placement"]
    assert {r["segment"] for r in placement} == set(segs)

    # The fallen-back pieces are not retried while nothing changed.
    from rwkv2rknn.build import build_manifest
    from rwkv2rknn.verify import RUNTIME
    again = build_manifest(tmp_path / "out", runtime=RUNTIME, progress=False)
    assert again.compiles == 0 and again.count("fallback") == 4


def test_hung_compile_times_out_and_falls_back(tmp_path):
    from rwkv2rknn.build import build_manifest
    from rwkv2rknn.verify import RUNTIME

    mpath = make_manifest(tmp_path / "out")
    report = build_manifest(tmp_path / "out", runtime=RUNTIME, timeout=0.3, jobs=2, progress=False)
    reasons = {s.get("fallback_reason") for s in _segments(mpath) if s["backend"] == "cpu"} - {None}
    assert reasons == {"compiler timed out after 0.3 s"}
    assert report.count("built") == 0
    Manifest.load(mpath)


def test_w8a8_handmade(tmp_path):
    from rwkv2rknn.build import build_manifest
    from rwkv2rknn.verify import RUNTIME

    mpath = make_manifest(tmp_path / "out")
    report = build_manifest(tmp_path / "out", runtime=RUNTIME, precision="w8a8", jobs=2, progress=False)
    assert report.count("built") == 2
    m = _npu_checked(mpath, threshold=0.99)
    assert all(s["precision"] == "w8a8" for _, s in m.segments() if s["backend"] == "npu")
    assert m.data["build"]["precision"] == "w8a8" and m.data["build"]["calib_sha256"]


def test_user_errors_exit_2(tmp_path, capsys, monkeypatch):
    assert main(["build", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "run `rwkv2rknn split" in err and err.count("\n") == 1
    make_manifest(tmp_path / "out")
    assert main(["build", str(tmp_path / "out"), "--target", "rk9999"]) == 2
    err = capsys.readouterr().err
    assert "rk9999" in err and "rk3588" in err and err.count("\n") == 1
    assert main(["build", str(tmp_path / "out"), "--calib", "x.txt"]) == 2
    err = capsys.readouterr().err
    assert "x.txt" in err and err.count("\n") == 1
    from rwkv2rknn.build import driver
    monkeypatch.setattr(driver, "toolkit_version", lambda: None)
    assert main(["build", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pip install rknn-toolkit2" in err and err.count("\n") == 1


def test_sigkill_mid_build_leaves_a_valid_manifest_and_resumes(tmp_path):
    out = tmp_path / "out"
    mpath = make_manifest(out)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "rwkv2rknn", "build", str(out), "-q", "--jobs", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3.5)  # the first compile is under way (or finished)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    Manifest.load(mpath)  # valid, and every file it names exists with its sha256
    time.sleep(0.5)
    orphans = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(out) in (p / "cmdline").read_bytes().decode(errors="replace"):
                    orphans.append(p.name)
            except OSError:
                pass
    assert not orphans, "compile workers outlived their build"
    assert subprocess.run([sys.executable, "-m", "rwkv2rknn", "build", str(out), "-q"], check=False, env=env,
                          capture_output=True).returncode == 0
    _npu_checked(mpath)
    assert not list((out / "rknn").glob(".*.tmp"))


# -- a real split of a tiny exported model -------------------------------------------------------

def test_build_split_model_end_to_end(tmp_path, tmp_path_factory, monkeypatch, capsys):
    mpath = _split_tiny(tmp_path_factory, tmp_path / "out")
    reference = _logits(mpath)
    assert main(["build", str(tmp_path / "out"), "-q", "--target", "rk3588"]) == 0
    _npu_checked(mpath)
    assert main(["build", str(tmp_path / "out"), "-q"]) == 0
    assert "0 compiles (" in capsys.readouterr().out

    # A crash on one layer's NPU segment: exit 0, that work moves to the CPU, logits unchanged.
    crashed = tmp_path / "crashed"
    _split_tiny(tmp_path_factory, crashed)
    npu_ids = [s["id"] for s in _segments(crashed / "manifest.json") if s["backend"] == "npu"]
    victim = npu_ids[0]
    monkeypatch.setenv("RWKV2RKNN_INJECT_CRASH", victim)
    assert main(["build", str(crashed), "-q"]) == 0
    segs = _segments(crashed / "manifest.json")
    fallen = [s for s in segs if s.get("fallback_reason")]
    assert fallen and all(s["id"].startswith(victim) and s["backend"] == "cpu" for s in fallen)
    assert all(s["fallback_reason"] == "compiler crashed: SIGSEGV" for s in fallen)
    assert victim not in {s["id"] for s in segs} or len(fallen) == 1
    np.testing.assert_allclose(_logits(crashed / "manifest.json"), reference, rtol=0, atol=1e-5)


@pytest.mark.slow  # w8a8 of a split model runs in the default suite in the per-segment fallback test below
def test_w8a8_split_model_with_calib_text(tmp_path, tmp_path_factory):
    from rwkv2rknn.build import build_manifest
    from rwkv2rknn.verify import RUNTIME

    mpath = _split_tiny(tmp_path_factory, tmp_path / "out")
    calib = tmp_path / "calib.txt"
    calib.write_text("Once upon a time, a small model learned to count: 1 2 3.\n")
    report = build_manifest(tmp_path / "out", runtime=RUNTIME, precision="w8a8", calib=str(calib), progress=False)
    assert report.count("built") >= 1
    _npu_checked(mpath, threshold=0.99)
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3 40 50 60")
    again = build_manifest(tmp_path / "out", runtime=RUNTIME, precision="w8a8", calib=str(ids), progress=False)
    assert again.compiles == report.count("built")  # a new calibration set is a new build key


def test_fp16_build_records_rel_l2_and_the_whole_model_check(tmp_path, tmp_path_factory, capsys):
    mpath = _split_tiny(tmp_path_factory, tmp_path / "out")
    assert main(["build", str(tmp_path / "out"), "-q"]) == 0
    out = capsys.readouterr().out
    m = _npu_checked(mpath)
    for _, s in m.segments():
        if s["backend"] == "npu":
            assert 0 <= s["verify"]["rel_l2"] <= 1e-2, s["verify"]
            assert s["verify"]["worst_output"] in {t["name"] for t in s["outputs"]}
    check = m.data["build"]["verify_model"]
    assert check["tokens"] >= 16 and check["logits_cosine_min"] >= 0.999 and check["argmax_agree"] >= 0.9
    # the compiler's own per-op table, and the estimate using it
    from rwkv2rknn.cost import estimate, load_profile
    est = estimate(m.data, load_profile("rk3588"))
    priced = {s.id: s for plan in (est.decode, est.prefill) if plan is not None for g in plan.graphs for s in g.segments}
    for _, s in m.segments():
        if s["backend"] == "npu":
            t = s["compiler"]
            assert t["cycles"] > 0 and t["ops"] > 0 and isinstance(t["cpu_ops"], list), t
            assert priced[s["id"]].compiler_table and priced[s["id"]].hops == len(t["cpu_ops"])
            assert s["core_mask"] in (1, 7)
    assert "whole model (" in out and "worst rel_l2" in out and "warning" not in out
    # nothing changed: the check is not run again
    first = dict(check)
    assert main(["build", str(tmp_path / "out"), "-q"]) == 0
    assert Manifest.load(mpath).data["build"]["verify_model"] == first


def test_w8a8_build_runs_in_the_simulator_and_falls_back_to_fp16_per_segment(tmp_path, tmp_path_factory):
    from rwkv2rknn.build import build_manifest
    from rwkv2rknn.verify import RUNTIME
    from rwkv2rknn.run.chain import Chain, runner_factory

    mpath = _split_tiny(tmp_path_factory, tmp_path / "out")
    reference = _logits(mpath)
    report = build_manifest(tmp_path / "out", runtime=RUNTIME, precision="w8a8", progress=False, verify_model=False)
    m = Manifest.load(mpath)
    npu = [s for _, s in m.segments() if s["backend"] == "npu"]
    assert report.count("built") == len(npu)
    for s in npu:
        if s["precision"] == "w8a8":
            assert (m.root / s["calib"]).is_file() and s["verify"]["rel_l2"] <= 0.05
        else:  # fell back to fp16 because w8a8 lost too much: says why
            assert "built fp16 instead" in s["precision_reason"]
    with Chain(m, runner_factory(m, "rknn-sim")) as chain:  # needed the recorded calibration data
        got = np.stack([chain.step(t).copy() for t in (1, 50, 200, 7)])
    for g, r in zip(got, reference):
        assert float(g @ r / np.linalg.norm(g) / np.linalg.norm(r)) >= 0.99

    # A limit no w8a8 segment meets: every segment is built fp16, with the reason recorded.
    build_manifest(tmp_path / "out", runtime=RUNTIME, precision="w8a8", progress=False, verify_model=False, max_rel_l2=1e-9)
    m = Manifest.load(mpath)
    for _, s in m.segments():
        if s["backend"] == "npu":
            assert s["precision"] == "fp16" and "rel_l2" in s["precision_reason"] and "calib" not in s


def test_text_ids_without_a_tokenizer_fall_back_to_fixed_ids(model_factory, tmp_path, capsys):
    """A GPT-NeoX-vocab model split without tokenizer.json (the usual RWKV-4 Pile conversion) still builds:
    the built-in text cannot be read, so verification uses a fixed spread of ids and says so; a user's own
    --calib text without a tokenizer is a one-line error."""
    from rwkv2rknn.build.inputs import MIN_CHECK_TOKENS, calib_tokens
    from rwkv2rknn.errors import UserError
    from rwkv2rknn.split import split_model
    from rwkv2rknn.verify import RUNTIME

    data, _ = split_model([model_factory(layers=1, embd=64, vocab=50277)], tmp_path / "out", prefill_chunk=0,
                          progress=False)
    assert data["model"]["tokenizer"] == "neox"
    m = Manifest.load(tmp_path / "out" / "manifest.json")
    ids = calib_tokens(m, None, MIN_CHECK_TOKENS, RUNTIME)
    assert len(ids) >= MIN_CHECK_TOKENS and all(0 <= i < 50277 for i in ids)
    assert "fixed spread of token ids" in capsys.readouterr().err
    text = tmp_path / "calib.txt"
    text.write_text("some words")
    with pytest.raises(UserError, match="tokenizer"):
        calib_tokens(m, str(text), MIN_CHECK_TOKENS, RUNTIME)


def test_w8a8_keep_fp16_patterns_pick_segments_by_id():
    from rwkv2rknn.build.jobs import build_key, segment_precision

    assert segment_precision("head.s0", "w8a8", ("head.*",)) == ("fp16", "kept fp16 by --w8a8-keep-fp16 head.*")
    assert segment_precision("mixing_0.s1", "w8a8", ("head.*",)) == ("w8a8", None)
    assert segment_precision("head.s0", "fp16", ("head.*",)) == ("fp16", None)  # only w8a8 builds change
    assert segment_precision("mixing_10.s1", "w8a8", ("mixing_1.*",)) == ("w8a8", None)
    # the cache key follows the precision a segment is built at
    assert build_key("x", "2.5.0", "rk3588", "fp16", "c", 0.05) != build_key("x", "2.5.0", "rk3588", "w8a8", "c", 0.05)


def test_bisect_cuts_a_merged_prefill_segment_into_halves_that_chain_to_it(tmp_path):
    """A stored segment keeps only its boundary's shapes; bisecting a deep prefill group's NPU segment (the path a
    compile timeout takes) failed on a tensor inside without a static shape. The halves, chained on onnxruntime,
    give the whole segment's outputs."""
    import onnxruntime as ort

    from rwkv2rknn import families
    from rwkv2rknn.build.jobs import bisect_segment
    from rwkv2rknn.split import split_model

    fam = families.get("rwkv7")
    fam.export(fam.random_weights(2, 64, 64, seed=0), tmp_path / "m", dtype="float16", progress=False)
    data, _ = split_model([tmp_path / "m"], tmp_path / "out", policy="deep", layers_per_call=2, prefill_chunk=4,
                          progress=False)
    seg = next(s for g in data["prefill"]["graphs"] if g["name"].startswith("prefill.group_")
               for s in g["segments"] if s["backend"] == "npu")
    path = tmp_path / "out" / seg["onnx"]
    halves = bisect_segment(path)
    assert halves is not None and len(halves) == 2
    whole = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {i.name: (rng.standard_normal([d for d in i.shape]) * 0.5).astype(
        np.float16 if "float16" in i.type else np.float32) for i in whole.get_inputs()}
    want = dict(zip([o.name for o in whole.get_outputs()], whole.run(None, feeds)))
    values = dict(feeds)
    for h in halves:
        s = ort.InferenceSession(h.model.SerializeToString(), providers=["CPUExecutionProvider"])
        values.update(zip([o.name for o in s.get_outputs()], s.run(None, {i.name: values[i.name]
                                                                          for i in s.get_inputs()})))
    for name, w in want.items():
        np.testing.assert_allclose(values[name].astype(np.float32), w.astype(np.float32), rtol=1e-3, atol=1e-3)
