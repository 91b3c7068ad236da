"""RWKV-7 ("x070", Goose): checkpoint reading (checkpoint.py), a numpy RNN reference (reference.py), and per-layer
ONNX graphs (graph.py); `FAMILY` is what the rest of rwkv2rknn asks about the version."""

from __future__ import annotations

from rwkv2rknn.errors import UserError
from rwkv2rknn.families.base import Family, Precision, StateSpec, StateTuning
from rwkv2rknn.families.graph import exporter
from rwkv2rknn.families.rwkv7.checkpoint import (
    HEAD_SIZE,
    KEYS,
    LAYER0_UNUSED,
    VECTOR_KEYS,
    Weights7,
    detect,
    from_tensors7,
    load_pth7,
    lora_ranks,
    random_weights7,
    save_pth7,
    weights_from_state_dict,
)
from rwkv2rknn.families.rwkv7.graph import build_embed7, build_head7, build_mixing7, export_model7
from rwkv2rknn.families.rwkv7.reference import DECAY_SCALE, GN_EPS, L2_EPS, LN_EPS, RefModel7


def _random_family(layers, embd, vocab, seed=0, ffn=None):
    if ffn is not None:
        raise UserError("--ffn is not used by RWKV-7 random weights (the FFN is 4 x C); leave it out")
    return random_weights7(layers, embd, vocab, seed=seed)


_STATE = {"input": 1, "state_in": 2, "wkv_in": 3}
_OUT = {"output": 1, "state_out": 2, "wkv_out": 3}

FAMILY = Family(
    name="rwkv7", label="RWKV-7",
    layer0_inputs=_STATE, layer0_outputs={**_OUT, "v_first": 1},
    layer_inputs={**_STATE, "v_first": 1}, layer_outputs=_OUT,
    states=(StateSpec("state_in", "state_out"), StateSpec("wkv_in", "wkv_out")),
    extra_links=((0, "v_first", "v_first"),),
    detect=detect, from_state_dict=weights_from_state_dict, load_pth=load_pth7, save_pth=save_pth7,
    random_weights=_random_family, build_embed=build_embed7, build_mixing=build_mixing7, build_head=build_head7,
    export=exporter((build_embed7, build_mixing7, build_head7)), reference=RefModel7,
    # the matrix-state update: the decay's Exp and everything after it up to the next projection
    precision=Precision(ops=("Exp", "Log", "Max")),
    state_tuning=StateTuning("wkv_in", (0, 2, 1)),  # a time_state file is [H, key, value]; wkv_in [H, value, key]
    package_env={"RWKV_V7_ON": "1"}, package_class="RWKV_x070",
    notes="state_in [2, C]: ffn shift, att shift; wkv_in [H, N, N]: the matrix state; v_first [C] from layer 0",
)

__all__ = [
    "DECAY_SCALE", "FAMILY", "GN_EPS", "HEAD_SIZE", "KEYS", "L2_EPS", "LAYER0_UNUSED", "LN_EPS", "RefModel7",
    "VECTOR_KEYS", "Weights7", "build_embed7", "build_head7", "build_mixing7", "detect", "export_model7",
    "from_tensors7", "load_pth7", "lora_ranks", "random_weights7", "save_pth7", "weights_from_state_dict",
]
