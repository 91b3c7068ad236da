"""`rwkv2rknn export`: graph layout (the llama.onnx format), numerics against the reference, and the CLI."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_model
from onnx import TensorProto, numpy_helper
from rwkv_ref import RefModel, cosine, run_chain

from rwkv2rknn.families.rwkv4 import load_bin, load_pth, random_weights, save_bin, save_pth
from rwkv2rknn.cli import main as cli_main
from rwkv2rknn.errors import UserError
from rwkv2rknn.families.rwkv4 import export_model

MIXING_OPS = {"MatMul": 7, "ReduceMean": 4, "Sub": 6, "Pow": 2, "Sqrt": 2, "Div": 3, "Add": 17, "Mul": 21,
              "Gather": 5, "Sigmoid": 2, "Relu": 1, "Exp": 4, "Max": 2, "Cast": 6, "Reshape": 5,
              "Concat": 1, "Constant": 25}
TOKENS = np.random.default_rng(1234).integers(0, 256, 16)
ELEM = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT}


def io(model: onnx.ModelProto):
    def spec(v):
        t = v.type.tensor_type
        return v.name, t.elem_type, [d.dim_value for d in t.shape.dim]

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def op_counts(model) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def constant_tensors(model) -> dict[str, np.ndarray]:
    """Constant-node outputs and initializers by name."""
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


# -- numerics -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_logits():
    return RefModel(random_weights(2, 64, 256, seed=0)).run(TOKENS)


def test_fp32_matches_reference(tiny_fp32, reference_logits):
    got = run_chain(tiny_fp32, TOKENS)
    assert got.shape == (16, 256)
    err = np.abs(got - reference_logits).max()
    print(f"fp32 max abs logit error {err:.2e}")
    assert err <= 1e-4


def test_fp16_matches_reference(tiny_fp16, reference_logits):
    got = run_chain(tiny_fp16, TOKENS)
    cos = min(cosine(g, r) for g, r in zip(got, reference_logits))
    print(f"fp16 min cosine {cos:.6f}, max abs {np.abs(got - reference_logits).max():.2e}")
    assert cos >= 0.999


def test_initializers_variant_same_logits(tmp_path_factory, tiny_fp32):
    d = make_model(tmp_path_factory, dtype="float32", weights_as="initializers")
    np.testing.assert_array_equal(run_chain(d, TOKENS[:4]), run_chain(tiny_fp32, TOKENS[:4]))
    m = onnx.load(d / "mixing_0.onnx")
    assert "Constant" not in op_counts(m)
    floats = [i for i in m.graph.initializer if i.data_type == TensorProto.FLOAT]
    assert len(floats) == 25
    assert {k: v for k, v in op_counts(m).items()} == {k: v for k, v in MIXING_OPS.items()
                                                       if k not in ("Constant", "Cast")}


def test_reference_matches_rwkv_package(tmp_path):
    """Cross-check the numpy reference (and the .pth conventions) against the `rwkv` pip package."""
    pytest.importorskip("torch")
    os.environ.setdefault("RWKV_JIT_ON", "0")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    rwkv_model = pytest.importorskip("rwkv.model")
    w = random_weights(2, 32, 64, seed=7).materialize()
    save_pth(w, tmp_path / "m.pth")
    theirs = rwkv_model.RWKV(model=str(tmp_path / "m"), strategy="cpu fp32")
    ours = RefModel(w)
    state, st = None, ours.init_state()
    for t in (3, 7, 60, 5, 9, 9):
        out, state = theirs.forward([t], state)
        logits, st = ours.forward(t, st)
        assert np.abs(out.numpy() - logits).max() < 1e-4


def test_pth_and_bin_export_agree(tmp_path):
    w = random_weights(2, 64, 256, seed=11)
    save_pth(w, tmp_path / "m.pth")
    save_bin(load_pth(tmp_path / "m.pth"), tmp_path / "m.bin", "float32")
    save_bin(w, tmp_path / "m16.bin", "float16")
    ref = RefModel(load_pth(tmp_path / "m.pth")).run(TOKENS)
    outs = {}
    for name, loader in (("m.pth", load_pth), ("m.bin", load_bin), ("m16.bin", load_bin)):
        d = tmp_path / name.replace(".", "_")
        export_model(loader(tmp_path / name), d, dtype="float32", progress=False)
        outs[name] = run_chain(d, TOKENS)
    np.testing.assert_array_equal(outs["m.pth"], outs["m.bin"])  # bit-identical canonical weights
    assert np.abs(outs["m.pth"] - ref).max() <= 1e-4
    assert np.abs(RefModel(w).run(TOKENS) - ref).max() <= 1e-4  # raw decay roundtrip through the .pth
    assert min(cosine(a, b) for a, b in zip(outs["m16.bin"], ref)) >= 0.999


# -- structure ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_interfaces_and_structure(request, dtype):
    d = request.getfixturevalue("tiny_fp16" if dtype == "float16" else "tiny_fp32")
    C, V, f = 64, 256, ELEM[dtype]
    files = sorted(p.name for p in d.iterdir() if p.suffix == ".onnx")
    assert files == ["embed.onnx", "head.onnx", "mixing_0.onnx", "mixing_1.onnx"]
    expect = {
        "embed": ([("token", TensorProto.INT32, [1])], [("output", f, [C])]),
        "mixing_0": ([("input", f, [C]), ("state_in", f, [5, C])], [("output", f, [C]), ("state_out", f, [5, C])]),
        "mixing_1": ([("input", f, [C]), ("state_in", f, [5, C])], [("output", f, [C]), ("state_out", f, [5, C])]),
        "head": ([("x", f, [C])], [("output", f, [V])]),
    }
    for name, want in expect.items():
        m = onnx.load(d / f"{name}.onnx")
        onnx.checker.check_model(m, full_check=True)
        assert m.ir_version == 8
        assert [(o.domain, o.version) for o in m.opset_import] == [("", 16)]
        assert io(m) == want, name
        consts = constant_tensors(m)
        for t in consts.values():
            assert t.dtype in (np.int64, np.dtype(dtype)), (name, t.dtype)
        for n in m.graph.node:
            if n.op_type == "MatMul":
                wgt = consts[n.input[0]]  # the constant weight comes FIRST
                assert wgt.ndim == 2 and n.input[1] not in consts
    m = onnx.load(d / "mixing_0.onnx")
    counts = op_counts(m)
    want = dict(MIXING_OPS)
    if dtype == "float32":
        del want["Cast"]
    assert counts == want
    head = onnx.load(d / "head.onnx")
    assert op_counts(head)["MatMul"] == 1 and constant_tensors(head)["head.weight"].shape == (V, C)


def test_mixing_node_details(tiny_fp16):
    m = onnx.load(tiny_fp16 / "mixing_0.onnx")
    g = m.graph
    consts = constant_tensors(m)
    producers = {o: n for n in g.node for o in n.output}

    def attrs(n):
        return {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}

    matmul_shapes = sorted(consts[n.input[0]].shape for n in g.node if n.op_type == "MatMul")
    assert matmul_shapes == sorted([(64, 64)] * 5 + [(256, 64), (64, 256)])
    for n in g.node:
        if n.op_type == "ReduceMean":
            assert attrs(n) == {"axes": [-1], "keepdims": 1}
        if n.op_type == "Gather":
            assert n.input[0] == "state_in" and attrs(n)["axis"] == 0 and consts[n.input[1]].shape == ()
        if n.op_type == "Reshape":
            assert list(consts[n.input[1]]) == [1, -1]
        if n.op_type == "Max":  # kept in fp32 between Casts
            assert all(producers[i].op_type == "Cast" and attrs(producers[i])["to"] == TensorProto.FLOAT
                       for i in n.input)
        if n.op_type == "Pow":
            assert float(consts[n.input[1]]) == 2.0
    (concat,) = [n for n in g.node if n.op_type == "Concat"]
    assert attrs(concat)["axis"] == 0 and concat.output[0] == "state_out"
    assert all(producers[i].op_type == "Reshape" for i in concat.input)
    gathers = sorted(int(consts[n.input[1]]) for n in g.node if n.op_type == "Gather")
    assert gathers == [0, 1, 2, 3, 4]
    # LN parameters are not trivial: the Mul(gamma)/Add(beta) are real
    assert not np.allclose(consts["ln1.weight"].astype(np.float32), 1)


def test_state_rows(tiny_fp32):
    """state_out rows: 0 = LN2 out (ffn shift), 1 = LN1 out (att shift), 2 aa, 3 bb, 4 pp."""
    import onnxruntime as ort

    w = random_weights(2, 64, 256, seed=0)
    ref = RefModel(w)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(64)
    st = ref.init_state()[0]
    st[:2] = rng.standard_normal((2, 64))
    _, want = ref.block(0, x, st)
    sess = ort.InferenceSession(str(tiny_fp32 / "mixing_0.onnx"))
    _, got = sess.run(None, {"input": x.astype(np.float32), "state_in": st.astype(np.float32)})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# -- export_model and the CLI -------------------------------------------------------------------------

def test_export_refuses_foreign_dir(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    w = random_weights(1, 16, 32)
    with pytest.raises(UserError, match="--force"):
        export_model(w, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    files = export_model(w, out, force=True, progress=False)
    assert [p.name for p in files] == ["embed.onnx", "mixing_0.onnx", "head.onnx"]
    assert all(p.exists() for p in files) and not (out / "mine.txt").exists()
    # our own output is replaced without --force
    export_model(random_weights(2, 16, 32), out, progress=False)
    assert (out / "mixing_1.onnx").exists()


def test_cli_random_example(tmp_path, capsys):
    out = tmp_path / "m"
    assert cli_main(["export", "--random", "--layers", "2", "--embd", "256", "--vocab", "512",
                     "-o", str(out)]) == 0
    for name in ("embed.onnx", "mixing_0.onnx", "mixing_1.onnx", "head.onnx"):
        assert (out / name).exists()
    m = onnx.load(out / "mixing_0.onnx")
    f16 = TensorProto.FLOAT16
    assert io(m) == ([("input", f16, [256]), ("state_in", f16, [5, 256])],
                     [("output", f16, [256]), ("state_out", f16, [5, 256])])
    assert op_counts(m)["MatMul"] == 7
    assert io(onnx.load(out / "head.onnx"))[1] == [("output", f16, [512])]


def test_cli_checkpoint_and_options(tmp_path, capsys):
    w = random_weights(1, 32, 64, seed=2)
    save_bin(w, tmp_path / "m.bin", "float16")
    out = tmp_path / "out"
    assert cli_main(["export", str(tmp_path / "m.bin"), "-o", str(out), "--dtype", "float32",
                     "--weights-as", "initializers", "-q"]) == 0
    m = onnx.load(out / "mixing_0.onnx")
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert "Constant" not in op_counts(m)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["export", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--random" in text and ".pth" in text and "--weights-as" in text


@pytest.mark.parametrize("argv", [
    ["{d}/model.onnx"],                                          # unknown suffix
    ["{d}/missing.pth"],                                         # no such file
    ["{d}/trunc.bin"],                                           # damaged checkpoint
    ["--random", "--layers", "2", "--embd", "64"],               # --vocab missing
    ["--random", "--layers", "0", "--embd", "64", "--vocab", "8"],
    ["{d}/trunc.bin", "--random", "--layers", "1", "--embd", "8", "--vocab", "8"],
    ["{d}/trunc.bin", "--layers", "3"],
    [],                                                          # neither SRC nor --random
])
def test_cli_bad_inputs(tmp_path, capsys, argv):
    (tmp_path / "model.onnx").write_bytes(b"x")
    (tmp_path / "trunc.bin").write_bytes(b"fmgg" + b"\0" * 30)
    out = tmp_path / "out"
    argv = [a.format(d=tmp_path) for a in argv]
    assert cli_main(["export", *argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("rwkv2rknn export: error: ")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "trunc.bin"]


def test_cli_foreign_out_dir(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["export", "--random", "--layers", "1", "--embd", "16", "--vocab", "32", "-o", str(out)]
    assert cli_main(argv) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert cli_main([*argv, "--force", "-q"]) == 0


def test_cli_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "-m", "rwkv2rknn", "export", "--random", "--layers", "1", "--embd", "16",
                        "--vocab", "32", "-o", str(tmp_path / "m")], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert "wrote 3 RWKV-4 graphs" in r.stderr


@pytest.mark.slow
def test_export_430m_shape(tmp_path):
    """A 24 x 1024 model with vocab 50277 (the RWKV-4 430M shape) exports; prints the time."""
    t0 = time.perf_counter()
    files = export_model(random_weights(24, 1024, 50277), tmp_path / "m", progress=False)
    dt = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in files)
    print(f"\nexport 24x1024 vocab 50277 fp16: {dt:.1f}s, {size / 1e6:.0f} MB, {len(files)} files")
    assert len(files) == 26 and all(Path(p).exists() for p in files)
    m = onnx.load(files[5], load_external_data=False)
    assert op_counts(m)["MatMul"] == 7
