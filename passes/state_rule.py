"""The state-update rule: nodes that only update a recurrent state stay fp32 on the CPU, reading the state at full precision.

An NPU computes fp16. A recurrent state updated in fp16 every token accumulates rounding (a slow decay
of 3e-4 per token vanishes next to a running maximum of ~10 in fp16), so over hundreds of tokens it
drifts. The outputs of a layer only *read* the state, once per token: an fp16 copy of an exact state costs
a bounded error that does not grow. So: the nodes that depend on a state input and reach no output other
than state outputs (the update) run on the CPU in fp32; everything else, including the reads that feed the
layer's outputs, may run on the NPU. Where the update shares a cheap read of the state with the NPU side
(a Gather of a state row), the read is cloned so the CPU side reads the graph input itself, not an fp16
copy of it.
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

import onnx_graphsurgeon as gs

from passes.graphutil import row_index
from passes.infra import PassResult


class StateUpdate(NamedTuple):
    """A note of the state rule: a node that updates a recurrent state and so runs fp32 on the CPU."""

    node: str
    op: str
    copy_of: str | None = None  # a full-precision copy of this node, which keeps its place on the output side

    def __str__(self) -> str:
        return (f"{self.node}: updates a recurrent state: fp32 on the CPU"
                + (f" (a copy of {self.copy_of}, which the outputs read)" if self.copy_of else ""))


def _users(graph: gs.Graph) -> dict[str, list]:
    users: dict[str, list] = {}
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Variable) and t.name:
                users.setdefault(t.name, []).append(node)
    return users


def update_only_nodes(graph: gs.Graph, state_inputs: list[str], state_outputs: list[str]) -> set[str]:
    """Names of nodes that depend on a state input and from which only state outputs are reachable."""
    users = _users(graph)
    depends: set[int] = set()
    queue = deque(u for name in state_inputs for u in users.get(name, ()))
    while queue:
        node = queue.popleft()
        if id(node) in depends:
            continue
        depends.add(id(node))
        for t in node.outputs:
            queue.extend(users.get(t.name, ()))
    state_out = set(state_outputs)
    other_out = {t.name for t in graph.outputs} - state_out
    # reaches_other[node]: some non-state graph output is reachable from it (reverse topological order)
    reaches_other: dict[int, bool] = {}
    for node in reversed(graph.nodes):
        hit = any(t.name in other_out for t in node.outputs)
        if not hit:
            hit = any(reaches_other.get(id(u), False) for t in node.outputs for u in users.get(t.name, ()))
        reaches_other[id(node)] = hit
    return {n.name for n in graph.nodes if id(n) in depends and not reaches_other[id(n)]}


def _row_of(node, state) -> int | None:
    """The state row a node reads (passes.graphutil.row_index), when it reads `state` itself."""
    return row_index(node) if node.inputs and node.inputs[0] is state else None


def recurrent_rows(graph: gs.Graph, state_pairs) -> dict[str, set[int] | None]:
    """Per state input, the rows that are written from themselves (a recurrence), or None for the whole tensor.

    Uses the token-batching pass's analysis of a single-token graph (passes/batch.py): a row is recurrent when
    its new value depends on its old one; a shift row (the previous token's value) is not.
    """
    from passes.batch import plan_batch

    plan = plan_batch(graph, state_pairs)
    out: dict[str, set[int] | None] = {}
    for u in plan.units:
        if u.kind != "recurrent":
            out.setdefault(u.state_in, set())
            continue
        if u.row is None:
            out[u.state_in] = None
        elif out.get(u.state_in, set()) is not None:
            out.setdefault(u.state_in, set()).add(u.row)
    return out


def clone_state_cone(graph: gs.Graph, state_pairs, recurrent: dict[str, set[int] | None] | None = None) -> PassResult:
    """The CPU side of the rule; its notes are the nodes that run on the CPU (clones included), a StateUpdate each.

    The update is every node on a path from a recurrent read of a state (its old value) to the recurrent
    write (its new value), plus what only assembles the state outputs. Update nodes that also feed the
    output side (the reads of state rows; in a graph batched over M tokens, the scan's intermediate states)
    keep their place and the update gets its own full-precision copy, inserted right after the original.
    recurrent: state input -> recurrent rows (None: the whole tensor), from `recurrent_rows` of the
    single-token graph; default: computed from this graph.
    """
    ins = [a for a, _ in state_pairs]
    outs = [b for _, b in state_pairs]
    if recurrent is None:
        recurrent = recurrent_rows(graph, state_pairs)
    users = _users(graph)
    tensors = graph.tensors()
    producer = {t.name: n for n in graph.nodes for t in n.outputs}
    cone: set[int] = set()
    for a, b in state_pairs:  # per state: a later layer's update depends on an earlier layer's state via its input
        rows = recurrent.get(a, set())
        sin = tensors[a]
        if rows is None:
            reads, writes = {a}, {b}
        else:
            reads = {t.name for n in users.get(a, ()) if _row_of(n, sin) in rows for t in n.outputs}
            prod = producer.get(b)
            writes = ({prod.inputs[r].name for r in rows if r < len(prod.inputs)}
                      if rows and prod is not None and prod.op == "Concat" else set())
        if not reads or not writes:
            continue
        depends = {id(n) for n in users.get(a, ()) if any(t.name in reads for t in n.outputs)}
        for node in graph.nodes:
            if id(node) not in depends and any(
                    isinstance(t, gs.Variable) and (t.name in reads or id(producer.get(t.name)) in depends)
                    for t in node.inputs):
                depends.add(id(node))
        reaches: set[int] = set()
        for node in reversed(graph.nodes):
            if any(t.name in writes for t in node.outputs) or any(
                    id(u) in reaches for t in node.outputs for u in users.get(t.name, ())):
                reaches.add(id(node))
        cone |= depends & reaches
    update_only = update_only_nodes(graph, ins, outs)
    cpu_ids = cone | {id(n) for n in graph.nodes if n.name in update_only}
    other_outputs = {t.name for t in graph.outputs} - set(outs)

    # shared: cone nodes the output side needs too (directly, or through another shared node); they keep
    # their place and the update uses copies. Reverse topological order closes the set in one pass.
    shared: set[int] = set()
    for node in reversed(graph.nodes):
        if id(node) not in cone:
            continue
        if any(t.name in other_outputs or any(id(u) not in cpu_ids or id(u) in shared for u in users.get(t.name, ()))
               for t in node.outputs):
            shared.add(id(node))
    clones: dict[int, gs.Node] = {}
    names = {id(n): n.name for n in graph.nodes}
    cpu = {n.name for n in graph.nodes if id(n) in cpu_ids and id(n) not in shared}

    def clone(node) -> gs.Node:
        if id(node) in clones:
            return clones[id(node)]
        new_inputs = []
        for t in node.inputs:
            prod = producer.get(t.name) if isinstance(t, gs.Variable) else None
            new_inputs.append(clone(prod).outputs[0] if prod is not None and id(prod) in shared else t)
        new_outs = [gs.Variable(f"{t.name}.fp32", dtype=t.dtype, shape=t.shape) for t in node.outputs]
        copy = gs.Node(node.op, name=f"{node.name}.fp32", attrs=dict(node.attrs), inputs=new_inputs, outputs=new_outs)
        graph.nodes.insert(graph.nodes.index(node) + 1, copy)
        clones[id(node)] = copy
        cpu.add(copy.name)
        return copy

    for node in [n for n in graph.nodes if n.name in cpu]:
        for i, t in enumerate(list(node.inputs)):
            prod = producer.get(t.name) if isinstance(t, gs.Variable) else None
            if prod is not None and id(prod) in shared:
                node.inputs[i] = clone(prod).outputs[0]
    # A state output written by a node the output side also reads (RWKV-7's y = S' @ r reads the new
    # state): the copy writes the graph output; the original keeps feeding the output side under a new name.
    for o in outs:
        t = tensors[o]
        prod = producer.get(o)
        if prod is None or id(prod) not in shared:
            continue
        copy = clone(prod)
        k = next(j for j, x in enumerate(prod.outputs) if x is t)
        inner = gs.Variable(f"{o}.npu", dtype=t.dtype, shape=t.shape)
        for user in list(t.outputs):
            for i, x in enumerate(list(user.inputs)):
                if x is t:
                    user.inputs[i] = inner
        prod.outputs[k] = inner
        mine = copy.outputs[k]
        for user in list(mine.outputs):  # other copies that read the copy's value
            for i, x in enumerate(list(user.inputs)):
                if x is mine:
                    user.inputs[i] = t
        copy.outputs[k] = t
    origin = {c.name: names[i] for i, c in clones.items()}
    notes = tuple(StateUpdate(n.name, n.op, origin.get(n.name)) for n in graph.nodes if n.name in cpu)
    return PassResult(graph, notes, modified=bool(clones))
