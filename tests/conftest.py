"""Shared test fixtures: small exported RWKV-4 models, built once per session and argument tuple; the trained
tiny RWKV-4 fixture (exported, built through the CLI) and held-out text for it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

_MODELS: dict[tuple, Path] = {}


def make_model(tmp_path_factory, layers: int = 2, embd: int = 64, vocab: int = 256, dtype: str = "float16",
               weights_as: str = "constants", seed: int = 0) -> Path:
    """Export random weights (checkpoints.random_weights with the same arguments) once; return the dir.

    The weights are reproducible: `random_weights(layers, embd, vocab, seed=seed)` gives them again,
    e.g. for `rwkv_ref.RefModel`. Treat the directory as read-only: other tests share it.
    """
    from rwkv2rknn.families.rwkv4 import random_weights
    from rwkv2rknn.families.rwkv4 import export_model

    key = (layers, embd, vocab, dtype, weights_as, seed)
    if key not in _MODELS:
        out = tmp_path_factory.mktemp(f"model_L{layers}_C{embd}_V{vocab}_{dtype}_{weights_as}_s{seed}") / "m"
        export_model(random_weights(layers, embd, vocab, seed=seed), out, dtype=dtype,
                     weights_as=weights_as, progress=False)
        _MODELS[key] = out
    return _MODELS[key]


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """`model_factory(layers=..., embd=..., ...)` -> Path: make_model bound to this session."""
    return lambda **kw: make_model(tmp_path_factory, **kw)


@pytest.fixture(scope="session")
def tiny_fp16(tmp_path_factory) -> Path:
    """2 layers, n_embd 64, vocab 256, float16, weights as Constant nodes (the published layout)."""
    return make_model(tmp_path_factory, dtype="float16")


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory) -> Path:
    """2 layers, n_embd 64, vocab 256, float32, weights as Constant nodes."""
    return make_model(tmp_path_factory, dtype="float32")


# -- the trained tiny RWKV-4 (tests/fixtures/rwkv4-tiny-trained.pth, facts in the .json beside it) ------------

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TRAINED_PTH = FIXTURES / "rwkv4-tiny-trained.pth"
TRAINED_FACTS = FIXTURES / "rwkv4-tiny-trained.json"
# Used when none of the held-out files exist in this Python's stdlib (another version); it may have been
# trained on, so figures from it are optimistic.
FALLBACK_STDLIB_FILE = "textwrap.py"


def trained_facts() -> dict:
    import json

    return json.loads(TRAINED_FACTS.read_text())


def heldout_bytes(n: int, offset: int = 0) -> bytes:
    """`n` bytes of held-out text from `offset` on: the stdlib files the fixture's JSON names as held out
    (never trained on), concatenated in its order as the training script did (each followed by a newline).

    Files missing from this Python's stdlib are skipped; when none is there, FALLBACK_STDLIB_FILE is used.
    """
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [root / name for name in trained_facts()["heldout_files"]]
    data = b"".join(p.read_bytes() + b"\n" for p in paths if p.is_file())
    if not data:
        data = (root / FALLBACK_STDLIB_FILE).read_bytes()
    if offset + n > len(data):
        raise ValueError(f"only {len(data)} held-out bytes, asked for {n} from {offset}")
    return data[offset:offset + n]


@pytest.fixture(scope="session")
def heldout():
    """heldout(n, offset=0) -> bytes of held-out text (see heldout_bytes); byte values are the token ids."""
    return heldout_bytes


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> Path:
    """The trained fixture exported once per session (float16, llama.onnx layout); read-only, shared."""
    from rwkv2rknn.families.rwkv4 import load_pth
    from rwkv2rknn.families.rwkv4 import export_model

    out = tmp_path_factory.mktemp("model_trained_fp16") / "m"
    export_model(load_pth(TRAINED_PTH), out, dtype="float16", progress=False)
    return out


def run_cli(*args, module: str = "rwkv2rknn", timeout: float = 1800) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` as a user types it; returns the finished process (text), never raises on status."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="session")
def trained_cli_build(tmp_path_factory) -> SimpleNamespace:
    """The trained fixture through the command line once per session, as typed in the README:
    `rwkv2rknn export FIXTURE.pth -o model`, `rwkv2rknn split model -o out`, `rwkv2rknn build out` (fp16).

    Returns out (the split directory), manifest, and export/split/build: the finished processes (tests
    assert on their status and output). Read-only: other tests share it.
    """
    pytest.importorskip("rknn.api", reason="rknn-toolkit2 is not installed (build compiles with it)")
    root = tmp_path_factory.mktemp("trained_cli")
    ns = SimpleNamespace(model=root / "model", out=root / "out", manifest=root / "out" / "manifest.json")
    ns.export = run_cli("export", TRAINED_PTH, "-o", ns.model)
    ns.split = run_cli("split", ns.model, "-o", ns.out) if ns.export.returncode == 0 else ns.export
    ns.build = run_cli("build", ns.out) if ns.split.returncode == 0 else ns.split
    return ns
