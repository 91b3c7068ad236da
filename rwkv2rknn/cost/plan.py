"""Features of a split without writing it (`split --preview` keeps them), and layer repetition for cheap backtests.

`features_plan(paths, policy)` is the manifest-shaped data `split` would write, minus the files: each segment
with its `cost` features, so `estimate` can price a policy on a 430M-shape model without writing 1.7 GB.
"""

from __future__ import annotations

from pathlib import Path


def features_plan(paths: list[str | Path], policy: str = "fused", target: str = "rk3588", npu_all: bool = False,
                  shapes: dict | None = None, graphs: list[str] | None = None, board: str = "rk3588") -> dict:
    """Manifest-shaped dict of the split `policy` would make, with `cost` features per segment, no files.

    graphs: only these graphs of a model directory (e.g. ["embed", "mixing_0", "head"]); default all.
    """
    from rwkv2rknn.split import split_model

    if graphs is not None:
        if len(paths) != 1 or not Path(paths[0]).is_dir():
            raise ValueError("graphs= selects graphs of one model directory")
        paths = [Path(paths[0]) / f"{name}.onnx" for name in graphs]
    data, _ = split_model(paths, policy=policy, target=target, npu_all=npu_all, shapes=shapes, preview=True,
                          progress=False, board=board)
    return data


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
