"""Segment runners: one interface over onnxruntime, the board's RKNNLite and (rknn_c.py) librknnrt's C API.

A runner holds one compiled segment. `bind(inputs, outputs)` takes the arrays of the program's buffers
(allocated once by the interpreter, in the dtypes and shapes the segment declares) and returns a call with no
arguments that runs the segment from those inputs into those outputs: nothing is allocated or looked up per
token. `infer_list` (allocating; for checks and calibration) runs it on arrays it is given.

Backends are found by name in BACKENDS ("module:Class"), imported only when chosen: the simulator's runner
lives with the compiler (rwkv2rknn/simulate.py) and is never imported on a board.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from rwkv2rknn.errors import UserError

# Core masks (RKNNLite.NPU_CORE_*, rknn_core_mask), by the names --core-mask accepts.
CORE_MASKS = {"auto": 0, "0": 1, "1": 2, "2": 4, "0_1": 3, "0_1_2": 7, "all": 7}


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_SESSION_OPTIONS: dict = {}
_SO_LOCK = threading.Lock()


def session_options(threads: int | None = None, level: str = "all"):
    """One SessionOptions shared by every session of the process.

    A program holds dozens of sessions called one after another; by default each owns a thread pool whose idle
    threads spin, and on a small CPU those pools steal each other's cores (10x slower). Spinning off, intra-op
    threads = cores, inter-op 1: each session's pool sleeps while the others work.
    """
    import onnxruntime as ort

    threads = threads or cpu_count()
    key = (threads, level)
    with _SO_LOCK:
        so = _SESSION_OPTIONS.get(key)
        if so is None:
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
            so.graph_optimization_level = {
                "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                # onnxruntime refuses fp16-mixing graphs at the higher levels (llama-onnx-rwkv4.md)
                "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            }[level]
            so.log_severity_level = 3
            _SESSION_OPTIONS[key] = so
        return so


class Runner:
    """Polygraphy-style: lazily loaded on activate(), usable as a context manager."""

    name = "runner"
    copies_io = False   # True: every call copies its inputs in and outputs out (RKNNLite's Python path)

    def __init__(self):
        self.is_active = False
        self.input_names: list[str] = []
        self.output_names: list[str] = []

    def activate(self) -> Runner:
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def bind(self, inputs: list[np.ndarray], outputs: list[np.ndarray]):
        """A call that runs the segment from `inputs` into `outputs` (arrays in the segment's dtypes/shapes)."""
        def call():
            for o, v in zip(outputs, self.infer_list(inputs)):
                np.copyto(o, np.asarray(v).reshape(o.shape), casting="unsafe")
        return call

    def infer(self, feed: dict) -> dict:
        """feed: {input name: array} -> {output name: array}."""
        return dict(zip(self.output_names, self.infer_list([feed[n] for n in self.input_names])))

    def infer_list(self, arrays: list) -> list:
        raise NotImplementedError

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()

    def _activate(self):
        raise NotImplementedError

    def _deactivate(self):
        pass


class OrtRunner(Runner):
    """One ONNX model (a path or ModelProto bytes) on onnxruntime's CPUExecutionProvider.

    `bind` uses an IOBinding over the program's buffers: onnxruntime reads the inputs in place and writes the
    outputs straight into them (no per-call copy or allocation of the boundary tensors).
    """

    name = "ort"

    def __init__(self, model, input_names: list[str] | None = None, output_names: list[str] | None = None,
                 threads: int | None = None, level: str = "all", label: str | None = None):
        super().__init__()
        self.label = label
        self.model = model
        self.threads = threads
        self.level = level
        self._want_in, self._want_out = input_names, output_names
        self.session = None

    def _activate(self):
        import onnxruntime as ort

        model = self.model
        if not isinstance(model, (bytes, str)):
            model = str(model) if isinstance(model, os.PathLike) else model.SerializeToString()
        try:
            self.session = ort.InferenceSession(model, sess_options=session_options(self.threads, self.level),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            where = self.label or (self.model if isinstance(self.model, (str, os.PathLike)) else "model")
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{where}: onnxruntime cannot load it ({first}); split again") from None
        self.input_names = self._want_in or [i.name for i in self.session.get_inputs()]
        self.output_names = self._want_out or [o.name for o in self.session.get_outputs()]

    def bind(self, inputs, outputs):
        io = self.session.io_binding()
        for name, a in zip(self.input_names, inputs):
            io.bind_input(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        for name, a in zip(self.output_names, outputs):
            io.bind_output(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        run = self.session.run_with_iobinding
        return lambda: run(io)

    def infer_list(self, arrays: list) -> list:
        return self.session.run(self.output_names, dict(zip(self.input_names, arrays)))

    def _deactivate(self):
        self.session = None


def rknnlite_available() -> bool:
    try:
        import rknnlite.api  # noqa: F401
    except Exception:
        return False
    return True


class RknnLiteRunner(Runner):
    """A .rknn segment on the RK3588 NPU through rknn-toolkit-lite2's Python API (aarch64 board only).

    Inputs go in their own dtype (`data_type`) and, where the model's input is already that dtype, unconverted
    (`inputs_pass_through`); outputs come back in reused staging buffers (`reuse_outputs`) and are copied into
    the program's buffers. What RKNNLite 2.5.0 does underneath (read from its aarch64 wheel): librknnrt through
    ctypes.CDLL, so the NPU run releases the GIL and a CPU step can overlap it; every input copied into its own
    buffer, every output asked for as float32 (want_float = 1) and copied out. So one copy in, one copy out
    and an fp16 -> fp32 -> fp16 round trip per output remain per call; the rk3588 board profile prices them
    (npu_io_copy_ns_per_byte, npu_output_fp32_ns_per_byte). Not runnable on a PC: tested against a stand-in
    rknnlite module.
    """

    name = "rknn-lite"
    copies_io = True

    def __init__(self, rknn_path, input_names: list[str], output_names: list[str], core_mask: int = 0,
                 input_dtypes: list[str] | None = None, label: str | None = None):
        super().__init__()
        self.rknn_path = str(rknn_path)
        self.label = label or self.rknn_path
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.input_dtypes = list(input_dtypes or ["float32"] * len(self.input_names))
        self.core_mask = core_mask
        self._formats = ["nchw"] * len(self.input_names)
        self.rknn = None

    def _activate(self):
        try:
            from rknnlite.api import RKNNLite
        except ImportError:
            raise UserError("rknn-toolkit-lite2 is not installed (it exists only for the aarch64 board); "
                            "use --backend ort or rknn-sim here") from None
        rknn = RKNNLite(verbose=False)
        if rknn.load_rknn(self.rknn_path) != 0:
            rknn.release()
            raise UserError(f"{self.rknn_path}: RKNNLite.load_rknn failed; build again for this board's target")
        if rknn.init_runtime(core_mask=self.core_mask) != 0:
            rknn.release()
            raise UserError(f"{self.rknn_path}: RKNNLite.init_runtime(core_mask={self.core_mask}) failed; "
                            "check the NPU driver (dmesg) and the --core-mask")
        self.rknn = rknn
        floats = {d for d in self.input_dtypes if d in ("float16", "float32")}
        # one data_type for the call: the inputs' own float dtype when they agree (fp16 buffers pass through)
        self._data_type = floats.pop() if len(floats) == 1 else None
        self._pass = [1 if d == "float16" and self._data_type == "float16" else 0 for d in self.input_dtypes]
        self._kw = {"data_format": self._formats}
        if self._data_type is not None:
            self._kw["data_type"] = self._data_type
            self._kw["inputs_pass_through"] = self._pass
        self._kw["reuse_outputs"] = True

    def _call(self, arrays):
        try:
            outs = self.rknn.inference(inputs=list(arrays), **self._kw)
        except TypeError:  # an rknn-toolkit-lite2 older than 2.x: no data_type / pass-through / reuse_outputs
            self._kw = {"data_format": self._formats}
            outs = self.rknn.inference(inputs=list(arrays), **self._kw)
        if outs is None:
            raise UserError(f"{self.rknn_path}: RKNNLite.inference returned None (NPU runtime failure); "
                            "check the NPU driver (dmesg), or run with --backend ort")
        return outs

    def bind(self, inputs, outputs):
        def call():
            for o, v in zip(outputs, self._call(inputs)):
                np.copyto(o, np.asarray(v).reshape(o.shape), casting="unsafe")
        return call

    def infer_list(self, arrays: list) -> list:
        return [np.array(o) for o in self._call(arrays)]

    def _deactivate(self):
        if self.rknn is not None:
            self.rknn.release()
            self.rknn = None


__all__ = ["CORE_MASKS", "OrtRunner", "RknnLiteRunner", "Runner", "cpu_count", "rknnlite_available",
           "session_options"]
