"""An independent numpy RWKV-4 reference (RNN mode), written from the ChatRWKV equations, not from the graphs."""

from __future__ import annotations

import numpy as np

from rwkv2rknn.families.reference_common import ReferenceBase

PP_INIT = -1e30


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean()
    var = ((x - mu) ** 2).mean()
    return (x - mu) / np.sqrt(var + eps) * g + b


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class RefModel(ReferenceBase):
    """RWKV-4 in RNN mode from canonical `Weights`; computes in `dtype` (fp64 by default).

    State: [L, 5, C] with rows ffn shift, att shift, aa, bb, pp (the llama.onnx order).
    """

    def init_state(self) -> np.ndarray:
        s = np.zeros((self.n_layer, 5, self.n_embd), dtype=self.dtype)
        s[:, 4] = PP_INIT
        return s

    def block(self, i: int, x: np.ndarray, st: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = self.layers[i]
        s_ffn, s_att, aa, bb, pp = st
        xa = _layer_norm(x, w["ln1.weight"], w["ln1.bias"])
        mk, mv, mr = w["att.time_mix_k"], w["att.time_mix_v"], w["att.time_mix_r"]
        k = w["att.key.weight"] @ (xa * mk + s_att * (1 - mk))
        v = w["att.value.weight"] @ (xa * mv + s_att * (1 - mv))
        r = _sigmoid(w["att.receptance.weight"] @ (xa * mr + s_att * (1 - mr)))
        ww = w["att.time_first"] + k
        q = np.maximum(pp, ww)
        e1, e2 = np.exp(pp - q), np.exp(ww - q)
        wkv = (e1 * aa + e2 * v) / (e1 * bb + e2)
        x1 = x + w["att.output.weight"] @ (r * wkv)
        ww = pp + w["att.time_decay"]  # canonical time_decay is already -exp(raw)
        q2 = np.maximum(ww, k)
        e1, e2 = np.exp(ww - q2), np.exp(k - q2)
        aa2, bb2 = e1 * aa + e2 * v, e1 * bb + e2
        xf = _layer_norm(x1, w["ln2.weight"], w["ln2.bias"])
        fk = xf * w["ffn.time_mix_k"] + s_ffn * (1 - w["ffn.time_mix_k"])
        fr = xf * w["ffn.time_mix_r"] + s_ffn * (1 - w["ffn.time_mix_r"])
        kk = np.maximum(w["ffn.key.weight"] @ fk, 0) ** 2
        y = x1 + _sigmoid(w["ffn.receptance.weight"] @ fr) * (w["ffn.value.weight"] @ kk)
        return y, np.stack([xf, xa, aa2, bb2, q2])

    def forward(self, token: int, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Logits [V] of `token` and the new state (the input state is not modified)."""
        if state is None:
            state = self.init_state()
        x = _layer_norm(self.embed["emb.weight"][token], self.embed["ln0.weight"], self.embed["ln0.bias"])
        new = np.empty_like(state)
        for i in range(self.n_layer):
            x, new[i] = self.block(i, x, state[i])
        x = _layer_norm(x, self.head["ln_out.weight"], self.head["ln_out.bias"])
        return self.head["head.weight"] @ x, new
