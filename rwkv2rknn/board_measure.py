"""Board measurements: time the calibration probes and each segment, and write them as a board profile (TOML).

Shared by the runtime on the board (`python -m rwkv2rknn.run OUT --calibrate FILE.toml`, which must not need
the compiler) and the PC side (`rwkv2rknn.cost.calibrate`, which also makes the probe models). Standard
library and numpy; tomli_w (in the board extra) writes the file.

Measured:
  (a) the fixed cost of one NPU call: the tiny Add [1,16] probe;
  (b) input/output conversion per byte: the Add with a [1, 262144] fp32 input against the tiny one;
  (c) weight streaming: the [1,1024] x [1024,1024] constant MatMul (2 MiB of fp16 weights); a probe named
      "matmul1024@7" (the same model run with core mask 0_1_2), if given, yields the three-core rate;
  (d) every segment given (median ms per call).
Runners are anything with activate() / infer_list(list of arrays) -> list / deactivate(); `clock` is
injectable so a stand-in can test this off the board.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from rwkv2rknn.errors import UserError
from rwkv2rknn.fsio import atomic_path

# name -> input shape (fp32); the outputs have the same number of elements except for the MatMul's [1, 1024].
PROBE_SHAPES = {"add16": [1, 16], "add262144": [1, 262144], "matmul1024": [1, 1024]}
MATMUL_WEIGHT_BYTES_FP16 = 1024 * 1024 * 2
MULTICORE_SUFFIX = "@7"
# A difference of timings under this fraction of the tiny call's time is taken as noise: nothing is derived.
_RESOLVABLE = 0.01


def _io_bytes(name: str) -> int:
    shape = PROBE_SHAPES[name.split(MULTICORE_SUFFIX)[0]]
    n_in = int(np.prod(shape))
    n_out = 1024 if name.startswith("matmul1024") else n_in
    return 4 * (n_in + n_out)


def time_runner(runner, arrays: list, repeats: int, warmup: int, clock: Callable[[], float]) -> float:
    """Median seconds of one infer_list call (after `warmup` untimed calls); the runner is (de)activated here."""
    runner.activate()
    try:
        for _ in range(warmup):
            runner.infer_list(arrays)
        times = []
        for _ in range(repeats):
            t0 = clock()
            runner.infer_list(arrays)
            times.append(clock() - t0)
    finally:
        runner.deactivate()
    return statistics.median(times)


def _constant(value, unit: str, source: str) -> dict:
    return {"value": value, "unit": unit, "source": source}


def measure(probes: Mapping, segments=(), repeats: int = 30, warmup: int = 3, base: str = "rk3588",
            name: str | None = None, clock: Callable[[], float] = time.perf_counter, today: str | None = None,
            seed: int = 0, runtime: str = "") -> dict:
    """Time the probes and `segments` ((id, runner, input arrays, "npu"|"cpu") each); the profile as a dict.

    probes: {probe name: runner} ("add16" and "add262144" required, "matmul1024" and "matmul1024@7" optional).
    Constants the timings cannot give (a zero or negative difference) are left to the base profile and named
    in the description.
    """
    if repeats < 1 or warmup < 0:
        raise UserError(f"calibrate: repeats={repeats}, warmup={warmup}: need repeats >= 1 and warmup >= 0")
    for need in ("add16", "add262144"):
        if need not in probes:
            raise UserError(f"calibrate: probe {need!r} missing; build the models of probe_models() and pass "
                            f"a runner for each (have: {', '.join(sorted(probes)) or 'none'})")
    today = today or time.strftime("%Y-%m-%d")
    rng = np.random.default_rng(seed)
    medians = {}
    for pname, runner in probes.items():
        shape = PROBE_SHAPES.get(pname.split(MULTICORE_SUFFIX)[0])
        if shape is None:
            raise UserError(f"calibrate: unknown probe {pname!r}; probes are {', '.join(PROBE_SHAPES)} "
                            f"(and matmul1024{MULTICORE_SUFFIX})")
        arrays = [rng.standard_normal(shape).astype(np.float32)]
        medians[pname] = time_runner(runner, arrays, repeats, warmup, clock)
    how = f" through {runtime}" if runtime else ""

    def src(what: str) -> str:
        return f"measured on this board {today} by rwkv2rknn calibrate{how} ({what}; median of {repeats} calls)"

    data: dict = {}
    skipped = []
    small, big = medians["add16"], medians["add262144"]
    d_bytes = _io_bytes("add262144") - _io_bytes("add16")
    conv = (big - small) / d_bytes * 1e9  # ns per fp32 byte, inputs and outputs together
    if big - small > _RESOLVABLE * small:
        why = src("Add [1,262144] minus Add [1,16], per fp32 byte in and out; split evenly between inputs and "
                  "outputs; includes the NPU's own pass over the tensor")
        data["conv_in_ns_per_byte"] = _constant(conv, "ns/B", why)
        data["conv_out_ns_per_byte"] = _constant(conv, "ns/B", why)
    else:
        conv = 0.0
        skipped.append("conv_in_ns_per_byte, conv_out_ns_per_byte")
    call = small - conv * 1e-9 * _io_bytes("add16")
    if call > _RESOLVABLE * small:
        data["npu_call_us"] = _constant(call * 1e6, "us", src("Add [1,16] probe, less its conversion"))
    else:
        skipped.append("npu_call_us")
        call = small
    for pname, key, label in (("matmul1024", "npu_stream_gbps_1core", "one core"),
                              ("matmul1024" + MULTICORE_SUFFIX, "npu_stream_gbps_3core", "core mask 0_1_2")):
        if pname not in medians:
            continue
        work = medians[pname] - call - conv * 1e-9 * _io_bytes(pname)
        if work > _RESOLVABLE * small:
            data[key] = _constant(MATMUL_WEIGHT_BYTES_FP16 / work / 1e9, "GB/s",
                                  src(f"[1,1024]x[1024,1024] constant MatMul on {label}: 2 MiB of fp16 weights "
                                      "over its time less the call and conversion costs"))
        else:
            skipped.append(key)
    measured = {}
    for sid, runner, arrays, backend in segments:
        sec = time_runner(runner, arrays, repeats, warmup, clock)
        entry = {"ms": sec * 1e3, "repeats": repeats, "backend": backend, "source": src("this segment, one call")}
        mask = getattr(runner, "core_mask", None)
        if isinstance(mask, int):
            entry["core_mask"] = mask
        measured[sid] = entry
    doc = {"name": name or f"{base}-measured-{today}",
           "description": f"measured on this board {today} by rwkv2rknn calibrate{how} over base {base}"
                          + (f"; not derivable from the timings, kept from the base: {'; '.join(skipped)}"
                             if skipped else ""),
           "base": base, **data}
    if measured:
        doc["measured_segments"] = measured
    return doc


def write_profile(doc: dict, out_path) -> Path:
    """The profile as TOML, written atomically."""
    try:
        import tomli_w
    except ImportError:
        raise UserError("--calibrate writes TOML with tomli_w: pip install tomli-w (the board extra has it)") from None
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        Path(tmp).write_bytes(tomli_w.dumps(doc).encode())
    return out_path


__all__ = ["MULTICORE_SUFFIX", "PROBE_SHAPES", "measure", "time_runner", "write_profile"]
