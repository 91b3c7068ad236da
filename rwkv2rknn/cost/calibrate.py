"""Board calibration: time probe models and a manifest's segments on the board; write a board profile.

On the board, with the probe models built to .rknn (`probe_models()` gives their ONNX) and runners for them:

    from rwkv2rknn.cost.calibrate import calibrate
    calibrate(manifest, make_runner, probes, "my-board.toml")

measures
  (a) the fixed cost of one NPU call: the tiny Add [1,16] probe;
  (b) input/output conversion per byte: the Add with a [1, 262144] fp32 input against the tiny one;
  (c) weight streaming: the [1,1024] x [1024,1024] constant MatMul (2 MiB of fp16 weights); a probe named
      "matmul1024@7" (the same model run with core mask 0_1_2), if given, yields the three-core rate;
  (d) every segment of the manifest (median ms per call),
and writes a TOML profile with base = "rk3588" whose measured constants say so in their source;
`rwkv2rknn.cost.load_profile(path)` reads it and `rwkv2rknn estimate --board path` uses it.

Runners are anything with activate() / infer_list(list of arrays) -> list / deactivate() (rwkv2rknn.run.runners),
so a stand-in can test this off the board. `clock` is injectable for the same reason.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rwkv2rknn.cost.profile import DEFAULT_PROFILE, load_profile
from rwkv2rknn.errors import UserError
from rwkv2rknn.manifest import runs_on
from rwkv2rknn.fsio import atomic_path

PROBE_OPSET = 13
# name -> input shape (fp32); the outputs have the same number of elements except for the MatMul's [1, 1024].
PROBE_SHAPES = {"add16": [1, 16], "add262144": [1, 262144], "matmul1024": [1, 1024]}
MATMUL_WEIGHT_BYTES_FP16 = 1024 * 1024 * 2
MULTICORE_SUFFIX = "@7"
# A difference of timings under this fraction of the tiny call's time is taken as noise: nothing is derived.
_RESOLVABLE = 0.01


def _model(nodes, inputs, outputs, inits, name) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", PROBE_OPSET)],
                              producer_name="rwkv2rknn calibrate")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def probe_models(seed: int = 0) -> dict[str, onnx.ModelProto]:
    """The calibration probes as fp32 ONNX models (build them to .rknn like any NPU segment)."""
    rng = np.random.default_rng(seed)
    f32 = TensorProto.FLOAT
    out = {}
    x = helper.make_tensor_value_info("x", f32, [1, 16])
    y = helper.make_tensor_value_info("y", f32, [1, 16])
    c = numpy_helper.from_array(rng.standard_normal((1, 16)).astype(np.float32), "c")
    out["add16"] = _model([helper.make_node("Add", ["x", "c"], ["y"], name="Add_0")], [x], [y], [c], "add16")
    n = PROBE_SHAPES["add262144"][1]
    x = helper.make_tensor_value_info("x", f32, [1, n])
    y = helper.make_tensor_value_info("y", f32, [1, n])
    c = numpy_helper.from_array(np.array([0.5], np.float32), "c")  # a scalar: no weights to stream
    out["add262144"] = _model([helper.make_node("Add", ["x", "c"], ["y"], name="Add_0")], [x], [y], [c], "add262144")
    x = helper.make_tensor_value_info("x", f32, [1, 1024])
    y = helper.make_tensor_value_info("y", f32, [1, 1024])
    w = numpy_helper.from_array((rng.standard_normal((1024, 1024)) * 0.03).astype(np.float32), "w")
    out["matmul1024"] = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="MatMul_0")], [x], [y], [w],
                               "matmul1024")
    return out


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


def calibrate(manifest, make_runner: Callable | None, probes: Mapping, out_path, repeats: int = 30,
              warmup: int = 3, base: str = DEFAULT_PROFILE, name: str | None = None,
              clock: Callable[[], float] = time.perf_counter, today: str | None = None, seed: int = 0):
    """Time the probes and the manifest's segments; write a profile TOML to `out_path`; return its BoardProfile.

    manifest: a Manifest, a manifest path, or None (probes only). make_runner(graph, segment) -> runner for each
    segment (e.g. rwkv2rknn.run.chain.runner_factory(manifest, "rknn-lite", core_mask)). probes: {probe name:
    runner} for the models of probe_models() ("add16" and "add262144" are required, "matmul1024" and
    "matmul1024@7" optional). Constants that the timings cannot give (a negative or zero difference) are
    left to the base profile and listed under `skipped` in the file's description.
    """
    import tomli_w

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

    def src(what: str) -> str:
        return f"measured on this board {today} by rwkv2rknn calibrate ({what}; median of {repeats} calls)"

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
    segments = {}
    if manifest is not None:
        if make_runner is None:
            raise UserError("calibrate: a manifest needs make_runner(graph, segment) to time its segments")
        from rwkv2rknn.run.chain import as_manifest, random_feed

        manifest = as_manifest(manifest)
        for graph, seg in manifest.segments():
            runner = make_runner(graph, seg)
            feed = random_feed(seg["inputs"], rng, [manifest.resolve(seg["onnx"])])
            arrays = [feed[t["name"]] for t in seg["inputs"]]
            sec = time_runner(runner, arrays, repeats, warmup, clock)
            entry = {"ms": sec * 1e3, "repeats": repeats,
                     "backend": runs_on(seg),
                     "source": src("this segment, one call")}
            mask = getattr(runner, "core_mask", None)
            if isinstance(mask, int):
                entry["core_mask"] = mask
            segments[seg["id"]] = entry
    doc = {"name": name or f"{base}-measured-{today}",
           "description": f"measured on this board {today} by rwkv2rknn calibrate over base {base}"
                          + (f"; not derivable from the timings, kept from the base: {'; '.join(skipped)}"
                             if skipped else ""),
           "base": base, **data}
    if segments:
        doc["measured_segments"] = segments
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        Path(tmp).write_bytes(tomli_w.dumps(doc).encode())
    return load_profile(out_path)


__all__ = ["PROBE_SHAPES", "calibrate", "probe_models", "time_runner"]
