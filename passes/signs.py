"""Sign proofs over a graph: show from how a tensor is computed that every element is <= 0 (or >= 0).

Each proof holds in IEEE arithmetic, not only in exact arithmetic: rounding is monotone, so
fl(a - m) <= 0 whenever m >= a, fl(a + r) >= a whenever r >= 0, and a product's sign is exact.
NaN inputs are outside every claim (a NaN stays NaN through the rewrites that use these proofs).
`nonpositive(t)` / `nonnegative(t)` return a one-line proof, or None when none of the rules applies.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from passes.graphutil import row_index, static_shape

# Ops that only change the shape and keep the flat (row-major) element order: the k-th element of
# the output is the k-th element of the input.
VIEW_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
_ALWAYS_NONNEG = ("Relu", "Abs", "Exp", "Sigmoid", "Softplus", "Sqrt")
MAX_DEPTH = 12


def _producer(t):
    if isinstance(t, gs.Variable) and len(t.inputs) == 1:
        return t.inputs[0]
    return None


def strip_views(t):
    """The tensor `t` is a view of: follow Reshape/Flatten/Squeeze/Unsqueeze/Identity producers upwards."""
    seen = 0
    while seen < 64:
        p = _producer(t)
        if p is None or p.op not in VIEW_OPS or not p.inputs:
            return t
        t = p.inputs[0]
        seen += 1
    return t


def _numel(t):
    s = list(t.values.shape) if isinstance(t, gs.Constant) else static_shape(t)
    return None if s is None else math.prod(s)


def _shape(t):
    return list(t.values.shape) if isinstance(t, gs.Constant) else static_shape(t)


def _elementwise_same(a, b) -> bool:
    """a and b have the same static shape: an elementwise op pairs their k-th elements."""
    sa, sb = _shape(a), _shape(b)
    return sa is not None and sa == sb


def _concat(t):
    """(axis, parts) when `t` is (a view of) a Concat whose parts all have static shapes; else None."""
    core = strip_views(t)
    p = _producer(core)
    if p is None or p.op != "Concat" or _numel(core) != _numel(t):
        return None
    shapes = [_shape(x) for x in p.inputs]
    if any(sh is None for sh in shapes):
        return None
    return int(p.attrs.get("axis", 0)) % max(1, len(shapes[0])), list(p.inputs), shapes


def upper_bound_of(m, a, _depth: int = 0):
    """Why every m[k] >= a[k] (a and m of one shape, views allowed in between), or None.

    Also through Concat: m and a stacked from parts along the same axis with equal part shapes (a scan
    unrolled over tokens stacks per-token maxima), where each part of m bounds the same part of a.
    """
    base_a = strip_views(a)
    n = _numel(a)
    core = strip_views(m)
    p = _producer(core)
    if p is None or n is None or _numel(m) != n or _numel(core) != n:
        return None
    ca, cm = _concat(a), _concat(m)
    if ca and cm and _depth < MAX_DEPTH and ca[0] == cm[0] and ca[2] == cm[2]:
        whys = [upper_bound_of(pm, pa, _depth + 1) for pa, pm in zip(ca[1], cm[1])]
        if all(whys):
            return f"{p.name}: each stacked part bounds its part of {a.name} [{whys[0]}; ...]"
    sa = _shape(base_a)
    row = n // sa[0] if sa else None
    if cm and not ca and cm[0] == 0 and sa and len(cm[1]) == sa[0] and all(math.prod(sh) == row for sh in cm[2]):
        # m stacks one row per token along axis 0 (flat order: part t is row t), each part the Max of
        # something and that token's row of a
        if all(_max_of_row(part, base_a, i) for i, part in enumerate(cm[1])):
            return f"{p.name}: row t is a Max with row t of {base_a.name}"
    if p.op == "Max":
        for x in p.inputs:
            if strip_views(x) is base_a and _numel(x) == n:
                return f"{p.name} = Max({', '.join(i.name for i in p.inputs)}) >= {a.name}"
    if p.op == "Add" and len(p.inputs) == 2:
        for x, r in (p.inputs, p.inputs[::-1]):
            if strip_views(x) is base_a and _numel(x) == n:
                why = nonnegative(r)
                if why:
                    return f"{p.name} = {a.name} + r with r >= 0 ({why})"
    return None


def _row_of(t, base, i) -> bool:
    """t is (a view of) row i of `base` (passes.graphutil.row_index)."""
    p = _producer(strip_views(t))
    return p is not None and bool(p.inputs) and strip_views(p.inputs[0]) is base and row_index(p) == i


def _max_of_row(part, base, i) -> bool:
    p = _producer(strip_views(part))
    return p is not None and p.op == "Max" and any(_row_of(x, base, i) for x in p.inputs)


def _reduce_max_of(m, a):
    """m = ReduceMax(a, keepdims=1): a - m broadcasts m back over the reduced axes."""
    p = _producer(m)
    if p is None or p.op != "ReduceMax" or not p.inputs or p.inputs[0] is not a:
        return None
    if p.attrs.get("keepdims", 1) != 1:
        return None
    return f"{p.name} = ReduceMax({a.name}) >= {a.name}"


def _nonpositive_rules(t, _depth: int = 0):
    if _depth > MAX_DEPTH:
        return None
    if isinstance(t, gs.Constant):
        v = np.asarray(t.values)
        if v.dtype.kind in "fiu" and v.size and not np.isnan(v).any() and (v <= 0).all():
            return f"constant {t.name} <= 0"
        return None
    p = _producer(t)
    if p is None:
        return None
    d = _depth + 1
    ins = list(p.inputs)
    if p.op in VIEW_OPS and ins:
        return nonpositive(ins[0], d)
    if p.op == "Sub" and len(ins) == 2:
        a, m = ins
        if _elementwise_same(a, m):
            why = upper_bound_of(m, a)
            if why:
                return f"{p.name} = {a.name} - {m.name} <= 0 since {why}"
        why = _reduce_max_of(m, a)
        if why:
            return f"{p.name} = {a.name} - {m.name} <= 0 since {why}"
        pa, nm = nonpositive(a, d), nonnegative(m, d)
        if pa and nm:
            return f"{p.name}: (<= 0) - (>= 0) [{pa}; {nm}]"
        return None
    if p.op == "Neg" and ins:
        why = nonnegative(ins[0], d)
        return f"{p.name} = -(>= 0) [{why}]" if why else None
    if p.op in ("Add", "Max", "Concat") and ins:
        whys = [nonpositive(x, d) for x in ins]
        return f"{p.name}: {p.op} of values <= 0 [{'; '.join(whys)}]" if all(whys) else None
    if p.op == "Min" and ins:
        for x in ins:
            why = nonpositive(x, d)
            if why:
                return f"{p.name} = Min(..., {x.name}) with {x.name} <= 0 [{why}]"
        return None
    if p.op == "Mul" and len(ins) == 2:
        for x, y in (ins, ins[::-1]):
            px = nonpositive(x, d)
            if px:
                ny = nonnegative(y, d)
                if ny:
                    return f"{p.name}: (<= 0) * (>= 0) [{px}; {ny}]"
        return None
    return None


def _nonnegative_rules(t, _depth: int = 0):
    if _depth > MAX_DEPTH:
        return None
    if isinstance(t, gs.Constant):
        v = np.asarray(t.values)
        if v.dtype.kind in "fiu" and v.size and not (v.dtype.kind == "f" and np.isnan(v).any()) and (v >= 0).all():
            return f"constant {t.name} >= 0"
        return None
    p = _producer(t)
    if p is None:
        return None
    d = _depth + 1
    ins = list(p.inputs)
    if p.op in VIEW_OPS and ins:
        return nonnegative(ins[0], d)
    if p.op in _ALWAYS_NONNEG:
        return f"{p.name} is {p.op}"
    if p.op == "Mul" and len(ins) == 2:
        if ins[0] is ins[1]:
            return f"{p.name} = {ins[0].name}^2"
        if all(nonnegative(x, d) for x in ins):
            return f"{p.name}: (>= 0) * (>= 0)"
        if all(nonpositive(x, d) for x in ins):
            return f"{p.name}: (<= 0) * (<= 0)"
        return None
    if p.op == "Pow" and len(ins) == 2 and isinstance(ins[1], gs.Constant):
        e = np.asarray(ins[1].values)
        if e.size == 1 and float(e) == round(float(e)) and int(round(float(e))) % 2 == 0:
            return f"{p.name} = {ins[0].name}^{int(round(float(e)))}"
        return None
    if p.op == "Neg" and ins:
        why = nonpositive(ins[0], d)
        return f"{p.name} = -(<= 0) [{why}]" if why else None
    if p.op in ("Add", "Min", "Concat") and ins:
        whys = [nonnegative(x, d) for x in ins]
        return f"{p.name}: {p.op} of values >= 0" if all(whys) else None
    if p.op == "Max" and ins:
        for x in ins:
            if nonnegative(x, d):
                return f"{p.name} = Max(..., {x.name}) with {x.name} >= 0"
        return None
    if p.op == "Sub" and len(ins) == 2:
        m, a = ins
        if _elementwise_same(a, m):
            why = upper_bound_of(m, a)
            if why:
                return f"{p.name} = {m.name} - {a.name} >= 0 since {why}"
        if nonnegative(m, d) and nonpositive(a, d):
            return f"{p.name}: (>= 0) - (<= 0)"
        return None
    return None


def nonpositive(t, _depth: int = 0):
    """A proof that every element of `t` is <= 0, or None. At the top: the rules above, then interval bounds
    (passes/bounds.py: an upper bound <= 0)."""
    why = _nonpositive_rules(t, _depth)
    return why if why is not None or _depth else _by_interval(t, upper=True)


def nonnegative(t, _depth: int = 0):
    """A proof that every element of `t` is >= 0, or None (rules, then interval bounds at the top)."""
    why = _nonnegative_rules(t, _depth)
    return why if why is not None or _depth else _by_interval(t, upper=False)


def _by_interval(t, upper: bool):
    from passes.bounds import interval

    iv = interval(t)
    if iv is None:
        return None
    if upper and np.all(iv.hi <= 0):
        return f"{t.name} <= 0 by interval bounds [{iv.why}]"
    if not upper and np.all(iv.lo >= 0):
        return f"{t.name} >= 0 by interval bounds [{iv.why}]"
    return None


def describe(t) -> str:
    """How `t` is computed, one level deep, for a 'cannot prove' message."""
    p = _producer(t)
    if p is None:
        return f"{t.name} is a graph input" if isinstance(t, gs.Variable) else f"{t.name} is a constant"
    return f"{t.name} = {p.op}({', '.join(i.name for i in p.inputs)}) [{p.name}]"


__all__ = ["VIEW_OPS", "describe", "nonnegative", "nonpositive", "strip_views", "upper_bound_of"]
