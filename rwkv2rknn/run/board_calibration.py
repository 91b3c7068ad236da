"""`python -m rwkv2rknn.run OUT --backend rknn-lite --calibrate FILE.toml`: measure this board, write a profile."""

from __future__ import annotations

import sys

from rwkv2rknn.errors import UserError
from rwkv2rknn.manifest import Manifest


def run_calibrate(args, manifest: Manifest) -> int:
    from rwkv2rknn.cost.calibrate import MULTICORE_SUFFIX, calibrate
    from rwkv2rknn.run.chain import core_mask_value, resolve_backend, runner_factory
    from rwkv2rknn.run.runners import RknnLiteRunner

    if not args.calibrate.endswith(".toml"):
        raise UserError(f"--calibrate {args.calibrate}: give a file name ending in .toml")
    if resolve_backend(manifest, args.backend) != "rknn-lite":
        raise UserError("--calibrate measures the board: run it on the RK3588 with --backend rknn-lite "
                        "(rknn-toolkit-lite2); timings from a PC would describe the PC")
    built = [p for p in (manifest.data.get("build") or {}).get("probes", []) if "rknn" in p]
    if not built:
        raise UserError(f"{manifest.path}: no calibration probes were built; run `rwkv2rknn build {manifest.root}` "
                        "on the PC with this rwkv2rknn (it builds them), then copy the directory again")
    probes = {}
    for p in built:
        name = p["id"].removeprefix("probe.")
        ins, outs = [t["name"] for t in p["inputs"]], [t["name"] for t in p["outputs"]]
        probes[name] = RknnLiteRunner(manifest.resolve(p["rknn"]), ins, outs, core_mask=1)
        if name == "matmul1024":
            probes[name + MULTICORE_SUFFIX] = RknnLiteRunner(manifest.resolve(p["rknn"]), ins, outs, core_mask=7)
    for r in probes.values():
        r.activate()
    factory = runner_factory(manifest, "rknn-lite", core_mask=core_mask_value(args.core_mask), threads=args.threads)
    made = []

    def make_runner(graph, seg):
        r = factory(graph, seg).activate()
        made.append(r)
        return r

    if not args.quiet:
        print(f"calibrating: {len(probes)} probe models and {sum(1 for _ in manifest.segments())} segments",
              file=sys.stderr)
    try:
        profile = calibrate(manifest, make_runner, probes, args.calibrate)
    finally:
        for r in list(probes.values()) + made:
            r.deactivate()
    keys = [k for k in ("npu_call_us", "conv_in_ns_per_byte", "npu_stream_gbps_1core", "npu_stream_gbps_3core")]
    print(f"wrote {args.calibrate}: board profile {profile.name} (base {profile.files[0].stem if profile.files else '-'})")
    for k in keys:
        print(f"  {k} = {getattr(profile, k):.4g}")
    print(f"use it: rwkv2rknn estimate {manifest.root} --board {args.calibrate}")
    return 0
