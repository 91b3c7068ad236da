"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one verify pass.

The target's verify plan (rwkv2rknn/verify_plan.py) takes the last accepted token and k drafts as k + 1 rows and
gives the logits and the state after every row. Acceptance is standard speculative sampling (Leviathan et al. 2023;
Chen et al. 2023): draft i is kept with probability min(1, p_i(d) / q_i(d)) (p the target's distribution at that
position, q the draft's); at the first rejection the next token is drawn from max(p_i - q_i, 0), normalized; when
all k are kept a bonus token comes from the target's last row. The output then has the target's distribution
exactly, and under greedy sampling (temperature 0) it is the target's greedy output token for token. After the
pass the target keeps the state after the last accepted row (Chain.commit): a rejection rolls the state back
without another pass over the weights; the draft restores the state it had after the same token.

Invariant between rounds: both models have consumed the history except its last token (`pending`), which the
next round feeds first: to the draft (then k - 1 of its own drafts), and as row 0 of the verify pass.

A sampling policy has `probs(logits) -> distribution | None` (None: greedy), `argmax(logits)` (the greedy choice),
`update(token)` (its memory of the tokens produced: the server's repetition penalties) and `fork()` (a copy to
look ahead with).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from rwkv2rknn.acceptance import per_token_acceptance, tokens_per_pass
from rwkv2rknn.errors import UserError


@dataclass
class SpecStats:
    """What speculative decoding did (measured on this machine)."""

    rounds: int = 0         # verify passes of the target
    drafted: int = 0        # draft tokens proposed
    accepted: int = 0       # draft tokens the target kept
    tokens: int = 0         # tokens produced by the rounds
    draft_steps: int = 0    # draft model calls (one token each)
    single_steps: int = 0   # plain target steps (a round with no room for drafts)
    draft_s: float = 0.0    # time in the draft model (its steps, state snapshots and restores)
    target_s: float = 0.0   # time in the target model (verify passes, commits, plain steps)
    accept_s: float = 0.0   # time deciding (sampling, acceptance)
    k: int = 0              # drafts per round

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_pass(self) -> float | None:
        passes = self.rounds + self.single_steps
        return self.tokens / passes if passes else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(acceptance=self.acceptance, tokens_per_target_pass=self.tokens_per_pass,
                 acceptance_per_token=per_token_acceptance(self.tokens_per_pass, self.k))
        total = self.draft_s + self.target_s + self.accept_s
        d["time_share"] = {"draft": self.draft_s / total, "target": self.target_s / total,
                           "accept": self.accept_s / total} if total else None
        return d


def accept_probability(p: float, q: float) -> float:
    """The chance of keeping a drafted token the target gives probability p and the draft gave q (> 0)."""
    return 1.0 if q <= p else p / q


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The distribution after a rejection: max(p - q, 0), normalized (p itself where p == q everywhere)."""
    r = np.maximum(p - q, 0.0)
    s = r.sum()
    return r / s if s > 0 else p


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    return int(rng.choice(len(probs), p=probs))


def check_pair(target, draft, where: str = "--draft") -> None:
    """The draft must speak the target's tokens: the same vocabulary size and tokenizer."""
    tm, dm = target.program.model or {}, draft.program.model or {}
    if not dm:
        raise UserError(f"{where}: {draft.root}: a split of single graphs is no draft model; give a model's output")
    if tm.get("vocab_size") != dm.get("vocab_size") or tm.get("tokenizer") != dm.get("tokenizer"):
        raise UserError(f"{where}: {draft.root} has vocab {dm.get('vocab_size')} (tokenizer {dm.get('tokenizer')}), "
                        f"the target {target.root} {tm.get('vocab_size')} ({tm.get('tokenizer')}); a draft must use "
                        "the target's tokenizer")
    if target.program.verify is None:
        raise UserError(f"{target.root}: no verify plan; split it with --verify-tokens K (e.g. 4) to decode with a "
                        "draft model")


class Speculator:
    """A target Chain with a verify plan and a draft Chain, decoding together.

    start(prompt) feeds a prompt; round(policy, limit) produces 1..k+1 tokens; feed(tokens) appends tokens of the
    user's (a chat turn); truncate(m) keeps only the first m tokens of the last round (a stop sequence inside it).
    """

    def __init__(self, target, draft, k: int | None = None, rng: np.random.Generator | None = None):
        check_pair(target, draft)
        most = target.verify_rows - 1
        k = most if k is None else int(k)
        if not 1 <= k <= most:
            raise UserError(f"--draft-tokens {k}: give 1 to {most} (the target's verify plan has {most + 1} rows; "
                            "split with a larger --verify-tokens for more)")
        self.target, self.draft, self.k = target, draft, k
        self.rng = rng if rng is not None else np.random.default_rng()
        self.stats = SpecStats(k=k)
        self.pending: int | None = None
        self._todo: list[int] = []           # tokens the draft still has to consume before `pending`
        self._round: tuple | None = None     # (tokens fed, row kept, draft snapshots, k)
        self.last_rows: np.ndarray | None = None  # the target's logits after each row of the last round (a copy)

    # -- history ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.target.reset()
        self.draft.reset()
        self.pending, self._todo, self._round = None, [], None

    def start(self, prompt: list[int]) -> None:
        """A new text: both models from their initial state, the prompt consumed but its last token."""
        self.reset()
        self.feed(prompt)

    def feed(self, tokens: list[int]) -> None:
        """Append tokens to the history (a prompt or a user's turn); the last becomes the pending token."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            return
        self._settle()
        head = ([self.pending] if self.pending is not None else []) + tokens[:-1]
        if head:
            t0 = time.perf_counter()
            self.target.feed(head)
            self.stats.target_s += time.perf_counter() - t0
            self._todo.extend(head)
        self.pending = tokens[-1]

    # -- one round -------------------------------------------------------------------------------------
    def _draft_feed(self, tokens: list[int]) -> np.ndarray:
        logits = self.draft.feed(tokens)
        self.stats.draft_steps += len(tokens)
        return logits

    def round(self, policy, limit: int | None = None) -> list[int]:
        """One verify pass (or, with room for one token only, one plain step): the tokens it produces, 1..k+1 of
        them; their last is the new pending token. policy: probs/update/fork (see the module docstring); the caller
        calls policy.update for every token it keeps. limit: produce at most this many tokens."""
        if self.pending is None:
            raise ValueError("round() needs a prompt first (start or feed)")
        self._settle()
        st, rng = self.stats, self.rng
        k = self.k if limit is None else max(0, min(self.k, int(limit) - 1))
        x = self.pending
        if k == 0:  # room for one token: the decode plan, no draft
            t0 = time.perf_counter()
            logits = np.array(self.target.step(x), dtype=np.float32)
            self.last_rows = logits.reshape(1, -1)
            t1 = time.perf_counter()
            pol = policy.fork()
            probs = pol.probs(logits)
            z = pol.argmax(logits) if probs is None else _draw(probs, rng)
            st.target_s += t1 - t0
            st.accept_s += time.perf_counter() - t1
            st.single_steps += 1
            st.tokens += 1
            self._todo.append(x)
            self.pending = z
            self._round = None
            return [z]
        # the draft: x (after what it has not consumed yet), then its own drafts, k calls
        t0 = time.perf_counter()
        pol = policy.fork()
        drafts, qs, snaps = [], [], []
        logits = self._draft_feed(self._todo + [x])
        self._todo = []
        for i in range(k):
            q = pol.probs(logits)
            d = pol.argmax(logits) if q is None else _draw(q, rng)
            drafts.append(d)
            qs.append(q)
            pol.update(d)
            if i < k - 1:  # the state after x, d_1 .. d_i, then d_{i+1} in
                snaps.append(self.draft.get_state())
                logits = self._draft_feed([d])
        t1 = time.perf_counter()
        rows = self.last_rows = np.array(self.target.verify([x] + drafts), dtype=np.float32)
        t2 = time.perf_counter()
        pol = policy.fork()
        out = []
        for i, d in enumerate(drafts):
            p = pol.probs(rows[i])
            if p is None:  # greedy: keep the draft while it is the target's choice
                best = pol.argmax(rows[i])
                out.append(best)
                if best != d:
                    break
                pol.update(d)
                continue
            if rng.random() < accept_probability(p[d], qs[i][d]):
                out.append(d)
                pol.update(d)
                continue
            out.append(_draw(residual(p, qs[i]), rng))
            break
        else:  # every draft kept: the bonus token from the last row
            p = pol.probs(rows[k])
            out.append(pol.argmax(rows[k]) if p is None else _draw(p, rng))
        t3 = time.perf_counter()
        j = len(out) - 1  # drafts kept
        st.rounds += 1
        st.drafted += k
        st.accepted += j
        st.tokens += len(out)
        st.draft_s += t1 - t0
        st.target_s += t2 - t1
        st.accept_s += t3 - t2
        self._round = ([x] + drafts, j, snaps, k)
        self.pending = out[-1]
        return out

    def truncate(self, m: int) -> None:
        """Keep only the first m (>= 1) tokens of the last round: the state goes back to the row before the m-th."""
        if self._round is None:
            if m != 1:
                raise ValueError("truncate: the last round produced one token")
            return
        fed, j, snaps, k = self._round
        if not 1 <= m <= j + 1:
            raise ValueError(f"truncate({m}): the last round produced {j + 1} token(s)")
        self._round = (fed, m - 1, snaps, k)
        self.pending = fed[m] if m - 1 < j else self.pending  # the m-th token was a kept draft

    def _settle(self) -> None:
        """Apply the last round's outcome: the target keeps its state after row j, the draft the same history."""
        if self._round is None:
            return
        fed, j, snaps, k = self._round
        self._round = None
        t0 = time.perf_counter()
        self.target.commit(j)
        t1 = time.perf_counter()
        # the draft consumed x, d_1 .. d_{k-1}; it needs x, d_1 .. d_j
        if j == k:
            self._todo = [fed[k]]
        elif j < k - 1:
            self.draft.set_state(snaps[j])
        self.stats.target_s += t1 - t0
        self.stats.draft_s += time.perf_counter() - t1

    def generate(self, policy, n: int):
        """Yield n tokens after the history, round by round (policy.update is called for each)."""
        made = 0
        while made < n:
            toks = self.round(policy, limit=n - made)
            for t in toks:
                policy.update(t)
                made += 1
                yield t


__all__ = ["SpecStats", "Speculator", "accept_probability", "check_pair", "per_token_acceptance", "residual",
           "tokens_per_pass"]
