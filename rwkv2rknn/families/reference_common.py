"""What the families' numpy reference models share: the weights cast once per part, their dimensions, the norms."""

from __future__ import annotations

import numpy as np

LN_EPS = 1e-5   # LayerNorm (ln0, ln1, ln2, ln_out)


def norm_last(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """Normalize over the last axis (a LayerNorm, or a GroupNorm on [H, N]), then scale and shift."""
    mu = x.mean(axis=-1, keepdims=True)
    d = x - mu
    return d / np.sqrt((d * d).mean(axis=-1, keepdims=True) + eps) * g + b


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class ReferenceBase:
    """A family's weights (`embed()`, `layer(i)`, `head()`) cast to `dtype` once; n_layer, n_embd, n_vocab."""

    def __init__(self, weights, dtype=np.float64):
        self.dtype = dtype

        def cast(d):
            return {k: np.asarray(v, dtype=dtype) for k, v in d.items()}

        self.embed = cast(weights.embed())
        self.layers = [cast(weights.layer(i)) for i in range(weights.n_layer)]
        self.head = cast(weights.head())
        self.n_layer, self.n_embd, self.n_vocab = weights.n_layer, weights.n_embd, weights.n_vocab

    def forward(self, token: int, state=None) -> tuple[np.ndarray, object]:
        """One token: (logits [V], the new state); the state passed in is not modified."""
        raise NotImplementedError

    def run(self, tokens) -> np.ndarray:
        """Logits [T, V] of a token sequence from the initial state."""
        state, out = self.init_state(), []
        for t in tokens:
            logits, state = self.forward(int(t), state)
            out.append(logits)
        return np.stack(out)


class MatrixStateReference(ReferenceBase):
    """RWKV-5 and later: a (shift [2, C], matrix state [H, N, N]) pair per layer, ln0 after the embedding."""

    def __init__(self, weights, dtype=np.float64):
        super().__init__(weights, dtype)
        self.n_head, self.head_size = weights.n_head, weights.head_size

    def init_state(self) -> list[tuple[np.ndarray, np.ndarray]]:
        H, N = self.n_head, self.head_size
        return [(np.zeros((2, self.n_embd), self.dtype), np.zeros((H, N, N), self.dtype))
                for _ in range(self.n_layer)]

    def embedding(self, token: int) -> np.ndarray:
        e = self.embed
        return norm_last(e["emb.weight"][token], e["ln0.weight"], e["ln0.bias"], LN_EPS)

    def logits(self, x: np.ndarray) -> np.ndarray:
        hd = self.head
        return hd["head.weight"] @ norm_last(x, hd["ln_out.weight"], hd["ln_out.bias"], LN_EPS)
