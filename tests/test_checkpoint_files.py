"""Checkpoint files other than a .pth: rwkv.cpp .bin files of every version and fla-hub RWKV-7 directories.

The files are written by test-side writers (tests/ggml_writer.py follows rwkv.cpp's converter,
tests/fla_writer.py fla's) from .pth state dicts, so every check compares against the .pth they came from:
- reading gives the .pth's names, shapes and values (exact, except the decays rwkv.cpp keeps only through
  exp for RWKV-4/5, which must give the stored value back);
- `rwkv2rknn export` of the file gives the graphs, and onnxruntime the logits, of the .pth's export;
- versions without a family in this tool are checked at the state-dict level and, through the `rwkv`
  package, at the logits level;
- bad files end as one line and exit status 2.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fla_writer import write_fla
from ggml_writer import write_rwkvcpp
from pth_layouts import VERSIONS, random_state_dict, save_pth
from rwkv_ref import cosine, run_chain

from rwkv2rknn import families
from rwkv2rknn.families import rwkvcpp
from rwkv2rknn.families.rwkv7 import flahub
from rwkv2rknn.cli import main
from rwkv2rknn.errors import UserError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]
TOKENS = [34, 105, 110, 32, 116, 104, 101, 10, 200, 7]
RWKVCPP_VERSION = {"x040": "4", "x050": "5.1", "x052": "5.2", "x060": "6", "x070": "7"}
# Tensors rwkv.cpp stores only through exp: (name suffix, the function of it the file holds).
EXP_STORED = {
    "4": {"att.time_decay": lambda t: -np.exp(t)},
    "5.1": {"att.time_decay": lambda t: np.exp(-np.exp(t)), "att.time_first": np.exp},
    "5.2": {"att.time_decay": lambda t: np.exp(-np.exp(t))},
}


def _torch_sd(path) -> dict[str, np.ndarray]:
    import torch

    return {k: v.float().numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}


def _assert_state_dicts_equal(got: dict, want: dict, version: str, dtype=np.float32, squeeze_time=False):
    """Same names, shapes, values (values as stored: `want` cast to each tensor's dtype in the file)."""
    assert set(got) == set(want), set(got) ^ set(want)
    for name, w in want.items():
        g = got[name]
        w = np.asarray(w)
        if squeeze_time and ".time_" in name:  # the project's own RWKV-4 .pth keeps every time_* [1, 1, C]
            w = w.reshape(g.shape)
        assert g.shape == w.shape, (name, g.shape, w.shape)
        short = name.split(".", 2)[2] if name.startswith("blocks.") else name
        f = EXP_STORED.get(version, {}).get(short)
        if f is None:
            np.testing.assert_array_equal(g, w.astype(g.dtype), err_msg=name)
            continue
        # stored as f(t): reading gives t back to float32 rounding, and f of it gives the stored value
        stored = f(w.astype(np.float32))
        np.testing.assert_allclose(f(np.asarray(g, np.float32)), stored, rtol=4e-7, atol=0, err_msg=name)
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4, err_msg=name)
    return True


# -- rwkv.cpp: state dicts ------------------------------------------------------------------------------

@pytest.mark.parametrize("data_type", ["FP32", "FP16"])
@pytest.mark.parametrize("version", VERSIONS)
def test_bin_reads_back_the_pth_state_dict(tmp_path, version, data_type):
    sd = random_state_dict(version, seed=1)
    path = tmp_path / f"{version}.bin"
    write_rwkvcpp(sd, path, data_type)
    got_version, got = rwkvcpp.read_state_dict(path)
    assert got_version == RWKVCPP_VERSION[version]
    _assert_state_dicts_equal(got, sd, got_version)
    matrices = {k: a.dtype for k, a in got.items() if k.endswith(("key.weight", "emb.weight", "head.weight"))}
    assert set(matrices.values()) == {np.dtype(np.float16 if data_type == "FP16" else np.float32)}
    if version == "x070":  # the six mixes came out of att.x_rwkvag in r w k v a g order, each its own tensor
        for q in "rwkvag":
            np.testing.assert_array_equal(got[f"blocks.1.att.x_{q}"], sd[f"blocks.1.att.x_{q}"])
        assert "blocks.0.att.v1" in got  # rwkv.cpp keeps layer 0's unused value LoRA
    if version in ("x060", "x070"):  # the check can fail: a transposed LoRA read as stored would differ
        raw = rwkvcpp.scan(path).tensors
        moved = [k for k in sd if k.endswith(("att.w1", "time_maa_w2", "att.time_decay_w1"))]
        assert moved and all(raw[k].shape != sd[k].shape for k in moved)


def test_bin_of_the_trained_fixtures_reads_back(tmp_path):
    for name in ("rwkv4-tiny-trained", "rwkv7-tiny-trained"):
        sd = _torch_sd(FIXTURES / f"{name}.pth")  # fp16 values, held as float32
        write_rwkvcpp(sd, tmp_path / f"{name}.bin", "FP16")
        version, got = rwkvcpp.read_state_dict(tmp_path / f"{name}.bin")
        assert version == name[4]
        _assert_state_dicts_equal(got, sd, version, squeeze_time=True)


def _rwkv_package(version_env: dict, monkeypatch):
    pytest.importorskip("torch")
    rwkv = pytest.importorskip("rwkv")
    for k, v in {"RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0", **version_env}.items():
        monkeypatch.setenv(k, v)
    spec = importlib.util.spec_from_file_location("_rwkv_model_ckpt", os.path.join(os.path.dirname(rwkv.__file__),
                                                                                 "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package_logits(module, pth: Path) -> np.ndarray:
    model = module.RWKV(model=str(pth.with_suffix("")), strategy="cpu fp32", verbose=False)
    state, out = None, []
    for t in TOKENS:
        logits, state = model.forward([t], state)
        out.append(logits.double().numpy())
    return np.stack(out)


@pytest.mark.parametrize("version", [pytest.param("x050", marks=pytest.mark.slow), "x052", "x060"])
def test_bin_v5_v6_logits_through_the_rwkv_package(tmp_path, monkeypatch, version):
    """The RWKV-5/6 state dicts read from a .bin run in the `rwkv` package like the .pth they came from."""
    module = _rwkv_package({}, monkeypatch)
    sd = random_state_dict(version, seed=2)
    save_pth(sd, tmp_path / "orig.pth")
    write_rwkvcpp(sd, tmp_path / "m.bin", "FP32")
    _, got = rwkvcpp.read_state_dict(tmp_path / "m.bin")
    save_pth({k: np.asarray(v, np.float32) for k, v in got.items()}, tmp_path / "back.pth")
    want, have = _package_logits(module, tmp_path / "orig.pth"), _package_logits(module, tmp_path / "back.pth")
    cos = min(cosine(a, b) for a, b in zip(want, have))
    diff = np.abs(want - have).max()
    print(f"{version}: .bin vs .pth through the rwkv package: min cosine {cos:.12f}, max |diff| {diff:.2e}")
    if version == "x060":  # nothing lossy: the same tensors
        np.testing.assert_array_equal(have, want)
    else:  # the decay went through exp(-exp(.)) and back
        assert cos >= 0.9999999 and diff < 1e-3, (cos, diff)
    # the comparison is sensitive: a decay read as stored (without the log) changes the logits
    broken = dict(got)
    broken["blocks.0.att.time_decay"] = np.asarray(got["blocks.0.att.time_decay"]) * 0.5
    save_pth({k: np.asarray(v, np.float32) for k, v in broken.items()}, tmp_path / "broken.pth")
    assert np.abs(_package_logits(module, tmp_path / "broken.pth") - want).max() > 1e-3


# -- rwkv.cpp and fla: export gives the .pth's logits ---------------------------------------------------

def _export(src: Path, out: Path) -> Path:
    assert main(["export", str(src), "-o", str(out), "-q", "--dtype", "float32"]) == 0
    return out


def _logits(model_dir: Path, family, weights) -> np.ndarray:
    if family.name == "rwkv4":
        return run_chain(model_dir, TOKENS).astype(np.float64)
    from test_rwkv7 import run_graphs

    return run_graphs(model_dir, TOKENS, "float32", weights.n_layer, weights.n_head, weights.head_size)


def _same_export(pth: Path, other: Path, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Export both through the CLI; the graphs must be byte-identical and the logits equal."""
    fam, weights = families.load_checkpoint(pth)
    fam2, _ = families.load_checkpoint(other)
    assert fam2.name == fam.name
    a, b = _export(pth, tmp_path / "from_pth"), _export(other, tmp_path / "from_other")
    names = sorted(p.name for p in a.glob("*.onnx"))
    assert names == sorted(p.name for p in b.glob("*.onnx")) and len(names) == weights.n_layer + 2
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    want, got = _logits(a, fam, weights), _logits(b, fam, weights)
    np.testing.assert_array_equal(got, want)
    return want, got


@pytest.mark.parametrize("name, data_type", [("rwkv4-tiny-trained", "FP16"), ("rwkv7-tiny-trained", "FP16"),
                                             ("rwkv7-tiny-trained", "FP32")])
def test_bin_export_gives_the_pth_logits(tmp_path, name, data_type):
    pth = FIXTURES / f"{name}.pth"
    write_rwkvcpp(_torch_sd(pth), tmp_path / "m.bin", data_type)
    _same_export(pth, tmp_path / "m.bin", tmp_path)


@pytest.mark.parametrize("version", ["x050", "x052", "x060"])
def test_bin_of_a_version_without_family(tmp_path, version):
    """A version this tool has no family for is refused by name; with a family, it exports like its .pth."""
    sd = random_state_dict(version, seed=3)
    save_pth(sd, tmp_path / "m.pth")
    write_rwkvcpp(sd, tmp_path / "m.bin", "FP32")
    reads = [n for n in families.names() if families.get(n).detect(set(sd))]
    if not reads:
        with pytest.raises(UserError, match=rf"m\.bin: this is an RWKV-{RWKVCPP_VERSION[version]} checkpoint"):
            families.load_checkpoint(tmp_path / "m.bin")
        return
    try:
        fam = families.load_checkpoint(tmp_path / "m.pth")[0]
    except UserError as exc:  # a family claims the names but refuses the version (RWKV-5.0/5.1): the same for both
        with pytest.raises(UserError) as got:
            families.load_checkpoint(tmp_path / "m.bin")
        assert str(got.value) == str(exc).replace("m.pth", "m.bin")
        return
    assert families.load_checkpoint(tmp_path / "m.bin")[0].name == fam.name
    a, b = _export(tmp_path / "m.pth", tmp_path / "a"), _export(tmp_path / "m.bin", tmp_path / "b")
    for n in sorted(p.name for p in a.glob("*.onnx")):
        want, got = _graph_tensors(a / n), _graph_tensors(b / n)
        assert len(want) == len(got), n
        for w, g in zip(want, got):
            if version == "x060":  # nothing lossy
                np.testing.assert_array_equal(g, w, err_msg=n)
            else:  # decays through exp(-exp(.)) and back
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=n)


def _graph_tensors(path: Path) -> list[np.ndarray]:
    """Every weight of a graph (initializers and Constant nodes) in graph order."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    out = [numpy_helper.to_array(t) for t in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == "Constant":
            out += [numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"]
    return out


@pytest.mark.parametrize("dtype, legacy, shards, tie", [("float32", False, 1, False), ("float16", True, 3, False)])
def test_fla_export_gives_the_pth_logits(tmp_path, dtype, legacy, shards, tie):
    """The trained RWKV-7 written in the fla-hub layout exports to the same graphs and logits as its .pth."""
    pth = FIXTURES / "rwkv7-tiny-trained.pth"  # fp16 values: exact in a float16 safetensors too
    directory = write_fla(_torch_sd(pth), tmp_path / "hf", dtype=dtype, legacy_x_x=legacy, shards=shards, tie=tie)
    if legacy:
        assert "model.layers.1.attn.x_x" in json.loads((directory / flahub.INDEX).read_text())["weight_map"]
    _same_export(pth, directory, tmp_path)
    # a file of the directory names it as well
    assert families.load_checkpoint(directory / "config.json")[0].name == "rwkv7"


def test_fla_reads_back_the_pth_state_dict(tmp_path):
    """Every tensor but layer 0's unused value LoRA (which fla drops); bf16 comes back as exact float32."""
    import ml_dtypes

    sd = random_state_dict("x070", seed=4)
    sd = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in sd.items()}  # bf16-exact values
    sd["head.weight"] = sd["emb.weight"]  # tied, and written without lm_head
    write_fla(sd, tmp_path / "hf", dtype="bfloat16", tie=True)
    got = flahub.read_state_dict(tmp_path / "hf")
    want = {k: v for k, v in sd.items() if k not in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")}
    _assert_state_dicts_equal(got, want, "7")
    assert all(a.dtype == np.float32 for a in got.values())
    # the LoRA matrices are transposed in the fla files: the check would see them read as stored
    assert sd["blocks.1.att.w1"].shape[0] != sd["blocks.1.att.w1"].shape[1]


# -- bad input ------------------------------------------------------------------------------------------

def _bad_inputs(root: Path) -> dict[str, tuple[Path, str]]:
    sd7 = random_state_dict("x070", layers=1, seed=5)
    good = root / "good.bin"
    write_rwkvcpp(sd7, good, "FP16")
    data = good.read_bytes()
    cases = {}

    def variant(name, content, expect):
        (root / name).write_bytes(content)
        cases[name] = (root / name, expect)

    variant("truncated.bin", data[:-1000], "truncated: tensor")
    variant("cut_header.bin", data[:30], "truncated tensor header")
    variant("short.bin", data[:10], "truncated: 10 bytes")
    variant("magic.bin", b"GGUF" + data[4:], "wrong magic")
    variant("zip.bin", b"PK\x03\x04" + data[4:], "rename a BlinkDL state dict to .pth")
    variant("version.bin", data[:4] + struct.pack("<i", 102) + data[8:], "file version 102")
    variant("q5_1.bin", data[:20] + struct.pack("<i", 8) + data[24:], "the file is quantized (Q5_1)")
    tq = bytearray(data)  # the first tensor (emb.weight) claims Q4_0 while the header says FP16
    tq[24 + 8: 24 + 12] = struct.pack("<i", 2)
    variant("tensor_q.bin", bytes(tq), "tensor emb.weight is quantized (Q4_0)")
    for name, msg in (("no_config", "no config.json"), ("llama", "model_type 'llama'"),
                      ("foreign_tensors", "is not part of an fla-hub RWKV-7 model"),
                      ("no_weights", "no *.safetensors"), ("damaged", "cannot read as safetensors")):
        d = root / name
        d.mkdir()
        cases[name] = (d, msg)
    write_fla(sd7, root / "no_config")
    (root / "no_config" / "config.json").unlink()
    write_fla(sd7, root / "llama")
    cfg = json.loads((root / "llama" / "config.json").read_text())
    (root / "llama" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama",
                                                            "architectures": ["LlamaForCausalLM"]}))
    from safetensors.numpy import save_file

    (root / "foreign_tensors" / "config.json").write_text(json.dumps(cfg))
    save_file({"model.embeddings.weight": np.zeros((4, 4), np.float32),
               "model.layers.0.self_attn.q_proj.weight": np.zeros((4, 4), np.float32)},
              str(root / "foreign_tensors" / "model.safetensors"))
    (root / "no_weights" / "config.json").write_text(json.dumps(cfg))
    write_fla(sd7, root / "damaged")
    st = root / "damaged" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-500])
    cases["missing"] = (root / "missing_dir", "no such file or directory")
    (root / "graphs").mkdir()
    (root / "graphs" / "embed.onnx").write_bytes(b"")
    cases["graphs"] = (root / "graphs", "give it to `rwkv2rknn split`")
    return cases


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    return _bad_inputs(tmp_path_factory.mktemp("bad_ckpt"))


CASES = ["truncated.bin", "cut_header.bin", "short.bin", "magic.bin", "zip.bin", "version.bin", "q5_1.bin",
         "tensor_q.bin", "no_config", "llama", "foreign_tensors", "no_weights", "damaged", "missing", "graphs"]


@pytest.mark.parametrize("case", CASES)
def test_bad_files_one_line_exit_2(bad_inputs, tmp_path, capsys, case):
    path, expect = bad_inputs[case]
    out = tmp_path / "out"
    assert main(["export", str(path), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert expect in err and str(path) in err, err
    assert not out.exists()


def test_bad_file_through_the_real_command(bad_inputs, tmp_path):
    path, expect = bad_inputs["q5_1.bin"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "rwkv2rknn", "export", str(path), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "export from the .pth, or from an FP16/FP32 .bin" in r.stderr
