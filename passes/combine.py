"""Combine parallel elementwise branches: k copies of one chain that differ only in their constants become one.

RWKV's token-shift mixes are the example: RWKV-7 computes `h + d * x_q` for six vectors x_q (r, w, k, v, a,
g): twelve small ops per layer; RWKV-4's `x * mix_q + xx * (1 - mix_q)` for three. On the NPU each small op
costs about as much as it would on a vector of any size (the board profile's npu_op_us), so the branches are
stacked into [k, C]: `h + d * X` with X the [k, C] stack of the x_q is two ops, and one Split hands the k rows
to their consumers (RWKV-7: 12 ops -> 3; RWKV-4: 9 -> 4). The arithmetic is the same, element by element.

A group starts at k >= 2 binary elementwise nodes reading one tensor and a constant each (same op, same
operand position, same constant shape); it grows along the branches while each branch's next node is the same
op reading the branch and either one tensor shared by all branches, the aligned branch of another group, or
a constant per branch. Branch tensors read elsewhere end the growth there.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from passes.infra import PassResult, same_wiring, wiring

_BINARY = ("Add", "Sub", "Mul", "Div")
_UNARY = ("Sigmoid", "Tanh", "Relu", "Neg", "Exp")


def _const(x) -> np.ndarray | None:
    return np.asarray(x.values) if isinstance(x, gs.Constant) else None


def _row_shape(t) -> list | None:
    """[C] or [1, C]: a single row the branches can be stacked along."""
    shape = list(t.shape) if t.shape is not None else None
    if not shape or not all(isinstance(d, int) for d in shape):
        return None
    if len(shape) == 1 or (len(shape) == 2 and shape[0] == 1):
        return shape
    return None


def _seed_groups(graph: gs.Graph) -> list[list[gs.Node]]:
    groups = []
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            continue
        buckets: dict = {}
        for n in t.outputs:
            if n.op not in _BINARY or len(n.inputs) != 2 or len(n.outputs) != 1:
                continue
            pos = 0 if n.inputs[0] is t else 1
            c = _const(n.inputs[1 - pos])
            out = n.outputs[0]
            if c is None or _row_shape(out) is None or n.inputs[pos] is not t:
                continue
            key = (n.op, pos, c.shape, c.dtype.str, tuple(out.shape))
            buckets.setdefault(key, []).append(n)
        groups += [ns for ns in buckets.values() if len(ns) >= 2]
    return groups


class _Stage:
    """One merged op: its type, where the branch enters it, and the other operand (a shared tensor, constants,
    or the aligned branches of another seed group: `joined`)."""

    def __init__(self, op: str, nodes: list, pos: int | None, shared=None, consts=None, joined=None):
        self.op, self.nodes, self.pos, self.shared, self.consts = op, nodes, pos, shared, consts
        self.joined = joined


def _grow(seed: list, outputs: set, used: set, seed_ends: dict) -> list[_Stage]:
    source = seed[0].inputs[0] if _const(seed[0].inputs[1]) is not None else seed[0].inputs[1]
    pos0 = 0 if seed[0].inputs[0] is source else 1
    stages = [_Stage(seed[0].op, seed, pos0, consts=[_const(n.inputs[1 - pos0]) for n in seed])]
    k = len(seed)
    while True:
        ends = [n.outputs[0] for n in stages[-1].nodes]
        if any(id(e) in outputs or len(e.outputs) != 1 for e in ends):
            break
        nxt = [e.outputs[0] for e in ends]
        if len({n.op for n in nxt}) != 1 or any(id(n) in used for n in nxt) or len(set(map(id, nxt))) != k:
            break
        op = nxt[0].op
        if op in _UNARY and all(len(n.inputs) == 1 for n in nxt):
            stages.append(_Stage(op, nxt, None))
            continue
        if op not in _BINARY or any(len(n.inputs) != 2 for n in nxt):
            break
        pos = [0 if n.inputs[0] is e else 1 for n, e in zip(nxt, ends)]
        if len(set(pos)) != 1 or any(n.inputs[p] is not e for n, p, e in zip(nxt, pos, ends)):
            break
        others = [n.inputs[1 - pos[0]] for n in nxt]
        consts = [_const(o) for o in others]
        owners = [seed_ends.get(id(o)) for o in others]
        if all(o is not None for o in owners) and len({id(g) for g, _ in owners}) == 1 and \
                [i for _, i in owners] == list(range(k)) and owners[0][0] is not seed and \
                not any(id(n) in used for n in owners[0][0]):
            stages.append(_Stage(op, nxt, pos[0], joined=owners[0][0]))
        elif all(o is others[0] for o in others) and consts[0] is None and _row_shape(others[0]) is not None:
            stages.append(_Stage(op, nxt, pos[0], shared=others[0]))
        elif all(c is not None for c in consts) and len({c.shape for c in consts}) == 1:
            stages.append(_Stage(op, nxt, pos[0], consts=consts))
        else:
            break
    return stages


def _stack(consts: list[np.ndarray], width: int) -> np.ndarray:
    return np.stack([np.broadcast_to(c.reshape(-1) if c.size > 1 else c.reshape(1), (width,)) for c in consts])


def combine_parallel(graph: gs.Graph) -> PassResult:
    """Stack parallel elementwise branches (see the module docstring); returns the graph, cleaned up."""
    before = wiring(graph)
    outputs = set(id(t) for t in graph.outputs)
    used: set[int] = set()
    serial = 0
    seeds = _seed_groups(graph)
    seed_ends = {id(n.outputs[0]): (g, i) for g in seeds for i, n in enumerate(g)}
    for seed in seeds:
        if any(id(n) in used for n in seed):
            continue
        stages = _grow(seed, outputs, used, seed_ends)
        k = len(seed)
        merged = sum(k + (k if st.joined is not None else 0) for st in stages)
        if merged <= len(stages) + sum(st.joined is not None for st in stages) + 1:
            continue  # no op saved (the Split costs one)
        width = _row_shape(seed[0].outputs[0])[-1]
        dtype = seed[0].outputs[0].dtype

        def merged_op(op, ins, serial, k=k, width=width, dtype=dtype):
            out = gs.Variable(f"combined{serial}.{op}", dtype=dtype, shape=[k, width])
            graph.nodes.append(gs.Node(op, f"combined{serial}.{op}", inputs=ins, outputs=[out]))
            return out

        def constant(consts, serial, width=width, dtype=dtype):
            return gs.Constant(f"combined{serial}.const", _stack(consts, width).astype(np.dtype(dtype)))

        def as_row(t, serial, width=width):
            """A 1-D [C] operand as [1, C]: the RKNN compiler runs a [C] x [k, C] broadcast on its CPU."""
            if t.shape is None or len(t.shape) != 1:
                return t
            out = gs.Variable(f"combined{serial}.row_in", dtype=t.dtype, shape=[1, width])
            graph.nodes.append(gs.Node("Reshape", f"combined{serial}.row_in", outputs=[out], inputs=[
                t, gs.Constant(f"combined{serial}.row_shape", np.array([1, width], dtype=np.int64))]))
            return out

        cur = as_row(seed[0].inputs[stages[0].pos], f"{serial + 1}s")
        for st in stages:
            serial += 1
            if st.op in _UNARY:
                ins = [cur]
            else:
                if st.joined is not None:  # the other seed group's first op, merged too
                    j = st.joined
                    jsrc = j[0].inputs[0] if _const(j[0].inputs[1]) is not None else j[0].inputs[1]
                    jpos = 0 if j[0].inputs[0] is jsrc else 1
                    jconst = constant([_const(n.inputs[1 - jpos]) for n in j], f"{serial}j")
                    other = merged_op(j[0].op, [jsrc, jconst] if jpos == 0 else [jconst, jsrc], f"{serial}j")
                    for n in j:
                        used.add(id(n))
                        n.outputs.clear()
                else:
                    other = as_row(st.shared, f"{serial}o") if st.shared is not None else constant(st.consts, serial)
                ins = [cur, other] if st.pos == 0 else [other, cur]
            cur = merged_op(st.op, ins, serial)
        # one Split hands each branch its row, reshaped to what its consumers read
        serial += 1
        rows = [gs.Variable(f"combined{serial}.row{i}", dtype=dtype, shape=[1, width]) for i in range(k)]
        if (graph.opset or 13) >= 13:
            split = gs.Node("Split", f"combined{serial}.Split", attrs={"axis": 0},
                            inputs=[cur, gs.Constant(f"combined{serial}.sizes", np.ones(k, dtype=np.int64))],
                            outputs=rows)
        else:
            split = gs.Node("Split", f"combined{serial}.Split", attrs={"axis": 0, "split": [1] * k}, inputs=[cur],
                            outputs=rows)
        graph.nodes.append(split)
        for i, n in enumerate(stages[-1].nodes):
            end = n.outputs[0]
            for st in stages:
                used.add(id(st.nodes[i]))
            n.outputs.clear()  # the old branch no longer produces it
            shape = gs.Constant(f"combined{serial}.shape{i}", np.array(end.shape, dtype=np.int64))
            graph.nodes.append(gs.Node("Reshape", f"combined{serial}.Reshape{i}", inputs=[rows[i], shape],
                                       outputs=[end]))
    graph.cleanup().toposort()
    return PassResult(graph, modified=not same_wiring(before, wiring(graph)))
