"""Build time, cold and warm: compile every NPU segment of generated models, then rebuild unchanged.

For each shape (169M and 430M by default): export random fp16 weights, split (default policy), build
cold with simulator verification, build again with nothing changed (the content-hash cache must
compile nothing). Ratios are against the cold build measured in the same run; the verify figures
(largest rel_l2 and max-abs error over all NPU segments, the whole-model logits check) come from the manifest.

    .venv/bin/python -m benchmarks.build [--shapes 169M,430M] [--jobs 2]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from benchmarks.common import ROOT, SHAPES, export_shape, save_results


def measure(work: Path, name: str, jobs: int) -> dict:
    from rwkv2rknn.build import build_manifest
    from rwkv2rknn.verify import RUNTIME
    from rwkv2rknn.manifest import Manifest
    from rwkv2rknn.split import split_model

    layers, embd, vocab = SHAPES[name]
    model, out = export_shape(work, name), work / f"split-{name}"
    shutil.rmtree(out, ignore_errors=True)  # cold means cold: no .rknn from an earlier run
    _, reports = split_model([model], out, progress=False)
    t0 = time.perf_counter()
    cold = build_manifest(out, runtime=RUNTIME, jobs=jobs)
    cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = build_manifest(out, runtime=RUNTIME, jobs=jobs)
    warm_s = time.perf_counter() - t0
    verify = [s["verify"] for _, s in Manifest.load(out).segments() if "verify" in s]
    return {"shape": {"layers": layers, "embd": embd, "vocab": vocab}, "jobs": jobs,
            "npu_segments": sum(r.npu_segments for r in reports),
            "cold_seconds": round(cold_s, 1), "warm_seconds": round(warm_s, 2),
            "warm_vs_cold": round(warm_s / cold_s, 4), "cold_compiles": cold.compiles,
            "warm_compiles": warm.compiles,
            "verify_cosine_min": min((v["cosine"] for v in verify), default=None),
            "verify_rel_l2_max": max((v["rel_l2"] for v in verify if "rel_l2" in v), default=None),
            "verify_max_abs": max((v["max_abs"] for v in verify), default=None),
            "verify_model": (Manifest.load(out).data.get("build") or {}).get("verify_model")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="169M,430M")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / ".work" / "build"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    results = {}
    for name in args.shapes.split(","):
        r = results[name] = measure(work, name, args.jobs)
        print(f"\nbuild {name}: {r['npu_segments']} NPU segments, --jobs {args.jobs}: cold {r['cold_seconds']:.1f} s "
              f"({r['cold_compiles']} compiles), warm {r['warm_seconds']:.2f} s ({r['warm_compiles']} compiles, "
              f"{100 * r['warm_vs_cold']:.1f}% of cold); verify rel_l2 max {r['verify_rel_l2_max']:.3g}, "
              f"max abs {r['verify_max_abs']:.3g}")
    save_results("build", results)
    return results


if __name__ == "__main__":
    main()
