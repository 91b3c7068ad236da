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

import onnx_graphsurgeon as gs

# Data-movement ops whose clones are free and exact: a CPU copy of a state read.
_CLONEABLE = ("Gather", "Slice", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten")


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


def clone_state_reads(graph: gs.Graph, update: set[str], state_inputs: list[str]) -> set[str]:
    """Give the update its own copies of the state reads it shares with other nodes; returns the enlarged set.

    A read is a chain of data-movement ops from a state input (e.g. Gather(state_in, 2)). The copy is
    placed right after the original, so the graph stays topologically sorted.
    """
    state = set(state_inputs)
    by_output = {t.name: n for n in graph.nodes for t in n.outputs}

    def is_read(node) -> bool:
        if node.op not in _CLONEABLE:
            return False
        data = [t for t in node.inputs if isinstance(t, gs.Variable)]
        return bool(data) and all(t.name in state or (t.name in by_output and is_read(by_output[t.name]))
                                  for t in data)

    clones: dict[int, gs.Node] = {}
    out = set(update)

    def clone(node) -> gs.Node:
        if id(node) in clones:
            return clones[id(node)]
        new_inputs = []
        for t in node.inputs:
            prod = by_output.get(t.name) if isinstance(t, gs.Variable) else None
            new_inputs.append(clone(prod).outputs[0] if prod is not None else t)
        outs = [gs.Variable(f"{t.name}.fp32", dtype=t.dtype, shape=t.shape) for t in node.outputs]
        copy = gs.Node(node.op, name=f"{node.name}.fp32", attrs=dict(node.attrs), inputs=new_inputs, outputs=outs)
        graph.nodes.insert(graph.nodes.index(node) + 1, copy)
        clones[id(node)] = copy
        out.add(copy.name)
        return copy

    for node in [n for n in graph.nodes if n.name in update]:
        for i, t in enumerate(node.inputs):
            prod = by_output.get(t.name) if isinstance(t, gs.Variable) else None
            if prod is None or prod.name in update or not is_read(prod):
                continue
            node.inputs[i] = clone(prod).outputs[0]
    return out
