"""Segment runners with one interface: activate() / infer(feed) -> dict / deactivate(), lazily loaded.

OrtRunner runs a segment ONNX on onnxruntime (CPU); RknnSimRunner runs an NPU segment in
rknn-toolkit2's x86 simulator (rebuilt from the ONNX: the simulator cannot load .rknn files);
RknnLiteRunner runs a .rknn on the board through rknn-toolkit-lite2.
"""

from __future__ import annotations

import os
import tempfile
import threading

import numpy as np

from rwkv2rknn.errors import UserError

# rknn-toolkit-lite2 core masks (RKNNLite.NPU_CORE_*), by the names --core-mask accepts.
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

    A chain holds dozens of sessions called one after another; by default each owns a thread pool
    whose idle threads spin, and on a small CPU those pools steal each other's cores (10x slower,
    shared/docs/performance-facts.md). Spinning off, intra-op threads = cores, inter-op 1: each
    session's pool sleeps while the others work.
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
    """Polygraphy-style runner: lazily loaded on activate(), usable as a context manager."""

    name = "runner"

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

    def infer(self, feed: dict) -> dict:
        """feed: {input name: array} -> {output name: array} (float32 for float outputs)."""
        return dict(zip(self.output_names, self.infer_list([feed[n] for n in self.input_names])))

    def infer_list(self, arrays: list) -> list:
        """Inputs in `input_names` order -> outputs in `output_names` order (the chain's fast path)."""
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
    """One ONNX model (a path or ModelProto bytes) on onnxruntime's CPUExecutionProvider."""

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
        self._run = self.session.run
        self._in = self.input_names

    def infer_list(self, arrays: list) -> list:
        return self._run(self.output_names, dict(zip(self._in, arrays)))

    def infer(self, feed: dict) -> dict:
        return dict(zip(self.output_names, self._run(self.output_names, {n: feed[n] for n in self._in})))

    def _deactivate(self):
        self.session = None


def quiet_fds():
    """The toolkit logs build steps and first-inference banners on fds 1 and 2: hide them."""
    from rwkv2rknn.compile_worker import quiet_fds as hide

    return hide(True, (1, 2))


# Built simulator objects, per process: building is slow, and a chain or a test may ask twice.
_SIM_CACHE: dict = {}


class RknnSimRunner(Runner):
    """An NPU segment in rknn-toolkit2's x86 simulator, compiled in-process from the segment ONNX.

    The simulator cannot load a .rknn file (shared/docs/rknn-toolkit2.md), so activation builds the
    segment (seconds per segment); built objects are cached per process and never released early.
    """

    name = "rknn-sim"

    def __init__(self, onnx_path, input_names: list[str], output_names: list[str], target: str = "rk3588",
                 precision: str = "fp16", calib: str | None = None):
        super().__init__()
        self.onnx_path = str(onnx_path)
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.target, self.precision, self.calib = target, precision, calib
        self.rknn = None

    def _activate(self):
        from rwkv2rknn.compile_worker import compile_segment

        key = (os.path.realpath(self.onnx_path), self.target, self.precision, self.calib)
        rknn = _SIM_CACHE.get(key)
        if rknn is None:
            if self.precision != "fp16" and self.calib is None:
                raise UserError(f"{self.onnx_path}: a {self.precision} segment without its calibration data; "
                                "run `rwkv2rknn build` again (it records the data), or use --backend ort")
            try:
                with quiet_fds(), tempfile.TemporaryDirectory(prefix="rwkv2rknn-calib-") as tmp:
                    dataset = _dataset_from(self.calib, self.input_names, tmp) if self.calib else None
                    rknn = compile_segment(self.onnx_path, target=self.target, precision=self.precision,
                                           dataset=dataset, for_simulator=True)
            except UserError:
                raise
            except Exception as exc:
                raise UserError(f"{self.onnx_path}: the RKNN simulator could not build it ({exc}); run "
                                "`rwkv2rknn build` to see why, or use --backend ort") from None
            _SIM_CACHE[key] = rknn
        self.rknn = rknn
        self._first = True
        # Non-4-D tensors: "nchw" asks the toolkit for no layout change.
        self._formats = ["nchw"] * len(self.input_names)

    def infer_list(self, arrays: list) -> list:
        if self._first:  # the first call prints preparation banners
            self._first = False
            with quiet_fds():
                return self.infer_list(arrays)
        outs = self.rknn.inference(inputs=list(arrays), data_format=self._formats)
        if outs is None:
            raise RuntimeError(f"{self.onnx_path}: simulator inference failed")
        return [o if o.dtype == np.float32 else o.astype(np.float32) for o in outs]

    def _deactivate(self):
        self.rknn = None  # the cached object stays alive for the process


def _dataset_from(calib_npz, order: list[str], directory) -> str:
    """The toolkit's dataset.txt from the calibration samples a build recorded beside the segment."""
    from rwkv2rknn.compile_worker import load_samples, write_dataset

    try:
        samples = load_samples(calib_npz)
    except (OSError, ValueError) as exc:
        raise UserError(f"{calib_npz}: cannot read the calibration data ({exc}); run `rwkv2rknn build` again") from None
    return str(write_dataset(directory, samples, order))


def rknnlite_available() -> bool:
    try:
        import rknnlite.api  # noqa: F401
    except Exception:
        return False
    return True


class RknnLiteRunner(Runner):
    """A .rknn segment on the RK3588 NPU through rknn-toolkit-lite2 (aarch64 board only).

    Not runnable on an x86 PC (rknnlite has no x86 wheel): it is kept thin and untested here.
    """

    name = "rknn-lite"

    def __init__(self, rknn_path, input_names: list[str], output_names: list[str], core_mask: int = 0):
        super().__init__()
        self.rknn_path = str(rknn_path)
        self.input_names, self.output_names = list(input_names), list(output_names)
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

    def infer_list(self, arrays: list) -> list:
        # nchw: the toolkit must not re-layout 1-D/2-D activations (the same call as the simulator's)
        outs = self.rknn.inference(inputs=list(arrays), data_format=self._formats)
        if outs is None:
            raise UserError(f"{self.rknn_path}: RKNNLite.inference returned None (NPU runtime failure); "
                            "check the NPU driver (dmesg), or run with --backend ort")
        return [o if o.dtype == np.float32 else o.astype(np.float32) for o in outs]

    def _deactivate(self):
        if self.rknn is not None:
            self.rknn.release()
            self.rknn = None
