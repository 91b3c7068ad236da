"""The 1.5B RWKV-7 shape end to end on this machine: export, split, build, with wall time, peak RSS and disk per stage.

Random weights with the published RWKV-7 1.5B checkpoint's dimensions (24 layers, C 2048, vocab 65536, LoRA ranks
w/a/v/g 96/96/64/256, the same as rwkv2rknn.families.rwkv7.lora_ranks(2048)). Each stage runs as the CLI a user
types, in a child process; its peak RSS is the largest resident set of the child's process tree (sampled every
0.2 s: the compile workers included), its disk the size of what it wrote. A user's PC has more cores: `build
--jobs N` runs N compiles at once; the result records the compiles and their summed seconds, so the wall time at N
jobs can be read off (about the sum over N while memory allows N compilers; see the printed scaling line).

    .venv/bin/python -m benchmarks.large_build [--precision w8a8] [--jobs 2] [--work DIR] [--stages export,split,build]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, save_results

SHAPE = {"layers": 24, "embd": 2048, "vocab": 65536, "source": "RWKV-7 1.5B (rwkv-x070 World 1.5B dimensions)"}


def tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def du(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def stage(name: str, args: list[str], out: Path, log: Path) -> dict:
    """Run `python -m rwkv2rknn ARGS`, sampling its process tree's RSS; wall, peak RSS, disk of `out`."""
    cmd = [sys.executable, "-m", "rwkv2rknn", *args]
    print(f"[{name}] {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    peak = 0
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    row = {"stage": name, "command": "rwkv2rknn " + " ".join(a if not os.path.isabs(a) else Path(a).name for a in args),
           "returncode": proc.returncode, "wall_seconds": round(wall, 1), "peak_rss_bytes": peak,
           "disk_bytes": du(out)}
    print(f"[{name}] exit {proc.returncode}, {wall:.0f} s, peak RSS {peak / 2**30:.2f} GiB, "
          f"disk {row['disk_bytes'] / 2**30:.2f} GiB (log {log})", flush=True)
    if proc.returncode != 0:
        print(log.read_text()[-3000:], flush=True)
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="w8a8", choices=["fp16", "w8a8"])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--policy", default="fused")
    ap.add_argument("--stages", default="export,split,build")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / ".work" / "large"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, out = work / "model-1.5B", work / f"split-1.5B-{args.policy}"
    todo = args.stages.split(",")
    rows = []
    if "export" in todo:
        rows.append(stage("export", ["export", "--random", "--family", "rwkv7", "--layers", str(SHAPE["layers"]),
                                     "--embd", str(SHAPE["embd"]), "--vocab", str(SHAPE["vocab"]), "-o", str(model),
                                     "--force", "-q"], model, work / "export.log"))
    if "split" in todo:
        rows.append(stage("split", ["split", str(model), "-o", str(out), "--policy", args.policy, "--force", "-q"],
                          out, work / "split.log"))
    if "build" in todo:
        before = du(out)
        row = stage("build", ["build", str(out), "--precision", args.precision, "--jobs", str(args.jobs), "-q"],
                    out, work / "build.log")
        row["disk_bytes"] -= before  # what the build added (the .rknn files, calibration data)
        rows.append(row)
    fp16_checkpoint = 0
    if model.exists():  # the published fp16 checkpoint holds every weight once at 2 bytes: the exported graphs do
        fp16_checkpoint = du(model)
    result = {"shape": SHAPE, "precision": args.precision, "jobs": args.jobs, "policy": args.policy,
              "cpu_count": os.cpu_count(), "stages": rows, "exported_fp16_bytes": fp16_checkpoint}
    split_row = next((r for r in rows if r["stage"] == "split"), None)
    if split_row and fp16_checkpoint:
        result["split_vs_fp16_checkpoint"] = round(split_row["disk_bytes"] / fp16_checkpoint, 3)
    build_json = out / "build.json"
    if build_json.exists():
        rec = json.loads(build_json.read_text())
        segs = rec.get("segments", {})
        result["built_segments"] = len(segs)
        result["precisions"] = {p: sum(1 for s in segs.values() if s.get("precision") == p) for p in ("fp16", "w8a8")}
        result["hybrid_segments"] = sum(1 for s in segs.values() if s.get("hybrid"))
    save_results("large_build", result)
    return result


if __name__ == "__main__":
    main()
