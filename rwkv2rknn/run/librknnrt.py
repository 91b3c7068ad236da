"""ctypes binding to librknnrt.so, the C runtime of the RK3588 NPU (RKNN SDK 2.x).

Why the C API and not rknn-toolkit-lite2: RKNNLite has no rknn_create_mem / rknn_set_io_mem, so every
inference copies its inputs in and its outputs out. Through the C API one segment's output buffer can
be bound as the next segment's input (nothing copied between them), and ctypes.CDLL releases the GIL
during each call, so Python work can overlap an NPU run.

The declarations are our own, written from the documented API (shared/docs/rknn-runtime-api.md).
tests/test_rknn_c.py checks every Structure's size and field offsets against gcc's layout of
tests/standin/rknn_standin.h, and runs this binding against a stand-in library built from C.

This module knows nothing of manifests or segments: labels are only used in error messages.
"""

from __future__ import annotations

import ctypes
import os
import platform
from ctypes import POINTER, byref, c_char, c_char_p, c_float, c_int, c_int8, c_int32, c_int64, c_uint8, c_uint32
from ctypes import c_uint64, c_void_p
from dataclasses import dataclass, field

import numpy as np

DEFAULT_PATH = "/usr/lib/librknnrt.so"

# rknn_context is a uint32 only on 32-bit ARM; a uint64 on aarch64 and on x86_64 (the tests' stand-in).
_ARM32 = ctypes.sizeof(c_void_p) == 4 and platform.machine().lower().startswith("arm")
rknn_context = c_uint32 if _ARM32 else c_uint64

RKNN_MAX_DIMS = 16
RKNN_MAX_NAME_LEN = 256

# -- error codes ------------------------------------------------------------------------------------------
RKNN_SUCC = 0
ERRORS = {
    -1: "failed",
    -2: "timeout",
    -3: "device unavailable",
    -4: "malloc failed",
    -5: "parameter invalid",
    -6: "model invalid",
    -7: "context invalid",
    -8: "input invalid",
    -9: "output invalid",
    -10: "device unmatch: update the rknn runtime and the NPU driver",
    -11: "pre-compiled model incompatible with this driver",
    -12: "optimization level incompatible with this driver",
    -13: "model built for another target platform",
}

# -- rknn_query commands ------------------------------------------------------------------------------------
RKNN_QUERY_IN_OUT_NUM = 0
RKNN_QUERY_INPUT_ATTR = 1
RKNN_QUERY_OUTPUT_ATTR = 2
RKNN_QUERY_PERF_DETAIL = 3
RKNN_QUERY_PERF_RUN = 4
RKNN_QUERY_SDK_VERSION = 5
RKNN_QUERY_MEM_SIZE = 6
RKNN_QUERY_NATIVE_INPUT_ATTR = 8
RKNN_QUERY_NATIVE_OUTPUT_ATTR = 9
RKNN_QUERY_NATIVE_NHWC_INPUT_ATTR = 10
RKNN_QUERY_NATIVE_NHWC_OUTPUT_ATTR = 11

# -- tensor types, formats ---------------------------------------------------------------------------------
RKNN_TENSOR_FLOAT32 = 0
RKNN_TENSOR_FLOAT16 = 1
RKNN_TENSOR_INT8 = 2
RKNN_TENSOR_UINT8 = 3
RKNN_TENSOR_INT16 = 4
RKNN_TENSOR_UINT16 = 5
RKNN_TENSOR_INT32 = 6
RKNN_TENSOR_UINT32 = 7
RKNN_TENSOR_INT64 = 8
RKNN_TENSOR_BOOL = 9
RKNN_TENSOR_INT4 = 10
RKNN_TENSOR_BFLOAT16 = 11

# INT4 and BFLOAT16 have no numpy dtype.
NUMPY_DTYPES = {
    RKNN_TENSOR_FLOAT32: np.dtype(np.float32), RKNN_TENSOR_FLOAT16: np.dtype(np.float16),
    RKNN_TENSOR_INT8: np.dtype(np.int8), RKNN_TENSOR_UINT8: np.dtype(np.uint8),
    RKNN_TENSOR_INT16: np.dtype(np.int16), RKNN_TENSOR_UINT16: np.dtype(np.uint16),
    RKNN_TENSOR_INT32: np.dtype(np.int32), RKNN_TENSOR_UINT32: np.dtype(np.uint32),
    RKNN_TENSOR_INT64: np.dtype(np.int64), RKNN_TENSOR_BOOL: np.dtype(np.bool_),
}
TENSOR_TYPES = {dt: t for t, dt in NUMPY_DTYPES.items()}

RKNN_TENSOR_NCHW = 0
RKNN_TENSOR_NHWC = 1
RKNN_TENSOR_NC1HWC2 = 2
RKNN_TENSOR_UNDEFINED = 3

RKNN_TENSOR_QNT_NONE = 0

# -- core masks (rknn_set_core_mask) -----------------------------------------------------------------------
RKNN_NPU_CORE_AUTO = 0
RKNN_NPU_CORE_0 = 1
RKNN_NPU_CORE_1 = 2
RKNN_NPU_CORE_2 = 4
RKNN_NPU_CORE_0_1 = 3
RKNN_NPU_CORE_0_1_2 = 7
RKNN_NPU_CORE_ALL = 0xFFFF

# -- rknn_init flags, rknn_mem_sync modes, rknn_tensor_mem.flags --------------------------------------------
RKNN_FLAG_PRIOR_HIGH = 0x0
RKNN_FLAG_PRIOR_MEDIUM = 0x1
RKNN_FLAG_PRIOR_LOW = 0x2
RKNN_FLAG_COLLECT_PERF_MASK = 0x8
RKNN_FLAG_DISABLE_PROC_HIGH_PRIORITY = 0x2000
RKNN_FLAG_DISABLE_FLUSH_INPUT_MEM_CACHE = 0x4000
RKNN_FLAG_DISABLE_FLUSH_OUTPUT_MEM_CACHE = 0x8000

RKNN_MEMORY_SYNC_TO_DEVICE = 1
RKNN_MEMORY_SYNC_FROM_DEVICE = 2
RKNN_MEMORY_SYNC_BIDIRECTIONAL = 3

RKNN_TENSOR_MEMORY_FLAGS_ALLOC_INSIDE = 1
RKNN_TENSOR_MEMORY_FLAGS_FROM_FD = 2


def numpy_dtype(tensor_type: int) -> np.dtype:
    try:
        return NUMPY_DTYPES[tensor_type]
    except KeyError:
        raise ValueError(f"rknn tensor type {tensor_type} has no numpy dtype") from None


# -- structs (field order as documented; enums are 4-byte ints) --------------------------------------------

class RknnInputOutputNum(ctypes.Structure):
    _fields_ = [("n_input", c_uint32), ("n_output", c_uint32)]


class RknnTensorAttr(ctypes.Structure):
    _fields_ = [
        ("index", c_uint32), ("n_dims", c_uint32), ("dims", c_uint32 * RKNN_MAX_DIMS),
        ("name", c_char * RKNN_MAX_NAME_LEN), ("n_elems", c_uint32), ("size", c_uint32),
        ("fmt", c_int), ("type", c_int), ("qnt_type", c_int),
        ("fl", c_int8), ("zp", c_int32), ("scale", c_float),  # C pads 3 bytes after fl
        ("w_stride", c_uint32), ("size_with_stride", c_uint32),
        ("pass_through", c_uint8), ("h_stride", c_uint32),  # and 3 after pass_through
    ]


class RknnPerfRun(ctypes.Structure):
    _fields_ = [("run_duration", c_int64)]  # microseconds


class RknnSdkVersion(ctypes.Structure):
    _fields_ = [("api_version", c_char * 256), ("drv_version", c_char * 256)]


class RknnMemSize(ctypes.Structure):
    _fields_ = [
        ("total_weight_size", c_uint32), ("total_internal_size", c_uint32),
        ("total_dma_allocated_size", c_uint64), ("total_sram_size", c_uint32),
        ("free_sram_size", c_uint32), ("reserved", c_uint32 * 10),
    ]


class RknnTensorMem(ctypes.Structure):
    _fields_ = [
        ("virt_addr", c_void_p), ("phys_addr", c_uint64), ("fd", c_int32), ("offset", c_int32),
        ("size", c_uint32), ("flags", c_uint32), ("priv_data", c_void_p),
    ]


class RknnInput(ctypes.Structure):
    _fields_ = [
        ("index", c_uint32), ("buf", c_void_p), ("size", c_uint32), ("pass_through", c_uint8),
        ("type", c_int), ("fmt", c_int),
    ]


class RknnOutput(ctypes.Structure):
    _fields_ = [
        ("want_float", c_uint8), ("is_prealloc", c_uint8), ("index", c_uint32), ("buf", c_void_p),
        ("size", c_uint32),
    ]


STRUCTS = {
    "rknn_input_output_num": RknnInputOutputNum, "rknn_tensor_attr": RknnTensorAttr,
    "rknn_perf_run": RknnPerfRun, "rknn_sdk_version": RknnSdkVersion, "rknn_mem_size": RknnMemSize,
    "rknn_tensor_mem": RknnTensorMem, "rknn_input": RknnInput, "rknn_output": RknnOutput,
}

_MEM_P = POINTER(RknnTensorMem)
_PROTOTYPES = {  # name: (restype, argtypes); rknn_init takes a path (size 0), never a model buffer here
    "rknn_init": (c_int, [POINTER(rknn_context), c_char_p, c_uint32, c_uint32, c_void_p]),
    "rknn_dup_context": (c_int, [POINTER(rknn_context), POINTER(rknn_context)]),
    "rknn_destroy": (c_int, [rknn_context]),
    "rknn_query": (c_int, [rknn_context, c_int, c_void_p, c_uint32]),
    "rknn_set_core_mask": (c_int, [rknn_context, c_int]),
    "rknn_inputs_set": (c_int, [rknn_context, c_uint32, POINTER(RknnInput)]),
    "rknn_run": (c_int, [rknn_context, c_void_p]),
    "rknn_outputs_get": (c_int, [rknn_context, c_uint32, POINTER(RknnOutput), c_void_p]),
    "rknn_outputs_release": (c_int, [rknn_context, c_uint32, POINTER(RknnOutput)]),
    "rknn_create_mem": (_MEM_P, [rknn_context, c_uint32]),
    "rknn_create_mem_from_fd": (_MEM_P, [rknn_context, c_int32, c_void_p, c_uint32, c_int32]),
    "rknn_set_io_mem": (c_int, [rknn_context, _MEM_P, POINTER(RknnTensorAttr)]),
    "rknn_mem_sync": (c_int, [rknn_context, _MEM_P, c_int]),
    "rknn_destroy_mem": (c_int, [rknn_context, _MEM_P]),
}


# -- errors -------------------------------------------------------------------------------------------------

class RknnLibraryError(Exception):
    """librknnrt.so could not be loaded, or lacks a function the binding needs."""


class RknnCallError(Exception):
    """A librknnrt call failed. str() is one line: `label: call returned code (meaning)`."""

    def __init__(self, label: str, call: str, code: int | None):
        self.label, self.call, self.code = label, call, code
        if code is None:
            self.meaning = "no memory returned; the runtime's log says why"
        else:
            self.meaning = ERRORS.get(code, "unknown error code")
        what = "NULL" if code is None else str(code)
        super().__init__(" ".join(f"{label}: {call} returned {what} ({self.meaning})".split()))

    def __reduce__(self):  # picklable, e.g. across a process pool
        return type(self), (self.label, self.call, self.code)


def load_library(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Load librknnrt: `path`, else $LIBRKNNRT_PATH, else /usr/lib/librknnrt.so (rknn-toolkit-lite2's order).

    CDLL, not PyDLL: each call releases the GIL while the NPU runs.
    """
    if path is not None:
        where, source = os.fspath(path), "given path"
    elif os.environ.get("LIBRKNNRT_PATH"):
        where, source = os.environ["LIBRKNNRT_PATH"], "LIBRKNNRT_PATH"
    else:
        where, source = DEFAULT_PATH, "default path"
    try:
        lib = ctypes.CDLL(where)
    except OSError as e:
        raise RknnLibraryError(
            f"cannot load librknnrt from {where} ({source}): {e}. On the RK3588 board install Rockchip's "
            f"runtime library (librknnrt.so, RKNN SDK 2.x, in /usr/lib), or set LIBRKNNRT_PATH to its path."
        ) from None
    for name, (restype, argtypes) in _PROTOTYPES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise RknnLibraryError(f"{where} has no function {name}: it is not an RKNN SDK 2.x librknnrt; "
                                   f"install a newer runtime (or point LIBRKNNRT_PATH at one)") from None
        fn.restype, fn.argtypes = restype, argtypes
    return lib


# -- tensor attributes --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorAttr:
    """One queried rknn_tensor_attr as Python values; `raw` is a copy of the struct itself."""

    index: int
    name: str
    dims: tuple[int, ...]
    n_elems: int
    size: int
    size_with_stride: int
    w_stride: int
    h_stride: int
    type: int
    fmt: int
    qnt_type: int
    zp: int
    scale: float
    pass_through: int
    raw: RknnTensorAttr = field(repr=False, compare=False)

    @classmethod
    def from_struct(cls, a: RknnTensorAttr) -> TensorAttr:
        raw = RknnTensorAttr.from_buffer_copy(a)
        return cls(index=a.index, name=a.name.decode(errors="replace"), dims=tuple(a.dims[:a.n_dims]),
                   n_elems=a.n_elems, size=a.size, size_with_stride=a.size_with_stride, w_stride=a.w_stride,
                   h_stride=a.h_stride, type=a.type, fmt=a.fmt, qnt_type=a.qnt_type, zp=a.zp, scale=a.scale,
                   pass_through=a.pass_through, raw=raw)

    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(self.type)

    def to_struct(self, pass_through: bool, type: int | None = None, fmt: int | None = None) -> RknnTensorAttr:
        """A copy of the queried struct for rknn_set_io_mem, with pass_through (and type, fmt) set.

        Start from the queried attr: an input and an output can share an index, so the runtime needs the
        rest of it (the name) to know which tensor is meant.
        """
        a = RknnTensorAttr.from_buffer_copy(self.raw)
        a.pass_through = 1 if pass_through else 0
        if type is not None:
            a.type = type
        if fmt is not None:
            a.fmt = fmt
        return a


# -- memory -------------------------------------------------------------------------------------------------

class Mem:
    """One rknn_tensor_mem*. `addr` is where the CPU reads and writes its first byte."""

    def __init__(self, ptr, addr: int, size: int):
        self.ptr = ptr
        self.addr = addr
        self.size = size

    @property
    def fd(self) -> int:
        return self.ptr.contents.fd

    @property
    def offset(self) -> int:
        return self.ptr.contents.offset

    def array(self, dtype, shape, offset_bytes: int = 0) -> np.ndarray:
        """A numpy view over the buffer (no copy). It dangles once the mem is destroyed."""
        if self.ptr is None:
            raise ValueError("this rknn_tensor_mem was destroyed")
        dtype = np.dtype(dtype)
        shape = tuple(shape) if np.iterable(shape) else (int(shape),)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset_bytes < 0 or offset_bytes + nbytes > self.size:
            raise ValueError(f"{shape} {dtype} at byte {offset_bytes} exceeds the {self.size}-byte mem")
        buf = (c_char * nbytes).from_address(self.addr + offset_bytes)
        return np.frombuffer(buf, dtype=dtype).reshape(shape)


# -- contexts -----------------------------------------------------------------------------------------------

class Context:
    """One rknn_context. Every failing call raises RknnCallError naming `label`.

    A context is not thread-safe: use one per thread (dup() shares the model between them).
    """

    def __init__(self, lib: ctypes.CDLL, handle: int, label: str):
        self.lib, self.handle, self.label = lib, handle, label
        self._attrs: dict[int, list[TensorAttr]] = {}

    def _check(self, call: str, code: int) -> None:
        if code < 0:
            raise RknnCallError(self.label, call, code)

    @classmethod
    def open(cls, lib: ctypes.CDLL, path: str | os.PathLike, label: str, flags: int = 0) -> Context:
        """rknn_init from a .rknn file (size 0 means `model` is a path)."""
        handle = rknn_context(0)
        code = lib.rknn_init(byref(handle), os.fsencode(path), 0, flags, None)
        if code < 0:
            raise RknnCallError(label, "rknn_init", code)
        return cls(lib, handle.value, label)

    def dup(self, label: str | None = None) -> Context:
        """A second context on the same model (rknn_dup_context): weights loaded once."""
        src, out = rknn_context(self.handle), rknn_context(0)
        self._check("rknn_dup_context", self.lib.rknn_dup_context(byref(src), byref(out)))
        return Context(self.lib, out.value, label or self.label)

    def destroy(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            self._check("rknn_destroy", self.lib.rknn_destroy(handle))

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    # queries
    def _query(self, cmd: int, info: ctypes.Structure) -> None:
        self._check("rknn_query", self.lib.rknn_query(self.handle, cmd, byref(info), ctypes.sizeof(info)))

    def io_num(self) -> tuple[int, int]:
        n = RknnInputOutputNum()
        self._query(RKNN_QUERY_IN_OUT_NUM, n)
        return n.n_input, n.n_output

    def _attrs_of(self, cmd: int, count: int) -> list[TensorAttr]:
        if cmd not in self._attrs:  # a model's attrs never change
            out = []
            for i in range(count):
                a = RknnTensorAttr(index=i)
                self._query(cmd, a)
                out.append(TensorAttr.from_struct(a))
            self._attrs[cmd] = out
        return self._attrs[cmd]

    def input_attrs(self, native: bool = False) -> list[TensorAttr]:
        cmd = RKNN_QUERY_NATIVE_INPUT_ATTR if native else RKNN_QUERY_INPUT_ATTR
        return self._attrs_of(cmd, self.io_num()[0])

    def output_attrs(self, native: bool = False) -> list[TensorAttr]:
        cmd = RKNN_QUERY_NATIVE_OUTPUT_ATTR if native else RKNN_QUERY_OUTPUT_ATTR
        return self._attrs_of(cmd, self.io_num()[1])

    def perf_run_us(self) -> int:
        """The last run's duration as the runtime measured it (NPU time, without the call overhead)."""
        p = RknnPerfRun()
        self._query(RKNN_QUERY_PERF_RUN, p)
        return p.run_duration

    def sdk_version(self) -> tuple[str, str]:
        v = RknnSdkVersion()
        self._query(RKNN_QUERY_SDK_VERSION, v)
        return v.api_version.decode(errors="replace"), v.drv_version.decode(errors="replace")

    def set_core_mask(self, mask: int) -> None:
        self._check("rknn_set_core_mask", self.lib.rknn_set_core_mask(self.handle, mask))

    # zero-copy memory
    def create_mem(self, size: int) -> Mem:
        ptr = self.lib.rknn_create_mem(self.handle, size)
        if not ptr:
            raise RknnCallError(self.label, "rknn_create_mem", None)
        return Mem(ptr, ptr.contents.virt_addr, ptr.contents.size)

    def create_mem_from_fd(self, other: Mem, offset: int = 0, size: int | None = None) -> Mem:
        """A mem of this context over `other`'s buffer from byte `offset`: the two alias, nothing is copied.

        The runtime gets the buffer's base address and the offset apart: its header says virt_addr is
        given without the offset. Our Mem's address is other's plus offset, whatever the runtime stores.
        """
        size = other.size - offset if size is None else size
        if offset < 0 or size <= 0 or offset + size > other.size:
            raise ValueError(f"offset {offset} + size {size} exceeds the {other.size}-byte mem")
        base = other.addr - other.offset
        ptr = self.lib.rknn_create_mem_from_fd(self.handle, other.fd, base, size, other.offset + offset)
        if not ptr:
            raise RknnCallError(self.label, "rknn_create_mem_from_fd", None)
        return Mem(ptr, other.addr + offset, size)

    def set_io_mem(self, mem: Mem, attr: RknnTensorAttr | TensorAttr) -> None:
        """Bind `mem` to the input or output `attr` describes (see TensorAttr.to_struct)."""
        raw = attr.raw if isinstance(attr, TensorAttr) else attr
        self._check("rknn_set_io_mem", self.lib.rknn_set_io_mem(self.handle, mem.ptr, byref(raw)))

    def mem_sync(self, mem: Mem, mode: int) -> None:
        self._check("rknn_mem_sync", self.lib.rknn_mem_sync(self.handle, mem.ptr, mode))

    def destroy_mem(self, mem: Mem) -> None:
        if mem.ptr is not None:
            ptr, mem.ptr = mem.ptr, None
            self._check("rknn_destroy_mem", self.lib.rknn_destroy_mem(self.handle, ptr))

    # running
    def run(self) -> None:
        self._check("rknn_run", self.lib.rknn_run(self.handle, None))

    def inputs_set(self, items) -> None:
        """The copying path: items are (index, ndarray, pass_through, type, fmt); the runtime copies them.

        Without pass-through the array's dtype must be `type`'s: the runtime reads the bytes as that type.
        """
        arrays = [np.ascontiguousarray(a) for _, a, *_ in items]
        for (index, _, pass_through, type_, _), a in zip(items, arrays):
            if not pass_through and type_ in NUMPY_DTYPES and a.dtype != NUMPY_DTYPES[type_]:
                raise ValueError(f"{self.label}: input {index} is {a.dtype}, not the {NUMPY_DTYPES[type_]} "
                                 f"its rknn type {type_} says")
        inputs = (RknnInput * len(arrays))()
        for inp, (index, _, pass_through, type_, fmt), a in zip(inputs, items, arrays):
            inp.index, inp.buf, inp.size = index, a.ctypes.data, a.nbytes
            inp.pass_through, inp.type, inp.fmt = 1 if pass_through else 0, type_, fmt
        self._check("rknn_inputs_set", self.lib.rknn_inputs_set(self.handle, len(arrays), inputs))

    def outputs_get(self, n: int, want_float: bool = False) -> list[np.ndarray]:
        """The copying path: outputs 0..n-1 copied into new arrays (float32 if want_float), then released."""
        attrs = self.output_attrs()[:n]
        outputs = (RknnOutput * n)()
        for i, o in enumerate(outputs):
            o.index, o.want_float, o.is_prealloc = i, 1 if want_float else 0, 0
        self._check("rknn_outputs_get", self.lib.rknn_outputs_get(self.handle, n, outputs, None))
        try:
            result = []
            for o, a in zip(outputs, attrs):
                dtype = np.dtype(np.float32) if want_float else a.dtype
                arr = np.empty(o.size // dtype.itemsize, dtype)
                ctypes.memmove(arr.ctypes.data, o.buf, arr.nbytes)
                result.append(arr.reshape(a.dims) if arr.size == a.n_elems else arr)
            return result
        finally:
            self._check("rknn_outputs_release", self.lib.rknn_outputs_release(self.handle, n, outputs))
