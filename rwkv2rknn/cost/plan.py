"""Layer repetition for cheap backtests: the plan of an n-layer model from a plan of fewer identical layers.

The plan itself comes from the split driver (rwkv2rknn/preview.py `features_plan`: a split's data without its
files); cost/ never imports the driver (tests/test_layering.py).
"""

from __future__ import annotations


def _repeat(graphs: list[dict], n_layer: int, prefix: str, template: str | None) -> list[dict]:
    """Graphs of one plan with its mixing layers repeated to n_layer (renamed, segment ids too)."""
    name = f"{prefix}mixing_"
    mixing = [g for g in graphs if g["name"].startswith(name)]
    if not mixing:
        raise ValueError(f"plan has no {name}<i> graph to repeat")
    tpl = next(g for g in mixing if g["name"] == prefix + template) if template else mixing[-1]
    have = {g["name"] for g in mixing}
    extra = []
    for i in range(n_layer):
        layer = f"{name}{i}"
        if layer in have:
            continue
        extra.append({**tpl, "name": layer,
                      "segments": [{**s, "id": s["id"].replace(tpl["name"], layer, 1)} for s in tpl["segments"]]})
    body = sorted([g for g in mixing if int(g["name"].rsplit("_", 1)[1]) < n_layer] + extra,
                  key=lambda g: int(g["name"].rsplit("_", 1)[1]))
    rest = [g for g in graphs if not g["name"].startswith(name)]
    pre = [g for g in rest if graphs.index(g) < graphs.index(mixing[0])]
    return pre + body + [g for g in rest if g not in pre]


def _loop_links(family: str, n_layer: int, entries: list[dict], prefix: str = "", head_last: bool = False) -> list:
    """The family's links between n_layer layers as manifest links (graphs not merged), with fp16-copy links."""
    from rwkv2rknn.families import get
    from rwkv2rknn.model_loop import fp16_links

    links = []
    for a, o, b, i in get(family).links(n_layer):
        pa = a if a == "head" else prefix + a
        pb = b if b == "head" else prefix + b
        link = {"from": {"graph": pa, "name": o}, "to": {"graph": pb, "name": i}}
        if head_last and b == "head":
            link["last"] = True
        links.append(link)
    return fp16_links(links, entries)


def _loop_states(states: list[dict], n_layer: int, prefix: str) -> list[dict]:
    """The template's per-layer state entries, one set per layer (the last template layer's for the new ones)."""
    by_layer: dict[int, list[dict]] = {}
    for st in states:
        by_layer.setdefault(int(st["graph"].rsplit("_", 1)[1]), []).append(st)
    last = max(by_layer)
    out = []
    for i in range(n_layer):
        for st in by_layer.get(i, by_layer[last]):
            out.append({**st, "graph": f"{prefix}mixing_{i}"})
    return out


def repeat_layers(plan: dict, n_layer: int, template: str | None = None) -> dict:
    """The plan of an `n_layer` model from a plan holding fewer identical mixing layers.

    Every mixing layer of one model shape has the same graph structure and tensor shapes (weights differ only
    in value), so its features are identical and the estimator, additive over graphs, prices n_layer copies of
    one layer exactly as it prices the real n_layer plan. The copies are renamed mixing_<i> (segment ids too),
    in the decode plan and the prefill plan, and the token loop (links, states) is rebuilt for n_layer layers
    from the model's family, so the execution program (conversions, overlap) is the real one's. `template` is
    the layer copied (default: the last mixing layer present). Plans of merged layers (deep) are not repeatable.
    """
    if any(g.get("covers") and not g["name"].startswith("prefill.") for g in plan["graphs"]):
        raise ValueError("a plan of merged layers (deep) cannot be repeated layer by layer; split the real shape")
    out = dict(plan, graphs=_repeat(plan["graphs"], n_layer, "", template))
    model = plan.get("model")
    if model:
        out["model"] = dict(model, n_layer=n_layer,
                            links=_loop_links(model["family"], n_layer, out["graphs"]),
                            state=_loop_states(model["state"], n_layer, ""))
    pre = plan.get("prefill")
    if pre and model:
        graphs = _repeat(pre["graphs"], n_layer, "prefill.", template)
        order = [g["name"] for g in graphs] + [n for n in pre["order"] if not n.startswith("prefill.")]
        out["prefill"] = dict(pre, graphs=graphs, order=order,
                              links=_loop_links(model["family"], n_layer, graphs + out["graphs"], "prefill.", True),
                              state=_loop_states(pre["state"], n_layer, "prefill."))
    return out


__all__ = ["repeat_layers"]
