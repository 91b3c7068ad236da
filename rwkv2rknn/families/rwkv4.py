"""RWKV-4: the llama.onnx layout this project started with (ChatRWKV .pth and rwkv.cpp .bin checkpoints).

The readers live in rwkv2rknn/checkpoints.py and the graph builders in rwkv2rknn/export.py; this module
is what the rest of the tool asks about the version.
"""

from __future__ import annotations

from rwkv2rknn.families import Family, StateSpec

PP_ROW = 4  # the running-max exponent row of the state: -1e30 at the start while it stays fp32


def _load(path):
    from rwkv2rknn.checkpoints import load_checkpoint

    return load_checkpoint(path)


def _random(layers, embd, vocab, seed=0, ffn=None):
    from rwkv2rknn.checkpoints import random_weights

    return random_weights(layers, embd, vocab, ffn, seed)


def _export(weights, out_dir, dtype="float16", weights_as="constants", force=False, progress=True):
    from rwkv2rknn.export import export_model

    return export_model(weights, out_dir, dtype=dtype, weights_as=weights_as, force=force, progress=progress)


def _detect(keys) -> bool:
    from rwkv2rknn.checkpoints import looks_rwkv56

    return "blocks.0.att.time_decay" in keys and "blocks.0.att.time_first" in keys and not looks_rwkv56(keys)


_IN, _OUT = {"input": 1, "state_in": 2}, {"output": 1, "state_out": 2}

FAMILY = Family(
    name="rwkv4", label="RWKV-4",
    layer0_inputs=_IN, layer0_outputs=_OUT, layer_inputs=_IN, layer_outputs=_OUT,
    states=(StateSpec("state_in", "state_out", {PP_ROW: -1e30}),),
    precision_seeds=("Exp", "Log", "Max"),
    load_checkpoint=_load, random_weights=_random, export=_export, detect_keys=_detect,
    notes="state [5, C]: ffn shift, att shift, aa, bb, pp (ChatRWKV / rwkv.cpp order)",
)
