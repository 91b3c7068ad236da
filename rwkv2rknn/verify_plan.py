"""The verify plan: k drafted tokens checked in one pass over the weights (speculative decoding, docs/speculative.md).

Every unit of the decode plan (embed, layers or merged groups, head) is batched over k + 1 rows by graph surgery
(passes/verify.py): row 0 is the last accepted token, rows 1..k the drafts. Unlike the prefill plan, the head runs
on every row (logits for each drafted position) and each layer gives the state after every row, not only the last
(`<state output>@row<r>`): after r accepted drafts the runtime keeps row r's state, so a rejection never costs a
second pass over the weights. The manifest's `verify` holds the plan (rows, graph order, links, the states with
their row outputs); its graph entries are named verify.<graph>.
"""

from __future__ import annotations

from rwkv2rknn.deep import Unit, tensor_ref
from rwkv2rknn.model_loop import fp16_links, hand_offs, input_dtypes, state_shadow

PREFIX = "verify."
MAX_DRAFT_TOKENS = 15  # k + 1 rows per verify pass; the NPU pads M to 16 rows, so 16 rows cost what 1 row does


def verify_units(units: list[Unit]) -> list[Unit]:
    """The verify plan's units: every decode unit (the head included, batched) under the verify. prefix."""
    return [Unit(f"{PREFIX}{u.name}", list(u.sources), merged=u.merged) for u in units]


def verified(graph, rows: int, state_pairs: list[tuple[str, str]]):
    """(the graph over `rows` rows with every row's state, the recurrent rows of its states found on the
    single-token graph)."""
    from passes.matmul2d import cancel_reshapes
    from passes.state_rule import recurrent_rows
    from passes.verify import verify_tokens

    rec = recurrent_rows(graph, state_pairs) if state_pairs else {}
    return cancel_reshapes(verify_tokens(graph, rows, state_pairs).graph).graph.cleanup().toposort(), rec


def split_verify_unit(unit: Unit, job, rows: int, link_dtypes=None):
    """The verify plan's graph entry of one unit and its report (split's own planning and cutting, under the
    split's `_Job`); link_dtypes(unit): the dtypes of the buffers feeding the unit's inputs (rwkv2rknn/split.py)."""
    from rwkv2rknn.errors import UserError
    from rwkv2rknn.split import _context, _entry, _plan, _state_pairs, _unit_graph

    src = unit.sources
    where = src[0].path if len(src) == 1 else f"{src[0].path} ... {src[-1].path}"
    policy = job.policy.for_unit(unit)  # as the decode plan: the embedding lookup and a lone head stay fused
    try:
        graph, rec = verified(_unit_graph(unit, job.options.shapes or {}, job.model), rows,
                              _state_pairs(unit, job.model))
    except ValueError as exc:
        raise UserError(f"{where}: cannot batch this graph over {rows} verify rows ({exc}); split without "
                        "--verify-tokens") from None
    ctx = _context(job, unit, graph, link_dtypes, rec)
    entry, report = _entry(unit, graph, _plan(graph, policy, ctx, where), job, tokens=rows)
    report.plan = "verify"
    return entry, report


def verify_loop(model, units: list[Unit], decode_loop: dict, entries: list[dict], rows: int,
                decode_entries: list[dict] = ()) -> dict:
    """The manifest's `verify`: rows, graph order, links, token input, logits (every row), and the states in the
    decode plan's order, each with the outputs holding it after rows 0..rows-2 (`row_outputs`)."""
    from passes.verify import row_output

    unit_of = {src.name: u for u in units for src in u.sources}

    def ref(graph: str, tensor: str) -> dict:
        return tensor_ref(unit_of[graph], graph, tensor)

    links = fp16_links(hand_offs(model, unit_of), list(entries) + list(decode_entries))
    dtypes = input_dtypes(entries)
    outputs = {(e["name"], t["name"]): t["dtype"] for e in entries for t in e["outputs"]}
    state = []
    specs = [(f"mixing_{i}", spec) for i in range(model.n_layer) for spec in model.family.states]
    for (g, spec), st in zip(specs, decode_loop["state"]):
        r_in, r_out = ref(g, spec.input), ref(g, spec.output)
        item = {k: v for k, v in st.items() if k != "shadow"}
        names = [row_output(r_out["name"], r) for r in range(rows - 1)]
        item.update({"graph": r_in["graph"], "input": r_in["name"], "output": r_out["name"],
                     "dtype": dtypes.get(r_in["name"], st["dtype"]), "row_outputs": names,
                     "row_dtypes": [outputs.get((r_in["graph"], n), st["dtype"]) for n in names]})
        shadow = state_shadow(entries, r_in["graph"], r_in["name"])
        if shadow is not None:
            item["shadow"] = shadow
        state.append(item)
    return {"rows": rows, "draft_tokens": rows - 1, "order": [u.name for u in units],
            "token_input": ref("embed", "token"), "logits": ref("head", "output"), "links": links, "state": state}


__all__ = ["MAX_DRAFT_TOKENS", "PREFIX", "split_verify_unit", "verified", "verify_loop", "verify_units"]
