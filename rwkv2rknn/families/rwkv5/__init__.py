"""RWKV-5.2 ("x052", Eagle): checkpoint reading (checkpoint.py), a numpy RNN reference (reference.py), per-layer
ONNX graphs (graph.py); `FAMILY` is what the rest of rwkv2rknn asks about the version. RWKV-6 builds on the
public pieces of these modules."""

from __future__ import annotations

from rwkv2rknn.families.base import Family, Precision, StateSpec, StateTuning
from rwkv2rknn.families.graph import build_embed, build_head
from rwkv2rknn.families.rwkv5.checkpoint import (
    HEAD_SIZE,
    TABLE,
    VECTOR_KEYS,
    Weights5,
    detect,
    from_tensors5,
    load_pth5,
    random_weights5,
    save_pth5,
    weights_from_state_dict,
)
from rwkv2rknn.families.rwkv5.graph import build_mixing5, export_model5
from rwkv2rknn.families.rwkv5.reference import GN_EPS, LN_EPS, RefModel5

LAYER_INPUTS = {"input": 1, "state_in": 2, "wkv_in": 3}
LAYER_OUTPUTS = {"output": 1, "state_out": 2, "wkv_out": 3}
STATES = (StateSpec("state_in", "state_out"), StateSpec("wkv_in", "wkv_out"))
# the fixed decay has no Exp in the graph: the rule starts at the state's readers (its update), as RWKV-6's
PRECISION = Precision(ops=("Exp", "Log", "Max"), state_inputs=("wkv_in",))


# a state-tuning file's time_state is [H, value, key] (the package transposes it into its [key, value] state):
# wkv_in's layout already
STATE_TUNING = StateTuning("wkv_in", (0, 1, 2))

FAMILY = Family(
    name="rwkv5", label="RWKV-5",
    layer0_inputs=LAYER_INPUTS, layer0_outputs=LAYER_OUTPUTS, layer_inputs=LAYER_INPUTS, layer_outputs=LAYER_OUTPUTS,
    states=STATES,
    detect=detect, from_state_dict=weights_from_state_dict, load_pth=load_pth5, save_pth=save_pth5,
    random_weights=random_weights5, build_embed=build_embed, build_mixing=build_mixing5, build_head=build_head,
    export=export_model5, reference=RefModel5, precision=PRECISION, state_tuning=STATE_TUNING,
    package_env={"RWKV_V7_ON": "0"}, package_class="RWKV",
    notes="x052; state_in [2, C]: ffn shift, att shift; wkv_in [H, N, N]: the matrix state [value, key]",
)

__all__ = [
    "FAMILY", "GN_EPS", "HEAD_SIZE", "LN_EPS", "PRECISION", "RefModel5", "STATES", "TABLE", "VECTOR_KEYS",
    "Weights5", "build_mixing5", "detect", "export_model5", "from_tensors5", "load_pth5", "random_weights5",
    "save_pth5", "weights_from_state_dict",
]
