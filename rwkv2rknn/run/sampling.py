"""Sampling the next token from logits: greedy, temperature, nucleus (top-p)."""

from __future__ import annotations

import numpy as np


def sample(logits: np.ndarray, temperature: float = 1.0, top_p: float = 0.85,
           rng: np.random.Generator | None = None) -> int:
    """temperature 0 (or top_p 0) is greedy; otherwise softmax(logits / T) restricted to the top-p mass."""
    if temperature <= 0 or top_p <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
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
    rng = rng or np.random.default_rng()
    return int(rng.choice(len(probs), p=probs))
