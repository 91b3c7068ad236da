"""`python -m rwkv2rknn.run OUT --backend rknn-c|rknn-lite --calibrate FILE.toml`: measure this board.

Times the probe models `build` made and every segment of the program through the runtime it runs on, and
writes a board profile (base rk3588-c for the C API, rk3588 for RKNNLite) that `rwkv2rknn estimate --board
FILE.toml` reads on the PC.
"""

from __future__ import annotations

import sys

import numpy as np

from rwkv2rknn.board_measure import MULTICORE_SUFFIX, measure, write_profile
from rwkv2rknn.errors import UserError

BASE_OF_RUNTIME = {"rknn-c": "rk3588-c", "rknn-lite": "rk3588"}


def _arrays(seg, vocab: int | None, rng) -> list:
    out = []
    for t in seg.inputs:
        dt = np.dtype(t.dtype)
        if dt.kind in "iu":
            out.append(rng.integers(0, max(1, vocab or 1), size=t.shape).astype(dt))
        elif "state" in t.name.lower():
            out.append(rng.uniform(0.0, 0.5, size=t.shape).astype(dt))
        else:
            out.append(rng.standard_normal(t.shape).astype(dt))
    return out


def run_calibrate(args, source) -> int:
    from rwkv2rknn.run.chain import core_mask_value, runner_factory

    if not args.calibrate.endswith(".toml"):
        raise UserError(f"--calibrate {args.calibrate}: give a file name ending in .toml")
    factory = runner_factory(source, args.backend, core_mask=core_mask_value(args.core_mask), threads=args.threads)
    program, root = factory.program, factory.root
    if factory.backend not in BASE_OF_RUNTIME:
        raise UserError("--calibrate measures the board: run it on the RK3588 with --backend rknn-c or rknn-lite; "
                        "timings from a PC would describe the PC")
    built = [p for p in program.probes if p.rknn]
    if not built:
        raise UserError(f"{root}: no calibration probes were built; run `rwkv2rknn build {root}` on the PC with this "
                        "rwkv2rknn (it builds them), then copy the directory again")
    probes = {}
    for p in built:
        name = p.id.removeprefix("probe.")
        probes[name] = factory.runner(p, mask=1)
        if name == "matmul1024":
            probes[name + MULTICORE_SUFFIX] = factory.runner(p, mask=7)
    rng = np.random.default_rng(1)
    vocab = (program.model or {}).get("vocab_size")
    segments = [(s.id, factory.runner(s), _arrays(s, vocab, rng), s.device) for s in program.segments.values()]
    if not args.quiet:
        print(f"calibrating through {factory.backend}: {len(probes)} probe models and {len(segments)} segments",
              file=sys.stderr)
    try:
        doc = measure(probes, segments, base=BASE_OF_RUNTIME[factory.backend], runtime=factory.backend)
        write_profile(doc, args.calibrate)
    finally:
        factory.close()
    print(f"wrote {args.calibrate}: board profile {doc['name']} (base {doc['base']})")
    for k in ("npu_call_us", "conv_in_ns_per_byte", "npu_stream_gbps_1core", "npu_stream_gbps_3core"):
        if k in doc:
            print(f"  {k} = {doc[k]['value']:.4g}")
    print(f"use it: rwkv2rknn estimate {root} --board {args.calibrate}")
    return 0
