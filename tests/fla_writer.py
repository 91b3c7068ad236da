"""Test-side writer of Hugging Face RWKV-7 checkpoints in the flash-linear-attention (fla-hub) layout, from an
x070 .pth state dict, following fla's utils/convert_from_rwkv7.py (a separate implementation from
rwkv2rknn/families/rwkv7/flahub.py).

That converter renames `blocks.N` -> `model.layers.N`, `att` -> `attn`, `ln0/ln1/ln2` -> `pre_norm/attn_norm/
ffn_norm`, `receptance/key/value/output/ln_x` (under attn) -> `r_proj/k_proj/v_proj/o_proj/g_norm`, and the
LoRA tensors `{w,v,a,g}{0,1,2}` -> `{w,v,a,g}_lora.lora.{2.bias, 0.weight, 2.weight}`, transposing the 1
and 2 matrices; `emb.weight`, `ln_out.*`, `head.weight` -> `model.embeddings.weight`, `model.norm.*`,
`lm_head.weight`. [1, 1, C] tensors are squeezed and copied into the model's parameters, which are
[1, 1, C] for attn.x_* and [C] for the rest; blocks.0.att.v0/v1/v2 are dropped. save_pretrained writes
config.json (model_type rwkv7) and model.safetensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

UNUSED = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
EMB_HEAD = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
            "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "ln_x": "g_norm", "output": "o_proj"}
PART = {"att": "attn", "ffn": "ffn", "ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}


def fla_name(name: str) -> tuple[str, bool]:
    """(fla name, transposed) of a .pth name; ("", False) for the unused ones."""
    if name in UNUSED:
        return "", False
    if name in EMB_HEAD:
        return EMB_HEAD[name], False
    parts = name.split(".")
    parts[0] = "model.layers"
    parts[2] = PART[parts[2]]
    transposed = False
    if re.match("[wvag][012]", parts[3]):
        typ, num = parts[3]
        parts[3] = f"{typ}_lora.lora." + {"0": "2.bias", "1": "0.weight", "2": "2.weight"}[num]
        transposed = num in "12"
    elif parts[2] == "attn" and parts[3] in PROJ:
        parts[3] = PROJ[parts[3]]
    return ".".join(parts), transposed


def fla_tensors(state_dict: dict, legacy_x_x: bool = False) -> dict[str, np.ndarray]:
    C = np.shape(state_dict["emb.weight"])[1]
    out: dict[str, np.ndarray] = {}
    for name, v in state_dict.items():
        new, transposed = fla_name(name)
        if not new:
            continue
        a = np.asarray(v, dtype=np.float32)
        if transposed:
            a = a.T
        if a.shape == (1, 1, C):
            a = a.reshape(C)
        if re.search(r"\.attn\.x_[rwkvag]$", new):
            a = a.reshape(1, 1, C)
        out[new] = np.ascontiguousarray(a)
    if legacy_x_x:  # fla before April 2025: one attn.x_x [6, C]
        for prefix in sorted({k[: -len("x_r")] for k in out if k.endswith(".attn.x_r")}):
            rows = [out.pop(f"{prefix}x_{q}").reshape(C) for q in "rwkvag"]
            out[f"{prefix}x_x"] = np.stack(rows)
    return out


def config(state_dict: dict, dtype: str) -> dict:
    L = 0
    while f"blocks.{L}.ffn.key.weight" in state_dict:
        L += 1
    F, C = np.shape(state_dict["blocks.0.ffn.key.weight"])
    H, N = np.shape(state_dict["blocks.0.att.r_k"])
    v1 = state_dict.get("blocks.1.att.v1")
    return {
        "architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", "attn": None, "attn_mode": "chunk",
        "vocab_size": int(np.shape(state_dict["emb.weight"])[0]), "hidden_size": int(C),
        "hidden_ratio": F / C, "intermediate_size": int(F), "num_hidden_layers": L, "head_dim": int(N),
        "num_heads": int(H), "value_dim": [int(C)] * L,
        "decay_low_rank_dim": int(np.shape(state_dict["blocks.0.att.w1"])[1]),
        "gate_low_rank_dim": int(np.shape(state_dict["blocks.0.att.g1"])[1]),
        "a_low_rank_dim": int(np.shape(state_dict["blocks.0.att.a1"])[1]),
        "v_low_rank_dim": int(np.shape(v1)[1]) if v1 is not None else 32,
        "hidden_act": "sqrelu", "norm_first": True, "norm_bias": True, "norm_eps": 1e-5, "fuse_norm": True,
        "tie_word_embeddings": False, "torch_dtype": dtype, "use_cache": True,
    }


def write_fla(state_dict: dict, directory, dtype: str = "float32", legacy_x_x: bool = False,
              shards: int = 1, tie: bool = False) -> Path:
    """Write config.json and the safetensors (one file, or `shards` files with an index) into `directory`."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = fla_tensors(state_dict, legacy_x_x)
    cfg = config(state_dict, dtype)
    if tie:
        del tensors["lm_head.weight"]
        cfg["tie_word_embeddings"] = True
    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    torch_tensors = {k: torch.from_numpy(v).to(tdtype).contiguous() for k, v in tensors.items()}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    names = list(torch_tensors)
    if shards == 1:
        save_file(torch_tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: torch_tensors[k] for k in names[i::shards]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory
