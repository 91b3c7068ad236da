"""Sampling the next token from logits: greedy, temperature, nucleus (top-p)."""

from __future__ import annotations

import numpy as np


def distribution(logits: np.ndarray, temperature: float = 1.0, top_p: float = 0.85) -> np.ndarray | None:
    """The distribution `sample` draws from (float64, sums to 1), or None for greedy (temperature or top_p 0)."""
    if temperature <= 0 or top_p <= 0:
        return None
    z = np.asarray(logits, dtype=np.float64).reshape(-1) / temperature
    z -= z.max()
    probs = np.exp(z)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(probs)[::-1]
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return probs


def sample(logits: np.ndarray, temperature: float = 1.0, top_p: float = 0.85,
           rng: np.random.Generator | None = None) -> int:
    """temperature 0 (or top_p 0) is greedy; otherwise softmax(logits / T) restricted to the top-p mass."""
    probs = distribution(logits, temperature, top_p)
    if probs is None:
        return int(np.argmax(logits))
    rng = rng or np.random.default_rng()
    return int(rng.choice(len(probs), p=probs))


class Sampling:
    """`run`'s sampling as a policy for speculative decoding (rwkv2rknn/run/speculative.py): no memory of tokens."""

    def __init__(self, temperature: float = 1.0, top_p: float = 0.85):
        self.temperature, self.top_p = temperature, top_p

    def probs(self, logits: np.ndarray) -> np.ndarray | None:
        return distribution(logits, self.temperature, self.top_p)

    def argmax(self, logits: np.ndarray) -> int:
        return int(np.argmax(logits))

    def update(self, token: int) -> None:
        pass

    def fork(self) -> Sampling:
        return self
