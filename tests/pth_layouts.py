"""Random RWKV state dicts in the .pth layout of each version the `rwkv` package reads (numpy, float32), at the
shapes BlinkDL's trainers save: x040 (RWKV-4), x050 (RWKV-5.0, rwkv.cpp's "5.1"), x052, x060, x070.

Values are at realistic scales (LayerNorm near 1/0, mixes in (0, 1), decays spread slow to fast, matrices
~ N(0, 1/sqrt(fan-in))), so logits computed from them are meaningful.
"""

from __future__ import annotations

import numpy as np

VERSIONS = ("x040", "x050", "x052", "x060", "x070")
HEAD_SIZE = 64


def _normal(rng, shape, std):
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _uniform(rng, shape, lo, hi):
    return rng.uniform(lo, hi, shape).astype(np.float32)


def _ends(rng, C, V) -> tuple[dict, dict]:
    head = {"emb.weight": _normal(rng, (V, C), 1.0),
            "blocks.0.ln0.weight": 1 + _normal(rng, C, 0.1), "blocks.0.ln0.bias": _normal(rng, C, 0.1)}
    tail = {"ln_out.weight": 1 + _normal(rng, C, 0.1), "ln_out.bias": _normal(rng, C, 0.1),
            "head.weight": _normal(rng, (V, C), C ** -0.5)}
    return head, tail


def _ln(rng, p, C):
    return {f"{p}.weight": 1 + _normal(rng, C, 0.1), f"{p}.bias": _normal(rng, C, 0.1)}


def _x040(L, C, V, rng):
    from rwkv2rknn.families.rwkv4 import random_weights

    w = random_weights(L, C, V, seed=int(rng.integers(1 << 30)))
    sd = {}
    for name, a in w.tensors():
        if name.endswith("att.time_decay"):
            a = np.log(-a.astype(np.float64)).astype(np.float32)  # canonical w = -exp(raw) -> raw
        elif ".time_mix_" in name:
            a = a.reshape(1, 1, -1)
        sd[name] = np.asarray(a, dtype=np.float32)
    return sd


def _x05(L, C, V, rng, minor: int):
    H, F = C // HEAD_SIZE, 4 * C
    first, last = _ends(rng, C, V)
    sd = dict(first)
    for i in range(L):
        b = f"blocks.{i}."
        sd.update(_ln(rng, b + "ln1", C))
        sd.update(_ln(rng, b + "ln2", C))
        mixes = "kvrg" if minor == 2 else "kvr"
        for q in mixes:
            sd[f"{b}att.time_mix_{q}"] = _uniform(rng, (1, 1, C), 0.05, 0.95)
        if minor == 2:
            sd[b + "att.time_decay"] = _uniform(rng, (H, HEAD_SIZE), -6.0, 1.0)
            sd[b + "att.time_faaaa"] = _uniform(rng, (H, HEAD_SIZE), -1.0, 1.0)
        else:
            sd[b + "att.time_decay"] = _uniform(rng, (H,), -6.0, 1.0)
            sd[b + "att.time_first"] = _uniform(rng, (H,), -1.0, 1.0)
        names = ["receptance", "key", "value", "output"] + (["gate"] if minor == 2 else [])
        for n in names:
            sd[f"{b}att.{n}.weight"] = _normal(rng, (C, C), C ** -0.5)
        sd.update(_ln(rng, b + "att.ln_x", C))
        for q in "kr":
            sd[f"{b}ffn.time_mix_{q}"] = _uniform(rng, (1, 1, C), 0.05, 0.95)
        sd[b + "ffn.key.weight"] = _normal(rng, (F, C), C ** -0.5)
        sd[b + "ffn.receptance.weight"] = _normal(rng, (C, C), C ** -0.5)
        sd[b + "ffn.value.weight"] = _normal(rng, (C, F), F ** -0.5)
    sd.update(last)
    return sd


def _x060(L, C, V, rng):
    H, F, D, Dd = C // HEAD_SIZE, 7 * C // 2, 32, 64
    first, last = _ends(rng, C, V)
    sd = dict(first)
    for i in range(L):
        b = f"blocks.{i}."
        sd.update(_ln(rng, b + "ln1", C))
        sd.update(_ln(rng, b + "ln2", C))
        for q in "xwkvrg":
            sd[f"{b}att.time_maa_{q}"] = _uniform(rng, (1, 1, C), 0.05, 0.95)
        sd[b + "att.time_maa_w1"] = _normal(rng, (C, 5 * D), 0.1)
        sd[b + "att.time_maa_w2"] = _normal(rng, (5, D, C), 0.1)
        sd[b + "att.time_decay"] = _uniform(rng, (1, 1, C), -6.0, 1.0)
        sd[b + "att.time_decay_w1"] = _normal(rng, (C, Dd), 0.1)
        sd[b + "att.time_decay_w2"] = _normal(rng, (Dd, C), 0.1)
        sd[b + "att.time_faaaa"] = _uniform(rng, (H, HEAD_SIZE), -1.0, 1.0)
        for n in ("receptance", "key", "value", "output", "gate"):
            sd[f"{b}att.{n}.weight"] = _normal(rng, (C, C), C ** -0.5)
        sd.update(_ln(rng, b + "att.ln_x", C))
        for q in "kr":
            sd[f"{b}ffn.time_maa_{q}"] = _uniform(rng, (1, 1, C), 0.05, 0.95)
        sd[b + "ffn.key.weight"] = _normal(rng, (F, C), C ** -0.5)
        sd[b + "ffn.receptance.weight"] = _normal(rng, (C, C), C ** -0.5)
        sd[b + "ffn.value.weight"] = _normal(rng, (C, F), F ** -0.5)
    sd.update(last)
    return sd


def _x070(L, C, V, rng):
    from rwkv2rknn.families.rwkv7 import VECTOR_KEYS, random_weights7

    w = random_weights7(L, C, V, seed=int(rng.integers(1 << 30)))
    sd = {}
    for name, a in w.tensors():
        key = name.split(".", 2)[2] if name.startswith("blocks.") else name
        sd[name] = np.asarray(a, dtype=np.float32).reshape(1, 1, -1) if key in VECTOR_KEYS else np.asarray(a)
        if name == "blocks.0.att.g2":  # BlinkDL files carry layer 0's unused value-residual LoRA too
            Dv = w.lora_v
            sd["blocks.0.att.v0"] = _uniform(rng, (1, 1, C), 0.5, 1.0)
            sd["blocks.0.att.v1"] = _normal(rng, (C, Dv), 0.1)
            sd["blocks.0.att.v2"] = _normal(rng, (Dv, C), 0.1)
    return sd


def random_state_dict(version: str, layers: int = 2, embd: int = 128, vocab: int = 256, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    if version == "x040":
        return _x040(layers, embd, vocab, rng)
    if version in ("x050", "x052"):
        return _x05(layers, embd, vocab, rng, minor=int(version[-1]))
    if version == "x060":
        return _x060(layers, embd, vocab, rng)
    if version == "x070":
        return _x070(layers, embd, vocab, rng)
    raise ValueError(version)


def save_pth(state_dict: dict, path) -> None:
    """Write a state dict of numpy arrays as a torch .pth (dtypes kept)."""
    import torch

    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}, str(path))
