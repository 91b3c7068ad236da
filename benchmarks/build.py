"""Build time, cold and warm: compile every NPU segment of a generated model, then rebuild unchanged.

The warm build must compile nothing (content-hash cache), so its time is the baseline's overhead.
Ratios are against the cold build measured in the same run.

    .venv/bin/python -m benchmarks.build [--layers 12 --embd 768 --vocab 50277 --jobs 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "build.json"


def main(argv=None) -> dict:
    from rwkv2rknn.build import build_manifest
    from rwkv2rknn.checkpoints import random_weights
    from rwkv2rknn.export import export_model
    from rwkv2rknn.split import split_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50277)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / ".work" / "build"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    model, out = work / "model", work / "split"
    if not (model / "head.onnx").exists():
        export_model(random_weights(args.layers, args.embd, args.vocab, seed=0), model, force=True)
    shutil.rmtree(out, ignore_errors=True)  # cold means cold: no .rknn from an earlier run
    _, reports = split_model([model], out, progress=False)
    npu = sum(r.npu_segments for r in reports)
    t0 = time.perf_counter()
    cold = build_manifest(out, jobs=args.jobs)
    cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = build_manifest(out, jobs=args.jobs)
    warm_s = time.perf_counter() - t0
    result = {"shape": {"layers": args.layers, "embd": args.embd, "vocab": args.vocab}, "jobs": args.jobs,
              "npu_segments": npu, "cold_seconds": round(cold_s, 1), "warm_seconds": round(warm_s, 2),
              "warm_vs_cold": round(warm_s / cold_s, 4),
              "cold_compiles": getattr(cold, "compiles", None), "warm_compiles": getattr(warm, "compiles", None)}
    print(f"\nbuild {args.layers}x{args.embd} (vocab {args.vocab}), {npu} NPU segments, --jobs {args.jobs}: "
          f"cold {cold_s:.1f} s, warm {warm_s:.2f} s ({100 * warm_s / cold_s:.1f}% of cold)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
