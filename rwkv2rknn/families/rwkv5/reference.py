"""The RWKV-5.2 numpy reference (RNN mode), written from the `rwkv` package's v5.2 equations in its own layout.

Per layer, on h = LN1(x) with the previous token's h as h_prev (the att shift):
- r, k, v = R, K, V applied to the token-shift mixes h * mix + h_prev * (1 - mix); g = silu(G (...));
- per head, the state S [N key, N value]: y = r^T (u * k v^T + S), then S = decay * S + k v^T, where decay =
  exp(-exp(time_decay)) and u = time_faaaa, both per key channel [H, N];
- y = GroupNorm_H(y) * ln_x.weight + ln_x.bias (eps 64e-5); x = x + O (y * g);
- channel mix on c = LN2(x) with its previous c: x = x + sigmoid(R' mix_r) * V' relu(K' mix_k)^2.
RefModel6 (rwkv2rknn/families/rwkv6) replaces the token-shift mixes, the decay and the channel mix.
"""

from __future__ import annotations


import numpy as np

from rwkv2rknn.families.reference_common import LN_EPS, MatrixStateReference, norm_last, sigmoid

GN_EPS = 64e-5  # GroupNorm ln_x over each head


class RefModel5(MatrixStateReference):
    """RWKV-5.2 in RNN mode from `Weights5`, computing in `dtype` (float64 by default).

    State: one (shift [2, C], S [H, N key, N value]) pair per layer; shift row 0 = ffn shift, row 1 = att shift
    (the mixing graphs' state_in rows). S is the package's layout, the transpose of the graphs' wkv_in.
    """

    def time_mix(self, w: dict, h: np.ndarray, h_prev: np.ndarray):
        """(r, k, v, g, decay [H, N]) of one token."""
        def mixed(q):
            m = w[f"att.time_mix_{q}"]
            return h * m + h_prev * (1 - m)

        r = w["att.receptance.weight"] @ mixed("r")
        k = w["att.key.weight"] @ mixed("k")
        v = w["att.value.weight"] @ mixed("v")
        gx = w["att.gate.weight"] @ mixed("g")
        decay = np.exp(-np.exp(w["att.time_decay"]))
        return r, k, v, gx * sigmoid(gx), decay

    def channel_mix(self, w: dict, c: np.ndarray, c_prev: np.ndarray) -> np.ndarray:
        mk, mr = w["ffn.time_mix_k"], w["ffn.time_mix_r"]
        hid = np.maximum(w["ffn.key.weight"] @ (c * mk + c_prev * (1 - mk)), 0)
        return sigmoid(w["ffn.receptance.weight"] @ (c * mr + c_prev * (1 - mr))) * (w["ffn.value.weight"] @ (hid * hid))

    def block(self, i: int, x: np.ndarray, state: tuple[np.ndarray, np.ndarray]):
        """One layer: (x, (shift, S)) -> (x, (shift, S))."""
        w = self.layers[i]
        H, N = self.n_head, self.head_size
        shift, S = state
        h = norm_last(x, w["ln1.weight"], w["ln1.bias"], LN_EPS)
        r, k, v, g, decay = self.time_mix(w, h, shift[1])
        r, k, v = r.reshape(H, N), k.reshape(H, N), v.reshape(H, N)
        a = k[:, :, None] * v[:, None, :]                                        # k v^T per head
        y = np.einsum("hk,hkv->hv", r, w["att.time_faaaa"][:, :, None] * a + S)
        S = decay.reshape(H, N, 1) * S + a
        y = norm_last(y, w["att.ln_x.weight"].reshape(H, N), w["att.ln_x.bias"].reshape(H, N), GN_EPS)
        x = x + w["att.output.weight"] @ (y.reshape(-1) * g)
        c = norm_last(x, w["ln2.weight"], w["ln2.bias"], LN_EPS)
        x = x + self.channel_mix(w, c, shift[0])
        return x, (np.stack([c, h]), S)

    def forward(self, token: int, state: list | None = None) -> tuple[np.ndarray, list]:
        """One token: (logits [V], the new state); the state passed in is not modified."""
        state = self.init_state() if state is None else state
        x, new = self.embedding(int(token)), []
        for i in range(self.n_layer):
            x, st = self.block(i, x, state[i])
            new.append(st)
        return self.logits(x), new
