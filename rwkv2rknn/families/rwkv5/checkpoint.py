"""RWKV-5 ("x052", Eagle) checkpoints: the names and shapes of a .pth, its reader and writer, random weights.

The `rwkv` package (0.8.32) tells the versions apart by their tensor names: `att.ln_x` makes an RWKV-5,
`att.gate.weight` a 5.1 and `att.time_decay` of shape [H, N] (N > 1) a 5.2; `time_maa` makes an RWKV-6. Only
5.2 (x052, the released Eagle World models) is read here.

Canonical form (`Weights5`), fetched part by part: float32 arrays named as in the .pth without `blocks.{i}.`;
per-channel vectors stored [1, 1, C] become [C]; `att.time_decay` (raw: the decay is exp(-exp(raw))) and
`att.time_faaaa` (the bonus u) stay [H, N]. A file with `att.time_first` instead of `att.time_faaaa` stores
log u (the package exponentiates it); the reader gives u under the name `att.time_faaaa`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import numpy as np

from rwkv2rknn.errors import UserError
from rwkv2rknn.families.parts import (
    Part,
    TableWeights,
    canonical_shape,
    check_table,
    head_grid,
    layer_rng,
    n_layers,
    need_shape,
    random_ends,
    random_ln,
    random_normal,
    table_fetcher,
)
from rwkv2rknn.families.pth import read_state_dict, write_state_dict

HEAD_SIZE = 64
ENDS = {
    "embed": {"emb.weight": ("V", "C"), "ln0.weight": ("C",), "ln0.bias": ("C",)},
    "head": {"ln_out.weight": ("C",), "ln_out.bias": ("C",), "head.weight": ("V", "C")},
}
# the matrix-state time mix's output side and the projections every RWKV-5/6 layer has
ATT_COMMON = {
    "att.time_faaaa": ("H", "N"),
    "att.receptance.weight": ("C", "C"), "att.key.weight": ("C", "C"), "att.value.weight": ("C", "C"),
    "att.gate.weight": ("C", "C"), "att.output.weight": ("C", "C"),
    "att.ln_x.weight": ("C",), "att.ln_x.bias": ("C",),
}
LN = {"ln1.weight": ("C",), "ln1.bias": ("C",), "ln2.weight": ("C",), "ln2.bias": ("C",)}
FFN = {"ffn.key.weight": ("F", "C"), "ffn.receptance.weight": ("C", "C"), "ffn.value.weight": ("C", "F")}
TABLE = {
    **ENDS,
    "layer": {
        **LN,
        **{f"att.time_mix_{q}": (1, 1, "C") for q in "kvrg"},
        # ln_x before time_decay in a written file: the package takes the head count from time_decay only once
        # an ln_x name has made the file an RWKV-5 (a one-layer file written the other way fails to load there)
        **ATT_COMMON,
        "att.time_decay": ("H", "N"),
        "ffn.time_mix_k": (1, 1, "C"), "ffn.time_mix_r": (1, 1, "C"),
        **FFN,
    },
}
VECTOR_KEYS = frozenset(k for k, s in TABLE["layer"].items() if s == (1, 1, "C"))


def detect(keys: Iterable[str]) -> bool:
    """An RWKV-5 state dict: att.ln_x and att.time_decay, none of RWKV-6's time_maa or RWKV-7's tensors."""
    keys = set(keys)
    later = any(".time_maa" in k or k.endswith((".att.x_r", ".att.r_k", ".att.w0")) for k in keys)
    return not later and any(k.endswith(".att.ln_x.weight") for k in keys) and \
        any(k.endswith(".att.time_decay") for k in keys)


class Weights5(TableWeights):
    """RWKV-5.2 weights in canonical form (see the module docstring), fetched part by part."""

    TABLE = TABLE


def weights_from_state_dict(get: Callable[[str], np.ndarray], shapes: dict[str, tuple[int, ...]],
                            source: str) -> Weights5:
    """Check an RWKV-5.2 state dict's names and shapes, infer every dimension, and wrap `get` lazily."""
    fix = "the file is damaged or not an RWKV-5 (x052) checkpoint; re-download or re-convert it"
    if not detect(shapes):
        raise UserError(f"{source}: not an RWKV-5 checkpoint (no blocks.N.att.ln_x / att.time_decay tensors); "
                        "give an RWKV-5 (x052) .pth")
    V, C = need_shape(shapes, "emb.weight", 2, source, fix)
    decay = shapes.get("blocks.0.att.time_decay", ())
    if "blocks.0.att.gate.weight" not in shapes or len(decay) != 2 or decay[1] <= 1:
        raise UserError(f"{source}: an RWKV-5.0/5.1 checkpoint (blocks.0.att.time_decay {list(decay)}, "
                        f"{'a' if 'blocks.0.att.gate.weight' in shapes else 'no'} gate); only RWKV-5.2 (x052: "
                        "time_decay [heads, head size] and a gate) is supported")
    H, N = head_grid(shapes, "blocks.0.att.time_decay", C, source, fix)
    dims = {"L": n_layers(shapes), "C": C, "V": V, "H": H, "N": N,
            "F": need_shape(shapes, "blocks.0.ffn.key.weight", 2, source, fix)[0]}
    # an older file stores log u as time_first: read it as time_faaaa = exp(time_first)
    first = "time_faaaa" if "blocks.0.att.time_faaaa" in shapes else "time_first"
    stored = {k.replace("att.time_first", "att.time_faaaa"): v for k, v in shapes.items()}
    check_table(TABLE, stored, dims, source, fix)

    def get_any(name: str) -> np.ndarray:
        if first == "time_first" and name.endswith("att.time_faaaa"):
            return np.exp(np.asarray(get(name.replace("att.time_faaaa", "att.time_first")), dtype=np.float64))
        return get(name)

    return Weights5(dims, table_fetcher(TABLE, get_any, dims), source)


def from_tensors5(tensors: dict[str, np.ndarray], source: str = "<memory>") -> Weights5:
    """Weights5 from a dict of file-named arrays (vectors may be [1, 1, C] or [C])."""
    return weights_from_state_dict(lambda name: tensors[name], {k: tuple(np.shape(v)) for k, v in tensors.items()},
                                   source)


def load_pth5(path: str | os.PathLike) -> Weights5:
    """Read an RWKV-5.2 torch state dict (memory-mapped when the format allows; bf16/fp16 become fp32)."""
    get, shapes = read_state_dict(path)
    return weights_from_state_dict(get, shapes, str(path))


def stored_items(weights, vector_keys):
    """(name, array) in the .pth layout the `rwkv` package reads: per-channel vectors [1, 1, C]."""
    for name, a in weights.tensors():
        key = name.split(".", 2)[2] if name.startswith("blocks.") else name
        yield name, (a.reshape(1, 1, -1) if key in vector_keys else a)


def save_pth5(weights: Weights5, path: str | os.PathLike) -> None:
    """Write the .pth layout the `rwkv` package reads as v5.2; for tests."""
    write_state_dict(stored_items(weights, VECTOR_KEYS), path)


def random_decays(rng: np.random.Generator, C: int) -> np.ndarray:
    """Raw log-log decays d (decay = exp(-exp(d))) spread from slow (d ~ -7, decay ~ 0.999) to fast (d ~ 1,
    decay ~ 0.07) across the width, with a per-layer curvature and noise, as trained models show."""
    ramp = np.linspace(0.0, 1.0, C, dtype=np.float32) ** np.float32(rng.uniform(0.7, 1.3))
    return (-7.0 + 8.0 * ramp + random_normal(rng, C, 0.3)).astype(np.float32)


def random_common(rng: np.random.Generator, C: int, F: int, H: int, N: int) -> dict[str, np.ndarray]:
    """The tensors RWKV-5 and RWKV-6 layers share, at realistic scales (LN and GroupNorm affine non-trivial)."""
    out = {**random_ln(rng, "ln1", C), **random_ln(rng, "ln2", C)}
    out["att.time_faaaa"] = random_normal(rng, (H, N), 0.5, mean=0.3)
    for k in ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.gate.weight", "att.output.weight",
              "ffn.receptance.weight"):
        out[k] = random_normal(rng, (C, C), C ** -0.5)
    out["att.ln_x.weight"] = rng.uniform(0.3, 1.2, C).astype(np.float32)
    out["att.ln_x.bias"] = random_normal(rng, C, 0.1)
    out["ffn.key.weight"] = random_normal(rng, (F, C), C ** -0.5)
    out["ffn.value.weight"] = random_normal(rng, (C, F), F ** -0.5)
    return out


def check_random_shape(layers: int, embd: int, vocab: int, head_size: int, ffn: int | None) -> None:
    if min(layers, embd, vocab, head_size) < 1 or (ffn is not None and ffn < 1):
        raise UserError("random model sizes must be positive integers; fix --layers/--embd/--vocab/--ffn")
    if embd % head_size:
        raise UserError(f"n_embd {embd} is not a multiple of the head size {head_size}; choose another --embd")


def random_weights5(layers: int, embd: int, vocab: int, seed: int = 0, ffn: int | None = None,
                    head_size: int = HEAD_SIZE) -> Weights5:
    """Random RWKV-5.2 weights at realistic scales, generated per part from a per-part seed."""
    check_random_shape(layers, embd, vocab, head_size, ffn)
    C, V, F = embd, vocab, ffn or int(3.5 * embd) // 32 * 32 or 4 * embd
    H, N = C // head_size, head_size
    dims = {"L": layers, "C": C, "V": V, "F": F, "H": H, "N": N}

    def fetch(part: Part) -> dict[str, np.ndarray]:
        if part in ("embed", "head"):
            return random_ends(part, seed, V, C)
        rng = layer_rng(seed, part)
        out = random_common(rng, C, F, H, N)
        for q in "kvrg":
            out[f"att.time_mix_{q}"] = rng.uniform(0.0, 1.0, C).astype(np.float32)
        out["att.time_decay"] = random_decays(rng, C).reshape(H, N)
        out["ffn.time_mix_k"] = rng.uniform(0.0, 1.0, C).astype(np.float32)
        out["ffn.time_mix_r"] = rng.uniform(0.0, 1.0, C).astype(np.float32)
        return {k: out[k].reshape(canonical_shape(s, dims)) for k, s in TABLE["layer"].items()}

    return Weights5(dims, fetch, f"<random rwkv5 seed={seed}>")
