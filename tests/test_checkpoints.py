"""Checkpoint readers and writers: .pth, rwkv.cpp .bin, random weights, and their error messages."""

from __future__ import annotations

import struct
import sys

import numpy as np
import pytest

from rwkv2rknn.families import rwkv4 as ck
from rwkv2rknn.families.rwkv4 import (
    BIN_MAGIC,
    LAYER_KEYS,
    load_bin,
    load_checkpoint,
    load_pth,
    random_weights,
    save_bin,
    save_pth,
)
from rwkv2rknn.errors import UserError

torch = pytest.importorskip("torch")

L, C, V = 2, 32, 64


@pytest.fixture(scope="module")
def weights():
    return random_weights(L, C, V, seed=3).materialize()


@pytest.fixture(scope="module")
def pth(weights, tmp_path_factory):
    p = tmp_path_factory.mktemp("ck") / "m.pth"
    save_pth(weights, p)
    return p


def assert_same(a, b, exact=True):
    assert (a.n_layer, a.n_embd, a.n_vocab, a.n_ffn) == (b.n_layer, b.n_embd, b.n_vocab, b.n_ffn)
    for (na, ta), (nb, tb) in zip(a.tensors(), b.tensors(), strict=True):
        assert na == nb
        assert ta.dtype == np.float32 and ta.shape == tb.shape, na
        if exact:
            np.testing.assert_array_equal(ta, tb, err_msg=na)
        else:
            np.testing.assert_allclose(ta, tb, rtol=2e-6, atol=0, err_msg=na)


# -- random weights -----------------------------------------------------------------------------------

def test_random_weights_shapes_and_scales():
    w = random_weights(3, 16, 40, ffn=48, seed=1)
    assert (w.n_layer, w.n_embd, w.n_vocab, w.n_ffn) == (3, 16, 40, 48)
    shapes = ck.canonical_shapes(3, 16, 40, 48)
    names = [n for n, _ in w.tensors()]
    assert sorted(names) == sorted(shapes)
    for name, a in w.tensors():
        assert a.shape == shapes[name] and a.dtype == np.float32, name
    lay = w.layer(1)
    assert set(lay) == set(LAYER_KEYS)
    # LN parameters are non-trivial (else onnx-simplifier would have dropped Mul/Add in the published graphs)
    assert not np.allclose(lay["ln1.weight"], 1) and not np.allclose(lay["ln1.bias"], 0)
    assert abs(lay["ln1.weight"].mean() - 1) < 0.2
    for k in ("att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "ffn.time_mix_k", "ffn.time_mix_r"):
        assert ((lay[k] > 0) & (lay[k] < 1)).all()
    w_decay = lay["att.time_decay"]
    assert (w_decay < 0).all() and w_decay.min() > -10 and w_decay.max() < -0.01
    np.testing.assert_array_equal(w.decay(1), w_decay)
    std = lay["att.key.weight"].std()
    assert 0.8 / 4 < std < 1.2 / 4  # ~ 1/sqrt(in)


def test_random_weights_are_seeded_per_part():
    a, b = random_weights(2, 16, 32, seed=5), random_weights(2, 16, 32, seed=5)
    np.testing.assert_array_equal(a.layer(1)["att.key.weight"], b.layer(1)["att.key.weight"])
    # lazily regenerated parts are identical each time, and layers differ from each other
    np.testing.assert_array_equal(a.layer(0)["ffn.key.weight"], a.layer(0)["ffn.key.weight"])
    assert not np.array_equal(a.layer(0)["att.key.weight"], a.layer(1)["att.key.weight"])
    # a layer does not depend on how many layers there are (seeded per layer)
    np.testing.assert_array_equal(random_weights(5, 16, 32, seed=5).layer(1)["att.value.weight"],
                                  a.layer(1)["att.value.weight"])
    assert not np.array_equal(random_weights(2, 16, 32, seed=6).embed()["emb.weight"], a.embed()["emb.weight"])


# -- .pth ---------------------------------------------------------------------------------------------

def test_pth_roundtrip_and_conventions(weights, pth):
    sd = torch.load(pth, weights_only=True)
    assert tuple(sd["blocks.1.att.time_mix_k"].shape) == (1, 1, C)
    assert tuple(sd["blocks.0.att.time_decay"].shape) == (1, 1, C)
    assert tuple(sd["blocks.0.ffn.key.weight"].shape) == (4 * C, C)
    # .pth holds the raw decay; canonical holds -exp(raw)
    raw = sd["blocks.1.att.time_decay"].numpy().reshape(-1)
    np.testing.assert_allclose(-np.exp(raw), weights.layer(1)["att.time_decay"], rtol=2e-6)
    loaded = load_pth(pth)
    assert loaded.layer(1)["att.time_mix_k"].shape == (C,)
    np.testing.assert_array_equal(loaded.layer(1)["att.time_decay"], -np.exp(raw))
    assert_same(loaded, weights, exact=False)
    # everything but the decay (which went through log/exp) is bit-exact
    for k in LAYER_KEYS:
        if k != "att.time_decay":
            np.testing.assert_array_equal(loaded.layer(0)[k], weights.layer(0)[k])


def test_pth_bfloat16_and_load_checkpoint(weights, tmp_path):
    p = tmp_path / "bf16.pth"
    save_pth(weights, p)
    sd = {k: v.to(torch.bfloat16) for k, v in torch.load(p, weights_only=True).items()}
    torch.save(sd, p)
    w = load_checkpoint(p)
    a = w.layer(0)["att.key.weight"]
    assert a.dtype == np.float32
    np.testing.assert_allclose(a, weights.layer(0)["att.key.weight"], rtol=1e-2, atol=1e-3)


# -- .bin ---------------------------------------------------------------------------------------------

def _read_bin_headers(path):
    data = path.read_bytes()
    header = struct.unpack("<6i", data[:24])
    pos, tensors = 24, {}
    while pos < len(data):
        n, klen, dt = struct.unpack("<3i", data[pos:pos + 12])
        dims = struct.unpack(f"<{n}i", data[pos + 12:pos + 12 + 4 * n])
        key = data[pos + 12 + 4 * n:pos + 12 + 4 * n + klen].decode()
        pos += 12 + 4 * n + klen + int(np.prod(dims)) * (4 if dt == 0 else 2)
        tensors[key] = (dims, dt)
    return header, tensors


def test_bin_same_weights_as_pth_identical(pth, tmp_path):
    """A .bin converted from a .pth (as rwkv.cpp's converter does) loads bit-identical to the .pth."""
    from_pth = load_pth(pth)
    b = tmp_path / "m.bin"
    save_bin(from_pth, b, "float32")
    assert_same(load_bin(b), from_pth, exact=True)
    header, tensors = _read_bin_headers(b)
    assert header == (BIN_MAGIC, 101, V, C, L, 0)
    assert tensors["emb.weight"] == ((C, V), 0)  # dims reversed from PyTorch [V, C]
    assert tensors["blocks.0.ffn.key.weight"] == ((C, 4 * C), 0)
    assert tensors["blocks.0.att.time_mix_k"] == ((C,), 0)  # time_* are 1-D in .bin
    # .bin stores the decay as -exp(raw)
    raw = torch.load(pth, weights_only=True)["blocks.0.att.time_decay"].numpy().reshape(-1)
    np.testing.assert_array_equal(load_bin(b).decay(0), -np.exp(raw))


def test_bin_fp16(weights, tmp_path):
    b = tmp_path / "m16.bin"
    save_bin(weights, b, "float16")
    header, tensors = _read_bin_headers(b)
    assert header[5] == 1
    assert tensors["blocks.0.att.key.weight"][1] == 1 and tensors["head.weight"][1] == 1
    assert tensors["blocks.0.ln1.weight"][1] == 0 and tensors["blocks.0.att.time_decay"][1] == 0
    w = load_bin(b)
    for (name, a), (_, ref) in zip(w.tensors(), weights.tensors(), strict=True):
        assert a.dtype == np.float32
        want = ref.astype(np.float16).astype(np.float32) if ref.ndim == 2 else ref
        np.testing.assert_array_equal(a, want, err_msg=name)


# -- bad files ----------------------------------------------------------------------------------------

def _raises(path, *fragments):
    with pytest.raises(UserError) as exc:
        load_checkpoint(path)
    msg = str(exc.value)
    assert msg.startswith(str(path)), msg
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


@pytest.fixture(scope="module")
def good_bin(weights, tmp_path_factory):
    p = tmp_path_factory.mktemp("bin") / "good.bin"
    save_bin(weights, p, "float16")
    return p


def test_bad_files_common(tmp_path):
    _raises(tmp_path / "nope.bin", "no such file")
    _raises(tmp_path / "nope.pth", "no such file")
    for suffix in (".bin", ".pth"):
        (tmp_path / f"empty{suffix}").write_bytes(b"")
        _raises(tmp_path / f"empty{suffix}", "empty")
    (tmp_path / "m.safetensors").write_bytes(b"x")
    _raises(tmp_path / "m.safetensors", "unknown checkpoint type")


def test_bad_bin(good_bin, tmp_path):
    data = good_bin.read_bytes()

    def variant(name, blob):
        p = tmp_path / name
        p.write_bytes(blob)
        return p

    _raises(variant("magic.bin", struct.pack("<i", 0x12345678) + data[4:]), "wrong magic")
    _raises(variant("short.bin", data[:10]), "truncated")
    _raises(variant("trunc.bin", data[:-100]), "truncated")
    _raises(variant("trunc_hdr.bin", data[:30]), "truncated")
    _raises(variant("version.bin", data[:4] + struct.pack("<i", 7) + data[8:]), "version 7")
    _raises(variant("q4.bin", data[:20] + struct.pack("<i", 2) + data[24:]), "only fp32/fp16")
    # a tensor whose own dtype is quantized
    tq = bytearray(data)
    tq[24 + 8:24 + 12] = struct.pack("<i", 3)
    _raises(variant("tq.bin", bytes(tq)), "only fp32/fp16")
    # header disagreeing with the tensors
    _raises(variant("hdr.bin", data[:16] + struct.pack("<i", 5) + data[20:]), "header says")


def test_bad_pth(weights, tmp_path):
    good = tmp_path / "good.pth"
    save_pth(weights, good)
    blob = good.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(blob[: len(blob) // 2])
    _raises(tmp_path / "trunc.pth", "cannot read")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    _raises(tmp_path / "junk.pth", "cannot read")
    sd = torch.load(good, weights_only=True)

    def variant(name, d):
        p = tmp_path / name
        torch.save(d, p)
        return p

    _raises(variant("missing.pth", {k: v for k, v in sd.items() if k != "blocks.1.ffn.value.weight"}),
            "blocks.1.ffn.value.weight is missing")
    _raises(variant("shape.pth", {**sd, "blocks.1.att.key.weight": torch.zeros(C, C + 1)}),
            "blocks.1.att.key.weight has shape")
    _raises(variant("noemb.pth", {k: v for k, v in sd.items() if k != "emb.weight"}), "emb.weight")
    _raises(variant("v5.pth", {**sd, "blocks.0.att.time_faaaa": torch.zeros(4, 8)}), "not an RWKV-4 checkpoint")
    # the command line reads the version through the family seam first: a later version's tensor sends the file
    # to that version's reader, which names what is missing
    from rwkv2rknn import families

    for name, extra in (("v5f.pth", "blocks.0.att.time_faaaa"), ("v6x.pth", "blocks.0.att.ln_x.weight")):
        with pytest.raises(UserError, match="RWKV-5") as err:
            families.load_checkpoint(variant(name, {**sd, extra: torch.zeros(4, 8)}))
        assert name in str(err.value) and "\n" not in str(err.value)
    _raises(variant("list.pth", [torch.zeros(3)]), "state dict")


def test_pth_without_torch(pth, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(UserError, match="install torch"):
        load_pth(pth)
