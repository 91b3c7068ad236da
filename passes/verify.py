"""Verify graphs: a single-token recurrent graph over M rows that also gives the state after every row.

A verify pass checks M - 1 drafted tokens in one call (speculative decoding): row 0 is the last accepted token,
rows 1..M-1 the drafts. It is the M-token batched graph of passes/batch.py (activations [M, ...], token shifts
along the token axis, the recurrences unrolled as an M-step scan), with per-token outputs on every row (a head
batched this way gives logits for each drafted position) and, beside each state output (the state after the last
row), one output per earlier row: `<state output>@row<r>`, the state after row r (r = 0 .. M-2). The unrolled
scan computes those states anyway (each step's carry), and a token shift's value at row r is a row of the
shifted block, so the extra outputs cost no extra arithmetic, only the bytes they are written to: rolling back
to the last accepted row is a choice among buffers, never a second pass over the weights.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from passes.batch import _Batcher, batched_by
from passes.graphutil import static_shape
from passes.infra import PassResult

ROW_SUFFIX = "@row"


def row_output(state_output: str, row: int) -> str:
    """The name of the output holding the state after row `row` (rows before the last)."""
    return f"{state_output}{ROW_SUFFIX}{row}"


class _RowBatcher(_Batcher):
    """The batcher of passes/batch.py, plus the state after every row but the last as extra outputs."""

    def run(self) -> gs.Graph:
        g = super().run()
        taken = list(g.outputs)
        state_outs = []
        for u in self.units:
            if u.state_out not in state_outs:
                state_outs.append(u.state_out)
        by_name = {t.name: t for t in self.plan.graph.outputs}
        extra = []
        for name in state_outs:
            for r in range(self.m - 1):
                t = self.row_state(by_name[name], r, taken + extra)
                extra.append(t)
        g.outputs = list(g.outputs) + extra
        g.nodes = self.em.nodes
        return g

    def row_state(self, o, r: int, taken: list):
        em, m = self.em, self.m
        pieces = []
        units = [(i, u) for i, u in enumerate(self.units) if u.state_out == o.name]
        for i, u in units:
            if u.kind == "shift":
                piece = em.slice0(self.shift_block(i), r, r + 1, [m] + u.shape, f"{u.label}__row{r}")
            else:
                piece = em.reshape(self.next_vals[i][r], u.shape, [1] + u.shape, f"{u.label}__row{r}")
            pieces.append(piece)
        S = static_shape(o)
        if units[0][1].row is None:
            t = em.reshape(pieces[0], [1] + S, S, f"{o.name}__row{r}")
        elif len(pieces) == 1:
            t = pieces[0]
        else:
            t = em.op("Concat", f"{o.name}__rows{r}", pieces, o.dtype, S, {"axis": 0})
        name = row_output(o.name, r)
        if isinstance(t, gs.Variable) and any(t is x for x in taken):  # already an output: a copy of its own
            out = gs.Variable(name, dtype=o.dtype, shape=list(S))
            em.node("Identity", f"{name}__identity", [t], [out])
            return out
        return self.bind(t, name, o.dtype, S, taken)


def verify_tokens(graph: gs.Graph, m: int, state_pairs, token_inputs=None) -> PassResult:
    """The graph over `m` rows per run with every row's state (a new graph; `graph`, a normalized single-token
    graph, is left untouched); its one note is the BatchPlan (as passes.batch.batch_tokens). Per-token inputs and
    outputs become [m, ...] as there; each state output holds the state after row m-1 and `row_output(name, r)`
    the state after row r < m-1.
    Raises ValueError naming the node when a part of the graph cannot be batched."""
    m = int(m)
    if m < 2:
        raise ValueError(f"a verify graph has at least 2 rows (one drafted token), got {m}")
    return batched_by(_RowBatcher, graph, m, state_pairs, token_inputs)


__all__ = ["ROW_SUFFIX", "row_output", "verify_tokens"]
