"""One model, many requests: the engine that owns the Chain and shares it fairly.

The model (one Chain over one NPU) is driven by a single worker thread. Requests wait in a FIFO queue; up to
`max_active` of them are active at once and take turns, round robin, each turn a time slice (`quantum`) of work:
a prefill chunk or a decoded token at a time. Switching turns swaps the recurrent states (Chain.get_state /
set_state: copies of a few MB), so every request computes exactly what it would compute alone: the prefill
chunks fall at the same token positions and nothing else carries over between tokens. A short request is not
stuck behind a long one, and a request whose client went away (`Job.cancel()`, called by the web layer on a
disconnect) is dropped at its next token.

A request starts from the state cache's longest cached prefix of its prompt (`cache.py`); the state after its
prompt, and after the tokens it generated, go back into the cache. For a chat turn the state is brought to the
end of the reply as the next turn's prompt will write it ("Assistant: reply\\n\\n"), so the next turn computes
only its new message. That extra feeding happens after the reply is sent.

Events go to the web layer through `Job.emit(kind, payload)` from the worker thread:
  ("text", str), ("done", {finish_reason, content, usage}), ("error", exception),
  and for a snapshot job ("done", {state, logits, tokens, cached}).
"""

from __future__ import annotations

import codecs
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from rwkv2rknn.serve.cache import StateCache
from rwkv2rknn.serve.sampling import GenParams, Sampler, StopMatcher
from rwkv2rknn.serve.template import reply_content


class QueueFull(Exception):
    pass


class TextDecoder:
    """Token ids -> text pieces, holding back incomplete UTF-8 (bytes tokenizers) or replacement chars."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bytes_level = hasattr(tokenizer, "decode_bytes")
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []
        self.emitted = 0

    def add(self, token: int) -> str:
        if self.bytes_level:
            return self.utf8.decode(self.tok.decode_bytes([token]))
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def flush(self) -> str:
        if self.bytes_level:
            return self.utf8.decode(b"", final=True)
        text = self.tok.decode(self.ids)
        new, self.emitted = text[self.emitted:], len(text)
        return new


class Job:
    """One request's work. kind: "generate" (a completion) or "snapshot" (only the state after the prompt).

    next_turn: for a chat turn, content -> the token ids the next turn's prompt starts with (or None).
    """

    def __init__(self, kind: str, prompt: list[int], params: GenParams | None = None,
                 emit: Callable[[str, object], None] | None = None, chat: bool = False,
                 next_turn: Callable[[str], list[int] | None] | None = None):
        self.kind, self.prompt, self.params = kind, [int(t) for t in prompt], params
        self._emit = emit
        self.chat, self.next_turn = chat, next_turn
        self.cancelled = False
        self.closed = False
        # progress
        self.state: list | None = None      # the saved state while another request has the model
        self.logits: np.ndarray | None = None
        self.pos = 0                        # prompt tokens fed
        self.cached = 0                     # prompt tokens taken from the cache
        self.started = False
        self.generated: list[int] = []
        self.fed_generated = 0
        self.content = ""
        self.prompt_state: tuple | None = None
        self.sampler = self.decoder = self.stops = None
        self._lead = True
        self.t_submit = time.perf_counter()
        self.t_first = self.t_done = None

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, kind: str, payload) -> None:
        if self._emit is not None:
            self._emit(kind, payload)


class Engine:
    def __init__(self, chain, tokenizer, *, init_state: list | None = None, cache_bytes: int = 256 << 20,
                 max_active: int = 16, max_queue: int = 256, quantum: float = 0.025, eos: int | None = None):
        self.chain, self.tok = chain, tokenizer
        self.vocab = int(chain.vocab_size)
        self.chunk = chain.chunk
        chain.reset()
        self.init_state = [np.array(a, copy=True) for a in init_state] if init_state is not None else chain.get_state()
        self.cache = StateCache(cache_bytes)
        self.max_active, self.max_queue, self.quantum, self.eos = max_active, max_queue, quantum, eos
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: deque[Job] = deque()
        self._current: Job | None = None
        self._loaded: Job | None = None
        self._stopping = False
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "errors": 0, "prompt_tokens": 0,
                      "cached_tokens": 0, "completion_tokens": 0}
        self._thread = threading.Thread(target=self._loop, name="rwkv2rknn-engine", daemon=True)
        self._thread.start()

    # -- the web layer's side ------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting for the model; try again later")
            self._waiting.append(job)
            self.stats["requests"] += 1
            self._cond.notify()

    def health(self) -> dict:
        with self._cond:
            current = self._current
            active = len(self._active) + (1 if current is not None and not current.closed else 0)
            waiting = len(self._waiting)
        return {"status": "ok", "active": active, "queued": waiting, "cache": self.cache.stats(), **self.stats}

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            pending = list(self._waiting) + list(self._active)
            self._waiting.clear()
            self._active.clear()
            self._cond.notify_all()
        for job in pending:
            job.emit("error", QueueFull("the server is shutting down"))
        self._thread.join(timeout)

    # -- the worker ----------------------------------------------------------------------------------------
    def _busy_elsewhere(self) -> bool:
        return bool(self._active or self._waiting)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not (self._waiting or self._active):
                    self._cond.wait()
                if self._stopping:
                    return
                while self._waiting and len(self._active) < self.max_active:
                    self._active.append(self._waiting.popleft())
                job = self._current = self._active.popleft()
            try:
                done = self._turn(job)
            except Exception as exc:  # a runner failed: this request ends with an error, the engine goes on
                self._loaded = None
                job.closed = done = True
                self.stats["errors"] += 1
                job.emit("error", exc)
            with self._cond:
                self._current = None
                if not done and not self._stopping:
                    self._active.append(job)

    def _drop(self, job: Job) -> bool:
        job.closed = True
        self.stats["cancelled"] += 1
        if self._loaded is job:
            self._loaded = None
        return True

    def _switch_to(self, job: Job) -> None:
        if self._loaded is job:
            return
        if self._loaded is not None and not self._loaded.closed:
            self._loaded.state = self.chain.get_state()
        if not job.started:
            job.started = True
            entry = self.cache.lookup(job.prompt)
            if entry is not None:
                self.chain.set_state(entry.state)
                job.logits = entry.logits
                job.pos = job.cached = len(entry.tokens)
            else:
                self.chain.set_state(self.init_state)
        else:
            self.chain.set_state(job.state)
            job.state = None
        self._loaded = job

    def _turn(self, job: Job) -> bool:
        """One time slice of a job's work; True when the job is finished (or dropped)."""
        if job.cancelled:
            return self._drop(job)
        self._switch_to(job)
        t0 = time.perf_counter()
        while True:
            if job.cancelled:
                return self._drop(job)
            if job.pos < len(job.prompt):
                self._prefill_unit(job)
                if job.pos == len(job.prompt) and self._prompt_done(job):
                    return True
            elif job.kind == "snapshot":
                return self._prompt_done(job)
            elif job.logits is None:
                raise ValueError("a completion needs at least one prompt token")
            elif self._generate_one(job):
                return True
            if time.perf_counter() - t0 >= self.quantum and self._busy_elsewhere():
                return False

    def _prefill_unit(self, job: Job) -> None:
        rest = len(job.prompt) - job.pos
        if self.chunk and rest >= self.chunk:
            logits = self.chain.prefill(job.prompt[job.pos:job.pos + self.chunk])
            job.pos += self.chunk
        else:
            logits = self.chain.step(job.prompt[job.pos])
            job.pos += 1
        job.logits = np.array(logits, dtype=np.float32)

    def _prompt_done(self, job: Job) -> bool:
        """After the prompt: cache its state; a snapshot job ends here (True)."""
        n = len(job.prompt)
        if n and job.cached < n and (self.cache.enabled or job.next_turn is not None):
            state = self.chain.get_state()
            self.cache.put(job.prompt, state, job.logits)
            if job.next_turn is not None:
                job.prompt_state = (state, job.logits)
        if job.kind != "snapshot":
            return False
        job.closed = True
        self.stats["completed"] += 1
        job.emit("done", {"state": self.chain.get_state(), "logits": job.logits, "tokens": job.prompt,
                          "cached": job.cached})
        return True

    def _generate_one(self, job: Job) -> bool:
        p = job.params
        if job.sampler is None:
            job.sampler = Sampler(p, self.vocab)
            job.decoder = TextDecoder(self.tok)
            job.stops = StopMatcher(p.stop)
        tok = job.sampler.sample(job.logits)
        job.sampler.update(tok)
        job.generated.append(tok)
        if job.t_first is None:
            job.t_first = time.perf_counter()
        if self.eos is not None and tok == self.eos:
            return self._finish(job, "stop", flush=True)
        text, stopped = job.stops.add(job.decoder.add(tok))
        self._send(job, text)
        if stopped:
            return self._finish(job, "stop", flush=False)
        if len(job.generated) >= p.max_tokens:
            return self._finish(job, "length", flush=True)
        job.logits = np.array(self.chain.step(tok), dtype=np.float32)
        job.fed_generated += 1
        return False

    def _send(self, job: Job, text: str) -> None:
        if job.chat and job._lead and text:
            job._lead = False
            text = reply_content(text)
        if text:
            job.content += text
            job.emit("text", text)

    def _finish(self, job: Job, reason: str, flush: bool) -> bool:
        if flush:
            self._send(job, job.stops.add(job.decoder.flush())[0] + job.stops.flush())
        job.closed = True
        job.t_done = time.perf_counter()
        n = len(job.prompt)
        usage = {"prompt_tokens": n, "completion_tokens": len(job.generated),
                 "total_tokens": n + len(job.generated),
                 "prompt_tokens_details": {"cached_tokens": job.cached, "computed_tokens": n - job.cached}}
        for k, v in (("completed", 1), ("prompt_tokens", n), ("cached_tokens", job.cached),
                     ("completion_tokens", len(job.generated))):
            self.stats[k] += v
        job.emit("done", {"finish_reason": reason, "content": job.content, "usage": usage})
        self._cache_after(job)
        return True

    def _cache_after(self, job: Job) -> None:
        """Cache the state after the generated tokens; for a chat turn, at the end of the reply as the next
        turn's prompt writes it."""
        if not self.cache.enabled:
            return
        fed = job.prompt + job.generated[:job.fed_generated]
        key = job.next_turn(job.content) if job.next_turn is not None else None
        if key is None or list(key) == fed:
            if job.fed_generated and job.logits is not None:
                self.cache.put(fed, self.chain.get_state(), job.logits)
            return
        key = list(key)
        if key[:len(fed)] == fed:
            logits = self.chain.feed(key[len(fed):])
        elif job.prompt_state is not None and key[:len(job.prompt)] == job.prompt and len(key) > len(job.prompt):
            self.chain.set_state(job.prompt_state[0])
            logits = self.chain.feed(key[len(job.prompt):])
        else:
            return
        self.cache.put(key, self.chain.get_state(), np.asarray(logits, dtype=np.float32))
