"""The `rwkv2rknn` command line: one small module per subcommand, each over a public function."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rwkv2rknn import __version__
from rwkv2rknn.errors import UserError, describe_unexpected
from rwkv2rknn.manifest import DEFAULT_OUT  # noqa: F401  (re-exported: split writes it, build reads it)

# Subcommand modules, in the order `--help` lists them. Each defines `register(subparsers)`,
# which adds its parser and sets `func` to a callable taking the parsed args.
SUBCOMMANDS = ["export", "split", "build", "report", "doctor"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rwkv2rknn",
        description="Compile llama.onnx-style RWKV graphs into hybrid onnxruntime + RKNN NPU models.",
        epilog="Run a compiled model with: python -m rwkv2rknn.run OUT/manifest.json",
    )
    parser.add_argument("--version", action="version", version=f"rwkv2rknn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"rwkv2rknn.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"rwkv2rknn.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        status = args.func(args)
    except UserError as exc:
        print(f"rwkv2rknn {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"rwkv2rknn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # no traceback reaches a user unless asked for
        if os.environ.get("RWKV2RKNN_DEBUG"):
            raise
        msg, status = describe_unexpected(exc)
        print(f"rwkv2rknn {args.command}: error: {msg}", file=sys.stderr)
        return status
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
