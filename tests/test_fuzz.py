"""Malformed ONNX files: mutated bytes of a small real mixing graph end in UserError or success, nothing else.

(The random-DAG property over every partition policy is tests/passes/test_passes_partition_cut.py.)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkv2rknn.errors import UserError
from rwkv2rknn.model import load_onnx_file
from rwkv2rknn.split import split_model


@pytest.fixture(scope="module")
def mixing_bytes(model_factory) -> bytes:
    return (model_factory(layers=1, embd=16, vocab=32, dtype="float32") / "mixing_0.onnx").read_bytes()


@st.composite
def mutations(draw, size: int):
    """A list of (kind, position, payload) edits: byte flips, truncation, insertions, deletions."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "flip", "truncate", "insert", "delete", "set"]))
        pos = draw(st.integers(0, size - 1))
        payload = draw(st.binary(min_size=1, max_size=8)) if kind in ("insert", "set") else b""
        bit = draw(st.integers(0, 7))
        edits.append((kind, pos, payload, bit))
    return edits


def mutate(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for kind, pos, payload, bit in edits:
        pos = min(pos, max(len(buf) - 1, 0))
        if not buf:
            break
        if kind == "flip":
            buf[pos] ^= 1 << bit
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = payload
        elif kind == "delete":
            del buf[pos:pos + len(payload) + bit + 1]
        else:
            buf[pos:pos + len(payload)] = payload
    return bytes(buf)


def _load_or_user_error(path: Path, then_split: bool) -> None:
    try:
        load_onnx_file(path)
        if then_split:  # what loads must also go through the passes, or be refused with a reason
            split_model([path], preview=True, progress=False)
    except UserError as exc:
        assert str(exc).splitlines() and "\n" not in str(exc).strip()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_onnx_loads_or_is_refused(mixing_bytes, data):
    edits = data.draw(mutations(len(mixing_bytes)))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        path.write_bytes(mutate(mixing_bytes, edits))
        _load_or_user_error(path, then_split=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_onnx_splits_or_is_refused(mixing_bytes, data):
    edits = data.draw(mutations(len(mixing_bytes)))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        path.write_bytes(mutate(mixing_bytes, edits))
        _load_or_user_error(path, then_split=True)
