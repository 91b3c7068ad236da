"""Shared test fixtures: small exported RWKV-4 models, built once per session and argument tuple."""

from __future__ import annotations

from pathlib import Path

import pytest

_MODELS: dict[tuple, Path] = {}


def make_model(tmp_path_factory, layers: int = 2, embd: int = 64, vocab: int = 256, dtype: str = "float16",
               weights_as: str = "constants", seed: int = 0) -> Path:
    """Export random weights (checkpoints.random_weights with the same arguments) once; return the dir.

    The weights are reproducible: `random_weights(layers, embd, vocab, seed=seed)` gives them again,
    e.g. for `rwkv_ref.RefModel`. Treat the directory as read-only: other tests share it.
    """
    from rwkv2rknn.checkpoints import random_weights
    from rwkv2rknn.export import export_model

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
