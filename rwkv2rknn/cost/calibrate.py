"""Board calibration, the PC side: the probe models (ONNX) `build` compiles, and calibrate() over a manifest.

The measuring itself is rwkv2rknn/board_measure.py, shared with the board's `python -m rwkv2rknn.run OUT
--calibrate FILE.toml`; it writes a TOML profile with base = "rk3588" (or "rk3588-c" for the C runtime) whose
measured constants say so in their source; `rwkv2rknn estimate --board FILE.toml` uses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rwkv2rknn.board_measure import MULTICORE_SUFFIX, PROBE_SHAPES, measure, time_runner, write_profile
from rwkv2rknn.cost.profile import DEFAULT_PROFILE, load_profile
from rwkv2rknn.errors import UserError
from rwkv2rknn.manifest import runs_on

PROBE_OPSET = 13


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


def calibrate(manifest, make_runner: Callable | None, probes: Mapping, out_path, repeats: int = 30,
              warmup: int = 3, base: str = DEFAULT_PROFILE, name: str | None = None,
              clock: Callable[[], float] = time.perf_counter, today: str | None = None, seed: int = 0):
    """Time the probes and the manifest's segments; write a profile TOML to `out_path`; return its BoardProfile.

    manifest: a Manifest, a manifest path, or None (probes only). make_runner(graph, segment) -> runner for each
    segment. probes: {probe name: runner} for the models of probe_models() (rwkv2rknn/board_measure.py says
    which are required and what each measures).
    """
    segments = []
    if manifest is not None:
        if make_runner is None:
            raise UserError("calibrate: a manifest needs make_runner(graph, segment) to time its segments")
        from rwkv2rknn.feeds import random_feed
        from rwkv2rknn.manifest import as_manifest

        manifest = as_manifest(manifest)
        rng = np.random.default_rng(seed + 1)
        for graph, seg in manifest.segments():
            feed = random_feed(seg["inputs"], rng, [manifest.resolve(seg["onnx"])])
            segments.append((seg["id"], make_runner(graph, seg), [feed[t["name"]] for t in seg["inputs"]],
                             runs_on(seg)))
    doc = measure(probes, segments, repeats, warmup, base, name, clock, today, seed)
    write_profile(doc, out_path)
    return load_profile(out_path)


__all__ = ["MULTICORE_SUFFIX", "PROBE_SHAPES", "calibrate", "probe_models", "time_runner"]
