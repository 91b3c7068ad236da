"""Hugging Face RWKV-7 checkpoints in the flash-linear-attention (fla-hub) layout, read into the x070 .pth layout.

This is the layout RKLLM converts RWKV-7 from: a directory with `config.json` (model_type "rwkv7",
architectures ["RWKV7ForCausalLM"]) and `*.safetensors` (one file, or shards listed in
`model.safetensors.index.json`), tensors named like `model.layers.N.attn.r_proj.weight`.

The mapping is fla's utils/convert_from_rwkv7.py (.pth -> fla) read backwards:
| fla | .pth (x070) |
|---|---|
| model.embeddings.weight, model.norm.*, lm_head.weight | emb.weight, ln_out.*, head.weight |
| model.layers.0.pre_norm.*, layers.N.attn_norm.*, layers.N.ffn_norm.* | blocks.0.ln0.*, blocks.N.ln1.*, blocks.N.ln2.* |
| attn.x_r ... attn.x_g [1, 1, C] (older fla: attn.x_x [6, C], rows r w k v a g) | att.x_r ... att.x_g [1, 1, C] |
| attn.k_k, attn.k_a [C]; attn.r_k [H, N] | att.k_k, att.k_a [1, 1, C]; att.r_k |
| attn.r_proj, k_proj, v_proj, o_proj .weight; attn.g_norm.* | att.receptance, key, value, output .weight; att.ln_x.* |
| attn.{w,a,v}_lora.lora.0.weight [D, C], .2.weight [C, D], .2.bias [C] | att.{w,a,v}1, {w,a,v}2 (transposed), {w,a,v}0 |
| attn.g_lora.lora.0.weight, .lora.2.weight (no bias) | att.g1, att.g2 (transposed) |
| ffn.x_k [C], ffn.key.weight, ffn.value.weight | ffn.x_k [1, 1, C], ffn.key.weight, ffn.value.weight |
Layer 0 has no v_lora (the .pth's blocks.0.att.v0/v1/v2 are unused and dropped by the converter).
The values are copied unchanged (fla computes the same model); bf16 tensors become float32 (exactly), fp16
and fp32 stay as stored. The tensors are read into memory (safetensors has no memory map for numpy).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from rwkv2rknn.errors import UserError

INDEX = "model.safetensors.index.json"
_VECTOR, _T, _AS_IS = "vector", "transpose", None

_TOP = {
    "model.embeddings.weight": ("emb.weight", _AS_IS),
    "model.norm.weight": ("ln_out.weight", _AS_IS),
    "model.norm.bias": ("ln_out.bias", _AS_IS),
    "lm_head.weight": ("head.weight", _AS_IS),
}
_LAYER = {
    "pre_norm.weight": ("ln0.weight", _AS_IS), "pre_norm.bias": ("ln0.bias", _AS_IS),
    "attn_norm.weight": ("ln1.weight", _AS_IS), "attn_norm.bias": ("ln1.bias", _AS_IS),
    "ffn_norm.weight": ("ln2.weight", _AS_IS), "ffn_norm.bias": ("ln2.bias", _AS_IS),
    **{f"attn.x_{q}": (f"att.x_{q}", _VECTOR) for q in "rwkvag"},
    "attn.k_k": ("att.k_k", _VECTOR), "attn.k_a": ("att.k_a", _VECTOR), "attn.r_k": ("att.r_k", _AS_IS),
    "attn.r_proj.weight": ("att.receptance.weight", _AS_IS), "attn.k_proj.weight": ("att.key.weight", _AS_IS),
    "attn.v_proj.weight": ("att.value.weight", _AS_IS), "attn.o_proj.weight": ("att.output.weight", _AS_IS),
    "attn.g_norm.weight": ("att.ln_x.weight", _AS_IS), "attn.g_norm.bias": ("att.ln_x.bias", _AS_IS),
    **{f"attn.{q}_lora.lora.0.weight": (f"att.{q}1", _T) for q in "wavg"},
    **{f"attn.{q}_lora.lora.2.weight": (f"att.{q}2", _T) for q in "wavg"},
    **{f"attn.{q}_lora.lora.2.bias": (f"att.{q}0", _VECTOR) for q in "wav"},
    "ffn.x_k": ("ffn.x_k", _VECTOR),
    "ffn.key.weight": ("ffn.key.weight", _AS_IS), "ffn.value.weight": ("ffn.value.weight", _AS_IS),
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_FIX = "re-download the model, or export from the RWKV-7 .pth it was converted from"


def is_candidate(path: str | os.PathLike) -> bool:
    """Whether `path` should be read as a Hugging Face checkpoint: a directory, a .safetensors, a config.json."""
    path = Path(path)
    return path.is_dir() or path.suffix == ".safetensors" or path.name == "config.json"


def model_dir(path: str | os.PathLike) -> Path:
    """The checkpoint directory a path names (the directory itself, or the one holding the named file)."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def _config(directory: Path) -> dict:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file() and (directory / "embed.onnx").is_file():
        raise UserError(f"{directory}: holds exported graphs (embed.onnx), not a checkpoint; give it to "
                        "`rwkv2rknn split`")
    if not cfg_path.is_file():
        raise UserError(f"{directory}: no config.json; a Hugging Face checkpoint is a directory with config.json "
                        "and *.safetensors: download config.json too (or give a .pth or rwkv.cpp .bin)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{cfg_path}: not valid JSON ({exc.__class__.__name__}); re-download it") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path}: not a JSON object; re-download it")
    kind = cfg.get("model_type")
    if kind != "rwkv7":
        arch = ", ".join(cfg.get("architectures") or []) or "no architectures"
        raise UserError(f"{cfg_path}: model_type {kind!r} ({arch}) is not RWKV-7; rwkv2rknn reads Hugging Face "
                        "checkpoints in the fla-hub RWKV-7 layout (model_type 'rwkv7') only: for other versions "
                        "give the BlinkDL .pth or an rwkv.cpp .bin")
    if cfg.get("attn"):
        raise UserError(f"{cfg_path}: a hybrid RWKV-7 with softmax-attention layers (config 'attn'); only plain "
                        "RWKV-7 models are supported")
    if cfg.get("norm_first") is False:
        raise UserError(f"{cfg_path}: norm_first is false (no ln0 after the embedding), which the RWKV-7 .pth "
                        "layout cannot express; only models converted from BlinkDL .pth files are supported")
    if cfg.get("hidden_act", "sqrelu") != "sqrelu":
        raise UserError(f"{cfg_path}: hidden_act {cfg['hidden_act']!r} is not RWKV-7's sqrelu; not supported")
    hidden, values = cfg.get("hidden_size"), cfg.get("value_dim")
    if values is not None and any(v != hidden for v in (values if isinstance(values, list) else [values])):
        raise UserError(f"{cfg_path}: value_dim {values} differs from hidden_size {hidden} (an expanded state), "
                        "which the RWKV-7 .pth layout cannot express; not supported")
    return cfg


def _shards(directory: Path) -> list[Path]:
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index}: not a safetensors index (no weight_map); re-download it") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise UserError(f"{directory / missing[0]}: listed in {INDEX} but missing; download every shard")
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"{directory}: no *.safetensors files beside config.json; download the weights too "
                        "(pytorch_model.bin Hugging Face files are not read: use the .safetensors)")
    return files


def _read_tensors(files: list[Path]) -> dict[str, np.ndarray]:
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise UserError("reading Hugging Face checkpoints needs the safetensors package; install the compiler "
                        "extra: pip install 'rwkv2rknn[compile]'") from None
    out: dict[str, np.ndarray] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                for name in f.keys():
                    if name in out:
                        raise UserError(f"{file}: tensor {name} is also in another shard; the download is mixed up")
                    if f.get_slice(name).get_dtype() == "BF16":
                        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
                        out[name] = f.get_tensor(name).astype(np.float32)
                    else:
                        out[name] = f.get_tensor(name)
        except SafetensorError as exc:
            first = (str(exc).splitlines() or [""])[0][:160]
            raise UserError(f"{file}: cannot read as safetensors ({first}); the file is damaged or truncated: "
                            "re-download it") from None
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The x070 .pth state dict of an fla-hub RWKV-7 checkpoint directory (see the module docstring)."""
    directory = model_dir(path)
    if not directory.exists():
        raise UserError(f"{directory}: no such directory; check the checkpoint path")
    cfg = _config(directory)
    tensors = _read_tensors(_shards(directory))
    if "lm_head.weight" not in tensors and cfg.get("tie_word_embeddings") and "model.embeddings.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embeddings.weight"]
    if "model.layers.0.attn.x_x" in tensors or any(k.endswith(".attn.x_x") for k in tensors):
        tensors = _split_x_x(tensors, directory)
    out: dict[str, np.ndarray] = {}
    for name, a in tensors.items():
        m = _LAYER_RE.fullmatch(name)
        rule = _LAYER.get(m.group(2)) if m else _TOP.get(name)
        if m and m.group(2) == "attn.g_lora.lora.2.bias":  # early fla: a gate bias RWKV-7 has not
            if np.any(np.asarray(a, dtype=np.float32)):
                raise UserError(f"{directory}: tensor {name} is a non-zero output-gate bias, which RWKV-7 has not; "
                                "not a BlinkDL RWKV-7 model")
            continue
        if rule is None or (m and m.group(2).startswith("pre_norm") and m.group(1) != "0"):
            raise UserError(f"{directory}: tensor {name} is not part of an fla-hub RWKV-7 model; the directory "
                            f"holds another architecture or variant; {_FIX}")
        key, how = rule
        if m:
            key = f"blocks.{m.group(1)}.{key}"
        if how == _VECTOR:
            a = a.reshape(1, 1, -1)
        elif how == _T:
            if a.ndim != 2:
                raise UserError(f"{directory}: tensor {name} has shape {list(a.shape)}, expected a matrix; {_FIX}")
            a = np.ascontiguousarray(a.T)
        out[key] = a
    if cfg.get("norm_bias") is False:  # LayerNorms without bias: the .pth layout stores zeros
        for key in [k for k in out if re.search(r"(^|\.)(ln\d|ln_out)\.weight$", k)]:
            out.setdefault(key[: -len("weight")] + "bias", np.zeros_like(out[key]))
    for needed in ("emb.weight", "head.weight", "blocks.0.ln0.weight"):
        if needed not in out:
            fla = {"emb.weight": "model.embeddings.weight", "head.weight": "lm_head.weight",
                   "blocks.0.ln0.weight": "model.layers.0.pre_norm.weight"}[needed]
            raise UserError(f"{directory}: tensor {fla} is missing; {_FIX}")
    return out


def _split_x_x(tensors: dict[str, np.ndarray], directory: Path) -> dict[str, np.ndarray]:
    """fla before April 2025 kept the six token-shift mixes as one attn.x_x [6, C] (rows r, w, k, v, a, g)."""
    out = {}
    for name, a in tensors.items():
        if name.endswith(".attn.x_x"):
            if a.ndim != 2 or a.shape[0] != 6:
                raise UserError(f"{directory}: tensor {name} has shape {list(a.shape)}, expected [6, C]; {_FIX}")
            for i, q in enumerate("rwkvag"):
                out[f"{name[:-3]}x_{q}"] = a[i]
        else:
            out[name] = a
    return out
