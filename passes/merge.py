"""Merge a chain of graphs into one: names prefixed per graph, linked outputs feeding the next graphs' inputs."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from passes.graphutil import toposort


def merge_graphs(parts: list[tuple[str, gs.Graph]], links: list[tuple[str, str, str, str]],
                 name: str = "merged", keep_outputs=()) -> gs.Graph:
    """One graph computing `parts` in order; every tensor and node is renamed `<part>.<name>`.

    parts: (prefix, graph) in execution order; the graphs are consumed (their tensors are renamed and
    reused, not copied). links: (from part, output name, to part, input name): that input of the later
    part reads that output of the earlier part and stops being a graph input. The merged graph's inputs
    are every unlinked input, its outputs every output of every part that is not only a link source
    (a linked output that is also needed outside, e.g. a final layer's output, stays an output when
    listed in no link, or in `keep_outputs` as (part, output name)). Constants shared by name across parts
    are kept apart by the prefix.
    """
    prefixes = [p for p, _ in parts]
    if len(set(prefixes)) != len(prefixes):
        raise ValueError(f"merge: part prefixes must be unique, got {prefixes}")
    by_prefix = dict(parts)
    keep = set(keep_outputs)
    order = {p: i for i, p in enumerate(prefixes)}
    for src, out, dst, inp in links:
        if src not in by_prefix or dst not in by_prefix:
            raise ValueError(f"merge: link {src}.{out} -> {dst}.{inp} names an unknown part")
        if order[src] >= order[dst]:
            raise ValueError(f"merge: link {src}.{out} -> {dst}.{inp} goes backwards in the chain")
    linked_in = {(dst, inp): (src, out) for src, out, dst, inp in links}
    linked_out = {(src, out) for src, out, _, _ in links}

    nodes, inputs, outputs = [], [], []
    part_outputs: dict[tuple[str, str], gs.Tensor] = {}  # (part, original output name) -> tensor
    for prefix, graph in parts:
        outs_by_name = {t.name: t for t in graph.outputs}
        for src, out, dst, inp in links:
            if src == prefix and out not in outs_by_name:
                raise ValueError(f"merge: {prefix} has no output {out!r} (outputs: {sorted(outs_by_name)})")
            if dst == prefix and inp not in {t.name for t in graph.inputs}:
                raise ValueError(f"merge: {prefix} has no input {inp!r}")
        own = list(graph.tensors().values())  # snapshot, by identity, before any rewiring
        replaced = set()
        for t in graph.inputs:
            key = (prefix, t.name)
            if key not in linked_in:
                inputs.append(t)
                continue
            src_t = part_outputs[linked_in[key]]
            for consumer in list(t.outputs):
                for i, x in enumerate(list(consumer.inputs)):
                    if x is t:
                        consumer.inputs[i] = src_t
            replaced.add(id(t))
        for name, t in outs_by_name.items():
            part_outputs[(prefix, name)] = t
            if (prefix, name) not in linked_out or (prefix, name) in keep:
                outputs.append(t)
        for t in own:
            if id(t) not in replaced:
                t.name = f"{prefix}.{t.name}"
        for node in graph.nodes:
            node.name = f"{prefix}.{node.name}"
        nodes.extend(graph.nodes)
    merged = gs.Graph(nodes=nodes, inputs=inputs, outputs=outputs, name=name,
                      opset=max(g.opset or 0 for _, g in parts) or None,
                      import_domains=parts[0][1].import_domains)
    merged.ir_version = parts[0][1].ir_version
    return toposort(merged.cleanup(remove_unused_graph_inputs=False))
