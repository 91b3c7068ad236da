"""Interval bounds over a graph: from how a tensor is computed, per-element lower and upper bounds, with a proof.

A bounded activation (Tanh, Sigmoid in [-1, 1] and [0, 1]) followed by a constant projection has a bounded
output: a MatMul W x with x in [lo, hi] lies in [W+ lo + W- hi, W+ hi + W- lo] row by row. That is what makes
RWKV-6's data-dependent decay exp(-exp(t_decay + tanh(x w1) w2)) legalizable: the inner argument is at most
t_decay + sum |w2| per channel (passes/legalize_exp.py shifts it by that bound).

The bounds hold in rounded arithmetic, fp16 or fp32: rounding is monotone, so a result whose exact value lies
in [lo, hi] rounds into [lo, hi] rounded outward to the fp16 grid (which the fp32 grid contains); every bound is
rounded outward so. A MatMul's sum in an unknown order also widens by the standard error bound of an n-term sum
(n * 2^-11 / (1 - n * 2^-11) times the sum of the magnitudes). Tanh and Sigmoid are taken to stay in [-1, 1]
and [0, 1]; Exp and Elu to be monotone. Unknown tensors (graph inputs, ops without a
rule) are unbounded; `interval(t)` returns None when nothing at all is known.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

from passes.graphutil import static_shape

U = 2.0 ** -11        # fp16 unit roundoff: the NPU computes in fp16
MAX_DEPTH = 24
_VIEWS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


class Interval(NamedTuple):
    lo: np.ndarray   # float64, broadcastable to the tensor's shape; -inf where unknown
    hi: np.ndarray   # float64; +inf where unknown
    why: str

    @property
    def finite_hi(self) -> bool:
        return bool(np.isfinite(self.hi).all())


def _shape(t):
    return list(t.values.shape) if isinstance(t, gs.Constant) else static_shape(t)


def _producer(t):
    if isinstance(t, gs.Variable) and len(t.inputs) == 1:
        return t.inputs[0]
    return None


def _const(t):
    return np.asarray(t.values, dtype=np.float64) if isinstance(t, gs.Constant) else None


def _clean(lo, hi):
    lo = np.where(np.isnan(lo), -np.inf, lo)
    hi = np.where(np.isnan(hi), np.inf, hi)
    return lo, hi


def _widen(lo, hi):
    """lo and hi rounded outward to the fp16 grid (infinite beyond its range)."""
    with np.errstate(invalid="ignore", over="ignore"):
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        lo16, hi16 = lo.astype(np.float16), hi.astype(np.float16)
        lo16 = np.where(lo16.astype(np.float64) > lo, np.nextafter(lo16, np.float16(-np.inf)), lo16)
        hi16 = np.where(hi16.astype(np.float64) < hi, np.nextafter(hi16, np.float16(np.inf)), hi16)
        return lo16.astype(np.float64), hi16.astype(np.float64)


def _short(why: str, limit: int = 240) -> str:
    return why if len(why) <= limit else why[:limit - 5] + " ...]"


def _full(iv: Interval, shape) -> tuple[np.ndarray, np.ndarray] | None:
    if shape is None:
        return None
    try:
        return np.broadcast_to(iv.lo, shape).copy(), np.broadcast_to(iv.hi, shape).copy()
    except ValueError:
        return None


_UNBOUNDED = Interval(np.array(-np.inf), np.array(np.inf), "unknown")


def interval(t, _depth: int = 0, _memo: dict | None = None) -> Interval | None:
    """Per-element bounds of `t` with a one-line proof, or None when nothing is known."""
    memo = {} if _memo is None else _memo
    key = id(t)
    if key in memo:
        return memo[key]
    memo[key] = None  # cycles (none in a DAG) and repeated failures end here
    out = _interval(t, _depth, memo)
    memo[key] = out
    return out


def _get(t, depth, memo) -> Interval:
    iv = interval(t, depth + 1, memo) if depth < MAX_DEPTH else None
    return iv if iv is not None else _UNBOUNDED


def _interval(t, depth, memo) -> Interval | None:
    c = _const(t)
    if c is not None:
        if c.dtype.kind != "f" and c.dtype.kind not in "iu":
            return None
        return Interval(c, c, f"constant {t.name}")
    p = _producer(t)
    if p is None or depth >= MAX_DEPTH:
        return None
    ins = list(p.inputs)
    op = p.op
    name = p.name
    with np.errstate(invalid="ignore", over="ignore"):
        if op in _VIEWS and ins:
            a = interval(ins[0], depth + 1, memo)
            if a is None:
                return None
            if a.lo.size == 1 and a.hi.size == 1:
                return Interval(a.lo.reshape(()), a.hi.reshape(()), a.why)
            full = _full(a, _shape(ins[0]))
            out_shape = _shape(t)
            if full is None or out_shape is None or full[0].size != math.prod(out_shape):
                return None
            return Interval(full[0].reshape(out_shape), full[1].reshape(out_shape), a.why)
        if op in ("Tanh", "Sigmoid", "Relu", "Elu", "Exp") and ins:
            a = _get(ins[0], depth, memo)
            if op == "Tanh":
                lo, hi = np.tanh(a.lo), np.tanh(a.hi)
            elif op == "Sigmoid":
                lo, hi = 1 / (1 + np.exp(-a.lo)), 1 / (1 + np.exp(-a.hi))
            elif op == "Relu":
                lo, hi = np.maximum(a.lo, 0), np.maximum(a.hi, 0)
            elif op == "Exp":
                lo, hi = np.exp(a.lo), np.exp(a.hi)
            else:
                alpha = float(p.attrs.get("alpha", 1.0))
                if alpha < 0:
                    return None
                elu = lambda x: np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))  # noqa: E731
                lo, hi = elu(a.lo), elu(a.hi)
            lo, hi = _widen(lo, hi)
            return Interval(*_clean(lo, hi), f"{name} = {op}(.) in [{float(np.min(lo)):.3g}, {float(np.max(hi)):.3g}]")
        if op == "Neg" and ins:
            a = _get(ins[0], depth, memo)
            return Interval(-a.hi, -a.lo, f"{name} = -({a.why})")
        if op in ("Add", "Sub", "Mul", "Max", "Min") and len(ins) == 2:
            a, b = _get(ins[0], depth, memo), _get(ins[1], depth, memo)
            if a is _UNBOUNDED and b is _UNBOUNDED:
                return None
            if op == "Add":
                lo, hi = a.lo + b.lo, a.hi + b.hi
            elif op == "Sub":
                lo, hi = a.lo - b.hi, a.hi - b.lo
            elif op == "Mul":
                prods = [x * y for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
                prods = [np.where(np.isnan(q), 0.0, q) for q in prods]  # 0 * inf: the zero factor wins
                lo, hi = np.minimum.reduce(np.broadcast_arrays(*prods)), np.maximum.reduce(np.broadcast_arrays(*prods))
            elif op == "Max":
                lo, hi = np.maximum(a.lo, b.lo), np.maximum(a.hi, b.hi)
            else:
                lo, hi = np.minimum(a.lo, b.lo), np.minimum(a.hi, b.hi)
            if op in ("Add", "Sub", "Mul"):
                lo, hi = _widen(lo, hi)
            return Interval(*_clean(lo, hi), _short(f"{name} = {op}({a.why}; {b.why})"))
        if op == "MatMul" and len(ins) == 2:
            return _matmul(p, t, depth, memo)
        if op == "Concat" and ins:
            axis = int(p.attrs.get("axis", 0))
            parts = []
            for x in ins:
                f = _full(_get(x, depth, memo), _shape(x))
                if f is None:
                    return None
                parts.append(f)
            lo = np.concatenate([q[0] for q in parts], axis=axis)
            hi = np.concatenate([q[1] for q in parts], axis=axis)
            return Interval(lo, hi, f"{name}: Concat of bounded parts")
        if op == "Slice" and len(ins) >= 3:
            a = interval(ins[0], depth + 1, memo)
            consts = [_const(x) for x in ins[1:]]
            if a is None or any(q is None for q in consts):
                return None
            full = _full(a, _shape(ins[0]))
            if full is None:
                return None
            starts, ends = consts[0].astype(np.int64), consts[1].astype(np.int64)
            axes = consts[2].astype(np.int64) if len(consts) > 2 else np.arange(len(starts))
            steps = consts[3].astype(np.int64) if len(consts) > 3 else np.ones(len(starts), np.int64)
            index = [slice(None)] * full[0].ndim
            for s, e, ax, st in zip(starts, ends, axes, steps):
                index[int(ax)] = slice(int(s), int(e), int(st))
            return Interval(full[0][tuple(index)], full[1][tuple(index)], a.why)
    return None


def _matmul(p, t, depth, memo) -> Interval | None:
    """A constant times a bounded tensor (either side); 1-D operands as a column (right) or row (left)."""
    A, B = p.inputs
    ca, cb = _const(A), _const(B)
    if (ca is None) == (cb is None):
        return None
    var = B if ca is not None else A
    iv = interval(var, depth + 1, memo)
    full = _full(iv, _shape(var)) if iv is not None else None
    if full is None or not (np.isfinite(full[0]).all() and np.isfinite(full[1]).all()):
        return None
    lo, hi = full
    if ca is not None:
        W = ca
        if W.ndim != 2:
            return None
        col = lo.ndim == 1
        lo2, hi2 = (lo[:, None], hi[:, None]) if col else (lo, hi)
        if lo2.ndim != 2 or lo2.shape[0] != W.shape[1]:
            return None
        pos, neg = np.maximum(W, 0), np.minimum(W, 0)
        out_lo, out_hi = pos @ lo2 + neg @ hi2, pos @ hi2 + neg @ lo2
        mag = np.abs(W) @ np.maximum(np.abs(lo2), np.abs(hi2))
        n = W.shape[1]
        if col:
            out_lo, out_hi, mag = out_lo[:, 0], out_hi[:, 0], mag[:, 0]
    else:
        W = cb
        if W.ndim != 2:
            return None
        row = lo.ndim == 1
        lo2, hi2 = (lo[None, :], hi[None, :]) if row else (lo, hi)
        if lo2.ndim != 2 or lo2.shape[1] != W.shape[0]:
            return None
        pos, neg = np.maximum(W, 0), np.minimum(W, 0)
        out_lo, out_hi = lo2 @ pos + hi2 @ neg, hi2 @ pos + lo2 @ neg
        mag = np.maximum(np.abs(lo2), np.abs(hi2)) @ np.abs(W)
        n = W.shape[0]
        if row:
            out_lo, out_hi, mag = out_lo[0], out_hi[0], mag[0]
    gamma = n * U / (1 - n * U) if n * U < 1 else np.inf
    err = gamma * mag
    out_lo, out_hi = _widen(out_lo - err, out_hi + err)
    return Interval(out_lo, out_hi, _short(f"{p.name} = MatMul(constant, bounded) in [{float(out_lo.min()):.3g}, "
                                           f"{float(out_hi.max()):.3g}] (from {iv.why})"))


__all__ = ["Interval", "U", "interval"]
