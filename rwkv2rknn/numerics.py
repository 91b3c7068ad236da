"""Comparison metrics for NPU results against onnxruntime fp32: well conditioned on near-zero tensors.

A cosine of two near-zero vectors is noise (trained RWKV models have state rows of ~1e-6 whose fp16
results differ by 3e-8 and still score "cosine 0.0"). The figure the build judges by is `rel_l2`:
||got - ref|| / max(||ref||, atol * sqrt(n)), where the absolute floor `atol` is the precision's
resolution at the scale the tensor is used at (the RMS of the activations flowing through the segment).
"""

from __future__ import annotations

import math

import numpy as np

# Resolution relative to the scale of the activations: fp16 has a 10-bit mantissa (spacing 2^-10 of
# the value), w8a8 quantizes each activation tensor to 256 levels over its range (~2^-7 of the range).
RESOLUTION = {"fp16": 2.0 ** -10, "w8a8": 2.0 ** -7}
# A segment output whose rel_l2 exceeds this is a warning (issue: fp16 > 1e-2, w8a8 > 5e-2).
WARN_REL_L2 = {"fp16": 1e-2, "w8a8": 5e-2}
# Whole-model logits: cosine below this against onnxruntime fp32 is a warning.
WARN_LOGITS_COSINE = {"fp16": 0.999, "w8a8": 0.99}


def cosine(a, b) -> float:
    """Cosine similarity in float64; nan when either side is not finite; 1.0 for two zero vectors."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def rms(arrays) -> float:
    """Root mean square over all values of float arrays (0.0 when there are none)."""
    total, n = 0.0, 0
    for a in arrays:
        a = np.asarray(a)
        if a.dtype.kind != "f" or not a.size:
            continue
        a64 = a.astype(np.float64, copy=False)
        finite = a64[np.isfinite(a64)]
        total += float(np.dot(finite.ravel(), finite.ravel()))
        n += a.size
    return math.sqrt(total / n) if n else 0.0


def atol_for(precision: str, scale: float) -> float:
    """The absolute floor: the precision's resolution at `scale`."""
    return RESOLUTION.get(precision, RESOLUTION["fp16"]) * scale


def rel_l2(got, ref, atol: float) -> float:
    """||got - ref|| / max(||ref||, atol * sqrt(n)); inf when got is not finite where ref is."""
    got = np.asarray(got, dtype=np.float64).ravel()
    ref = np.asarray(ref, dtype=np.float64).ravel()
    if not np.isfinite(got).all():
        return float("inf")
    if not got.size:
        return 0.0
    denom = max(float(np.linalg.norm(ref)), atol * math.sqrt(ref.size))
    num = float(np.linalg.norm(got - ref))
    if denom == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / denom


class OutputStats:
    """Worst-case figures of one output over several samples."""

    __slots__ = ("cosine", "max_abs", "name", "rel_l2", "scale")

    def __init__(self, name: str):
        self.name = name
        self.cosine, self.max_abs, self.rel_l2, self.scale = 1.0, 0.0, 0.0, 0.0

    def add(self, got, ref, atol: float, scale: float) -> None:
        self.cosine = min(self.cosine, cosine(got, ref))
        diff = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))
        self.max_abs = max(self.max_abs, float(diff.max()) if diff.size else 0.0)
        self.rel_l2 = max(self.rel_l2, rel_l2(got, ref, atol))
        self.scale = max(self.scale, scale)


def compare_outputs(got: list, ref: list, names: list[str], inputs: list, precision: str,
                    stats: dict[str, OutputStats] | None = None) -> dict[str, OutputStats]:
    """Fold one sample (segment inputs, reference and NPU outputs) into per-output worst-case stats."""
    stats = {} if stats is None else stats
    scale = rms(list(inputs) + list(ref))
    atol = atol_for(precision, scale)
    for name, g, r in zip(names, got, ref):
        stats.setdefault(name, OutputStats(name)).add(g, r, atol, scale)
    return stats


def summarize(stats: dict[str, OutputStats]) -> dict:
    """The manifest's `verify` entry: worst cosine, max abs, worst rel_l2 and the output it came from."""
    if not stats:
        return {"cosine": 1.0, "max_abs": 0.0, "rel_l2": 0.0}
    worst = max(stats.values(), key=lambda s: s.rel_l2)
    return {"cosine": min(s.cosine for s in stats.values()),
            "max_abs": max(s.max_abs for s in stats.values()),
            "rel_l2": worst.rel_l2, "worst_output": worst.name, "scale": worst.scale}
