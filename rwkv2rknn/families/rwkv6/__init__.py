"""RWKV-6 ("x060", Finch): checkpoint reading (checkpoint.py), a numpy RNN reference (reference.py), per-layer
ONNX graphs (graph.py); built on RWKV-5.2's public pieces (the layer interface, states, matrix-state attention).
`FAMILY` is what the rest of rwkv2rknn asks about the version."""

from __future__ import annotations

from rwkv2rknn.families.base import Family
from rwkv2rknn.families.graph import build_embed, build_head
from rwkv2rknn.families.rwkv5 import LAYER_INPUTS, LAYER_OUTPUTS, PRECISION, STATE_TUNING, STATES
from rwkv2rknn.families.rwkv6.checkpoint import (
    MIX_ORDER,
    TABLE,
    VECTOR_KEYS,
    Weights6,
    detect,
    from_tensors6,
    load_pth6,
    lora_ranks6,
    random_weights6,
    save_pth6,
    weights_from_state_dict,
)
from rwkv2rknn.families.rwkv6.graph import build_mixing6, export_model6
from rwkv2rknn.families.rwkv6.reference import RefModel6

FAMILY = Family(
    name="rwkv6", label="RWKV-6",
    layer0_inputs=LAYER_INPUTS, layer0_outputs=LAYER_OUTPUTS, layer_inputs=LAYER_INPUTS, layer_outputs=LAYER_OUTPUTS,
    states=STATES,
    detect=detect, from_state_dict=weights_from_state_dict, load_pth=load_pth6, save_pth=save_pth6,
    random_weights=random_weights6, build_embed=build_embed, build_mixing=build_mixing6, build_head=build_head,
    export=export_model6, reference=RefModel6,
    # the decay's two Exps and the state's update: fp32 on the CPU in fused plans
    precision=PRECISION, state_tuning=STATE_TUNING,
    package_env={"RWKV_V7_ON": "0"}, package_class="RWKV",
    notes="x060; state_in [2, C]: ffn shift, att shift; wkv_in [H, N, N]: the matrix state [value, key]",
)

__all__ = [
    "FAMILY", "MIX_ORDER", "RefModel6", "TABLE", "VECTOR_KEYS", "Weights6", "build_mixing6", "detect",
    "export_model6", "from_tensors6", "load_pth6", "lora_ranks6", "random_weights6", "save_pth6",
    "weights_from_state_dict",
]
