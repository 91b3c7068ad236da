"""RWKV-6 ("x060", Finch) checkpoints: the names and shapes of a .pth, its reader and writer, random weights.

The `rwkv` package (0.8.32) makes a state dict with `time_maa` tensors an RWKV-6 and runs it as v6.0.
Canonical form (`Weights6`), fetched part by part: float32 arrays named as in the .pth without `blocks.{i}.`;
per-channel vectors stored [1, 1, C] (the time_maa mixes, the raw time_decay) become [C]; the token-shift
LoRA keeps its stored shapes (`att.time_maa_w1` [C, 5 Dm], `att.time_maa_w2` [5, Dm, C], in the order
w, k, v, r, g), as does the decay LoRA (`att.time_decay_w1` [C, Dd], `att.time_decay_w2` [Dd, C]) and the
bonus `att.time_faaaa` [H, N]. The decay of a token is exp(-exp(time_decay + tanh(x_w w1) w2)).
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
    random_normal,
    table_fetcher,
)
from rwkv2rknn.families.pth import read_state_dict, write_state_dict
from rwkv2rknn.families.rwkv5.checkpoint import (
    ATT_COMMON,
    ENDS,
    FFN,
    HEAD_SIZE,
    LN,
    check_random_shape,
    random_common,
    random_decays,
    stored_items,
)

MIX_ORDER = "wkvrg"  # the five outputs of the token-shift LoRA, in the package's order
TABLE = {
    **ENDS,
    "layer": {
        **LN,
        **{f"att.time_maa_{q}": (1, 1, "C") for q in "x" + MIX_ORDER},
        "att.time_maa_w1": ("C", "Dm5"), "att.time_maa_w2": (5, "Dm", "C"),
        "att.time_decay": (1, 1, "C"), "att.time_decay_w1": ("C", "Dd"), "att.time_decay_w2": ("Dd", "C"),
        **ATT_COMMON,
        "ffn.time_maa_k": (1, 1, "C"), "ffn.time_maa_r": (1, 1, "C"),
        **FFN,
    },
}
VECTOR_KEYS = frozenset(k for k, s in TABLE["layer"].items() if s == (1, 1, "C"))


def detect(keys: Iterable[str]) -> bool:
    """An RWKV-6 state dict: the token-shift LoRA's blocks.N.att.time_maa_x."""
    return any(k.endswith(".att.time_maa_x") for k in keys)


class Weights6(TableWeights):
    """RWKV-6 weights in canonical form (see the module docstring), fetched part by part."""

    TABLE = TABLE

    def __init__(self, dims, fetch, source="<memory>"):
        super().__init__(dims, fetch, source)
        self.lora_mix, self.lora_decay = dims["Dm"], dims["Dd"]


def weights_from_state_dict(get: Callable[[str], np.ndarray], shapes: dict[str, tuple[int, ...]],
                            source: str) -> Weights6:
    """Check an RWKV-6 state dict's names and shapes, infer every dimension, and wrap `get` lazily."""
    fix = "the file is damaged or not an RWKV-6 (x060) checkpoint; re-download or re-convert it"
    if not detect(shapes):
        raise UserError(f"{source}: not an RWKV-6 checkpoint (no blocks.N.att.time_maa_x tensors); "
                        "give an RWKV-6 (x060) .pth")
    V, C = need_shape(shapes, "emb.weight", 2, source, fix)
    H, N = head_grid(shapes, "blocks.0.att.time_faaaa", C, source, fix)
    Dm5 = need_shape(shapes, "blocks.0.att.time_maa_w1", 2, source, fix)[1]
    if Dm5 % 5:
        raise UserError(f"{source}: tensor blocks.0.att.time_maa_w1 has {Dm5} columns, not 5 x the LoRA rank; {fix}")
    dims = {"L": n_layers(shapes), "C": C, "V": V, "H": H, "N": N, "Dm": Dm5 // 5, "Dm5": Dm5,
            "Dd": need_shape(shapes, "blocks.0.att.time_decay_w1", 2, source, fix)[1],
            "F": need_shape(shapes, "blocks.0.ffn.key.weight", 2, source, fix)[0]}
    check_table(TABLE, shapes, dims, source, fix)
    return Weights6(dims, table_fetcher(TABLE, get, dims), source)


def from_tensors6(tensors: dict[str, np.ndarray], source: str = "<memory>") -> Weights6:
    """Weights6 from a dict of file-named arrays (vectors may be [1, 1, C] or [C])."""
    return weights_from_state_dict(lambda name: tensors[name], {k: tuple(np.shape(v)) for k, v in tensors.items()},
                                   source)


def load_pth6(path: str | os.PathLike) -> Weights6:
    """Read an RWKV-6 torch state dict (memory-mapped when the format allows; bf16/fp16 become fp32)."""
    get, shapes = read_state_dict(path)
    return weights_from_state_dict(get, shapes, str(path))


def save_pth6(weights: Weights6, path: str | os.PathLike) -> None:
    """Write the .pth layout the `rwkv` package reads as v6.0; for tests."""
    write_state_dict(stored_items(weights, VECTOR_KEYS), path)


def lora_ranks6(C: int) -> dict[str, int]:
    """LoRA ranks as the released models have them (token shift 32 and decay 64 up to C = 4096, 64 and 128
    above), capped at C / 4 for small test widths and at least 8."""
    mix, decay = (32, 64) if C <= 4096 else (64, 128)
    return {"Dm": max(8, min(mix, C // 4)), "Dd": max(8, min(decay, C // 4))}


def random_weights6(layers: int, embd: int, vocab: int, seed: int = 0, ffn: int | None = None,
                    head_size: int = HEAD_SIZE) -> Weights6:
    """Random RWKV-6 weights at realistic scales, generated per part from a per-part seed.

    The decays' base spreads slow to fast across the width (rwkv5.random_decays) and the decay LoRA moves a
    channel by about +-0.5 from token to token; the token-shift LoRA moves the mixes by about +-0.2.
    """
    check_random_shape(layers, embd, vocab, head_size, ffn)
    C, V, F = embd, vocab, ffn or int(3.5 * embd) // 32 * 32 or 4 * embd
    H, N = C // head_size, head_size
    ranks = lora_ranks6(C)
    Dm, Dd = ranks["Dm"], ranks["Dd"]
    dims = {"L": layers, "C": C, "V": V, "F": F, "H": H, "N": N, "Dm": Dm, "Dm5": 5 * Dm, "Dd": Dd}

    def fetch(part: Part) -> dict[str, np.ndarray]:
        if part in ("embed", "head"):
            return random_ends(part, seed, V, C)
        rng = layer_rng(seed, part)
        out = random_common(rng, C, F, H, N)
        for q in "x" + MIX_ORDER:
            out[f"att.time_maa_{q}"] = rng.uniform(0.0, 1.0, C).astype(np.float32)
        out["att.time_maa_w1"] = random_normal(rng, (C, 5 * Dm), C ** -0.5)
        out["att.time_maa_w2"] = random_normal(rng, (5, Dm, C), 0.3 * Dm ** -0.5)
        out["att.time_decay"] = random_decays(rng, C)
        out["att.time_decay_w1"] = random_normal(rng, (C, Dd), C ** -0.5)
        out["att.time_decay_w2"] = random_normal(rng, (Dd, C), 0.8 * Dd ** -0.5)
        out["ffn.time_maa_k"] = rng.uniform(0.0, 1.0, C).astype(np.float32)
        out["ffn.time_maa_r"] = rng.uniform(0.0, 1.0, C).astype(np.float32)
        return {k: out[k].reshape(canonical_shape(s, dims)) for k, s in TABLE["layer"].items()}

    return Weights6(dims, fetch, f"<random rwkv6 seed={seed}>")
