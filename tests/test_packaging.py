"""What `pip install .` and `pip install '.[board]'` bring: the runtime, not the compiler."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
# the runtime's own needs (rwkv2rknn/run/__init__.py says why): numpy and onnxruntime; on the board also
# rknn-toolkit-lite2 (librknnrt comes with the board's image), tokenizers and pyrwkv-tokenizer for text,
# tomli-w for --calibrate
RUNTIME = {"numpy", "onnxruntime"}
BOARD = RUNTIME | {"rknn-toolkit-lite2", "tokenizers", "pyrwkv-tokenizer", "tomli-w", "starlette", "uvicorn"}
COMPILER = {"onnx", "onnx-graphsurgeon", "rknn-toolkit2", "torch", "jsonschema", "rich", "tqdm"}


def _names(reqs) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() for r in reqs}


@pytest.fixture(scope="module")
def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_base_install_is_the_runtime(project):
    assert _names(project["dependencies"]) == RUNTIME


def test_board_extra_is_exactly_the_runtime(project):
    board = _names(project["dependencies"]) | _names(project["optional-dependencies"]["board"])
    assert board <= BOARD and not board & COMPILER, board


def test_the_compiler_is_an_extra(project):
    assert {"onnx", "onnx-graphsurgeon"} <= _names(project["optional-dependencies"]["compile"])


def test_cli_without_the_compiler_says_what_to_install(tmp_path):
    """The compiler's CLI on a board install: one line naming the extra, exit 2 (onnx made unimportable)."""
    code = ("import sys, importlib.abc\n"
            "class B(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, n, p=None, t=None):\n"
            "        if n.split('.')[0] in ('onnx', 'onnx_graphsurgeon', 'rich'):\n"
            "            raise ModuleNotFoundError(f'No module named {n!r}', name=n)\n"
            "sys.meta_path.insert(0, B())\n"
            "from rwkv2rknn.cli import main\n"
            "sys.exit(main(['split', 'x.onnx']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "rwkv2rknn[compile]" in r.stderr and "Traceback" not in r.stderr, r.stderr
