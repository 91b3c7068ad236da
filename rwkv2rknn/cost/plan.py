"""Features of a split without writing it: the split pipeline in memory, one graph at a time.

`features_plan(paths, policy)` runs the same passes `split` runs (normalize, place, propose_segments,
extract_segments) and keeps only each segment's features, so `estimate` can price a policy on a 430M-shape
model without writing its 1.7 GB of segment files. The result is manifest-shaped (graphs -> segments with
id, backend, inputs, outputs, cost): what `split` would write, minus the files and the placement table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from rwkv2rknn.cost.features import segment_features
from rwkv2rknn.errors import UserError


def _specs(tensors) -> list[dict]:
    return [{"name": t.name, "dtype": np.dtype(t.dtype).name, "shape": [int(d) for d in t.shape]} for t in tensors]


def features_plan(paths: list[str | Path], policy: str = "fused", target: str = "rk3588", npu_all: bool = False,
                  shapes: dict | None = None, graphs: list[str] | None = None) -> dict:
    """Manifest-shaped dict of the split `policy` would make, with `cost` features per segment, no files.

    graphs: only these source graph names (e.g. ["embed", "mixing_0", "head"]); default all.
    """
    from passes.cut import extract_segments
    from passes.partition import POLICIES, propose_segments
    from passes.pipeline import normalize
    from passes.placement import place
    from rwkv2rknn.model import load_sources

    if policy not in POLICIES:
        raise UserError(f"policy {policy!r}: choose one of {', '.join(POLICIES)}")
    sources, model = load_sources(paths)
    entries = []
    for src in sources:
        if graphs is not None and src.name not in graphs:
            continue
        graph = normalize(gs.import_onnx(src.model), shapes or {})
        segments = propose_segments(graph, place(graph, target=target, npu_all=npu_all), policy=policy)
        cuts = extract_segments(graph, segments)
        segs = []
        for i, cut in enumerate(cuts):
            sid = f"{src.name}.s{i}"
            segs.append({"id": sid, "backend": cut.backend, "onnx": f"segments/{sid}.onnx",
                         "inputs": _specs(cut.inputs), "outputs": _specs(cut.outputs), "nodes": cut.nodes,
                         "matmul_flops": int(cut.matmul_flops), "cost": segment_features(cut.model, cut.backend)})
        entries.append({"name": src.name, "inputs": _specs(graph.inputs), "outputs": _specs(graph.outputs),
                        "segments": segs})
        src.release()
    return {"format_version": 1, "target": target, "policy": policy, "npu_all": npu_all, "graphs": entries,
            "model": {"n_layer": model.n_layer, "n_embd": model.n_embd, "vocab_size": model.vocab_size}
            if model is not None else None}


def repeat_layers(plan: dict, n_layer: int, template: str | None = None) -> dict:
    """The plan of an `n_layer` model from a plan holding fewer identical mixing layers.

    Every mixing layer of one model shape has the same graph structure and tensor shapes (weights differ only
    in value), so its features are identical and the estimator, additive over graphs, prices n_layer copies of
    one layer exactly as it prices the real n_layer plan. The copies are renamed mixing_<i> (segment ids too);
    `template` is the layer copied (default: the last mixing layer present).
    """
    graphs = plan["graphs"]
    mixing = [g for g in graphs if g["name"].startswith("mixing_")]
    if not mixing:
        raise ValueError("plan has no mixing_<i> graph to repeat")
    tpl = next(g for g in mixing if g["name"] == template) if template else mixing[-1]
    have = {g["name"] for g in mixing}
    extra = []
    for i in range(n_layer):
        name = f"mixing_{i}"
        if name in have:
            continue
        extra.append({**tpl, "name": name,
                      "segments": [{**s, "id": s["id"].replace(tpl["name"], name, 1)} for s in tpl["segments"]]})
    body = sorted([g for g in mixing if int(g["name"].split("_")[1]) < n_layer] + extra,
                  key=lambda g: int(g["name"].split("_")[1]))
    head = [g for g in graphs if not g["name"].startswith("mixing_")]
    pre = [g for g in head if graphs.index(g) < graphs.index(mixing[0])]
    post = [g for g in head if g not in pre]
    out = dict(plan, graphs=pre + body + post)
    if out.get("model"):
        out["model"] = dict(out["model"], n_layer=n_layer)
    return out


__all__ = ["features_plan", "repeat_layers"]
