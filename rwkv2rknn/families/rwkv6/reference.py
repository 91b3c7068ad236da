"""The RWKV-6 numpy reference (RNN mode): RWKV-5.2's (rwkv2rknn/families/rwkv5/reference.py) with the v6.0
token-shift mixes, decay and channel mix of the `rwkv` package.

On h = LN1(x) with d = h_prev - h: the LoRA tanh((h + d maa_x) w1) w2 gives five offsets (w, k, v, r, g), and
x_q = h + d (maa_q + offset_q). The decay is exp(-exp(time_decay + tanh(x_w dw1) dw2)) per key channel. The
channel mix: x_k = c + (c_prev - c) maa_k, x_r likewise; sigmoid(R' x_r) * V' relu(K' x_k)^2.
"""

from __future__ import annotations

import numpy as np

from rwkv2rknn.families.rwkv5.reference import RefModel5, sigmoid
from rwkv2rknn.families.rwkv6.checkpoint import MIX_ORDER


class RefModel6(RefModel5):
    """RWKV-6 in RNN mode from `Weights6` (state and layout as RefModel5's)."""

    def time_mix(self, w: dict, h: np.ndarray, h_prev: np.ndarray):
        d = h_prev - h
        t = np.tanh((h + d * w["att.time_maa_x"]) @ w["att.time_maa_w1"]).reshape(5, -1)
        offsets = np.einsum("id,idc->ic", t, w["att.time_maa_w2"])
        x = {q: h + d * (w[f"att.time_maa_{q}"] + offsets[i]) for i, q in enumerate(MIX_ORDER)}
        r = w["att.receptance.weight"] @ x["r"]
        k = w["att.key.weight"] @ x["k"]
        v = w["att.value.weight"] @ x["v"]
        gx = w["att.gate.weight"] @ x["g"]
        loglog = w["att.time_decay"] + np.tanh(x["w"] @ w["att.time_decay_w1"]) @ w["att.time_decay_w2"]
        decay = np.exp(-np.exp(loglog)).reshape(self.n_head, self.head_size)
        return r, k, v, gx * sigmoid(gx), decay

    def channel_mix(self, w: dict, c: np.ndarray, c_prev: np.ndarray) -> np.ndarray:
        d = c_prev - c
        hid = np.maximum(w["ffn.key.weight"] @ (c + d * w["ffn.time_maa_k"]), 0)
        return sigmoid(w["ffn.receptance.weight"] @ (c + d * w["ffn.time_maa_r"])) * (w["ffn.value.weight"] @ (hid * hid))
