"""Realistic random inputs for a graph or a segment, from its manifest tensor specs (compiler side: it reads ONNX
for the range of integer inputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _gather_bound(onnx_path: Path, input_name: str) -> int | None:
    """For an integer input used as Gather indices: the size of the gathered axis (vocab for embed)."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:
        return None
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == input_name:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = inits.get(node.input[0])
            if dims:
                return int(dims[axis])
    return None


def random_feed(specs: list[dict], rng: np.random.Generator, onnx_paths=()) -> dict:
    """Realistic random graph inputs: normal activations; small positive finite values for state;
    valid indices for integer inputs."""
    feed = {}
    for spec in specs:
        dt = np.dtype(spec["dtype"])
        shape = tuple(spec["shape"])
        if dt.kind in "iu":
            bound = next((b for p in onnx_paths if (b := _gather_bound(p, spec["name"]))), 1)
            feed[spec["name"]] = rng.integers(0, bound, size=shape).astype(dt)
        elif "state" in spec["name"].lower():
            # aa/bb/pp rows of an RWKV state: positive keeps the WKV denominator away from zero.
            feed[spec["name"]] = rng.uniform(0.0, 0.5, size=shape).astype(dt)
        else:
            feed[spec["name"]] = rng.standard_normal(shape).astype(dt)
    return feed
