"""`python -m rwkv2rknn.run OUT --draft DRAFT_OUT [--draft-tokens k]`: generation, chat and --bench with a draft.

The draft is another split (or build) of a smaller model with the same tokenizer; it runs where its own program
says (its NPU steps on the NPU backend given, its CPU steps on onnxruntime). The target needs a verify plan
(`rwkv2rknn split --verify-tokens K`). docs/speculative.md.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from rwkv2rknn.errors import UserError


def add_arguments(p) -> None:
    g = p.add_argument_group("speculative decoding (docs/speculative.md)")
    g.add_argument("--draft", metavar="DRAFT_OUT",
                   help="a smaller model's split/build output with the same tokenizer: it drafts tokens, this model "
                   "checks them in one verify pass (OUT needs a verify plan: split --verify-tokens K)")
    g.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="tokens drafted per verify pass (default: the verify plan's K; at most that)")
    g.add_argument("--draft-backend", default=None, choices=["ort", "rknn-sim", "rknn-lite", "rknn-c", "auto"],
                   help="where the draft's NPU steps run (default: --backend)")


def check_arguments(args) -> None:
    if args.draft is None:
        for name in ("draft_tokens", "draft_backend"):
            if getattr(args, name) is not None:
                raise UserError(f"--{name.replace('_', '-')} goes with --draft DRAFT_OUT")
        return
    if args.dump_logits:
        raise UserError("--dump-logits goes without --draft (the logits after a prompt do not depend on a draft)")
    if args.draft_tokens is not None and args.draft_tokens < 1:
        raise UserError("--draft-tokens must be >= 1")


def open_draft(args, open_chain):
    """The draft's Chain, on --draft-backend (default --backend)."""
    from rwkv2rknn.run.source import open_program

    program, root = open_program(args.draft)
    saved = args.backend
    args.backend = args.draft_backend or args.backend
    try:
        return open_chain(args, (program, root))
    finally:
        args.backend = saved


def _write(text: str) -> None:
    from rwkv2rknn.run.tokenizers import CONTROLS

    sys.stdout.write(text.translate(CONTROLS))
    sys.stdout.flush()


def spec_generate(spec, policy, n: int, tokenizer, stop: str | None = None, echo: bool = True) -> tuple[list, str]:
    """n tokens, round by round, streamed; a stop text ends it inside a round (the state goes back to it)."""
    from rwkv2rknn.run.tokenizers import StreamDecoder

    dec = StreamDecoder(tokenizer) if tokenizer is not None else None
    made, toks, text = 0, [], []
    while made < n:
        got = spec.round(policy, limit=n - made)
        for i, t in enumerate(got):
            policy.update(t)
            made += 1
            toks.append(t)
            if dec is None:
                if echo:
                    _write(f"{t} ")
                continue
            piece = dec.add(t)
            if piece:
                text.append(piece)
                if echo:
                    _write(piece)
                if stop and stop in "".join(text[-8:]):
                    spec.truncate(i + 1)
                    return toks, "".join(text)
    if dec is None and echo:
        _write("\n")
    return toks, "".join(text)


def run(args, target, tokenizer, tokens, rng, open_chain) -> int:
    """Generation (--prompt/--tokens), --chat or --bench with a draft model."""
    from rwkv2rknn.run.sampling import Sampling
    from rwkv2rknn.run.speculative import Speculator

    with open_draft(args, open_chain) as draft:
        spec = Speculator(target, draft, args.draft_tokens, rng)
        policy = Sampling(args.temperature, args.top_p)
        if args.bench:
            return bench(args, spec, tokens, tokenizer)
        if args.chat:
            return chat(args, spec, policy, tokenizer)
        if tokens is None:
            tokens = tokenizer.encode(args.prompt)
            if not tokens:
                raise UserError("--prompt encodes to no tokens")
            _write(args.prompt)
        spec.start(tokens)
        n = args.max_tokens if args.max_tokens is not None else (0 if args.tokens else 100)
        if not n:
            print(f"fed {len(tokens)} token(s); --max-tokens N generates", file=sys.stderr)
            return 0
        spec_generate(spec, policy, n, tokenizer)
        if tokenizer is not None:
            _write("\n")
        if not args.quiet:
            st = spec.stats
            print(f"speculative: {st.rounds} verify passes, {st.tokens} tokens, {st.tokens_per_pass:.2f} per target "
                  f"pass, drafts accepted {100 * (st.acceptance or 0):.1f}%", file=sys.stderr)
    return 0


def chat(args, spec, policy, tokenizer) -> int:
    from rwkv2rknn.run.chat import STOP, chat_loop

    max_tokens = args.max_tokens or 200
    spec.reset()

    def answer(prompt: str) -> str:
        spec.feed(tokenizer.encode(prompt))
        _write("Bot:")
        return spec_generate(spec, policy, max_tokens, tokenizer, stop=STOP)[1]

    return chat_loop(answer, lambda: spec.feed(tokenizer.encode(STOP)), _write)


def bench(args, spec, tokens, tokenizer) -> int:
    """Plain decoding and speculative decoding of the same prompt in the same run: ms per token, the speed-up,
    the acceptance rate, tokens per target pass and where the time goes (measured on this machine)."""
    from rwkv2rknn.run.sampling import Sampling, sample

    target = spec.target
    vocab = int(target.vocab_size)
    ids = tokens or (tokenizer.encode(args.prompt) if args.prompt is not None else
                     [int(t) for t in np.random.default_rng(0).integers(0, vocab, 32)])
    if not ids:
        raise UserError("--prompt encodes to no tokens")
    n = 64 if args.max_tokens is None else args.max_tokens
    if n < 1:
        raise UserError("--bench with --draft needs --max-tokens >= 1")
    seed = 0 if args.seed is None else args.seed
    # warm-up: every plan of both models once
    spec.start(ids)
    list(spec.generate(Sampling(args.temperature, args.top_p), min(n, spec.k + 2)))
    target.reset()
    logits = target.feed(ids)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    plain = []
    for _ in range(n):
        t = sample(logits, args.temperature, args.top_p, rng)
        plain.append(t)
        logits = target.step(t)
    plain_s = time.perf_counter() - t0
    spec.start(ids)
    spec.rng = np.random.default_rng(seed)
    from rwkv2rknn.run.speculative import SpecStats

    spec.stats = SpecStats(k=spec.k)
    t0 = time.perf_counter()
    got = list(spec.generate(Sampling(args.temperature, args.top_p), n))
    spec_s = time.perf_counter() - t0
    st = spec.stats
    result = {"backend": target.backend, "draft_backend": spec.draft.backend, "draft": str(spec.draft.root),
              "draft_tokens": spec.k, "decode_tokens": n, "prompt_tokens": len(ids),
              "temperature": args.temperature, "top_p": args.top_p, "seed": seed,
              "plain_ms_per_token": 1e3 * plain_s / n, "speculative_ms_per_token": 1e3 * spec_s / n,
              "speedup": plain_s / spec_s if spec_s else None,
              "acceptance": st.acceptance, "tokens_per_target_pass": st.tokens_per_pass,
              "acceptance_per_token": st.to_dict()["acceptance_per_token"],
              "draft_ms_per_token": 1e3 * st.draft_s / n, "target_ms_per_token": 1e3 * st.target_s / n,
              "accept_ms_per_token": 1e3 * st.accept_s / n, "stats": st.to_dict(), "measured": True}
    if args.temperature <= 0 or args.top_p <= 0:
        result["greedy_tokens_equal"] = sum(a == b for a, b in zip(plain, got))
    share = st.to_dict()["time_share"] or {}
    print(f"backend {result['backend']} (draft {result['draft_backend']}), measured on this machine: plain decode "
          f"{result['plain_ms_per_token']:.2f} ms/token, speculative {result['speculative_ms_per_token']:.2f} ms/token "
          f"({result['speedup']:.2f}x) over {n} tokens, k = {spec.k}")
    print(f"drafts accepted {100 * (st.acceptance or 0):.1f}% ({st.accepted} of {st.drafted}), "
          f"{st.tokens_per_pass or 0:.2f} tokens per target pass ({st.rounds} verify passes); per-token acceptance "
          f"p = {result['acceptance_per_token'] or 0:.3f} (for rwkv2rknn estimate OUT --draft DRAFT_OUT --acceptance p)")
    print(f"time: draft {result['draft_ms_per_token']:.2f} ms/token ({100 * share.get('draft', 0):.0f}%), target "
          f"{result['target_ms_per_token']:.2f} ({100 * share.get('target', 0):.0f}%), acceptance "
          f"{result['accept_ms_per_token']:.2f} ({100 * share.get('accept', 0):.0f}%)")
    if "greedy_tokens_equal" in result:
        print(f"greedy: {result['greedy_tokens_equal']} of {n} tokens equal to plain greedy decoding")
    if args.json:
        print(json.dumps(result))
    return 0


__all__ = ["add_arguments", "bench", "chat", "check_arguments", "open_draft", "run", "spec_generate"]
