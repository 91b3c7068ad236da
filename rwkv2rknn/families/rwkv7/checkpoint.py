"""RWKV-7 ("x070", Goose) checkpoints: the names and shapes of a .pth, its reader and writer, random weights.

Canonical form (`Weights7`), fetched part by part like the other families' weights:
- float32 numpy arrays named as in the .pth without the `blocks.{i}.` prefix;
- time-mix and other per-channel vectors (`att.x_r` ... `att.x_g`, `att.w0`, `att.a0`, `att.v0`,
  `att.k_k`, `att.k_a`, `ffn.x_k`; stored [1, 1, C]) are flattened to [C]; `att.r_k` stays [H, N];
- LoRA matrices stay as stored (`w1` [C, Dw], `w2` [Dw, C], ...: the input side first), Linear
  weights are [out, in];
- layer 0 has no `att.v0/v1/v2` (the reference ignores them there; a checkpoint may carry them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable

import numpy as np

from rwkv2rknn.errors import UserError
from rwkv2rknn.families.parts import (
    Part,
    PartedWeights,
    file_name,
    head_grid,
    layer_rng,
    n_layers,
    need_shape,
    random_ends,
    random_ln,
    random_normal,
)
from rwkv2rknn.families.pth import read_state_dict, write_state_dict

HEAD_SIZE = 64

# -- checkpoint facts -----------------------------------------------------------------------------------
# Canonical key -> shape as stored in a .pth, in symbols (C n_embd, V vocab, H heads, N head size,
# F ffn width, Dw/Da/Dv/Dg LoRA ranks). A stored [1, 1, C] is a vector: canonical [C].
KEYS: dict[str, dict[str, tuple]] = {
    "embed": {"emb.weight": ("V", "C"), "ln0.weight": ("C",), "ln0.bias": ("C",)},
    "layer": {
        "ln1.weight": ("C",), "ln1.bias": ("C",), "ln2.weight": ("C",), "ln2.bias": ("C",),
        **{f"att.x_{q}": (1, 1, "C") for q in "rwkvag"},
        "att.w0": (1, 1, "C"), "att.w1": ("C", "Dw"), "att.w2": ("Dw", "C"),
        "att.a0": (1, 1, "C"), "att.a1": ("C", "Da"), "att.a2": ("Da", "C"),
        "att.v0": (1, 1, "C"), "att.v1": ("C", "Dv"), "att.v2": ("Dv", "C"),
        "att.g1": ("C", "Dg"), "att.g2": ("Dg", "C"),
        "att.k_k": (1, 1, "C"), "att.k_a": (1, 1, "C"), "att.r_k": ("H", "N"),
        "att.receptance.weight": ("C", "C"), "att.key.weight": ("C", "C"),
        "att.value.weight": ("C", "C"), "att.output.weight": ("C", "C"),
        "att.ln_x.weight": ("C",), "att.ln_x.bias": ("C",),
        "ffn.x_k": (1, 1, "C"), "ffn.key.weight": ("F", "C"), "ffn.value.weight": ("C", "F"),
    },
    "head": {"ln_out.weight": ("C",), "ln_out.bias": ("C",), "head.weight": ("V", "C")},
}
LAYER0_UNUSED = ("att.v0", "att.v1", "att.v2")  # value-residual LoRA: ignored in layer 0
VECTOR_KEYS = frozenset(k for k, s in KEYS["layer"].items() if s == (1, 1, "C"))
# Keys only RWKV-7 has; any of them marks an RWKV-7 state dict.
_MARKERS = re.compile(r"blocks\.\d+\.att\.(r_k|k_k|k_a|a0|a1|w0|w1|x_r|x_a|x_g)$")


def detect(keys: Iterable[str]) -> bool:
    """True when a state dict's keys are RWKV-7's (blocks.N.att.r_k, att.x_r, att.w1, att.a0, ...)."""
    return any(_MARKERS.match(k) for k in keys)


def _part_keys(part: Part) -> list[str]:
    if part in ("embed", "head"):
        return list(KEYS[part])
    return [k for k in KEYS["layer"] if not (part == 0 and k in LAYER0_UNUSED)]


def _symbolic(part: Part, key: str) -> tuple:
    return KEYS["layer" if isinstance(part, int) else part][key]


def _canonical_shape(sym: tuple, dims: dict[str, int]) -> tuple[int, ...]:
    if sym == (1, 1, "C"):
        return (dims["C"],)
    return tuple(d if isinstance(d, int) else dims[d] for d in sym)


class Weights7(PartedWeights):
    """RWKV-7 weights in canonical form (see the module docstring), fetched part by part."""

    def __init__(self, dims: dict[str, int], fetch: Callable[[Part], dict[str, np.ndarray]],
                 source: str = "<memory>"):
        super().__init__(dims["L"], fetch, source)
        self.dims = dict(dims)
        self.n_embd, self.n_vocab, self.n_ffn = dims["C"], dims["V"], dims["F"]
        self.n_head, self.head_size = dims["H"], dims["N"]
        self.lora_w, self.lora_a, self.lora_v, self.lora_g = dims["Dw"], dims["Da"], dims["Dv"], dims["Dg"]

    def __repr__(self) -> str:
        return (f"Weights7(n_layer={self.n_layer}, n_embd={self.n_embd}, n_vocab={self.n_vocab}, "
                f"n_head={self.n_head}, head_size={self.head_size}, lora w/a/v/g={self.lora_w}/"
                f"{self.lora_a}/{self.lora_v}/{self.lora_g}, source={self.source!r})")

    def _keys(self, part: Part):
        return _part_keys(part)

    def _like(self, fetch) -> Weights7:
        return Weights7(self.dims, fetch, self.source)


def weights_from_state_dict(get: Callable[[str], np.ndarray], shapes: dict[str, tuple[int, ...]],
                            source: str) -> Weights7:
    """Check an RWKV-7 state dict's names and shapes, infer every dimension, and wrap `get` lazily.

    `get(name)` returns the tensor of a checkpoint-file name as something np.asarray takes;
    `shapes` maps every name to its shape. Raises a one-line UserError naming `source` and the first
    missing or misshapen tensor.
    """
    fix = "the file is damaged or not an RWKV-7 checkpoint; re-download or re-convert it"
    if not detect(shapes):
        raise UserError(f"{source}: not an RWKV-7 checkpoint (no blocks.N.att.r_k/x_r/w1/a0 tensors); "
                        "give an RWKV-7 (x070) .pth")
    if any(k.startswith("blocks.") and ".ffn.s_emb" in k for k in shapes):
        raise UserError(f"{source}: a DeepEmbed RWKV-7 variant (ffn.s_emb tensors); only plain RWKV-7 "
                        "checkpoints are supported")

    def need(name: str, ndim: int) -> tuple[int, ...]:
        return need_shape(shapes, name, ndim, source, fix)

    V, C = need("emb.weight", 2)
    H, N = head_grid(shapes, "blocks.0.att.r_k", C, source, fix)
    L = n_layers(shapes)
    dims = {"L": L, "C": C, "V": V, "H": H, "N": N,
            "Dw": need("blocks.0.att.w1", 2)[1], "Da": need("blocks.0.att.a1", 2)[1],
            "Dg": need("blocks.0.att.g1", 2)[1], "F": need("blocks.0.ffn.key.weight", 2)[0]}
    if L > 1:
        dims["Dv"] = need("blocks.1.att.v1", 2)[1]
    else:  # one layer: the value LoRA is unused; take its rank from layer 0 when stored
        dims["Dv"] = shapes["blocks.0.att.v1"][-1] if len(shapes.get("blocks.0.att.v1", ())) == 2 else 0

    for part in ["embed", *range(L), "head"]:
        for key in _part_keys(part):
            name = file_name(part, key)
            if name not in shapes:
                raise UserError(f"{source}: tensor {name} is missing; {fix}")
            want = _canonical_shape(_symbolic(part, key), dims)
            got = tuple(shapes[name])
            vector_ok = len(want) == 1 and int(np.prod(got)) == want[0] and all(d == 1 for d in got[:-1])
            if got != want and not vector_ok:
                raise UserError(f"{source}: tensor {name} has shape {list(got)}, expected {list(want)} "
                                f"(n_embd={C}, {H} heads of {N}); {fix}")

    def fetch(part: Part) -> dict[str, np.ndarray]:
        return {key: np.asarray(get(file_name(part, key)), dtype=np.float32)
                .reshape(_canonical_shape(_symbolic(part, key), dims)) for key in _part_keys(part)}

    return Weights7(dims, fetch, source)


def from_tensors7(tensors: dict[str, np.ndarray], source: str = "<memory>") -> Weights7:
    """Weights7 from a dict of file-named arrays (vectors may be [1, 1, C] or [C])."""
    return weights_from_state_dict(lambda name: tensors[name], {k: tuple(np.shape(v)) for k, v in tensors.items()},
                                   source)


# -- .pth ---------------------------------------------------------------------------------------------

def load_pth7(path: str | os.PathLike) -> Weights7:
    """Read an RWKV-7 torch state dict (memory-mapped when the format allows; bf16/fp16 become fp32)."""
    get, shapes = read_state_dict(path)
    return weights_from_state_dict(get, shapes, str(path))


def save_pth7(weights: Weights7, path: str | os.PathLike) -> None:
    """Write the .pth layout the `rwkv` package reads (vectors as [1, 1, C], r_k [H, N]); for tests."""
    def items():
        for name, a in weights.tensors():
            key = name.split(".", 2)[2] if name.startswith("blocks.") else name
            yield name, (a.reshape(1, 1, -1) if key in VECTOR_KEYS else a)

    write_state_dict(items(), path)


# -- random -------------------------------------------------------------------------------------------

def lora_ranks(C: int) -> dict[str, int]:
    """LoRA ranks in the proportions of the released small models (C=768: Dw=Da=64, Dv=32, Dg=128).

    Ranks grow like sqrt(C) (the gate like C^0.8), rounded to multiples of 32 (8 below C=512), at least 8.
    """
    def rank(x: float) -> int:
        step = 32 if C >= 512 else 8
        return max(8, step * int(x / step + 0.5))

    root = C ** 0.5
    return {"Dw": rank(1.8 * root), "Da": rank(1.8 * root), "Dv": rank(1.3 * root), "Dg": rank(0.6 * C ** 0.8)}


def random_weights7(layers: int, embd: int, vocab: int, seed: int = 0, head_size: int = HEAD_SIZE) -> Weights7:
    """Random RWKV-7 weights at realistic scales, generated per part from a per-part seed.

    Decays spread from slow (w near 1) to fast channels across the width; LayerNorm/GroupNorm
    parameters are non-trivial; a0, v0, k_k, k_a, r_k sit near the values trained models show.
    """
    if min(layers, embd, vocab, head_size) < 1:
        raise UserError("random model sizes must be positive integers; fix --layers/--embd/--vocab")
    if embd % head_size:
        raise UserError(f"n_embd {embd} is not a multiple of the head size {head_size}; choose another --embd")
    C, V, F = embd, vocab, 4 * embd
    dims = {"L": layers, "C": C, "V": V, "F": F, "H": C // head_size, "N": head_size, **lora_ranks(C)}
    Dw, Da, Dv, Dg = dims["Dw"], dims["Da"], dims["Dv"], dims["Dg"]

    normal = random_normal

    def ln(rng, prefix):
        return random_ln(rng, prefix, C)

    def fetch(part: Part) -> dict[str, np.ndarray]:
        if part in ("embed", "head"):
            return random_ends(part, seed, V, C)
        rng = layer_rng(seed, part)

        def u(lo, hi, n=C):
            return rng.uniform(lo, hi, n).astype(np.float32)

        out = {**ln(rng, "ln1"), **ln(rng, "ln2")}
        for q in "rwkvag":
            out[f"att.x_{q}"] = u(0.0, 1.0)
        # slow channels first: w0 from about -6.5 (w ~ 0.999) to 1.5 (w ~ 0.6), per-layer curvature
        ramp = np.linspace(0.0, 1.0, C, dtype=np.float32) ** np.float32(rng.uniform(0.7, 1.3))
        out["att.w0"] = (-6.5 + 8.0 * ramp + normal(rng, C, 0.3)).astype(np.float32)
        out["att.w1"] = normal(rng, (C, Dw), C ** -0.5)
        out["att.w2"] = normal(rng, (Dw, C), 0.5 * Dw ** -0.5)
        out["att.a0"] = u(-1.0, 1.0)
        out["att.a1"] = normal(rng, (C, Da), C ** -0.5)
        out["att.a2"] = normal(rng, (Da, C), Da ** -0.5)
        if part != 0:
            out["att.v0"] = normal(rng, C, 0.3, mean=1.0)
            out["att.v1"] = normal(rng, (C, Dv), C ** -0.5)
            out["att.v2"] = normal(rng, (Dv, C), Dv ** -0.5)
        out["att.g1"] = normal(rng, (C, Dg), C ** -0.5)
        out["att.g2"] = normal(rng, (Dg, C), 1.5 * Dg ** -0.5)
        out["att.k_k"] = u(0.6, 1.1)
        out["att.k_a"] = u(0.7, 1.3)
        out["att.r_k"] = normal(rng, (C // head_size, head_size), 0.1, mean=-0.04)
        for k in ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight"):
            out[k] = normal(rng, (C, C), C ** -0.5)
        out["att.ln_x.weight"] = u(0.3, 1.2)
        out["att.ln_x.bias"] = normal(rng, C, 0.1)
        out["ffn.x_k"] = u(0.0, 1.0)
        out["ffn.key.weight"] = normal(rng, (F, C), C ** -0.5)
        out["ffn.value.weight"] = normal(rng, (C, F), F ** -0.5)
        return {k: out[k] for k in _part_keys(part)}

    return Weights7(dims, fetch, f"<random rwkv7 seed={seed}>")
