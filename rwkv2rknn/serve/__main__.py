"""`python -m rwkv2rknn.serve OUT`: an OpenAI-compatible server (and a chat page) for a split or built model."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from rwkv2rknn.errors import UserError, run_guarded

PROG = "python -m rwkv2rknn.serve"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models; "
        "streaming as server-sent events) with a chat page at /, a state cache (a conversation's next turn computes "
        "only its new tokens), and saved states (/v1/state/save, /v1/state/load). No authentication unless "
        "--api-key is given.")
    p.add_argument("manifest", metavar="OUT", help="the split/build output directory (or its manifest.json or "
                   "program.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--backend", default="auto", choices=["ort", "rknn-sim", "rknn-lite", "rknn-c", "auto"],
                   help="where NPU steps run, as for python -m rwkv2rknn.run (default auto)")
    p.add_argument("--core-mask", default=None, metavar="MASK", help="NPU cores, as for python -m rwkv2rknn.run")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--api-key", default=os.environ.get("RWKV2RKNN_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every /v1/ route (default: $RWKV2RKNN_API_KEY, "
                   "else no authentication)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: OUT's directory name)")
    p.add_argument("--tokenizer", default=None, metavar="PATH|world|bytes", help="default: the model's")
    p.add_argument("--state", default=None, metavar="FILE",
                   help="initial state: an RWKV state-tuning file (.pth/.safetensors with blocks.N.att.time_state) "
                   "or a state saved by this server (.npz)")
    p.add_argument("--state-dir", default="rwkv2rknn-states", metavar="DIR",
                   help="where /v1/state/save and /v1/state/load keep named states (default ./rwkv2rknn-states)")
    g = p.add_argument_group("speculative decoding (docs/speculative.md)")
    g.add_argument("--draft", metavar="DRAFT_OUT",
                   help="a smaller model's split/build output with the same tokenizer: it drafts tokens that this model "
                   "checks in one verify pass each (OUT needs a verify plan: split --verify-tokens K); the output has "
                   "the distribution of plain sampling")
    g.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="tokens drafted per verify pass (default: the verify plan's K)")
    g.add_argument("--draft-backend", default=None, choices=["ort", "rknn-sim", "rknn-lite", "rknn-c", "auto"],
                   help="where the draft's NPU steps run (default: --backend)")
    g = p.add_argument_group("limits")
    g.add_argument("--cache-mb", type=float, default=256, help="state cache size in MiB (default 256; 0 = off)")
    g.add_argument("--max-active", type=int, default=16,
                   help="requests generating at once, taking turns (default 16); more wait in a queue")
    g.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond those (default 256; then 503)")
    g.add_argument("--max-prompt-tokens", type=int, default=8192, help="longest prompt in tokens (default 8192)")
    g.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="largest max_tokens a request may ask for (default 4096)")
    g.add_argument("--default-max-tokens", type=int, default=None,
                   help="max_tokens when a request gives none (default 500, RWKV-Runner's)")
    g.add_argument("--quantum-ms", type=float, default=25.0,
                   help="time slice a request gets before the next one's turn (default 25 ms)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning; info logs every request)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(PROG, _run, args)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _run(args) -> int:
    for name, lo in (("port", 0), ("max_active", 1), ("max_queue", 0), ("max_prompt_tokens", 1),
                     ("max_tokens_limit", 1)):
        if getattr(args, name) < lo:
            raise UserError(f"--{name.replace('_', '-')} must be >= {lo}")
    if args.cache_mb < 0 or args.quantum_ms <= 0:
        raise UserError("--cache-mb must be >= 0 and --quantum-ms > 0")
    try:
        import uvicorn

        from rwkv2rknn.serve.app import Service, create_app
    except ImportError as exc:
        raise UserError(f"the server needs the serve extra ({exc.name} is missing): pip install 'rwkv2rknn[serve]' "
                        "(the board extra includes it)") from None
    from rwkv2rknn.run.chain import Chain, core_mask_value, runner_factory
    from rwkv2rknn.run.source import open_program
    from rwkv2rknn.run.tokenizers import BytesTokenizer, load_tokenizer
    from rwkv2rknn.serve.engine import Engine
    from rwkv2rknn.serve.protocol import Limits
    from rwkv2rknn.serve.sampling import DEFAULT_MAX_TOKENS
    from rwkv2rknn.serve.statefile import load_initial

    program, root = open_program(args.manifest)
    model = program.model
    if model is None:
        raise UserError(f"{root}: a split of single graphs (no whole model) cannot be served")
    tokenizer = load_tokenizer(args.tokenizer or model.get("tokenizer"), root, model["vocab_size"])
    factory = runner_factory((program, root), args.backend, core_mask=core_mask_value(args.core_mask),
                             threads=args.threads)
    chain = Chain(None, factory, progress=False)
    draft = None
    try:
        if args.draft is not None:
            dprog, droot = open_program(args.draft)
            dfactory = runner_factory((dprog, droot), args.draft_backend or args.backend,
                                      core_mask=core_mask_value(args.core_mask), threads=args.threads)
            draft = Chain(None, dfactory, progress=False)
        elif args.draft_tokens is not None or args.draft_backend is not None:
            raise UserError("--draft-tokens and --draft-backend go with --draft DRAFT_OUT")
        init = None
        if args.state:
            chain.reset()
            init = load_initial(args.state, program, chain.get_state())
        eos = None if isinstance(tokenizer, BytesTokenizer) else 0  # id 0 ends the text (RWKV World, GPT-NeoX)
        kw = dict(init_state=init, cache_bytes=int(args.cache_mb * (1 << 20)), max_active=args.max_active,
                  max_queue=args.max_queue, quantum=args.quantum_ms / 1e3, eos=eos)
        if draft is not None:
            from rwkv2rknn.serve.speculative import SpecEngine

            engine = SpecEngine(chain, tokenizer, draft, args.draft_tokens, **kw)
        else:
            engine = Engine(chain, tokenizer, **kw)
        name = args.model_name or root.name or model.get("family", "rwkv")
        default_max = min(args.default_max_tokens or DEFAULT_MAX_TOKENS, args.max_tokens_limit)
        service = Service(engine, tokenizer, program, model_name=name, state_dir=args.state_dir,
                          limits=Limits(args.max_prompt_tokens, args.max_tokens_limit), default_max_tokens=default_max)
        app = create_app(service, api_key=args.api_key)
        sock = _listen(args.host, args.port)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        say = lambda line: print(f"{PROG}: {line}", file=sys.stderr, flush=True)  # noqa: E731
        say(f"serving '{name}' ({model.get('family')}, {model.get('n_layer')}x{model.get('n_embd')}, vocab "
            f"{model['vocab_size']}, backend {chain.backend}{', state ' + args.state if args.state else ''}"
            + (f", draft {args.draft} on {draft.backend}, {engine.spec.k} drafted tokens per verify pass"
               if draft is not None else "") + ")")
        if args.api_key:
            say("authentication: every /v1/ request needs 'Authorization: Bearer KEY' (--api-key)")
        else:
            say("NO AUTHENTICATION: anyone who can connect to this address can use the model and save and load "
                "states; give --api-key KEY before opening it to a network")
            if not _is_loopback(host):
                say(f"WARNING: {host} is not a loopback address: other machines can reach this unauthenticated server")
        # last: a script (and the tests) wait for this line, so everything above is printed when they read it
        say(f"listening on http://{shown}:{port} (chat page at /, OpenAI API at /v1)")
        config = uvicorn.Config(app, log_level=args.log_level, lifespan="on", timeout_graceful_shutdown=5,
                                access_log=args.log_level in ("info", "debug"))
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the Ctrl-C: the normal way to stop
            pass
        say("stopped")
    finally:
        chain.close()
        if draft is not None:
            draft.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
