"""The prefill plan: the decode plan's units batched to M prompt tokens per call, the head once per chunk.

Each unit's normalized graph is batched by graph surgery (passes/batch.py): activations [M, C], token
shifts along the token axis, the recurrences unrolled as M-step scans. The head is not batched: it runs on
the last row of the last layer's output (a link marked `last`). Where the decode plan has the head as a
graph of its own, the prefill plan links to that graph instead of a copy.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from passes.batch import batch_tokens
from passes.state_rule import recurrent_rows
from rwkv2rknn.deep import Unit, tensor_ref
from rwkv2rknn.model_loop import fp16_links, hand_offs, input_dtypes, state_shadow

DEFAULT_CHUNK = 16  # tokens per prefill call for small models (below CHUNK_BY_WIDTH's first width)
# Wider models stream more weight bytes per call, and the NPU runs a chunk's MatMuls at the cost of streaming their
# weights once until M reaches the roofline's ridge: fp16 ~900 GFLOPS over 11.1 GB/s at 2 B per weight is ~80 rows
# (int8: ~1.9 TOPS at 1 B, ~85; shared/docs/rk3588-board-costs.md). So the chunk grows with the width, to 64 and
# 128 rows; a prompt shorter than one chunk runs token by token, which keeps small models at 16.
CHUNK_BY_WIDTH = ((1024, 64), (2048, 128))


def default_chunk(width: int | None) -> int:
    """Prefill tokens per call for a model of this width (n_embd)."""
    chunk = DEFAULT_CHUNK
    for at_least, rows in CHUNK_BY_WIDTH:
        if width is not None and width >= at_least:
            chunk = rows
    return chunk
MAX_PREFILL_CHUNK = 256  # tokens per prefill call: the batched graph unrolls the recurrence once per token
PREFIX = "prefill."


def prefill_units(units: list[Unit], max_layers: int | None = None) -> tuple[list[Unit], Unit | None]:
    """The prefill plan's units (embed and layers, head taken out of a merged group) and the head unit it needs
    of its own (None when the decode plan has a head graph the prefill plan can share). `max_layers`: a merged
    group's layers go in prefill groups of at most this many (its batched graph compiles slower); each unit's
    `parent` names the decode unit it comes from."""
    out, own_head = [], None
    for u in units:
        layers = [s for s in u.sources if s.name != "head"]
        if any(s.name == "head" for s in u.sources) and (u.merged or len(u.sources) > 1):
            head = next(s for s in u.sources if s.name == "head")
            own_head = Unit(f"{PREFIX}head", [head])
        if not layers:
            continue
        k = len(layers) if not (u.merged and max_layers) else max_layers
        if k >= len(layers):
            out.append(Unit(f"{PREFIX}{u.name}", layers, merged=u.merged, parent=u.name))
            continue
        for j in range(0, len(layers), k):
            part = layers[j:j + k]
            out.append(Unit(f"{PREFIX}{u.name}_{j // k}", part, merged=True, parent=u.name))
    return out, own_head


def batched(graph: gs.Graph, chunk: int, state_pairs: list[tuple[str, str]]) -> tuple[gs.Graph, dict]:
    """(the graph batched to `chunk` tokens, the recurrent rows of its states found on the single-token graph)."""
    from passes.matmul2d import cancel_reshapes

    rows = recurrent_rows(graph, state_pairs) if state_pairs else {}
    # the batched graph's reshapes that became no-ops (e.g. [M, N] -> [M, N]) go, graph outputs included
    return cancel_reshapes(batch_tokens(graph, chunk, state_pairs).graph).graph.cleanup().toposort(), rows


def prefill_loop(model, units: list[Unit], head_unit: Unit, decode_loop: dict, entries: list[dict],
                 chunk: int, decode_entries: list[dict] = ()) -> dict:
    """The prefill plan's part of the manifest: chunk, graph order, links, state (in the decode plan's order)."""
    unit_of = {src.name: u for u in units for src in u.sources}
    unit_of["head"] = head_unit

    def ref(graph: str, tensor: str) -> dict:
        return tensor_ref(unit_of[graph], graph, tensor)

    # the head the prefill plan shares with the decode plan is a decode-plan entry
    links = fp16_links(hand_offs(model, unit_of, last_into_head=True), list(entries) + list(decode_entries))
    dtypes = input_dtypes(entries)
    state = []
    specs = [(f"mixing_{i}", spec) for i in range(model.n_layer) for spec in model.family.states]
    for (g, spec), st in zip(specs, decode_loop["state"]):  # the decode plan's order
        r_in, r_out = ref(g, spec.input), ref(g, spec.output)
        item = {k: v for k, v in st.items() if k != "shadow"}
        item.update({"graph": r_in["graph"], "input": r_in["name"], "output": r_out["name"],
                     "dtype": dtypes.get(r_in["name"], st["dtype"])})
        shadow = state_shadow(entries, r_in["graph"], r_in["name"])
        if shadow is not None:
            item["shadow"] = shadow
        state.append(item)
    return {"chunk": chunk, "order": [u.name for u in units] + [head_unit.name],
            "token_input": ref("embed", "token"), "logits": ref("head", "output"),
            "links": links, "state": state}
