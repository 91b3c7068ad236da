"""`python -m rwkv2rknn.run OUT`: generate text, feed ids, chat, benchmark, or show the execution program."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import sys
import time

import numpy as np

from rwkv2rknn.errors import UserError, run_guarded
from rwkv2rknn.run.tokenizers import CONTROLS

PROG = "python -m rwkv2rknn.run"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run a split (and optionally built) model: its execution program (OUT/program.json) with "
        "onnxruntime for CPU steps and the NPU (rknn-c or rknn-lite on the board, rknn-sim on a PC) for NPU steps.",
    )
    p.add_argument("manifest", metavar="OUT", nargs="?", help="the split/build output directory (or its "
                   "manifest.json or program.json)")
    p.add_argument("--backend", default="auto", choices=["ort", "rknn-sim", "rknn-lite", "rknn-c", "auto"],
                   help="where NPU steps run: ort (CPU), rknn-sim (x86 simulator; compiles every NPU segment first, "
                   "slow; needs rknn-toolkit2), rknn-c (the board, librknnrt's C API: zero-copy buffers), rknn-lite "
                   "(the board, rknn-toolkit-lite2's Python API); auto = rknn-c where librknnrt loads, else "
                   "rknn-lite where it imports (a built model), else ort. CPU steps always run on onnxruntime")
    p.add_argument("--core-mask", default=None, metavar="MASK",
                   help="NPU cores: plan (default: each segment's mask from the program, the faster one predicted), "
                   "auto, 0, 1, 2, 0_1, 0_1_2 (or the number 0,1,2,4,3,7)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    g = p.add_argument_group("text")
    g.add_argument("--prompt", help="text to continue")
    g.add_argument("--tokens", metavar="ID,ID,...", help="feed these token ids instead of a prompt")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="tokens to generate (default 100 with --prompt, 0 with --tokens, 32 for --bench)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    g.add_argument("--top-p", type=float, default=0.85, help="nucleus sampling mass (default 0.85)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--tokenizer", default=None, metavar="PATH|world|bytes",
                   help="tokenizer.json, the RWKV World vocab, or bytes (default: the model's)")
    g.add_argument("--chat", action="store_true", help="interactive User:/Bot: chat; /quit or EOF ends it")
    g.add_argument("--dump-logits", metavar="FILE.npy", help="save float32 logits after the last fed token")
    g = p.add_argument_group("inspect and measure")
    g.add_argument("--show-program", action="store_true",
                   help="print the execution program (steps and buffers of the decode and prefill plans) and exit")
    g.add_argument("--bench", action="store_true",
                   help="prefill/decode ms per token, per-segment times, converted bytes, overlap, peak RSS")
    g.add_argument("--json", action="store_true", help="with --bench or --show-program: JSON on the last stdout line")
    g.add_argument("--trace", action="store_true", help="print every step with its inputs (stderr)")
    g.add_argument("--no-overlap", action="store_true",
                   help="run every step in order on one thread (default: CPU steps nothing waits on run beside "
                   "the next NPU step)")
    g.add_argument("--check", action="store_true",
                   help="single-graph splits (on the PC, with the compiler installed): random inputs through the "
                   "program and the source graph; exit 1 over tolerance")
    g.add_argument("--calibrate", metavar="FILE.toml",
                   help="on the board (--backend rknn-c or rknn-lite): time the probe models `build` made and every "
                   "segment, and write a board profile that `rwkv2rknn estimate --board FILE.toml` uses")
    g.add_argument("--doctor", action="store_true",
                   help="which runtime pieces are installed and which backends can run here; needs no OUT")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    from rwkv2rknn.run.draft_main import add_arguments

    add_arguments(p)
    return p


def _parse_tokens(text: str, vocab: int) -> list[int]:
    try:
        # commas and/or whitespace separate ids: "1,2,3", "1, 2, 3" and "1 2 3" are the same three ids
        ids = [int(t) for t in re.split(r"[,\s]+", text.strip()) if t != ""]
    except ValueError:
        raise UserError(f"--tokens {text!r}: expected comma-separated integers, e.g. --tokens 34,105,110") from None
    if not ids:
        raise UserError("--tokens: no ids given")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise UserError(f"--tokens: id {bad[0]} is outside the model's vocab (0..{vocab - 1})")
    return ids


def _open_chain(args, source, overlap: bool = True):
    from rwkv2rknn.run.chain import Chain, core_mask_value, runner_factory

    factory = runner_factory(source, args.backend, core_mask=core_mask_value(args.core_mask), threads=args.threads)
    npu = sum(1 for s in factory.program.segments.values() if s.device == "npu")
    if factory.backend == "rknn-sim" and npu and not args.quiet:
        print(f"rknn-sim: compiling {npu} NPU segment(s) in the simulator first; this takes seconds each "
              "(minutes for a deep model)", file=sys.stderr)
    return Chain(None, factory, trace=sys.stderr if args.trace else None, progress=not args.quiet,
                 overlap=overlap and not args.no_overlap)


def _save_logits(path: str, logits: np.ndarray) -> None:
    from rwkv2rknn.fsio import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(logits, dtype=np.float32))


# Control characters in generated text (ESC, NUL, CR, ... from a random or badly matched model) would
# drive the terminal instead of showing text: they are written as U+FFFD; tab and newline pass.


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def generate(chain, logits, n: int, tokenizer, args, rng, stop: str | None = None) -> tuple[np.ndarray, str]:
    """Sample n tokens, feeding each back; stream the text. Returns the last logits and the text."""
    from rwkv2rknn.run.sampling import sample
    from rwkv2rknn.run.tokenizers import StreamDecoder

    dec = StreamDecoder(tokenizer) if tokenizer is not None else None
    out = []
    for _ in range(n):
        tok = sample(logits, args.temperature, args.top_p, rng)
        logits = chain.step(tok)
        if dec is None:
            _write(f"{tok} ")
            continue
        piece = dec.add(tok)
        if piece:
            out.append(piece)
            _write(piece.translate(CONTROLS))
            if stop and stop in "".join(out[-8:]):
                break
    if dec is None:
        _write("\n")
    return logits, "".join(out)


def run_chat(chain, tokenizer, args, rng) -> int:
    """User:/Bot: turns; the conversation lives in the recurrent state, never re-fed."""
    from rwkv2rknn.run.chat import STOP, chat_loop

    max_tokens = args.max_tokens or 200

    def answer(prompt: str) -> str:
        logits = chain.feed(tokenizer.encode(prompt))
        _write("Bot:")
        return generate(chain, logits, max_tokens, tokenizer, args, rng, stop=STOP)[1]

    return chat_loop(answer, lambda: chain.feed(tokenizer.encode(STOP)), _write)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _decode_ms(chain, logits, n: int) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    for _ in range(n):
        logits = chain.step(int(np.argmax(logits)))
    return (time.perf_counter() - t0) * 1e3 / max(1, n), logits


def run_bench(chain, prompt_ids: list[int], n_decode: int, args) -> int:
    chain.step(prompt_ids[0])  # warm-up: first calls allocate and optimize
    if chain.chunk:
        chain.feed([prompt_ids[0]] * chain.chunk)  # and the prefill plan's
    chain.reset()
    t0 = time.perf_counter()
    logits = chain.feed(prompt_ids)
    t1 = time.perf_counter()
    conv0 = chain.converted_bytes
    decode, logits = _decode_ms(chain, logits, n_decode) if n_decode else (None, logits)
    converted = (chain.converted_bytes - conv0) / n_decode if n_decode else None
    # the same decode with every step on one thread: what overlapping the CPU steps saved, measured here
    serial = None
    overlapping = any(s.overlap for s in chain.program.decode.steps)
    if n_decode and overlapping and chain._overlap:
        chain._overlap_off = True
        chain._overlap, saved = False, chain._overlap
        chain._bind_all()
        chain.set_timing(False)
        serial, logits = _decode_ms(chain, logits, n_decode)
        chain._overlap = saved
        chain._bind_all()
        chain.set_timing(False)
    # per-segment times from a separate timed pass, so the figures above carry no timer cost
    chain.set_timing(True)
    for _ in range(max(4, min(n_decode, 16))):
        logits = chain.step(int(np.argmax(logits)))
    chain.set_timing(False)
    prefill = 1e3 * (t1 - t0) / len(prompt_ids)
    segs = {sid: {"ms": 1e3 * s / c, "calls": c} for sid, (s, c) in chain.segment_times.items() if c}
    npu_us = _npu_times(chain)
    result = {"backend": chain.backend, "prompt_tokens": len(prompt_ids), "decode_tokens": n_decode,
              "prefill_chunk": chain.chunk or None,
              "prefill_ms_per_token": prefill, "decode_ms_per_token": decode,
              "tokens_per_s": 1e3 / decode if decode else None,
              "converted_bytes_per_token": converted,
              "program_converted_bytes_per_token": chain.program.decode.converted_bytes_per_token,
              "overlap": {"steps_per_token": sum(s.overlap for s in chain.program.decode.steps),
                          "serial_decode_ms_per_token": serial,
                          "saved_ms_per_token": (serial - decode) if serial is not None else None},
              "peak_rss_mb": _peak_rss_mb(),
              "segments": {sid: round(v["ms"], 4) for sid, v in segs.items()}}
    if npu_us:
        result["npu_run_us"] = npu_us
    _print_bench(result, segs)
    if args.json:
        print(json.dumps(result))
    return 0


def _npu_times(chain) -> dict:
    """Each NPU segment's own time of its last run (RKNN_QUERY_PERF_RUN; the C-API runner only)."""
    out = {}
    for sid, r in chain.runners.items():
        perf = getattr(r, "perf_run_us", None)
        if callable(perf):
            with contextlib.suppress(Exception):
                out[sid] = perf()
    return out


def _print_bench(result: dict, segs: dict) -> None:
    total = sum(v["ms"] for v in segs.values()) or 1.0
    chunk, n_prompt = result.get("prefill_chunk"), result["prompt_tokens"]
    if chunk and n_prompt >= chunk:
        rest = n_prompt % chunk
        how = f"prefill plan, {chunk} per call" + (f", the last {rest} token by token" if rest else "")
    else:
        how = "token by token"
    decode = result["decode_ms_per_token"]
    decode_txt = (f"{decode:.2f} ms/token ({result['decode_tokens']} tokens, {result['tokens_per_s']:.1f} tokens/s)"
                  if decode is not None else "not timed (0 tokens)")
    print(f"backend {result['backend']} (measured on this machine): prefill {result['prefill_ms_per_token']:.2f} "
          f"ms/token ({n_prompt} tokens, {how}), decode {decode_txt}, peak RSS {result['peak_rss_mb']:.0f} MB")
    if result["converted_bytes_per_token"] is not None:
        print(f"converted per decoded token: {result['converted_bytes_per_token']:.0f} bytes (fp32 side; casts "
              "inside CPU graphs and the program's convert steps)")
    ov = result["overlap"]
    if ov["serial_decode_ms_per_token"] is not None:
        print(f"overlap: {ov['steps_per_token']} CPU step(s) per token beside the next NPU step; serial decode "
              f"{ov['serial_decode_ms_per_token']:.2f} ms/token, saved {ov['saved_ms_per_token']:+.3f} ms/token")
    print(f"{'segment':<28} {'ms/call':>9} {'share':>7}")
    for sid, v in segs.items():
        print(f"{sid:<28} {v['ms']:>9.4f} {100 * v['ms'] / total:>6.1f}%")
    if decode is None:
        note = "no decode steps timed, so no overhead figure"
    elif (overhead := decode - total) < 0:  # overlap, or noise: the segment times come from a separate pass
        note = f"overhead outside segments within timing noise or overlapped ({overhead:+.3f} ms/token)"
    else:
        note = f"overhead outside segments: {overhead:.3f} ms/token"
    print(f"{'sum of segments':<28} {total:>9.4f}  ({note})")


def _random_inputs(program, name: str, rng) -> dict:
    """Realistic random inputs of a single graph from its buffers: normal activations, small positive states."""
    feed = {}
    for tname, b in program.graphs[name]["inputs"].items():
        buf = program.buffers[b]
        dt = np.dtype(buf.dtype)
        if dt.kind in "iu":
            feed[tname] = np.zeros(buf.shape, dt)
        elif "state" in tname.lower():
            feed[tname] = rng.uniform(0.0, 0.5, size=buf.shape).astype(dt)
        else:
            feed[tname] = rng.standard_normal(buf.shape).astype(dt)
    return feed


def run_bench_graphs(chain, args) -> int:
    """Single-graph programs: ms per pass over every graph with random inputs."""
    rng = np.random.default_rng(0)
    feeds = [(name, _random_inputs(chain.program, name, rng)) for name in chain.program.graphs]
    for name, f in feeds:
        chain.run_graph(name, f)
    n = args.max_tokens or 32
    t0 = time.perf_counter()
    for _ in range(n):
        for name, f in feeds:
            chain.run_graph(name, f)
    ms = 1e3 * (time.perf_counter() - t0) / n
    chain.set_timing(True)
    for _ in range(min(n, 16)):
        for name, f in feeds:
            chain.run_graph(name, f)
    chain.set_timing(False)
    segs = {sid: {"ms": 1e3 * s / c, "calls": c} for sid, (s, c) in chain.segment_times.items() if c}
    result = {"backend": chain.backend, "prompt_tokens": 0, "decode_tokens": n, "prefill_ms_per_token": None,
              "decode_ms_per_token": ms, "tokens_per_s": 1e3 / ms, "peak_rss_mb": _peak_rss_mb(),
              "converted_bytes_per_token": chain.program.decode.converted_bytes_per_token,
              "segments": {sid: round(v["ms"], 4) for sid, v in segs.items()}}
    print(f"backend {chain.backend} (measured on this machine): {ms:.3f} ms per pass over {len(feeds)} graph(s), "
          f"peak RSS {result['peak_rss_mb']:.0f} MB")
    for sid, v in segs.items():
        print(f"{sid:<28} {v['ms']:>9.4f} ms/call")
    if args.json:
        print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(PROG, _run, args)


def _load_tokenizer(args, program, root, vocab: int, tokens, need_tok: bool):
    from rwkv2rknn.run.tokenizers import load_tokenizer

    hint = (program.model or {}).get("tokenizer")
    if need_tok or (tokens is None and args.max_tokens):
        return load_tokenizer(args.tokenizer or hint, root, vocab)
    if args.tokenizer and not args.bench:
        return load_tokenizer(args.tokenizer, root, vocab)
    if tokens is not None and args.max_tokens and not args.bench:  # print text if the model's tokenizer is here
        with contextlib.suppress(UserError):
            return load_tokenizer(hint, root, vocab)
    return None


def _run(args) -> int:
    from rwkv2rknn.run.source import open_program

    if args.doctor:
        from rwkv2rknn.run.doctor import collect, print_text

        print_text(collect())
        return 0
    if args.manifest is None:
        raise UserError("give the output directory of `rwkv2rknn split`/`build` (OUT), or --doctor")

    if args.max_tokens is not None and args.max_tokens < 0:
        raise UserError("--max-tokens must be >= 0")
    if args.temperature < 0 or not 0 <= args.top_p <= 1:
        raise UserError("--temperature must be >= 0 and --top-p within [0, 1]")
    if args.dump_logits and not args.dump_logits.endswith(".npy"):
        raise UserError(f"--dump-logits {args.dump_logits}: give a file name ending in .npy")
    if args.json and not (args.bench or args.show_program):
        raise UserError("--json goes with --bench or --show-program")
    from rwkv2rknn.run import draft_main

    draft_main.check_arguments(args)
    program, root = open_program(args.manifest)
    if args.show_program:
        from rwkv2rknn.program.show import print_program

        print_program(program, root, as_json=args.json)
        return 0
    if args.calibrate:
        from rwkv2rknn.run.board_calibration import run_calibrate

        return run_calibrate(args, (program, root))
    model = program.model
    if model is None:
        if not (args.check or args.bench):
            raise UserError(f"{root}: a split of single graphs (no whole model): use --check or --bench")
        if args.check:
            try:
                from rwkv2rknn.check import run_check
            except ImportError as exc:
                raise UserError(f"--check compares against the source graphs with the compiler's packages ({exc.name} "
                                "is missing): run it on the PC where rwkv2rknn split ran") from None
            with _open_chain(args, (program, root)) as chain:
                return run_check(chain, root, args)
        with _open_chain(args, (program, root)) as chain:
            return run_bench_graphs(chain, args)
    if args.check:
        raise UserError(f"{root}: --check is for single-graph splits; for a whole model compare "
                        "logits with --tokens ... --dump-logits")
    vocab = model["vocab_size"]
    tokens = _parse_tokens(args.tokens, vocab) if args.tokens is not None else None
    if args.tokens is not None and args.prompt is not None:
        raise UserError("give either --prompt or --tokens, not both")
    need_tok = (args.prompt is not None or args.chat) or (not args.bench and tokens is None)
    tokenizer = _load_tokenizer(args, program, root, vocab, tokens, need_tok)
    if not (args.prompt is not None or tokens or args.chat or args.bench):
        raise UserError("nothing to do: give --prompt TEXT, --tokens IDS, --chat or --bench")
    rng = np.random.default_rng(args.seed)
    if args.draft is not None:
        with _open_chain(args, (program, root)) as chain:
            return draft_main.run(args, chain, tokenizer, tokens, rng, _open_chain)
    with _open_chain(args, (program, root)) as chain:
        if args.bench:
            ids = tokens or (tokenizer.encode(args.prompt) if args.prompt is not None else
                             [int(t) for t in np.random.default_rng(0).integers(0, vocab, 32)])
            if not ids:
                raise UserError("--prompt encodes to no tokens")
            n = 32 if args.max_tokens is None else args.max_tokens
            return run_bench(chain, ids, n, args)
        if args.chat:
            return run_chat(chain, tokenizer, args, rng)
        if tokens is None:
            tokens = tokenizer.encode(args.prompt)
            if not tokens:
                raise UserError("--prompt encodes to no tokens")
            _write(args.prompt)
        logits = chain.feed(tokens)
        if args.dump_logits:
            _save_logits(args.dump_logits, logits)
        n = args.max_tokens if args.max_tokens is not None else (0 if args.tokens else 100)
        if not n and not args.dump_logits:
            print(f"fed {len(tokens)} token(s); next token by argmax: {int(np.argmax(logits))} "
                  "(--max-tokens N generates, --dump-logits FILE saves the logits)", file=sys.stderr)
        if n:
            logits, _ = generate(chain, logits, n, tokenizer, args, rng)
            if tokenizer is not None:
                _write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
