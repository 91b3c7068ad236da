"""RWKV sampling with repetition penalties, as ChatRWKV does it, and the defaults RWKV's own tools use.

Per generated token (ChatRWKV API_DEMO_CHAT.py and the `rwkv` package's PIPELINE.generate):
  logits[t] -= presence_penalty + occurrence[t] * frequency_penalty   for every token t generated so far
  probs = softmax(logits); keep the tokens whose prob >= the top-p cutoff (and the top_k best when top_k > 0)
  probs = probs ** (1 / temperature), renormalized, sampled
  occurrence[*] *= penalty_decay; occurrence[token] += 1
Only generated tokens are penalized (not the prompt). temperature 0 (or top_p 0) is greedy: the argmax of the
penalized logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# ChatRWKV API_DEMO_CHAT.py (GEN_TEMP, GEN_TOP_P, GEN_alpha_presence, GEN_alpha_frequency, GEN_penalty_decay).
CHAT_DEFAULTS = {"temperature": 1.0, "top_p": 0.3, "top_k": 0, "presence_penalty": 0.5, "frequency_penalty": 0.5,
                 "penalty_decay": 0.996}
# The `rwkv` package's PIPELINE_ARGS (ChatRWKV's rwkv_pip_package/src/rwkv/utils.py): plain text continuation.
COMPLETION_DEFAULTS = {"temperature": 1.0, "top_p": 0.85, "top_k": 0, "presence_penalty": 0.2,
                       "frequency_penalty": 0.2, "penalty_decay": 0.996}
# RWKV-Runner's max_tokens_per_generation (backend-python/utils/rwkv.py).
DEFAULT_MAX_TOKENS = 500


@dataclass
class GenParams:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 0.3
    top_k: int = 0
    presence_penalty: float = 0.5
    frequency_penalty: float = 0.5
    penalty_decay: float = 0.996
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


class Sampler:
    """One request's sampler: its penalties' memory and its random generator (seeded: reproducible)."""

    def __init__(self, params: GenParams, vocab: int):
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.penalize = params.presence_penalty != 0 or params.frequency_penalty != 0
        self.occurrence = np.zeros(vocab, dtype=np.float64) if self.penalize else None
        self.seen = np.zeros(vocab, dtype=bool) if self.penalize else None

    def _penalized(self, logits: np.ndarray) -> np.ndarray:
        p = self.p
        if not self.penalize:
            return logits
        x = logits.astype(np.float64)
        x -= self.seen * p.presence_penalty + self.occurrence * p.frequency_penalty
        return x

    def probs(self, logits: np.ndarray) -> np.ndarray | None:
        """The distribution `sample` draws from, or None when it is greedy (speculative decoding's policy)."""
        p = self.p
        if p.temperature <= 0 or p.top_p <= 0:
            return None
        x = np.asarray(self._penalized(logits), dtype=np.float64)
        z = np.exp(x - x.max())
        probs = z / z.sum()
        order = np.argsort(probs)[::-1]
        cum = np.cumsum(probs[order])
        cutoff = probs[order[min(int(np.searchsorted(cum, p.top_p)), len(order) - 1)]]
        probs[probs < cutoff] = 0.0
        if 0 < p.top_k < len(probs):
            probs[order[p.top_k:]] = 0.0
        if p.temperature != 1.0:
            probs = probs ** (1.0 / p.temperature)
        probs /= probs.sum()
        return probs

    def argmax(self, logits: np.ndarray) -> int:
        """The greedy choice (penalties applied)."""
        return int(np.argmax(self._penalized(logits)))

    def sample(self, logits: np.ndarray) -> int:
        probs = self.probs(logits)
        if probs is None:
            return self.argmax(logits)
        return int(self.rng.choice(len(probs), p=probs))

    def fork(self) -> Sampler:
        """A copy whose penalty memory moves on its own (to look ahead over drafted tokens)."""
        import copy

        other = copy.copy(self)
        if self.penalize:
            other.occurrence, other.seen = self.occurrence.copy(), self.seen.copy()
        return other

    def update(self, token: int) -> None:
        if self.penalize:
            self.occurrence *= self.p.penalty_decay
            self.occurrence[token] += 1.0
            self.seen[token] = True


class StopMatcher:
    """Stop sequences over streamed text: returns only text that cannot be the start of a stop sequence.

    add(piece) -> (text safe to send, stopped); on a match the text before the stop is sent and the rest dropped.
    flush() -> what was held back (at the end of a generation that did not stop on a sequence).
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0

    def add(self, piece: str) -> tuple[str, bool]:
        if not piece:
            return "", False
        self.text += piece
        if not self.stops:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out, False
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out, self.sent = self.text[self.sent:cut], cut
            self.text = self.text[:cut]
            return out, True
        hold = 0
        tail = self.text[self.sent:]
        for s in self.stops:
            for k in range(min(len(s) - 1, len(tail)), hold, -1):
                if tail.endswith(s[:k]):
                    hold = k
                    break
        safe = len(self.text) - hold
        out, self.sent = self.text[self.sent:safe], safe
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
