"""Placement: a table-driven NPU support predicate per target plus the fp32 precision rule, with reasons."""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

import onnx_graphsurgeon as gs

from passes.graphutil import is_float, np_dtype, static_shape


class Placement(NamedTuple):
    backend: str  # "npu" | "cpu"
    reason: str


# Float ops the rknn-toolkit2 NPU compiler handles (fp16). Value: extra check name or None.
NPU_OPS = {
    "MatMul": "weight", "Gemm": "weight", "Conv": "weight",
    "Add": None, "Sub": None, "Mul": None, "Div": None, "Pow": None, "Sqrt": None, "Reciprocal": None,
    "Neg": None, "Abs": None, "Exp": None, "Log": None, "Max": None, "Min": None,
    "Relu": None, "Sigmoid": None, "Tanh": None, "LeakyRelu": None, "Clip": None, "Erf": None,
    "HardSigmoid": None, "HardSwish": None, "Softmax": None, "LayerNormalization": None, "Elu": None,
    "Softplus": None,
    "ReduceMean": None, "ReduceSum": None, "ReduceMax": None, "ReduceMin": None,
    "Reshape": "shape", "Flatten": None, "Squeeze": None, "Unsqueeze": None, "Transpose": None,
    "Concat": None, "Split": None, "Slice": None, "Identity": None,
}
# Ops the table keeps on the CPU on purpose, with why.
CPU_OPS = {
    "Gather": "index lookup with an integer index: cheap on the CPU",
    "Shape": "shape arithmetic stays on the CPU",
    "Cast": "type conversion stays on the CPU",
    "ConstantOfShape": "shape arithmetic stays on the CPU",
    "Range": "shape arithmetic stays on the CPU",
}
MAX_NPU_RANK = 4
# rknn-toolkit2 targets sharing one operator table (RKNPU2 generation).
# rknn-toolkit2 2.5.0's target platforms; one support table serves them all until one is measured to differ.
TARGETS = ("rk3588", "rk3576", "rk3566", "rk3568", "rk3562", "rv1103", "rv1106", "rv1103b", "rv1106b", "rk2118")
_TABLES = {t: (NPU_OPS, CPU_OPS) for t in TARGETS}

PRECISION_SEEDS = ("Exp", "Log", "Max")
_WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


class Seeds(NamedTuple):
    """Where the fp32 precision rule starts: nodes of the op types `ops`, and every node other than a weight op
    that reads one of the graph inputs `inputs` (a recurrent state whose update has none of those ops, e.g. a
    constant decay). The caller (a model's family) decides; the default is the op list alone."""

    ops: tuple = PRECISION_SEEDS
    inputs: tuple = ()


def _weight_check(node):
    if node.op == "Conv":
        w = node.inputs[1] if len(node.inputs) > 1 else None
        return None if isinstance(w, gs.Constant) else "weight is not constant"
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return "weight is not constant"
    if node.op == "Gemm" and len(node.inputs) > 2 and not isinstance(node.inputs[2], gs.Constant):
        return "bias is not constant"
    return None


def _constant_row_read(node) -> bool:
    """Gather of a float tensor at a constant index: a row read the RKNN compiler keeps on the NPU
    (measured in docs/legalization.md for the state rows of an RWKV layer)."""
    return (node.op == "Gather" and len(node.inputs) == 2 and isinstance(node.inputs[1], gs.Constant)
            and is_float(node.inputs[0]))


def _float_cast(node) -> bool:
    """Cast between float types: folded into the model's own fp16 computation (no CPU op; measured)."""
    return (node.op == "Cast" and len(node.inputs) == 1 and is_float(node.inputs[0])
            and all(is_float(t) for t in node.outputs))


def supported(node, target="rk3588", whole_models: bool = False) -> Placement:
    """The table's answer for one node, ignoring the precision rule.

    whole_models: the node is part of a whole-layer NPU model (the deep policy), where the compiler also
    keeps constant-index row reads (Gather) and float-to-float Casts on the NPU.
    """
    if target not in _TABLES:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    npu_ops, cpu_ops = _TABLES[target]
    op = node.op
    if whole_models and _constant_row_read(node):
        return Placement("npu", f"{op}: a constant-index row read, kept on the {target} NPU")
    if whole_models and _float_cast(node):
        return Placement("npu", f"{op}: a float-to-float cast, folded into the {target} NPU model")
    if op in cpu_ops:
        return Placement("cpu", f"{op}: {cpu_ops[op]}")
    if op not in npu_ops or node.domain not in ("", "ai.onnx", None):
        return Placement("cpu", f"{op}: not in the {target} NPU op table")
    check = npu_ops[op]
    if check == "weight":
        why = _weight_check(node)
        if why:
            return Placement("cpu", f"{op}: {why}")
    if check == "shape" and len(node.inputs) > 1 and not isinstance(node.inputs[1], gs.Constant):
        return Placement("cpu", f"{op}: shape is not constant")
    for t in list(node.inputs) + list(node.outputs):
        if isinstance(t, gs.Constant) or not t.name:
            continue
        if not is_float(t):
            return Placement("cpu", f"{op}: tensor {t.name} is {np_dtype(t.dtype) or 'untyped'}, NPU takes float only")
        shape = static_shape(t)
        if shape is None:
            return Placement("cpu", f"{op}: tensor {t.name} has no static shape")
        if len(shape) > MAX_NPU_RANK:
            return Placement("cpu", f"{op}: tensor {t.name} has rank {len(shape)} > {MAX_NPU_RANK}")
    return Placement("npu", f"{op}: supported on {target} NPU")


def precision_pinned(graph, seeds: Seeds = Seeds()) -> dict:
    """Nodes the fp32 precision rule keeps on the CPU -> reason (seeds, forward and backward closure)."""
    consumers = {}
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Variable):
                consumers.setdefault(t.name, []).append(node)
    pinned = {}
    queue = deque()
    state_inputs = set(seeds.inputs)
    for node in graph.nodes:
        if node.op in seeds.ops:
            pinned[node.name] = f"{node.op}: kept fp32 on CPU (precision rule)"
            queue.append(node)
        elif node.op not in _WEIGHT_OPS and any(t.name in state_inputs for t in node.inputs):
            read = next(t.name for t in node.inputs if t.name in state_inputs)
            pinned[node.name] = f"{node.op}: updates the recurrent state {read}: kept fp32 on CPU (precision rule)"
            queue.append(node)
    while queue:  # forward: everything downstream up to the next weight op
        node = queue.popleft()
        for out in node.outputs:
            for user in consumers.get(out.name, ()):
                if user.name not in pinned and user.op not in _WEIGHT_OPS:
                    pinned[user.name] = f"{user.op}: consumes fp32 recurrence result {out.name} (precision rule)"
                    queue.append(user)

    def all_users_pinned(node):
        users = [u for out in node.outputs for u in consumers.get(out.name, ())]
        return bool(users) and all(u.name in pinned for u in users)

    producers = {t.name: node for node in graph.nodes for t in node.outputs}
    queue = deque(n for n in graph.nodes if n.name in pinned)
    while queue:  # backward: a producer feeding only pinned nodes joins them
        node = queue.popleft()
        for t in node.inputs:
            prod = producers.get(t.name) if isinstance(t, gs.Variable) else None
            if prod is None or prod.name in pinned or prod.op in _WEIGHT_OPS:
                continue
            if all_users_pinned(prod):
                pinned[prod.name] = f"{prod.op}: feeds only the fp32 recurrence (precision rule)"
                queue.append(prod)
    return pinned


def place(graph: gs.Graph, target: str = "rk3588", npu_all: bool = False, whole_models: bool = False,
          seeds: Seeds = Seeds()) -> dict:
    """node name -> Placement for every node; npu_all=True switches the precision rule off, `seeds` say where it
    starts (the model family's; default: the op list PRECISION_SEEDS).

    whole_models: row reads (Gather at a constant index) and float Casts go to the NPU (the deep policy).
    """
    pinned = {} if npu_all else precision_pinned(graph, seeds)
    result = {}
    for node in graph.nodes:
        p = supported(node, target, whole_models)
        if p.backend == "npu" and node.name in pinned:
            p = Placement("cpu", pinned[node.name])
        result[node.name] = p
    return result
