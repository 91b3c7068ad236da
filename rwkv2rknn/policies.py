"""The partition policies, in one registry: the CLI's choices, the benchmarks and the docs read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    name: str
    help: str
    segmenter: str | None  # passes.partition strategy; None: the driver composes other policies (auto)
    npu_all: bool = False  # True: the fp32 precision rule is off (the NPU takes the recurrence)
    groups_layers: bool = False  # True: consecutive layer graphs merge into one graph first (deep)
    nsplit: bool = True  # False: NPU segments are never split over the three cores (a baseline stays as it was)
    combine: bool = True  # stack parallel elementwise branches before placement (passes/combine.py)


_REGISTRY: dict[str, Policy] = {}


def register(policy: Policy) -> Policy:
    if policy.name in _REGISTRY:
        raise ValueError(f"policy {policy.name!r} is registered twice")
    _REGISTRY[policy.name] = policy
    return policy


def get(name: str) -> Policy:
    return _REGISTRY[name]


def names() -> list[str]:
    return list(_REGISTRY)


def concrete() -> list[Policy]:
    """Policies that produce a plan by themselves."""
    return [p for p in _REGISTRY.values() if p.segmenter is not None]


def help_text() -> str:
    return "; ".join(f"{p.name}: {p.help}" for p in _REGISTRY.values())


register(Policy("fused", "maximal NPU regions around the MatMuls, the recurrence fp32 on the CPU (default)", "fused"))
register(Policy("matmul", "each MatMul its own NPU call (the 2023 attempt, kept as a baseline)", "matmul",
                nsplit=False))
register(Policy("layer", "each whole graph one NPU model; the compiler places ops itself", "layer", npu_all=True))
register(Policy("cpu", "no NPU at all (the baseline every plan must beat)", "cpu", combine=False))
register(Policy("deep", "legalized layers, several per NPU call (--layers-per-call); the state update fp32 on the "
                "CPU between calls (--state-update)", "deep", npu_all=True, groups_layers=True,
                # stacked mixes in a legalized multi-layer model: the compiler put two Transposes of their Adds on
                # its CPU (RWKV-4, 2 x 128 per call; not reproduced in isolation), so deep keeps the branches
                combine=False))
register(Policy("auto", "per graph, the plan with the lowest predicted time on the --board among cpu, matmul, "
                "fused and layer; for a whole model, that plan or deep's, whichever predicts faster", None))
