"""`rwkv2rknn export`: a checkpoint of any supported RWKV version (or random weights) -> llama.onnx-style per-layer
graphs. The versions, their layer interfaces and file types come from rwkv2rknn.families."""

from __future__ import annotations

import argparse
import sys
import time

from rwkv2rknn.errors import UserError

HELP = ("export an RWKV checkpoint (.pth of any supported version, rwkv.cpp .bin, or a Hugging Face fla-hub "
        "directory) or random weights to ONNX graphs")


def _description() -> str:
    from rwkv2rknn import families

    layers = "\n".join(f"  {f.label}: {', '.join(f.layer0_inputs)} -> {', '.join(f.layer0_outputs)} ({f.notes})"
                        for f in families.all_families())
    return f"""\
Write embed.onnx, mixing_0.onnx ... mixing_{{L-1}}.onnx and head.onnx in the llama.onnx layout (1-D
activations, opset 16), ready for `rwkv2rknn split`. The version is read from the checkpoint's tensor names.
Layer graphs (mixing_0; later layers may take more inputs):
{layers}

Sources: a BlinkDL/ChatRWKV .pth state dict (needs torch); an rwkv.cpp .bin (fp32 or fp16; quantized files
are refused); a Hugging Face directory in the fla-hub layout (config.json and *.safetensors, what
RKLLM converts from); or --random weights of a given shape (--family) for tests and benchmarks. See
docs/checkpoints.md.
"""


EPILOG = """\
examples:
  rwkv2rknn export model.pth -o model/                   # the version is read from the tensor names
  rwkv2rknn export model-f16.bin -o model/ --dtype float32  # an rwkv.cpp file
  rwkv2rknn export hf-world-0.4B/ -o model/                  # config.json + model.safetensors (fla-hub)
  rwkv2rknn export --random --layers 2 --embd 256 --vocab 512 -o tiny/
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help=HELP, description=_description(), epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", metavar="SRC",
                   help="checkpoint: .pth (ChatRWKV torch state dict), .bin (rwkv.cpp fp32/fp16) or a Hugging Face "
                   "fla-hub directory (config.json + *.safetensors)")
    p.add_argument("-o", "--out", required=True, metavar="DIR",
                   help="output directory (replaced as a whole; one holding other files needs --force)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="tensor type of the graphs (default float16, as published)")
    p.add_argument("--weights-as", choices=["constants", "initializers"], default="constants",
                   help="store weights as Constant nodes (default, as published) or as initializers")
    p.add_argument("--force", action="store_true",
                   help="replace an output directory that holds files rwkv2rknn did not write")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r = p.add_argument_group("random weights (instead of SRC)")
    r.add_argument("--random", action="store_true", help="export random weights of the shape below")
    r.add_argument("--layers", type=int, metavar="L", help="number of layers (with --random)")
    r.add_argument("--embd", type=int, metavar="C", help="embedding width (with --random)")
    r.add_argument("--vocab", type=int, metavar="V", help="vocabulary size (with --random)")
    r.add_argument("--ffn", type=int, metavar="F", help="ffn hidden width (with --random; default 4*C)")
    r.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    r.add_argument("--family", default=None, choices=_family_names(),
                   help=f"RWKV version of the random weights (default {_default_family()}; a checkpoint's version is "
                   "read from its tensor names)")
    p.set_defaults(func=run)


def _default_family() -> str:
    from rwkv2rknn import families

    return families.DEFAULT


def _family_names() -> list[str]:
    from rwkv2rknn import families

    return families.names()


def _weights(args):
    from rwkv2rknn import families

    shape_opts = {k: getattr(args, k) for k in ("layers", "embd", "vocab", "ffn")}
    if args.random:
        if args.src:
            raise UserError(f"{args.src}: give either a checkpoint or --random, not both")
        missing = [f"--{k}" for k in ("layers", "embd", "vocab") if shape_opts[k] is None]
        if missing:
            raise UserError(f"--random needs {', '.join(missing)}; e.g. --layers 2 --embd 256 --vocab 512")
        bad = [f"--{k}" for k, v in shape_opts.items() if v is not None and v < 1]
        if bad:
            raise UserError(f"{', '.join(bad)} must be a positive integer")
        family = families.get(args.family or families.DEFAULT)
        return family, family.random_weights(args.layers, args.embd, args.vocab, seed=args.seed, ffn=args.ffn)
    if not args.src:
        raise UserError("no checkpoint given; name a .pth or .bin file or a Hugging Face directory, or use --random with "
                        "--layers/--embd/--vocab")
    given = [f"--{k}" for k, v in shape_opts.items() if v is not None]
    if given:
        raise UserError(f"{args.src}: {', '.join(given)} only apply with --random; the checkpoint sets its shape")
    if args.family is not None:
        raise UserError(f"{args.src}: --family only applies with --random; a checkpoint's tensor names tell its version")
    return families.load_checkpoint(args.src)


def run(args) -> int:
    t0 = time.perf_counter()  # reading a checkpoint is part of the wait
    family, weights = _weights(args)
    files = family.export(weights, args.out, dtype=args.dtype, weights_as=args.weights_as,
                          force=args.force, progress=not args.quiet)
    print(f"wrote {len(files)} {family.label} graphs ({weights.n_layer} layers, n_embd={weights.n_embd}, "
          f"vocab={weights.n_vocab}, {args.dtype}) to {args.out} in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    return 0
