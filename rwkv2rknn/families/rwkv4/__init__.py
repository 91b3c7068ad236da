"""RWKV-4: the llama.onnx layout this project started with (ChatRWKV .pth and rwkv.cpp .bin checkpoints).

checkpoint.py reads and writes .pth files and draws random weights, rwkvcpp.py reads and writes rwkv.cpp
files, graph.py builds the layer graphs, reference.py is the numpy model.
"""

from __future__ import annotations

from rwkv2rknn.families.base import Family, Precision, StateSpec
from rwkv2rknn.families.graph import build_embed, build_head
from rwkv2rknn.families.rwkv4.checkpoint import (
    EMBED_KEYS,
    HEAD_KEYS,
    LAYER_KEYS,
    Weights,
    canonical_shapes,
    detect,
    from_state_dict,
    from_tensors,
    load_pth,
    random_weights,
    save_pth,
)
from rwkv2rknn.families.rwkv4.graph import ROW_AA, ROW_ATT_SHIFT, ROW_BB, ROW_FFN_SHIFT, ROW_PP, build_mixing, export_model
from rwkv2rknn.families.rwkv4.reference import PP_INIT, RefModel
from rwkv2rknn.families.rwkv4.rwkvcpp import BIN_MAGIC, BIN_VERSIONS, load_bin, load_checkpoint, save_bin

PP_ROW = ROW_PP  # the running-max exponent row of the state: -1e30 at the start while it stays fp32


def _random(layers, embd, vocab, seed=0, ffn=None):
    return random_weights(layers, embd, vocab, ffn, seed)


_IN, _OUT = {"input": 1, "state_in": 2}, {"output": 1, "state_out": 2}

FAMILY = Family(
    name="rwkv4", label="RWKV-4",
    layer0_inputs=_IN, layer0_outputs=_OUT, layer_inputs=_IN, layer_outputs=_OUT,
    states=(StateSpec("state_in", "state_out", {PP_ROW: PP_INIT}),),
    detect=detect, from_state_dict=from_state_dict, load_pth=load_pth, save_pth=save_pth, random_weights=_random,
    build_embed=build_embed, build_mixing=build_mixing, build_head=build_head, export=export_model,
    reference=RefModel,
    # the WKV's running maximum (Max) and its exponentials: the recurrence stays fp32 on the CPU
    precision=Precision(ops=("Exp", "Log", "Max")),
    notes="state [5, C]: ffn shift, att shift, aa, bb, pp (ChatRWKV / rwkv.cpp order)",
)

__all__ = [
    "BIN_MAGIC", "BIN_VERSIONS", "EMBED_KEYS", "FAMILY", "HEAD_KEYS", "LAYER_KEYS", "PP_INIT", "PP_ROW", "ROW_AA",
    "ROW_ATT_SHIFT", "ROW_BB", "ROW_FFN_SHIFT", "ROW_PP", "RefModel", "Weights", "build_embed", "build_head",
    "build_mixing", "canonical_shapes", "detect", "export_model", "from_state_dict", "from_tensors",
    "load_bin", "load_checkpoint", "load_pth", "random_weights", "save_bin", "save_pth",
]
