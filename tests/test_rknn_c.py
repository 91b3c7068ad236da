"""The librknnrt ctypes binding (rwkv2rknn/run/librknnrt.py) against a stand-in library built with gcc.

The stand-in (tests/standin) exports librknnrt's functions and computes models through Python hooks,
counting calls, allocations, copies and conversions; so these tests show the zero-copy chain really
copies nothing, that every failing call names its segment, call and meaning, and that the ctypes
structs have the C layout.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rwkv2rknn.run import librknnrt as rt
from standin import build, hooks

pytestmark = pytest.mark.skipif(build.gcc() is None, reason="needs gcc to build the librknnrt stand-in")

REPO = Path(__file__).resolve().parent.parent
FP16, FP32 = rt.RKNN_TENSOR_FLOAT16, rt.RKNN_TENSOR_FLOAT32


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("standin")


@pytest.fixture(scope="module")
def so_path(build_dir) -> Path:
    return build.build_library(build_dir)


@pytest.fixture
def standin(so_path):
    """The stand-in, with fresh counters; knobs and failures reset afterwards."""
    s = hooks.standin(so_path)
    s.reset_counters()
    s.errors.clear()
    yield s
    s.set_fail(None)
    s.set_native_pad(None)
    s.set_run_us(None)
    assert not s.errors, s.errors


@pytest.fixture
def lib(so_path, standin):
    return rt.load_library(so_path)


def linear_onnx(path: Path, x: str, y: str, k: int, n: int, seed: int) -> Path:
    """y = x @ W + b with x [1, k] float32."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", [x, "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], [y])], "linear",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, n])], initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture
def chain(tmp_path, standin):
    """Two models, A: x[1,32] -> y[1,40], B: y[1,40] -> z[1,24], registered as a.rknn and b.rknn."""
    a_onnx = linear_onnx(tmp_path / "a.onnx", "x", "y", 32, 40, seed=1)
    b_onnx = linear_onnx(tmp_path / "b.onnx", "y", "z", 40, 24, seed=2)
    mapping = {str(tmp_path / "a.rknn"): str(a_onnx), str(tmp_path / "b.rknn"): str(b_onnx)}
    hooks.register_onnx_map(standin, mapping)
    a_model, b_model = (standin.models[os.path.realpath(p)] for p in mapping)

    def reference(x16):
        y16 = a_model[2]([x16])[0]
        return y16, b_model[2]([y16])[0]

    return tmp_path / "a.rknn", tmp_path / "b.rknn", reference


def test_struct_layout_matches_ctypes(build_dir, so_path):
    """gcc's layout of our header == the ctypes Structures; both == the vendor header's (read, by hand)."""
    c = build.c_layout(build_dir)
    n_functions = hooks.standin(so_path).lib.standin_n_functions()
    structs = {**rt.STRUCTS, "standin_tensor": hooks.StandinTensor,
               "standin_counters": hooks.counters_struct(n_functions)}
    for name, cls in structs.items():
        assert c.pop(f"{name} sizeof") == ctypes.sizeof(cls), name
        for field, *_ in cls._fields_:
            assert c.pop(f"{name}.{field}") == getattr(cls, field).offset, f"{name}.{field}"
    assert not c, f"fields in the C header but not in ctypes: {sorted(c)}"
    # LP64 offsets derived by hand from the vendor's rknn_api.h (SDK 2.x): padding after fl and pass_through.
    attr = rt.RknnTensorAttr
    assert ctypes.sizeof(attr) == 376
    assert (attr.name.offset, attr.n_elems.offset, attr.fmt.offset, attr.fl.offset, attr.zp.offset) == (
        72, 328, 336, 348, 352)
    assert (attr.w_stride.offset, attr.pass_through.offset, attr.h_stride.offset) == (360, 368, 372)
    assert ctypes.sizeof(rt.RknnTensorMem) == 40 and rt.RknnTensorMem.priv_data.offset == 32
    assert ctypes.sizeof(rt.RknnInput) == 32 and rt.RknnInput.type.offset == 24
    assert ctypes.sizeof(rt.RknnOutput) == 24 and rt.RknnOutput.buf.offset == 8
    assert ctypes.sizeof(rt.RknnMemSize) == 64 and ctypes.sizeof(rt.rknn_context) == 8


def test_queries_core_mask_dup_and_destroy(lib, standin, chain):
    a_path, _, _ = chain
    ctx = rt.Context.open(lib, a_path, "seg.a")
    assert ctx.io_num() == (1, 1)
    (x,), (y,) = ctx.input_attrs(), ctx.output_attrs()
    assert (x.name, x.dims, x.type, x.n_elems, x.size, x.size_with_stride) == ("x", (1, 32), FP16, 32, 64, 64)
    assert (y.name, y.dims, y.dtype) == ("y", (1, 40), np.float16)
    assert ctx.input_attrs(native=True)[0].size_with_stride == 64
    assert "standin" in ctx.sdk_version()[0]
    ctx.set_core_mask(rt.RKNN_NPU_CORE_1)
    assert standin.core_mask(ctx.handle) == rt.RKNN_NPU_CORE_1
    twin = ctx.dup("seg.a#2")
    assert twin.handle != ctx.handle and twin.output_attrs()[0].name == "y"
    assert standin.counters()["live_contexts"] >= 2
    for c in (twin, ctx):
        c.destroy()
        c.destroy()  # a second destroy is a no-op
    calls = standin.counters()["calls"]
    assert calls["rknn_init"] == 1 and calls["rknn_dup_context"] == 1 and calls["rknn_destroy"] == 2


def test_zero_copy_chain_runs_without_copies(lib, standin, chain):
    """A's output mem is B's input (create_mem_from_fd at an offset): 100 runs, no allocation, no copy."""
    a_path, b_path, reference = chain
    a, b = rt.Context.open(lib, a_path, "seg.a"), rt.Context.open(lib, b_path, "seg.b")
    (xa,), (ya,) = a.input_attrs(native=True), a.output_attrs(native=True)
    (yb,), (zb,) = b.input_attrs(native=True), b.output_attrs(native=True)
    arena = a.create_mem(4096)  # one buffer; y lives at byte 256 of it
    x_mem, z_mem = a.create_mem(xa.size_with_stride), b.create_mem(zb.size_with_stride)
    y_out = a.create_mem_from_fd(arena, offset=256, size=ya.size_with_stride)
    y_in = b.create_mem_from_fd(arena, offset=256, size=yb.size_with_stride)
    for ctx, mem, attr in ((a, x_mem, xa), (a, y_out, ya), (b, y_in, yb), (b, z_mem, zb)):
        ctx.set_io_mem(mem, attr.to_struct(pass_through=True))
    x_view, z_view = x_mem.array(np.float16, xa.dims), z_mem.array(np.float16, zb.dims)
    y_view = arena.array(np.float16, ya.dims, offset_bytes=256)
    standin.reset_counters()

    rng = np.random.default_rng(0)
    for _ in range(100):
        x = rng.standard_normal(xa.dims).astype(np.float16)
        x_view[...] = x
        a.run()
        b.run()
        y_ref, z_ref = reference(x)
        np.testing.assert_array_equal(y_view, y_ref)
        np.testing.assert_array_equal(z_view, z_ref)

    counts = standin.counters()
    assert counts["runs"] == 200 and counts["calls"]["rknn_run"] == 200
    for key in ("allocs", "alloc_bytes", "input_copies", "output_copies", "conversions", "restrides"):
        assert counts[key] == 0, key
    assert a.perf_run_us() >= 0
    a.mem_sync(y_out, rt.RKNN_MEMORY_SYNC_FROM_DEVICE)
    for ctx, mems in ((b, (y_in, z_mem)), (a, (y_out, x_mem, arena))):
        for m in mems:
            ctx.destroy_mem(m)
        ctx.destroy()
    with pytest.raises(ValueError, match="destroyed"):
        z_mem.array(np.float16, zb.dims)


def test_create_mem_from_fd_takes_the_base_address(lib, standin, chain):
    """The header says virt_addr comes without the offset; the stand-in refuses base + offset."""
    a_path, _, _ = chain
    a = rt.Context.open(lib, a_path, "seg.a")
    arena = a.create_mem(1024)
    assert not lib.rknn_create_mem_from_fd(a.handle, arena.fd, arena.addr + 128, 64, 128)
    alias = a.create_mem_from_fd(arena, offset=128, size=64)
    alias.array(np.uint8, 64)[:] = 7
    assert (arena.array(np.uint8, 1024)[128:192] == 7).all() and arena.array(np.uint8, 1024)[:128].sum() == 0
    with pytest.raises(ValueError):
        a.create_mem_from_fd(arena, offset=1000, size=64)
    a.destroy_mem(alias)
    a.destroy_mem(arena)
    a.destroy()


def test_copying_path_counts_copies_and_conversions(lib, standin, chain):
    a_path, _, reference = chain
    a = rt.Context.open(lib, a_path, "seg.a")
    x = np.random.default_rng(3).standard_normal((1, 32)).astype(np.float32)
    a.inputs_set([(0, x, False, FP32, rt.RKNN_TENSOR_UNDEFINED)])
    a.run()
    (y32,) = a.outputs_get(1, want_float=True)
    (y16,) = a.outputs_get(1)
    y_ref, _ = reference(x.astype(np.float16))
    assert y32.dtype == np.float32 and y16.dtype == np.float16 and y16.shape == (1, 40)
    np.testing.assert_array_equal(y32, y_ref.astype(np.float32))
    np.testing.assert_array_equal(y16, y_ref)
    c = standin.counters()
    assert (c["input_copies"], c["output_copies"], c["conversions"]) == (1, 2, 2)  # fp32 in, fp32 out
    assert c["calls"]["rknn_outputs_release"] == 2 and c["allocs"] >= 2
    a.destroy()


def test_fp32_binding_converts_each_run(lib, standin, chain):
    """pass_through 0 with float32 mems: correct results, one conversion per bound tensor per run."""
    a_path, _, reference = chain
    a = rt.Context.open(lib, a_path, "seg.a")
    (xa,), (ya,) = a.input_attrs(), a.output_attrs()
    x_mem, y_mem = a.create_mem(xa.n_elems * 4), a.create_mem(ya.n_elems * 4)
    a.set_io_mem(x_mem, xa.to_struct(pass_through=False, type=FP32))
    a.set_io_mem(y_mem, ya.to_struct(pass_through=False, type=FP32))
    standin.reset_counters()
    x = np.random.default_rng(4).standard_normal((1, 32)).astype(np.float32)
    x_mem.array(np.float32, (1, 32))[...] = x
    for _ in range(3):
        a.run()
    y_ref, _ = reference(x.astype(np.float16))
    np.testing.assert_array_equal(y_mem.array(np.float32, (1, 40)), y_ref.astype(np.float32))
    c = standin.counters()
    assert (c["conversions"], c["input_copies"], c["output_copies"], c["allocs"]) == (6, 3, 3, 0)
    with pytest.raises(rt.RknnCallError, match=r"seg\.a: rknn_set_io_mem returned -5 \(parameter invalid\)"):
        a.set_io_mem(x_mem, xa.to_struct(pass_through=True, type=FP32))  # pass-through needs the model dtype
    a.destroy_mem(x_mem)
    a.destroy_mem(y_mem)
    a.destroy()


def test_padded_native_layout(lib, standin, chain):
    """size_with_stride > size: pass_through 0 with plain bytes converts (counted); pass_through 1 takes
    the padded layout (rows w_stride apart) and costs no conversion."""
    a_path, _, reference = chain
    standin.set_native_pad(16)
    a = rt.Context.open(lib, a_path, "seg.a")
    (xn,), (yn,) = a.input_attrs(native=True), a.output_attrs(native=True)
    assert (xn.w_stride, xn.size_with_stride, xn.size) == (32, 64, 64)  # 32 is already a multiple of 16
    assert (yn.w_stride, yn.size_with_stride, yn.size) == (48, 96, 80)
    x = np.random.default_rng(5).standard_normal((1, 32)).astype(np.float16)
    y_ref, _ = reference(x)

    x_mem, y_plain = a.create_mem(xn.size_with_stride), a.create_mem(yn.size)
    a.set_io_mem(x_mem, xn.to_struct(pass_through=True))
    a.set_io_mem(y_plain, yn.to_struct(pass_through=False, type=FP16))  # the runtime's fallback
    x_mem.array(np.float16, (1, 32))[...] = x
    standin.reset_counters()
    a.run()
    np.testing.assert_array_equal(y_plain.array(np.float16, (1, 40)), y_ref)
    c = standin.counters()
    assert (c["conversions"], c["output_copies"], c["converted_bytes"]) == (1, 1, 80)

    y_padded = a.create_mem(yn.size_with_stride)
    a.set_io_mem(y_padded, yn.to_struct(pass_through=True))
    standin.reset_counters()
    a.run()
    np.testing.assert_array_equal(y_padded.array(np.float16, (1, 48))[:, :40], y_ref)
    c = standin.counters()
    assert (c["conversions"], c["output_copies"], c["restrides"]) == (0, 0, 1)
    with pytest.raises(rt.RknnCallError, match="rknn_set_io_mem returned -5"):
        a.set_io_mem(y_plain, yn.to_struct(pass_through=True))  # too small for the padded layout
    for m in (x_mem, y_plain, y_padded):
        a.destroy_mem(m)
    a.destroy()


def test_fp16_conversions_match_numpy(lib, standin, tmp_path):
    """The stand-in's own fp32<->fp16 conversions round like numpy (so results compare exactly)."""
    n = 65536
    standin.register({tmp_path / "id.rknn": ([hooks.Spec("x", (1, n))], [hooks.Spec("y", (1, n))],
                                             lambda xs: [xs[0].copy()])})
    ctx = rt.Context.open(lib, tmp_path / "id.rknn", "id")
    every_half = np.arange(n, dtype=np.uint16).view(np.float16).reshape(1, n)
    ctx.inputs_set([(0, every_half, True, FP16, rt.RKNN_TENSOR_UNDEFINED)])
    ctx.run()
    (as32,) = ctx.outputs_get(1, want_float=True)
    np.testing.assert_array_equal(as32.view(np.uint32), every_half.astype(np.float32).view(np.uint32))

    rng = np.random.default_rng(6)
    edges = np.array([0.0, -0.0, 65504, 65519.99, 65520, -65520, 1e-8, 2.0**-25, 2.0**-24, 3 * 2.0**-25,
                      6.1e-5, 1 + 2.0**-11, 1 + 3 * 2.0**-11, np.inf, -np.inf, 3.4e38], np.float32)
    scaled = (rng.standard_normal(n // 2) * 10.0 ** rng.integers(-9, 6, n // 2)).astype(np.float32)
    any_bits = rng.integers(0, 2**32, n // 2 - len(edges), dtype=np.uint32).view(np.float32)
    floats = np.concatenate([edges, scaled, any_bits])
    floats[np.isnan(floats)] = 1.0  # nan payloads are not compared
    ctx.inputs_set([(0, floats.reshape(1, n), False, FP32, rt.RKNN_TENSOR_UNDEFINED)])
    ctx.run()
    (as16,) = ctx.outputs_get(1)
    with np.errstate(over="ignore"):
        expected = floats.astype(np.float16).view(np.uint16).reshape(1, n)
    np.testing.assert_array_equal(as16.view(np.uint16), expected)
    with pytest.raises(ValueError, match="float64"):
        ctx.inputs_set([(0, floats.astype(np.float64), False, FP32, rt.RKNN_TENSOR_UNDEFINED)])
    ctx.destroy()


FAILING_CALLS = [  # (C function, code it is made to return, what the binding does)
    ("rknn_init", -6, lambda lib, ctx, mem, attr, path: rt.Context.open(lib, path, "mixing_0.s1")),
    ("rknn_query", -7, lambda lib, ctx, mem, attr, path: ctx.io_num()),
    ("rknn_set_core_mask", -5, lambda lib, ctx, mem, attr, path: ctx.set_core_mask(rt.RKNN_NPU_CORE_0_1_2)),
    ("rknn_dup_context", -4, lambda lib, ctx, mem, attr, path: ctx.dup()),
    ("rknn_create_mem", None, lambda lib, ctx, mem, attr, path: ctx.create_mem(64)),
    ("rknn_create_mem_from_fd", None, lambda lib, ctx, mem, attr, path: ctx.create_mem_from_fd(mem)),
    ("rknn_set_io_mem", -3, lambda lib, ctx, mem, attr, path: ctx.set_io_mem(mem, attr)),
    ("rknn_run", -7, lambda lib, ctx, mem, attr, path: ctx.run()),
    ("rknn_mem_sync", -1, lambda lib, ctx, mem, attr, path: ctx.mem_sync(mem, rt.RKNN_MEMORY_SYNC_TO_DEVICE)),
    ("rknn_inputs_set", -8, lambda lib, ctx, mem, attr, path: ctx.inputs_set(
        [(0, np.zeros((1, 32), np.float16), True, FP16, rt.RKNN_TENSOR_UNDEFINED)])),
    ("rknn_outputs_get", -9, lambda lib, ctx, mem, attr, path: ctx.outputs_get(1)),
    ("rknn_outputs_release", -2, lambda lib, ctx, mem, attr, path: ctx.outputs_get(1)),
    ("rknn_destroy_mem", -10, lambda lib, ctx, mem, attr, path: ctx.destroy_mem(mem)),
    ("rknn_destroy", -7, lambda lib, ctx, mem, attr, path: ctx.destroy()),
]


@pytest.mark.parametrize("function, code, call", FAILING_CALLS, ids=[f[0] for f in FAILING_CALLS])
def test_failing_call_raises_one_line_error(lib, standin, chain, function, code, call):
    a_path, _, _ = chain
    ctx = rt.Context.open(lib, a_path, "mixing_0.s1")
    handle = ctx.handle
    mem = ctx.create_mem(64)
    attr = ctx.input_attrs(native=True)[0]
    ctx.set_io_mem(mem, attr.to_struct(pass_through=True))
    ctx.run()  # so outputs_get has something to get
    standin.set_fail(function, code if code is not None else -1, times=1)
    with pytest.raises(rt.RknnCallError) as info:
        call(lib, ctx, mem, attr.to_struct(pass_through=True), a_path)
    e = info.value
    what = "NULL" if code is None else str(code)
    assert str(e) == f"mixing_0.s1: {function} returned {what} ({e.meaning})"
    assert "\n" not in str(e) and (e.label, e.call, e.code) == ("mixing_0.s1", function, code)
    if code is not None:
        assert e.meaning == rt.ERRORS[code]
    standin.set_fail(None)
    lib.rknn_destroy(handle)  # directly: a failed destroy() has already forgotten its handle


def test_error_message_example():
    e = rt.RknnCallError("mixing_0.s1", "rknn_run", -7)
    assert str(e) == "mixing_0.s1: rknn_run returned -7 (context invalid)"
    assert str(pickle.loads(pickle.dumps(e))) == str(e)


def test_unknown_model_is_model_invalid(lib, standin, tmp_path):
    with pytest.raises(rt.RknnCallError, match=r"^seg: rknn_init returned -6 \(model invalid\)$"):
        rt.Context.open(lib, tmp_path / "nowhere.rknn", "seg")


def test_run_releases_the_gil(lib, standin, chain):
    """A 0.3 s rknn_run in a thread leaves the main thread free to compute: the GIL is released."""
    a_path, _, _ = chain
    ctx = rt.Context.open(lib, a_path, "seg.a")
    ctx.inputs_set([(0, np.ones((1, 32), np.float16), True, FP16, rt.RKNN_TENSOR_UNDEFINED)])
    standin.set_run_us(300_000)
    started = threading.Event()

    def npu():
        started.set()
        ctx.run()

    t = threading.Thread(target=npu)
    t.start()
    started.wait()
    first = last = time.perf_counter()
    longest_stall = 0.0
    while t.is_alive():
        now = time.perf_counter()
        longest_stall, last = max(longest_stall, now - last), now
    t.join()
    # Were the GIL held, this thread would stall for the whole run, or only start looping after it.
    assert longest_stall < 0.15 and last - first > 0.15, (longest_stall, last - first)
    assert ctx.perf_run_us() >= 300_000
    ctx.destroy()


def test_run_sleep_from_environment(lib, standin, chain, monkeypatch):
    a_path, _, _ = chain
    monkeypatch.setenv("STANDIN_RUN_US", "20000")
    ctx = rt.Context.open(lib, a_path, "seg.a")
    ctx.inputs_set([(0, np.ones((1, 32), np.float16), True, FP16, rt.RKNN_TENSOR_UNDEFINED)])
    ctx.run()
    assert ctx.perf_run_us() >= 20000
    ctx.destroy()


def test_load_library_errors_say_what_to_do(so_path, monkeypatch, tmp_path):
    with pytest.raises(rt.RknnLibraryError, match=r"nothere/librknnrt\.so \(given path\).*LIBRKNNRT_PATH"):
        rt.load_library(tmp_path / "nothere" / "librknnrt.so")
    libm = ctypes.util.find_library("m")
    if libm:
        with pytest.raises(rt.RknnLibraryError, match="has no function rknn_init"):
            rt.load_library(libm)
    monkeypatch.setenv("LIBRKNNRT_PATH", str(so_path))
    assert rt.load_library().rknn_run.argtypes[0] is rt.rknn_context
    monkeypatch.setenv("LIBRKNNRT_PATH", str(tmp_path / "gone.so"))
    with pytest.raises(rt.RknnLibraryError, match=r"gone\.so \(LIBRKNNRT_PATH\)"):
        rt.load_library()


SUBPROCESS = """
import json, sys
import numpy as np
from rwkv2rknn.run import librknnrt as rt
lib = rt.load_library()
ctx = rt.Context.open(lib, sys.argv[1], "sub")
ctx.inputs_set([(0, np.arange(32, dtype=np.float16).reshape(1, 32) / 32, True, rt.RKNN_TENSOR_FLOAT16, 3)])
ctx.run()
print(json.dumps(ctx.outputs_get(1)[0].astype(float).tolist()))
"""


def test_sitecustomize_serves_models_in_a_subprocess(so_path, chain, tmp_path):
    """RKNN_STANDIN_MAP + tests/standin/site on PYTHONPATH: a fresh interpreter's runtime sees the models."""
    a_path, _, reference = chain
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps({str(a_path): str(tmp_path / "a.onnx")}))
    env = {**os.environ, "LIBRKNNRT_PATH": str(so_path), "RKNN_STANDIN_MAP": str(map_file),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "standin" / "site"), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", SUBPROCESS, str(a_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    y_ref, _ = reference((np.arange(32, dtype=np.float16).reshape(1, 32) / 32).astype(np.float16))
    np.testing.assert_array_equal(np.array(json.loads(done.stdout), np.float16), y_ref)
