"""Features of a split without writing it (`split --preview` keeps them), for the estimator and the backtests.

`features_plan(paths, policy)` is the manifest-shaped data `split` would write, minus the files: each segment
with its `cost` features, so `estimate` can price a policy on a 430M-shape model without writing 1.7 GB
(rwkv2rknn/cost/plan.py `repeat_layers` stretches it to more layers).
"""

from __future__ import annotations

from pathlib import Path

from rwkv2rknn.split import split_model


def features_plan(paths: list[str | Path], policy: str = "fused", target: str = "rk3588", npu_all: bool = False,
                  shapes: dict | None = None, graphs: list[str] | None = None, board: str = "rk3588") -> dict:
    """Manifest-shaped dict of the split `policy` would make, with `cost` features per segment, no files.

    graphs: only these graphs of a model directory (e.g. ["embed", "mixing_0", "head"]); default all.
    """
    if graphs is not None:
        if len(paths) != 1 or not Path(paths[0]).is_dir():
            raise ValueError("graphs= selects graphs of one model directory")
        paths = [Path(paths[0]) / f"{name}.onnx" for name in graphs]
    data, _ = split_model(paths, policy=policy, target=target, npu_all=npu_all, shapes=shapes, preview=True,
                          progress=False, board=board)
    return data
