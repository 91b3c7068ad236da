"""The server's engine with a draft model (`python -m rwkv2rknn.serve OUT --draft DRAFT_OUT`): each turn of a
request is one speculative round (rwkv2rknn/run/speculative.py) instead of one token.

The engine's bookkeeping stays as it is: a request's state holds the tokens it has fed, `job.logits` are the
target's logits after them, and the last generated token is not fed yet (the round feeds it first, as row 0 of
the verify pass). The first token after a prompt is sampled from the prompt's logits, as without a draft. A round's
tokens are sent one by one through the same stop, end-of-text and max_tokens checks; when one of them ends the
request inside a round, the state goes back to the row before that token (Speculator.truncate), so the state
cache holds exactly what plain decoding would have fed. The repetition penalties look ahead over the drafts (the
sampler is forked), so the output has the distribution of plain sampling with the same parameters.

The draft consumes a request's history lazily (its prompt on the first round: one draft prefill) and keeps its
own state per request; it is not in the state cache (a cached prompt is fed to the draft once).
"""

from __future__ import annotations

import time

import numpy as np

from rwkv2rknn.run.speculative import Speculator
from rwkv2rknn.serve.engine import Engine


class SpecEngine(Engine):
    def __init__(self, chain, tokenizer, draft, k: int | None = None, **kw):
        self.draft = draft
        self.spec = Speculator(chain, draft, k)
        draft.reset()
        self.draft_init = draft.get_state()
        super().__init__(chain, tokenizer, **kw)

    def health(self) -> dict:
        out = super().health()
        st = self.spec.stats
        out["speculative"] = {"draft_tokens": self.spec.k, "verify_passes": st.rounds, "drafted": st.drafted,
                              "accepted": st.accepted, "acceptance": st.acceptance,
                              "tokens_per_target_pass": st.tokens_per_pass}
        return out

    def _switch_to(self, job) -> None:
        prev = self._loaded
        if prev is job:
            return
        if prev is not None and not prev.closed:
            prev.draft_state = self.draft.get_state()
        super()._switch_to(job)
        if not hasattr(job, "draft_fed"):  # a new request: the draft from its initial state, nothing consumed
            job.draft_state, job.draft_fed, job.pending = None, 0, None
            self.draft.set_state(self.draft_init)
        elif job.draft_state is not None:
            self.draft.set_state(job.draft_state)
            job.draft_state = None

    def _generate_one(self, job) -> bool:
        from rwkv2rknn.serve.engine import TextDecoder
        from rwkv2rknn.serve.sampling import Sampler, StopMatcher

        p = job.params
        if job.sampler is None:
            job.sampler = Sampler(p, self.vocab)
            job.decoder = TextDecoder(self.tok)
            job.stops = StopMatcher(p.stop)
        if getattr(job, "pending", None) is None:  # the first token: from the prompt's logits, as without a draft
            tok = job.sampler.sample(job.logits)
            end = self._emit(job, tok)
            if end is not None:
                return self._finish(job, *end)
            job.pending = tok
            return False
        spec = self.spec
        history = job.prompt + job.generated[:job.fed_generated]
        spec.pending, spec._todo, spec._round = job.pending, history[job.draft_fed:], None
        spec.rng = job.sampler.rng
        toks = spec.round(job.sampler, limit=p.max_tokens - len(job.generated))
        end, m = None, len(toks)
        for i, tok in enumerate(toks):
            end = self._emit(job, tok)
            if end is not None:
                m = i + 1
                break
        spec.truncate(m)
        spec._settle()
        job.fed_generated += m  # the pending token and the first m - 1 of the round's
        job.logits = np.array(spec.last_rows[m - 1], dtype=np.float32)
        job.draft_fed = len(history) + m - len(spec._todo)
        job.pending = job.generated[-1]
        if end is not None:
            return self._finish(job, *end)
        return False

    def _emit(self, job, tok: int):
        """Send one generated token; (reason, flush) when it ends the request, else None."""
        job.sampler.update(tok)
        job.generated.append(tok)
        if job.t_first is None:
            job.t_first = time.perf_counter()
        if self.eos is not None and tok == self.eos:
            return ("stop", True)
        text, stopped = job.stops.add(job.decoder.add(tok))
        self._send(job, text)
        if stopped:
            return ("stop", False)
        if len(job.generated) >= job.params.max_tokens:
            return ("length", True)
        return None
