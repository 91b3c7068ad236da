"""Partition quality per policy on generated models of the 169M and 430M shapes.

For each shape, random weights are exported fp16 in the llama.onnx layout and split (preview: nothing
written) under every policy. Reported per token: NPU calls, bytes crossing NPU<->CPU, share of MatMul
FLOPs on the NPU, and the split wall time. The `matmul` policy (each MatMul its own NPU call, the 2023
attempt) is the baseline the ratios are taken against.

    .venv/bin/python -m benchmarks.partition [--shapes 169M,430M]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import ROOT, SHAPES, export_shape, save_results
from rwkv2rknn import policies

POLICIES = [p.name for p in policies.concrete()]


def measure(model_dir: Path, policy: str) -> dict:
    from rwkv2rknn.split import split_model

    t0 = time.perf_counter()
    _, reports = split_model([model_dir], policy=policy, preview=True, progress=False, prefill_chunk=0)
    seconds = time.perf_counter() - t0
    flops = sum(r.matmul_flops for r in reports)
    npu = sum(r.npu_matmul_flops for r in reports)
    # a layer graph, or (deep) a group of layers: the most segments one NPU/CPU round trip of layers makes
    mixing = [r for r in reports if r.name.startswith(("mixing", "group"))]
    return {"policy": policy, "npu_calls_per_token": sum(r.npu_segments for r in reports),
            "cpu_segments_per_token": sum(r.cpu_segments for r in reports),
            "max_npu_segments_per_layer": max(r.npu_segments for r in mixing),
            "max_cpu_segments_per_layer": max(r.cpu_segments for r in mixing),
            "graphs": len(reports),
            "crossing_bytes_per_token": sum(r.crossing_bytes for r in reports),
            "npu_matmul_flop_share": npu / flops if flops else 0.0, "split_seconds": round(seconds, 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="169M,430M")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / ".work"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.shapes.split(","):
        model = export_shape(work, name)
        rows = [measure(model, p) for p in POLICIES]
        base = next(r for r in rows if r["policy"] == "matmul")  # the 2023 attempt
        for row in rows:
            row["calls_vs_matmul"] = round(row["npu_calls_per_token"] / base["npu_calls_per_token"], 3)
        results[name] = rows
        print(f"\n{name} ({'x'.join(map(str, SHAPES[name]))}): partition per policy")
        print(f"{'policy':8} {'NPU calls':>9} {'vs matmul':>9} {'crossing KB':>11} {'NPU FLOP share':>14} {'split s':>8}")
        for r in rows:
            print(f"{r['policy']:8} {r['npu_calls_per_token']:9d} {r['calls_vs_matmul']:9.3f} "
                  f"{r['crossing_bytes_per_token'] / 1024:11.1f} {100 * r['npu_matmul_flop_share']:13.1f}% "
                  f"{r['split_seconds']:8.1f}")
    save_results("partition", results)
    return results


if __name__ == "__main__":
    main()
