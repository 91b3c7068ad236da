"""The acceptance model of speculative decoding (docs/speculative.md): how many tokens one verify pass yields.

Pure arithmetic shared by the runtime (`run --draft --bench` reports the per-token acceptance its measured tokens
per pass imply) and the estimate (rwkv2rknn/cost/speculative.py prices rounds with it); neither imports the other.
"""

from __future__ import annotations


def tokens_per_pass(p: float, k: int) -> float:
    """Expected tokens from one verify pass of k drafts when each is kept with probability p independently (the
    usual model, Leviathan et al. 2023): 1 + p + ... + p^k = (1 - p^(k+1)) / (1 - p)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"acceptance rate {p}: must be within [0, 1]")
    return float(k + 1) if p >= 1.0 else (1.0 - p ** (k + 1)) / (1.0 - p)


def per_token_acceptance(tokens: float | None, k: int) -> float | None:
    """The p whose tokens_per_pass(p, k) is `tokens` (measured tokens per target pass): the acceptance rate to give
    `rwkv2rknn estimate --acceptance` (kept drafts / drafted is lower: drafts after a rejection are never checked)."""
    if tokens is None or k < 1:
        return None
    if tokens >= k + 1:
        return 1.0
    if tokens <= 1:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if tokens_per_pass(mid, k) < tokens else (lo, mid)
    return 0.5 * (lo + hi)


__all__ = ["per_token_acceptance", "tokens_per_pass"]
