"""`python -m rwkv2rknn.run MANIFEST`: generate text, feed ids, chat, benchmark or check a split model."""

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
from rwkv2rknn.manifest import runs_on

PROG = "python -m rwkv2rknn.run"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run a split (and optionally built) model: onnxruntime for CPU segments, the NPU "
        "(rknn-lite on the board, rknn-sim on a PC) for NPU segments.",
    )
    p.add_argument("manifest", metavar="MANIFEST", help="OUT/manifest.json (or the OUT directory)")
    p.add_argument("--backend", default="auto", choices=["ort", "rknn-sim", "rknn-lite", "auto"],
                   help="where NPU segments run: ort (CPU), rknn-sim (x86 simulator; compiles every NPU "
                   "segment first, slow), rknn-lite (the board); auto = rknn-lite when available and built, "
                   "else ort. CPU segments always run on onnxruntime")
    p.add_argument("--core-mask", default=None, metavar="MASK",
                   help="rknn-lite NPU cores: plan (default: each segment's mask from the manifest, the faster one "
                   "the cost model predicts), auto, 0, 1, 2, 0_1, 0_1_2 (or the number 0,1,2,4,3,7)")
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
                   help="tokenizer.json, the RWKV World vocab, or bytes (default: the manifest's)")
    g.add_argument("--chat", action="store_true", help="interactive User:/Bot: chat; /quit or EOF ends it")
    g.add_argument("--dump-logits", metavar="FILE.npy", help="save float32 logits after the last fed token")
    g = p.add_argument_group("measure")
    g.add_argument("--bench", action="store_true", help="prefill/decode ms per token, per-segment times, peak RSS")
    g.add_argument("--json", action="store_true", help="with --bench: one JSON object on the last stdout line")
    g.add_argument("--trace", action="store_true", help="print every segment call with its inputs (stderr)")
    g.add_argument("--check", action="store_true",
                   help="single-graph manifests: random inputs through the chain and the source graph; "
                   "exit 1 over tolerance")
    g.add_argument("--calibrate", metavar="FILE.toml",
                   help="on the board (--backend rknn-lite): time the probe models `build` made and every segment, "
                   "and write a board profile that `rwkv2rknn estimate --board FILE.toml` uses")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
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


def _open_chain(args, manifest, timed=False):
    from rwkv2rknn.run.chain import Chain, core_mask_value, runner_factory

    factory = runner_factory(manifest, args.backend, core_mask=core_mask_value(args.core_mask),
                             threads=args.threads)
    npu = sum(1 for _, s in manifest.segments() if runs_on(s) == "npu")
    if factory.backend == "rknn-sim" and npu and not args.quiet:
        print(f"rknn-sim: compiling {npu} NPU segment(s) in the simulator first; this takes seconds each "
              "(minutes for a deep model)", file=sys.stderr)
    return Chain(manifest, factory, timed=timed, trace=sys.stderr if args.trace else None,
                 progress=not args.quiet)


def _save_logits(path: str, logits: np.ndarray) -> None:
    from rwkv2rknn.fsio import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(logits, dtype=np.float32))


# Control characters in generated text (ESC, NUL, CR, ... from a random or badly matched model) would
# drive the terminal instead of showing text: they are written as U+FFFD; tab and newline pass.
_CONTROLS = {c: "\ufffd" for c in [*range(0x20), *range(0x7F, 0xA0)] if c not in (0x09, 0x0A)}


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
            _write(piece.translate(_CONTROLS))
            if stop and stop in "".join(out[-8:]):
                break
    if dec is None:
        _write("\n")
    return logits, "".join(out)


def run_chat(chain, tokenizer, args, rng) -> int:
    """User:/Bot: turns; the conversation lives in the recurrent state, never re-fed."""
    interactive = sys.stdin.isatty()
    max_tokens = args.max_tokens or 200
    logits = None
    while True:
        if interactive:
            _write("User: ")
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if line == "/quit":
            break
        if not line:
            continue
        logits = chain.feed(tokenizer.encode(f"User: {line}\n\nBot:"))
        _write("Bot:")
        logits, text = generate(chain, logits, max_tokens, tokenizer, args, rng, stop="\n\n")
        if not text.endswith("\n\n"):
            # end the turn in the state too, so the next "User:" starts a fresh paragraph
            chain.feed(tokenizer.encode("\n\n"))
            _write("\n\n" if not text.endswith("\n") else "\n")
    return 0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_bench(chain, prompt_ids: list[int], n_decode: int, args) -> int:
    chain.step(prompt_ids[0])  # warm-up: first calls allocate and optimize
    if chain.chunk:
        chain.feed([prompt_ids[0]] * chain.chunk)  # and the prefill plan's
    chain.reset()
    t0 = time.perf_counter()
    logits = chain.feed(prompt_ids)
    t1 = time.perf_counter()
    for _ in range(n_decode):
        logits = chain.step(int(np.argmax(logits)))
    t2 = time.perf_counter()
    # per-segment times from a separate timed pass, so the figures above carry no timer cost
    chain.set_timing(True)
    for _ in range(max(4, min(n_decode, 16))):
        logits = chain.step(int(np.argmax(logits)))
    chain.set_timing(False)
    prefill = 1e3 * (t1 - t0) / len(prompt_ids)
    decode = 1e3 * (t2 - t1) / n_decode if n_decode else None  # None: JSON null, never NaN
    segs = {sid: {"ms": 1e3 * s / c, "calls": c} for sid, (s, c) in chain.segment_times.items() if c}
    result = {"backend": chain.backend, "prompt_tokens": len(prompt_ids), "decode_tokens": n_decode,
              "prefill_chunk": chain.chunk or None,
              "prefill_ms_per_token": prefill, "decode_ms_per_token": decode,
              "tokens_per_s": 1e3 / decode if decode else None,
              "peak_rss_mb": _peak_rss_mb(),
              "segments": {sid: round(v["ms"], 4) for sid, v in segs.items()}}
    _print_bench(result, segs)
    if args.json:
        print(json.dumps(result))
    return 0


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
    print(f"backend {result['backend']}: prefill {result['prefill_ms_per_token']:.2f} ms/token "
          f"({n_prompt} tokens, {how}), decode {decode_txt}, peak RSS {result['peak_rss_mb']:.0f} MB")
    print(f"{'segment':<24} {'ms/call':>9} {'share':>7}")
    for sid, v in segs.items():
        print(f"{sid:<24} {v['ms']:>9.4f} {100 * v['ms'] / total:>6.1f}%")
    if decode is None:
        note = "no decode steps timed, so no overhead figure"
    elif (overhead := decode - total) < 0:  # the segment times come from a separate timed pass: noise can win
        note = f"overhead outside segments within timing noise ({overhead:+.3f} ms/token)"
    else:
        note = f"overhead outside segments: {overhead:.3f} ms/token"
    print(f"{'sum of segments':<24} {total:>9.4f}  ({note})")


def run_check(chain, manifest, args) -> int:
    """Random realistic inputs through the chain and the fp32-upcast source graph of every graph."""
    from rwkv2rknn.run.chain import random_feed
    from rwkv2rknn.run.runners import OrtRunner

    rng = np.random.default_rng(args.seed or 0)
    sim = chain.backend in ("rknn-sim", "rknn-lite") and any(
        runs_on(s) == "npu" for _, s in manifest.segments())
    failed = 0
    for g in manifest.graphs:
        src = manifest.resolve(g["source"]["path"])
        if not src.exists():
            raise UserError(f"{manifest.path}: source graph {g['source']['path']} of {g['name']} is missing; "
                            "--check compares against it: copy it back or split again")
        feed = random_feed(g["inputs"], rng, [manifest.resolve(s["onnx"]) for s in g["segments"]])
        got = chain.run_graph(g["name"], feed)
        with OrtRunner(_fp32_source(src), level="basic", label=str(src)) as ref_runner:
            ref = ref_runner.infer(feed)
        for name in got:
            a = np.asarray(got[name], np.float64).ravel()
            b = np.asarray(ref[name], np.float64).ravel()
            if a.size != b.size:
                raise UserError(f"{src}: output {name} has {b.size} values, the chain {a.size}; split again")
            max_abs = float(np.abs(a - b).max()) if a.size else 0.0
            denom = np.linalg.norm(a) * np.linalg.norm(b)
            cos = float(a @ b / denom) if denom else (1.0 if max_abs == 0 else 0.0)
            scale = float(np.abs(b).max()) if b.size else 0.0
            ok = cos >= 0.999 if sim else max_abs <= 1e-4 * max(scale, 1e-30) or max_abs <= 1e-6
            failed += not ok
            print(f"{g['name']}/{name}: max_abs {max_abs:.3e} (rel {max_abs / max(scale, 1e-30):.2e}) "
                  f"cosine {cos:.6f} {'ok' if ok else 'FAIL'}")
    tol = "cosine >= 0.999" if sim else "max_abs <= 1e-4 * max|ref|"
    print(f"check ({chain.backend}, tolerance {tol}): {'FAILED' if failed else 'passed'}")
    return 1 if failed else 0


def _fp32_source(path) -> bytes:
    """The source graph with fp16 upcast to fp32 (onnxruntime runs fp16-mixing graphs badly or not at all)."""
    import onnx
    import onnx_graphsurgeon as gs

    from passes.fp32 import fp16_to_fp32
    from passes.normalize import constants_to_initializers, remove_identities
    from rwkv2rknn.model import load_onnx_file

    graph = remove_identities(fp16_to_fp32(constants_to_initializers(gs.import_onnx(load_onnx_file(path)))))
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model.ir_version = min(model.ir_version, 10)
    return onnx.shape_inference.infer_shapes(model).SerializeToString()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(PROG, _run, args)

def _run(args) -> int:
    from rwkv2rknn.manifest import Manifest

    manifest = Manifest.load(args.manifest)
    if args.max_tokens is not None and args.max_tokens < 0:
        raise UserError("--max-tokens must be >= 0")
    if args.temperature < 0 or not 0 <= args.top_p <= 1:
        raise UserError("--temperature must be >= 0 and --top-p within [0, 1]")
    if args.dump_logits and not args.dump_logits.endswith(".npy"):
        raise UserError(f"--dump-logits {args.dump_logits}: give a file name ending in .npy")
    if args.json and not args.bench:
        raise UserError("--json goes with --bench")
    if args.calibrate:
        from rwkv2rknn.run.board_calibration import run_calibrate

        return run_calibrate(args, manifest)
    model = manifest.model
    if model is None:
        if not (args.check or args.bench):
            raise UserError(f"{manifest.path}: a split of single graphs (no whole model): use --check or --bench")
        with _open_chain(args, manifest) as chain:
            return run_check(chain, manifest, args) if args.check else run_bench_graphs(chain, manifest, args)
    if args.check:
        raise UserError(f"{manifest.path}: --check is for single-graph splits; for a whole model compare "
                        "logits with --tokens ... --dump-logits")
    vocab = model["vocab_size"]
    tokens = _parse_tokens(args.tokens, vocab) if args.tokens is not None else None
    if args.tokens is not None and args.prompt is not None:
        raise UserError("give either --prompt or --tokens, not both")
    need_tok = (args.prompt is not None or args.chat) or (not args.bench and tokens is None)
    tokenizer = None
    if need_tok or (tokens is None and args.max_tokens):
        from rwkv2rknn.run.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer or model.get("tokenizer"), manifest.root, vocab)
    elif args.tokenizer and not args.bench:
        from rwkv2rknn.run.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer, manifest.root, vocab)
    elif tokens is not None and args.max_tokens and not args.bench:  # print text if the model's tokenizer is here
        from rwkv2rknn.run.tokenizers import load_tokenizer

        with contextlib.suppress(UserError):
            tokenizer = load_tokenizer(model.get("tokenizer"), manifest.root, vocab)
    if not (args.prompt is not None or tokens or args.chat or args.bench):
        raise UserError("nothing to do: give --prompt TEXT, --tokens IDS, --chat or --bench")
    rng = np.random.default_rng(args.seed)
    with _open_chain(args, manifest) as chain:
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


def run_bench_graphs(chain, manifest, args) -> int:
    """Single-graph manifests: ms per pass over every graph with random inputs."""
    from rwkv2rknn.run.chain import random_feed

    rng = np.random.default_rng(0)
    feeds = [(g["name"], random_feed(g["inputs"], rng, [manifest.resolve(s["onnx"]) for s in g["segments"]]))
             for g in manifest.graphs]
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
              "segments": {sid: round(v["ms"], 4) for sid, v in segs.items()}}
    print(f"backend {chain.backend}: {ms:.3f} ms per pass over {len(feeds)} graph(s), "
          f"peak RSS {result['peak_rss_mb']:.0f} MB")
    for sid, v in segs.items():
        print(f"{sid:<24} {v['ms']:>9.4f} ms/call")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
