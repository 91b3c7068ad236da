"""The state cache: the recurrent state (and logits) after a token prefix, least recently used first out.

An RWKV model's whole context is its state, a few MB. A request whose prompt starts with a cached prefix starts
from that prefix's state and computes only the rest: a conversation's next turn, whose prompt is the previous
prompt, the reply and the new message, prefills only the new message. Entries are found by the longest cached
prefix of a prompt (prefix hashes, so a lookup is linear in the prompt) and evicted least recently used first to
stay under a byte bound. Keys are token ids from the server's initial state (the zero state or --state).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

_MOD = (1 << 61) - 1
_BASE = 1_000_003


def prefix_hashes(tokens) -> list[int]:
    """h[i] = the hash of tokens[:i+1] (a polynomial rolling hash)."""
    out, h = [], 0
    for t in tokens:
        h = (h * _BASE + int(t) + 1) % _MOD
        out.append(h)
    return out


@dataclass
class Entry:
    tokens: tuple
    state: list          # arrays in the program's state order
    logits: np.ndarray   # float32 logits after the last token
    nbytes: int


class StateCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[tuple[int, int], Entry] = OrderedDict()  # (length, hash) -> entry
        self._lengths: dict[int, int] = {}  # length -> number of entries of that length
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens) -> Entry | None:
        """The entry of the longest cached prefix of tokens (the whole of them included), or None."""
        if not self.enabled or not tokens:
            return None
        hashes = prefix_hashes(tokens)
        with self._lock:
            for n in sorted(self._lengths, reverse=True):
                if n > len(tokens):
                    continue
                key = (n, hashes[n - 1])
                e = self._entries.get(key)
                if e is not None and e.tokens == tuple(tokens[:n]):
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return e
            self.misses += 1
            return None

    def put(self, tokens, state: list, logits: np.ndarray) -> bool:
        """Store copies of (state, logits) under tokens; False when the cache is off or the entry cannot fit."""
        if not self.enabled or not tokens or logits is None:
            return False
        tokens = tuple(int(t) for t in tokens)
        nbytes = sum(a.nbytes for a in state) + logits.nbytes + 8 * len(tokens)
        if nbytes > self.max_bytes:
            return False
        key = (len(tokens), prefix_hashes(tokens)[-1])
        entry = Entry(tokens, [np.array(a, copy=True) for a in state], np.array(logits, dtype=np.float32), nbytes)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._forget(old)
            self._entries[key] = entry
            self._lengths[len(tokens)] = self._lengths.get(len(tokens), 0) + 1
            self.bytes += nbytes
            while self.bytes > self.max_bytes and self._entries:
                _, victim = self._entries.popitem(last=False)
                self._forget(victim)
                self.evictions += 1
        return True

    def _forget(self, e: Entry) -> None:
        self.bytes -= e.nbytes
        n = len(e.tokens)
        self._lengths[n] -= 1
        if not self._lengths[n]:
            del self._lengths[n]

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions}
