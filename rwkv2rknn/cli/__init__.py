"""The `rwkv2rknn` command line: one small module per subcommand, each over a public function."""

from __future__ import annotations

import argparse
import importlib
import sys

from rwkv2rknn import __version__
from rwkv2rknn.errors import run_guarded
from rwkv2rknn.manifest import DEFAULT_OUT  # noqa: F401  (re-exported: split writes it, build reads it)

# Subcommand modules, in the order `--help` lists them. Each defines `register(subparsers)`,
# which adds its parser and sets `func` to a callable taking the parsed args.
SUBCOMMANDS = ["export", "split", "build", "estimate", "report", "doctor"]


def console():
    """A rich console for tables: the terminal's width, or 200 columns in a pipe or log (no wrapped reasons)."""
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


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


# What the compiler needs beyond the runtime (the `compile` extra): a board install has none of them.
COMPILER_PACKAGES = ("onnx", "onnx_graphsurgeon", "rich", "tqdm", "jsonschema", "tomli_w", "tokenizers")


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in COMPILER_PACKAGES:
            raise
        print(f"rwkv2rknn: error: the compiler needs {exc.name}, which this install lacks (a board install has "
              "the runtime only: python -m rwkv2rknn.run); install the compiler with pip install 'rwkv2rknn[compile]'",
              file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_guarded(f"rwkv2rknn {args.command}", args.func, args)

if __name__ == "__main__":
    sys.exit(main())
