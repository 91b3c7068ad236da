"""Test-side writer of rwkv.cpp model files: a .pth state dict -> what rwkv.cpp's convert_pytorch_to_ggml.py
would write, step by step as that converter does it (a separate implementation from rwkv2rknn/families/rwkvcpp.py).

The converter, per tensor in state-dict order: tell the version (v7: blocks.0.att.k_k; v6: time_maa_x;
v5.2: att.gate.weight; v5.1: att.ln_x.weight; else v4); for v7 first concatenate every att.x_* of a layer
into att.x_rwkvag (dim 0, in state-dict order, placed where the first one was); then cast to float32,
squeeze `.time_*` tensors, and apply the version's change:
- v7: transpose keys containing .w1 .w2 .a1 .a2 .v1 .v2 .g1 .g2;
- v6: .time_faaaa gets a trailing dim; .time_maa_w1 and .time_decay_w* are transposed; .time_maa_w2 has
  dims 1, 2 swapped; .time_decay (not _w) is reshaped (n_head, -1, 1), n_head from time_faaaa;
- v5: .time_decay -> exp(-exp(.)) with a trailing dim (5.2) or reshaped (-1, 1, 1) (5.1); .time_first ->
  exp(.) reshaped (-1, 1, 1); .time_faaaa gets a trailing dim;
- v4: .time_decay -> -exp(.);
then with FP16 every tensor of more than one dim becomes float16 unless its name has .time_, .k_k, .k_a,
.r_k, .x_rwkvag, .x_k, .w0, .a0, .v0. Header: magic, 101, n_vocab, n_embed, n_layer, 1 if FP16 else 0;
each tensor: dim count, name length, 1 if float16 else 0, dims reversed, name, data.
"""

from __future__ import annotations

import struct

import numpy as np

KEEP_FP32 = (".time_", ".k_k", ".k_a", ".r_k", ".x_rwkvag", ".x_k", ".w0", ".a0", ".v0")
V7_TRANSPOSED = (".w1", ".w2", ".a1", ".a2", ".v1", ".v2", ".g1", ".g2")


def _concat_x(state_dict: dict) -> dict:
    new: dict = {}
    for k, v in state_dict.items():
        if "att.x_" in k:
            layer = int(k.split(".")[1])
            key = f"blocks.{layer}.att.x_rwkvag"
            new[key] = np.concatenate([new[key], v], axis=0) if key in new else v
        else:
            new[k] = v
    return new


def write_rwkvcpp(state_dict: dict, path, data_type: str = "FP32", file_version: int = 101) -> None:
    """Write `state_dict` ({name: array} in the .pth layout) as an rwkv.cpp model file."""
    sd = dict(state_dict)
    n_layer = 0
    while f"blocks.{n_layer}.ln1.weight" in sd:
        n_layer += 1
    n_vocab, n_embed = np.shape(sd["emb.weight"])
    v5 = "blocks.0.att.ln_x.weight" in sd
    v52 = "blocks.0.att.gate.weight" in sd
    v6 = "blocks.0.att.time_maa_x" in sd
    v7 = "blocks.0.att.k_k" in sd
    if v7:
        sd = _concat_x(sd)
    fp16 = data_type in ("FP16", "float16")
    n_head = np.shape(sd["blocks.0.att.time_faaaa"])[0] if v6 else None
    with open(path, "wb") as out:
        out.write(struct.pack("=iiiiii", 0x67676D66, file_version, n_vocab, n_embed, n_layer, 1 if fp16 else 0))
        for k, v in sd.items():
            t = np.asarray(v, dtype=np.float32)
            if ".time_" in k:
                t = np.squeeze(t)
            if v7:
                if any(s in k for s in V7_TRANSPOSED):
                    t = t.T
            elif v6:
                if ".time_faaaa" in k:
                    t = t[..., None]
                if ".time_maa_w1" in k or ".time_decay_w" in k:
                    t = t.T
                if ".time_maa_w2" in k:
                    t = np.swapaxes(t, 1, 2)
                if ".time_decay" in k and "_w" not in k:
                    t = t.reshape(n_head, -1, 1)
            elif v5:
                if ".time_decay" in k:
                    t = np.exp(-np.exp(t))
                    t = t[..., None] if v52 else t.reshape(-1, 1, 1)
                if ".time_first" in k:
                    t = np.exp(t).reshape(-1, 1, 1)
                if ".time_faaaa" in k:
                    t = t[..., None]
            elif ".time_decay" in k:
                t = -np.exp(t)
            if fp16 and t.ndim > 1 and not any(s in k for s in KEEP_FP32):
                t = t.astype(np.float16)
            name = k.encode("utf-8")
            out.write(struct.pack("=iii", t.ndim, len(name), 1 if t.dtype == np.float16 else 0))
            for dim in reversed(t.shape):
                out.write(struct.pack("=i", dim))
            out.write(name)
            out.write(np.ascontiguousarray(t).tobytes())
