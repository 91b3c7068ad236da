"""The build step: NPU segments -> .rknn, each compile isolated, cached and verified (segment and whole model).

driver.py   build_manifest: what to compile, warnings, the whole-model check
jobs.py     compiles in child processes, bisection, manifest updates per segment
inputs.py   activations to verify on, calibration tokens and datasets
model_check.py  the whole-model check (a child process: the simulator is native code)
"""

from rwkv2rknn.build.driver import (
    RKNN_TARGETS,
    BuildReport,
    build_manifest,
    check_toolkit,
)
from rwkv2rknn.build.jobs import SegmentResult, bisect_segment, build_key
from rwkv2rknn.options import DEFAULT_TIMEOUT, BuildOptions

__all__ = ["DEFAULT_TIMEOUT", "RKNN_TARGETS", "BuildOptions", "BuildReport", "SegmentResult", "bisect_segment", "build_key",
           "build_manifest", "check_toolkit"]
