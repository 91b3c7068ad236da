"""The only code that calls the RKNN compiler: load one segment ONNX, build it, export or simulate it.

`build` runs it in a child process (see rwkv2rknn/build.py) so a compiler crash cannot kill the
build; the rknn-sim runner calls `compile_segment` in-process because the simulator can only run
a model built in the same RKNN object.
"""

from __future__ import annotations

import contextlib
import os
import sys

PRECISIONS = ("fp16", "w8a8")


def toolkit_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("rknn-toolkit2")
    except Exception:
        return None


@contextlib.contextmanager
def _quiet(enabled: bool):
    """The toolkit prints a banner and per-step logs on stdout; keep them out of the user's way."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


class CompileError(RuntimeError):
    """The toolkit returned a failure code for one step."""


def compile_segment(onnx_path, target: str = "rk3588", precision: str = "fp16", dataset: str | None = None,
                    rknn_out: str | None = None, for_simulator: bool = False, verbose: bool = False,
                    quiet: bool = True):
    """Build one ONNX segment with rknn-toolkit2.

    Returns the live RKNN object when `for_simulator` (runtime initialised on the x86 simulator;
    the caller releases it), otherwise releases it and returns None. Raises CompileError on a
    failure return code.
    """
    from rknn.api import RKNN  # imported late: heavy, and absent on machines that only run models

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    with _quiet(quiet and not verbose):
        rknn = RKNN(verbose=verbose)
    ok = False
    try:
        with _quiet(quiet and not verbose):
            if rknn.config(target_platform=target) != 0:
                raise CompileError(f"config(target_platform={target!r}) failed")
            if rknn.load_onnx(model=str(onnx_path)) != 0:
                raise CompileError(f"load_onnx({onnx_path}) failed")
            quant = precision == "w8a8"
            if quant and not dataset:
                raise CompileError("w8a8 needs a calibration dataset")
            ret = rknn.build(do_quantization=quant, dataset=dataset if quant else None)
            if ret != 0:
                raise CompileError(f"build failed (return {ret})")
            if rknn_out is not None and rknn.export_rknn(str(rknn_out)) != 0:
                raise CompileError(f"export_rknn({rknn_out}) failed")
            if for_simulator and rknn.init_runtime() != 0:
                raise CompileError("init_runtime() on the simulator failed")
        ok = True
        return rknn if for_simulator else None
    finally:
        if not (ok and for_simulator):
            with _quiet(quiet and not verbose):
                rknn.release()
