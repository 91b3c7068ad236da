"""The build step: NPU segments -> .rknn, each compile isolated, cached and verified (segment and whole model).

driver.py   build_manifest: what to compile, warnings, the whole-model check
jobs.py     compiles in child processes, bisection, manifest updates per segment
inputs.py   activations to verify on, calibration tokens and datasets; the Runtime the caller hands in

What the build needs of the runtime (segment-input traces, the whole-model check, tokenizers) comes from
rwkv2rknn/verify: build/ never imports the runtime; its caller passes `runtime=rwkv2rknn.verify.RUNTIME`.
"""

from rwkv2rknn.build.driver import (
    RKNN_TARGETS,
    BuildReport,
    build_manifest,
    check_toolkit,
)
from rwkv2rknn.build.inputs import Runtime
from rwkv2rknn.build.jobs import SegmentResult, bisect_segment, build_key
from rwkv2rknn.options import DEFAULT_TIMEOUT, BuildOptions

__all__ = ["DEFAULT_TIMEOUT", "RKNN_TARGETS", "BuildOptions", "BuildReport", "SegmentResult", "Runtime", "bisect_segment",
           "build_key", "build_manifest", "check_toolkit"]
