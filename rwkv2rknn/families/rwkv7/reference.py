"""The RWKV-7 numpy reference (RNN mode), written from the `rwkv` package's equations (docs: shared rwkv7-x070.md)."""

from __future__ import annotations


import numpy as np

from rwkv2rknn.families.reference_common import LN_EPS, MatrixStateReference, norm_last, sigmoid

GN_EPS = 64e-5  # GroupNorm ln_x over each head
L2_EPS = 1e-12  # kk = x / max(|x|, eps), per head
DECAY_SCALE = 0.606531  # w = exp(-DECAY_SCALE * sigmoid(.)); exp(-0.5) as the reference rounds it


class RefModel7(MatrixStateReference):
    """RWKV-7 in RNN mode from `Weights7`, computing in `dtype` (float64 by default).

    State: one (shift [2, C], wkv [H, N, N]) pair per layer, the layout of the mixing graphs
    (shift row 0 = ffn shift, row 1 = att shift; wkv per head [value, key]).
    """

    def block(self, i: int, x: np.ndarray, state: tuple[np.ndarray, np.ndarray], v_first: np.ndarray | None):
        """One layer: (x, (shift, wkv), v_first) -> (x, (shift, wkv), v_first)."""
        w = self.layers[i]
        H, N = self.n_head, self.head_size
        shift, S = state
        c_prev, h_prev = shift[0], shift[1]

        h = norm_last(x, w["ln1.weight"], w["ln1.bias"], LN_EPS)
        d = h_prev - h
        m = {q: h + d * w[f"att.x_{q}"] for q in "rwkvag"}
        r = w["att.receptance.weight"] @ m["r"]
        k = w["att.key.weight"] @ m["k"]
        v = w["att.value.weight"] @ m["v"]
        w_lora = np.tanh(m["w"] @ w["att.w1"]) @ w["att.w2"]
        a = sigmoid(w["att.a0"] + (m["a"] @ w["att.a1"]) @ w["att.a2"])
        g = sigmoid(m["g"] @ w["att.g1"]) @ w["att.g2"]

        kk = (k * w["att.k_k"]).reshape(H, N)
        kk = kk / np.maximum(np.sqrt((kk * kk).sum(axis=-1, keepdims=True)), L2_EPS)
        k = k * (1 + (a - 1) * w["att.k_a"])
        if i == 0:
            v_first = v
        else:
            v = v + (v_first - v) * sigmoid(w["att.v0"] + (m["v"] @ w["att.v1"]) @ w["att.v2"])
        decay = np.exp(-DECAY_SCALE * sigmoid(w["att.w0"] + w_lora))

        # S[h] = S[h] diag(w) - (S[h] kk) (kk a)^T + v k^T, with S[h] indexed [value, key]
        S = (S * decay.reshape(H, 1, N)
             - (S @ kk[:, :, None]) * (kk * a.reshape(H, N))[:, None, :]
             + v.reshape(H, N, 1) * k.reshape(H, 1, N))
        y = (S @ r.reshape(H, N, 1))[:, :, 0]
        y = norm_last(y, w["att.ln_x.weight"].reshape(H, N), w["att.ln_x.bias"].reshape(H, N), GN_EPS)
        bonus = (r * k * w["att.r_k"].reshape(-1)).reshape(H, N).sum(axis=-1, keepdims=True)
        y = (y + bonus * v.reshape(H, N)).reshape(-1)
        x = x + w["att.output.weight"] @ (y * g)

        c = norm_last(x, w["ln2.weight"], w["ln2.bias"], LN_EPS)
        hid = np.maximum(w["ffn.key.weight"] @ (c + (c_prev - c) * w["ffn.x_k"]), 0)
        x = x + w["ffn.value.weight"] @ (hid * hid)
        return x, (np.stack([c, h]), S), v_first

    def forward(self, token: int, state: list | None = None) -> tuple[np.ndarray, list]:
        """One token: (logits [V], the new state); the state passed in is not modified."""
        state = self.init_state() if state is None else state
        x, v_first, new = self.embedding(int(token)), None, []
        for i in range(self.n_layer):
            x, st, v_first = self.block(i, x, state[i], v_first)
            new.append(st)
        return self.logits(x), new
