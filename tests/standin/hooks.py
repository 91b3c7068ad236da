"""The test side of the stand-in librknnrt: describe and compute its models from Python, read its counters.

A model is (input specs, output specs, fn): fn gets the inputs as numpy arrays in the model's dtypes
and returns the outputs. `onnx_model` makes one that runs an ONNX file on onnxruntime, as a compiled
.rknn of that ONNX would (fp16 tensors by default, as an fp16 RKNN build has).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from ctypes import CFUNCTYPE, POINTER, c_char, c_char_p, c_int, c_int32, c_int64, c_uint32, c_uint64, c_void_p
from typing import NamedTuple

import numpy as np

from rwkv2rknn.run import librknnrt as rt


class StandinTensor(ctypes.Structure):
    _fields_ = [("name", c_char * rt.RKNN_MAX_NAME_LEN), ("n_dims", c_uint32),
                ("dims", c_uint32 * rt.RKNN_MAX_DIMS), ("type", c_int32), ("fmt", c_int32)]


def counters_struct(n_functions: int) -> type[ctypes.Structure]:
    """struct standin_counters for a library counting n_functions functions."""
    u64 = c_uint64
    return type("StandinCounters", (ctypes.Structure,), {"_fields_": [
        ("calls", u64 * n_functions), ("allocs", u64), ("alloc_bytes", u64), ("input_copies", u64),
        ("input_copy_bytes", u64), ("output_copies", u64), ("output_copy_bytes", u64), ("conversions", u64),
        ("converted_bytes", u64), ("restrides", u64), ("restride_bytes", u64), ("runs", u64),
        ("last_run_us", c_int64), ("live_contexts", u64), ("live_mems", u64), ("last_core_mask", c_uint32),
        ("native_pad", c_uint32)]})


DESCRIBE = CFUNCTYPE(c_int, c_char_p, c_uint32, POINTER(c_uint32), POINTER(StandinTensor), POINTER(c_uint32),
                     POINTER(StandinTensor))
COMPUTE = CFUNCTYPE(c_int, c_char_p, c_uint32, POINTER(c_void_p), c_uint32, POINTER(c_void_p))


class Spec(NamedTuple):
    """One model tensor: its name, plain shape and rknn tensor type (the model's own dtype)."""

    name: str
    dims: tuple[int, ...]
    type: int = rt.RKNN_TENSOR_FLOAT16
    fmt: int = rt.RKNN_TENSOR_UNDEFINED

    @property
    def dtype(self) -> np.dtype:
        return rt.numpy_dtype(self.type)


Model = tuple[list[Spec], list[Spec], Callable[[list[np.ndarray]], list[np.ndarray]]]


def _view(ptr: int, spec: Spec) -> np.ndarray:
    n = int(np.prod(spec.dims, dtype=np.int64)) * spec.dtype.itemsize
    return np.frombuffer((c_char * n).from_address(ptr), spec.dtype).reshape(spec.dims)


class Standin:
    """One loaded stand-in library and the models its hooks serve (use `standin(path)`: one per library)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.lib = lib = ctypes.CDLL(self.path)
        lib.standin_set_hooks.argtypes = [DESCRIBE, COMPUTE]
        lib.standin_n_functions.restype = c_int
        lib.standin_function_name.restype = c_char_p
        lib.standin_function_name.argtypes = [c_int]
        lib.standin_set_fail.argtypes = [c_char_p, c_int, c_int]
        lib.standin_set_native_pad.argtypes = [c_int64]
        lib.standin_set_run_us.argtypes = [c_int64]
        lib.standin_core_mask.argtypes = [rt.rknn_context]
        lib.standin_core_mask.restype = c_int64
        self.functions = [lib.standin_function_name(i).decode() for i in range(lib.standin_n_functions())]
        self.Counters = counters_struct(len(self.functions))
        self.models: dict[str, Model] = {}
        self.errors: list[BaseException] = []  # exceptions raised inside the callbacks
        self._describe, self._compute = DESCRIBE(self._on_describe), COMPUTE(self._on_compute)  # kept alive
        lib.standin_set_hooks(self._describe, self._compute)

    def register(self, models: dict[str | os.PathLike, Model]) -> None:
        for path, model in models.items():
            self.models[os.path.realpath(path)] = model

    def _model(self, path: bytes) -> Model:
        return self.models[os.path.realpath(os.fsdecode(path))]

    def _on_describe(self, path, max_tensors, n_in, ins, n_out, outs) -> int:
        try:
            in_specs, out_specs, _ = self._model(path)
            if len(in_specs) > max_tensors or len(out_specs) > max_tensors:
                raise ValueError(f"more than {max_tensors} tensors")
            for specs, count, arr in ((in_specs, n_in, ins), (out_specs, n_out, outs)):
                count[0] = len(specs)
                for i, s in enumerate(specs):
                    t = arr[i]
                    t.name, t.n_dims, t.type, t.fmt = s.name.encode(), len(s.dims), s.type, s.fmt
                    t.dims[:len(s.dims)] = [int(d) for d in s.dims]
            return 0
        except KeyError:
            return 1  # an unknown path: rknn_init fails with "model invalid"
        except BaseException as e:  # noqa: BLE001 - ctypes would only print it
            self.errors.append(e)
            return 1

    def _on_compute(self, path, n_in, ins, n_out, outs) -> int:
        try:
            in_specs, out_specs, fn = self._model(path)
            arrays = []
            for i, s in enumerate(in_specs):
                a = _view(ins[i], s)
                a.flags.writeable = False
                arrays.append(a)
            results = fn(arrays)
            for i, (s, r) in enumerate(zip(out_specs, results, strict=True)):
                np.copyto(_view(outs[i], s), np.asarray(r).reshape(s.dims), casting="unsafe")
            return 0
        except BaseException as e:  # noqa: BLE001
            self.errors.append(e)
            return 1

    # counters and knobs
    def counters(self) -> dict:
        c = self.Counters()
        self.lib.standin_get_counters(ctypes.byref(c))
        out = {name: getattr(c, name) for name, _ in c._fields_ if name != "calls"}
        out["calls"] = dict(zip(self.functions, c.calls))
        return out

    def reset_counters(self) -> None:
        self.lib.standin_reset_counters()

    def set_fail(self, function: str | None, code: int = -1, times: int = 1) -> None:
        """The next `times` calls of `function` (times < 0: all) return `code`; None clears all failures."""
        if self.lib.standin_set_fail(function.encode() if function else None, code, times) != 0:
            raise ValueError(f"the stand-in has no function {function}")

    def set_native_pad(self, elems: int | None) -> None:
        """Pad native layouts of contexts opened later (None: back to $STANDIN_NATIVE_PAD, else plain)."""
        self.lib.standin_set_native_pad(-1 if elems is None else elems)

    def set_run_us(self, us: int | None) -> None:
        """Sleep `us` inside every rknn_run (None: back to $STANDIN_RUN_US)."""
        self.lib.standin_set_run_us(-1 if us is None else us)

    def core_mask(self, handle: int) -> int:
        return self.lib.standin_core_mask(handle)


_LOADED: dict[str, Standin] = {}


def standin(path: str | os.PathLike) -> Standin:
    """The Standin of the library at `path` (one per library: its hooks are process-wide)."""
    key = os.path.realpath(path)
    if key not in _LOADED:
        _LOADED[key] = Standin(path)
    return _LOADED[key]


# -- onnxruntime-backed models ------------------------------------------------------------------------------

_ORT_TYPES = {  # onnxruntime type string: (numpy dtype, rknn type; None = the float type chosen)
    "tensor(float)": (np.float32, None), "tensor(float16)": (np.float16, None),
    "tensor(int8)": (np.int8, rt.RKNN_TENSOR_INT8), "tensor(uint8)": (np.uint8, rt.RKNN_TENSOR_UINT8),
    "tensor(int16)": (np.int16, rt.RKNN_TENSOR_INT16), "tensor(int32)": (np.int32, rt.RKNN_TENSOR_INT32),
    "tensor(int64)": (np.int64, rt.RKNN_TENSOR_INT64), "tensor(bool)": (np.bool_, rt.RKNN_TENSOR_BOOL),
}


def onnx_model(onnx_path: str | os.PathLike, float_type: int = rt.RKNN_TENSOR_FLOAT16) -> Model:
    """A model computed by onnxruntime from an ONNX file; float tensors are `float_type` on the RKNN side.

    Inputs are cast to the ONNX's dtypes, outputs back to the RKNN ones. Symbolic dimensions become 1
    (an RKNN model has static shapes).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(os.fspath(onnx_path), so, providers=["CPUExecutionProvider"])

    def specs(args):
        out = []
        for a in args:
            rknn_type = _ORT_TYPES[a.type][1]
            dims = tuple(d if isinstance(d, int) else 1 for d in a.shape)
            out.append(Spec(a.name, dims, float_type if rknn_type is None else rknn_type))
        return out

    ins, outs = specs(sess.get_inputs()), specs(sess.get_outputs())
    onnx_dtypes = [_ORT_TYPES[a.type][0] for a in sess.get_inputs()]

    def compute(arrays):
        feed = {s.name: a.astype(dt) for s, a, dt in zip(ins, arrays, onnx_dtypes)}
        return [r.astype(s.dtype) for s, r in zip(outs, sess.run(None, feed))]

    return ins, outs, compute


def register_onnx_map(lib: Standin, mapping: dict) -> None:
    """mapping: {rknn path: onnx path, or {"onnx": path, "float_type": "float16"|"float32"}}."""
    models = {}
    for rknn_path, entry in mapping.items():
        if isinstance(entry, dict):
            float_type = {"float16": rt.RKNN_TENSOR_FLOAT16, "float32": rt.RKNN_TENSOR_FLOAT32}[
                entry.get("float_type", "float16")]
            models[rknn_path] = onnx_model(entry["onnx"], float_type)
        else:
            models[rknn_path] = onnx_model(entry)
    lib.register(models)
