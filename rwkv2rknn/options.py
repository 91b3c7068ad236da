"""The options of `split` and `build`, each one typed object built once from the command line (or by a caller).

The drivers take them whole (`split_model(paths, out, SplitOptions(...))`, `build_manifest(out,
BuildOptions(...))`) and hand them on as they are: no function threads a dozen loose parameters. Both are frozen;
`dataclasses.replace` makes a variant (auto's candidate previews, the build's probe models).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rwkv2rknn.cost.profile import DEFAULT_PROFILE

DEFAULT_TIMEOUT = 600.0  # seconds one compile may take before it counts as hung


@dataclass(frozen=True)
class SplitOptions:
    """How `split` cuts source graphs (the CLI's flags of `rwkv2rknn split`).

    policy: a name of rwkv2rknn.policies. board: the profile plans are priced on (auto chooses by it).
    layers_per_call (deep): layers per merged graph (default: as many as the size budget allows).
    state_update (deep): "cpu" keeps the recurrent-state update fp32 on the CPU, "npu" in the NPU model.
    prefill_chunk: prompt tokens per call in a prefill plan beside the decode plan (whole models; None: the
    policy's default, 16 or none; 0: none). npu_io: "float16" NPU segments read and write fp16 buffers and CPU
    segments convert inside their own graphs (passes/boundary.py); "float32" keeps every boundary fp32.
    nsplit: where predicted faster, a single-row NPU segment becomes three pieces, one per NPU core.
    shapes: --shape NAME=D0,D1,... fixes of dynamic input dimensions. preview: write nothing.
    verify_tokens: k > 0 adds a verify plan (rwkv2rknn/verify_plan.py; whole models): k drafted tokens checked in
    one call of k + 1 rows, logits and state after every row (speculative decoding); 0: none.
    """

    policy: str = "fused"
    target: str = "rk3588"
    npu_all: bool = False
    shapes: dict = field(default_factory=dict)
    force: bool = False
    preview: bool = False
    progress: bool = True
    board: str = DEFAULT_PROFILE
    layers_per_call: int | None = None
    state_update: str = "cpu"
    prefill_chunk: int | None = None
    npu_io: str = "float16"
    nsplit: bool = True
    verify_tokens: int = 0


@dataclass(frozen=True)
class BuildOptions:
    """How `build` compiles and verifies (the CLI's flags of `rwkv2rknn build`).

    precision: "fp16" or "w8a8". calib: a text file or a file of token ids (w8a8 calibration and the whole-model
    check). jobs: compiles in parallel (None: the CPU count). verify: each built segment in the simulator;
    verify_model: then the whole model. max_rel_l2 (w8a8): a segment losing more is built fp16 (None: the w8a8
    warning bound). keep_fp16 (w8a8): fnmatch patterns of segment ids built fp16. probes: for a whole model, also
    build the board-calibration probe models. timeout: seconds one compile may take.
    """

    target: str = "rk3588"
    precision: str = "fp16"
    calib: str | None = None
    jobs: int | None = None
    verify: bool = True
    timeout: float = DEFAULT_TIMEOUT
    progress: bool = True
    verify_model: bool = True
    max_rel_l2: float | None = None
    probes: bool = True
    keep_fp16: tuple[str, ...] = ()
