"""Predicted board time per token of every policy on the 430M shape, with the backtests against published figures.

The 430M RWKV-4 shape (24 x 1024, vocab 50277, random fp16 weights) is split in memory under every policy
(`split --preview` keeps each segment's cost features) and priced by `rwkv2rknn estimate`'s estimator under
the rk3588 (SDK 2.x through Python RKNNLite), rk3588-c (SDK 2.x through librknnrt's C API, buffers bound once)
and rk3588-2023 (SDK 1.5.2) board profiles. These are PREDICTIONS, not board
measurements. Backtests: the 2023 attempt (matmul policy, rk3588-2023) was published at ~500 ms/token (within
2x required); rwkv.cpp on the CPU at 61 ms/token (the cpu policy under rk3588, within 1.5x required).

    .venv/bin/python -m benchmarks.estimate
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import ROOT, SHAPES7, export_shape, save_results

PUBLISHED = {"2023 attempt (matmul, SDK 1.5.2)": ("rk3588-2023", "matmul", 500.0, 2.0),
             "rwkv.cpp on the CPU": ("rk3588", "cpu", 61.0, 1.5)}
BOARDS = ("rk3588", "rk3588-c", "rk3588-2023")
RUNTIMES7 = ("rk3588", "rk3588-c")  # Python RKNNLite and the C API, side by side


def run(work: Path) -> dict:
    from rwkv2rknn import policies
    from rwkv2rknn.cost import estimate, load_profile
    from rwkv2rknn.preview import features_plan

    model = export_shape(work, "430M")
    rows = []
    names = [p.name for p in policies.concrete()] + ["auto"]
    plans = {}
    for board in BOARDS:
        profile = load_profile(board)
        for policy in names:
            t0 = time.perf_counter()
            key = (policy, board if policy == "auto" else "")  # only auto's plan depends on the board
            if key not in plans:
                plans[key] = features_plan([model], policy=policy, board=board)
            plan = plans[key]
            est = estimate(plan, profile)
            chosen = sorted({g["policy"] for g in plan["graphs"]})
            rows.append({"board": board, "policy": policy, "decode_ms_per_token": est.decode_ms_per_token,
                         "prefill_ms_per_token": est.prefill_ms_per_token, "prefill_plan": est.prefill_plan,
                         "npu_calls_per_token": est.npu_calls_per_token, "breakdown": est.breakdown,
                         "graph_policies": chosen, "seconds": time.perf_counter() - t0})
            print(f"{board:12s} {policy:7s} {est.decode_ms_per_token:8.1f} ms/token  "
                  f"{est.npu_calls_per_token:5g} NPU calls  ({time.perf_counter() - t0:.0f} s)", flush=True)
    backtests = []
    for what, (board, policy, published, factor) in PUBLISHED.items():
        got = next(r["decode_ms_per_token"] for r in rows if r["board"] == board and r["policy"] == policy)
        backtests.append({"what": what, "board": board, "policy": policy, "published_ms": published,
                          "predicted_ms": got, "tolerance": factor,
                          "within": published / factor <= got <= published * factor})
    rwkv7 = []
    for shape in SHAPES7:
        model7 = export_shape(work, shape)
        for policy in ("fused", "deep"):
            t0 = time.perf_counter()
            plan = features_plan([model7], policy=policy)
            for board in RUNTIMES7:
                est = estimate(plan, load_profile(board))
                rwkv7.append({"shape": shape, "policy": policy, "board": board,
                              "decode_ms_per_token": est.decode_ms_per_token,
                              "prefill_ms_per_token": est.prefill_ms_per_token,
                              "npu_calls_per_token": est.npu_calls_per_token, "breakdown": est.breakdown})
                print(f"{shape:12s} {policy:7s} {board:9s} {est.decode_ms_per_token:8.1f} ms/token  prefill "
                      f"{est.prefill_ms_per_token:6.1f}  conversion {est.breakdown['conversion']:5.1f} ms  "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"shape": "430M", "label": "PREDICTIONS from board profiles, not measurements", "rows": rows,
            "backtests": backtests, "rwkv7": rwkv7,
            "rkllm": {"shape": "RWKV-7 1.5B", "decode_ms_per_token": 72.0, "prefill_ms_per_token": 634 / 128,
                      "source": "RKLLM 1.3.0, w8a8, published (shared/docs/rk3588-board-costs.md)"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / ".work"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    save_results("estimate", run(work))


if __name__ == "__main__":
    main()
