"""The simulator backend (`--backend rknn-sim`, PC only): NPU segments in rknn-toolkit2's x86 simulator.

The simulator cannot load a .rknn file (shared facts: only a model built in the same RKNN object runs), so each
NPU segment is rebuilt in-process from its ONNX (seconds per segment). This runner needs the compiler's
toolkit: it lives beside the compiler, and the runtime imports it only when this backend is chosen.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from rwkv2rknn.errors import UserError
from rwkv2rknn.run.runners import Runner


def quiet_fds():
    """The toolkit logs build steps and first-inference banners on fds 1 and 2: hide them."""
    from rwkv2rknn.compile_worker import quiet_fds as hide

    return hide(True, (1, 2))


# Built simulator objects, per process: building is slow, and a chain or a test may ask twice.
_SIM_CACHE: dict = {}


class RknnSimRunner(Runner):
    """An NPU segment compiled in-process from its ONNX and run in the simulator; built objects are cached."""

    name = "rknn-sim"

    def __init__(self, onnx_path, input_names: list[str], output_names: list[str], target: str = "rk3588",
                 precision: str = "fp16", calib: str | None = None, label: str | None = None, hybrid: bool = False):
        super().__init__()
        self.onnx_path = str(onnx_path)
        self.label = label or self.onnx_path
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.target, self.precision, self.calib, self.hybrid = target, precision, calib, hybrid
        self.rknn = None
        self.emulated_bytes = 0  # host-only: outputs converted into the program's dtypes (not a board cost)

    def _activate(self):
        from rwkv2rknn.compile_worker import compile_segment

        key = (os.path.realpath(self.onnx_path), self.target, self.precision, self.calib, self.hybrid)
        rknn = _SIM_CACHE.get(key)
        if rknn is None:
            if self.precision != "fp16" and self.calib is None:
                raise UserError(f"{self.onnx_path}: a {self.precision} segment without its calibration data; "
                                "run `rwkv2rknn build` again (it records the data), or use --backend ort")
            try:
                with quiet_fds(), tempfile.TemporaryDirectory(prefix="rwkv2rknn-calib-") as tmp:
                    dataset = _dataset_from(self.calib, self.input_names, tmp) if self.calib else None
                    if self.hybrid:  # the build's hybrid recipe again (its step files in the temporary dir)
                        import contextlib

                        from rwkv2rknn.compile_worker import compile_hybrid

                        with contextlib.chdir(tmp):
                            rknn, _ = compile_hybrid(self.onnx_path, self.target, dataset, for_simulator=True)
                    else:
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
        return [np.asarray(o) for o in outs]

    def bind(self, inputs, outputs):
        def call():
            for o, v in zip(outputs, self.infer_list(inputs)):
                if v.dtype != o.dtype:
                    self.emulated_bytes += v.size * 4
                np.copyto(o, np.asarray(v).reshape(o.shape), casting="unsafe")
        return call

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


__all__ = ["RknnSimRunner"]
