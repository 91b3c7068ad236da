"""RWKV-4 checkpoints (.pth, random) to one canonical, lazily loaded form.

The canonical form (`Weights`):
- tensors are float32 numpy arrays, named as in ChatRWKV (`emb.weight`, `blocks.{i}.att.key.weight`...);
- every `time_*` tensor is flattened to shape [C] (the .pth files store [1, 1, C]);
- `att.time_decay` holds **w = -exp(raw time_decay)**, the value the graph uses. This is the rwkv.cpp
  convention; a .pth stores the raw value and `load_pth` converts it. Storing w (not the raw value)
  makes a .bin converted from a .pth load bit-identical to the .pth itself, which log(-w) would not;
- Linear weights are [out, in].

Access is per part, so a big model is never held twice: `embed()` -> {emb.weight, ln0.weight,
ln0.bias}, `layer(i)` -> the block's tensors keyed without the `blocks.{i}.` prefix (`ln1.weight`,
`att.time_decay`, ...), `head()` -> {ln_out.weight, ln_out.bias, head.weight}. Each call builds the
part afresh from its source (a memory-mapped state dict, a file offset table, or a per-part seeded
random generator), so the caller decides what stays in memory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable

import numpy as np

from rwkv2rknn.errors import UserError
from rwkv2rknn.families.parts import Part, PartedWeights, file_name, layer_rng, random_ends, random_ln, random_normal
from rwkv2rknn.families.pth import read_state_dict, write_state_dict

EMBED_KEYS = ("emb.weight", "ln0.weight", "ln0.bias")
HEAD_KEYS = ("ln_out.weight", "ln_out.bias", "head.weight")
LAYER_KEYS = (
    "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
    "att.time_decay", "att.time_first", "att.time_mix_k", "att.time_mix_v", "att.time_mix_r",
    "att.key.weight", "att.value.weight", "att.receptance.weight", "att.output.weight",
    "ffn.time_mix_k", "ffn.time_mix_r",
    "ffn.key.weight", "ffn.value.weight", "ffn.receptance.weight",
)


def _part_keys(part: Part) -> tuple[str, ...]:
    return EMBED_KEYS if part == "embed" else HEAD_KEYS if part == "head" else LAYER_KEYS


# tensors only later versions have: ln_x (5, 6, 7), time_faaaa (5, 6), time_maa_x (6), x_r (7)
_LATER = ("att.time_faaaa", "att.ln_x.weight", "att.x_r", "att.time_maa_x")


def detect(keys: Iterable[str]) -> bool:
    """An RWKV-4 state dict: time_decay and time_first, and none of the later versions' tensors."""
    keys = set(keys)
    later = any(k.endswith(_LATER) for k in keys)
    return "blocks.0.att.time_decay" in keys and "blocks.0.att.time_first" in keys and not later


def canonical_shapes(n_layer: int, n_embd: int, n_vocab: int, n_ffn: int) -> dict[str, tuple[int, ...]]:
    """Canonical shape of every tensor, keyed by checkpoint-file name."""
    C, V, F = n_embd, n_vocab, n_ffn
    shapes = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
              "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)}
    per_layer = {
        "ln1.weight": (C,), "ln1.bias": (C,), "ln2.weight": (C,), "ln2.bias": (C,),
        "att.time_decay": (C,), "att.time_first": (C,), "att.time_mix_k": (C,), "att.time_mix_v": (C,),
        "att.time_mix_r": (C,), "att.key.weight": (C, C), "att.value.weight": (C, C),
        "att.receptance.weight": (C, C), "att.output.weight": (C, C),
        "ffn.time_mix_k": (C,), "ffn.time_mix_r": (C,), "ffn.key.weight": (F, C),
        "ffn.value.weight": (C, F), "ffn.receptance.weight": (C, C),
    }
    for i in range(n_layer):
        for k, s in per_layer.items():
            shapes[f"blocks.{i}.{k}"] = s
    return shapes


class Weights(PartedWeights):
    """RWKV-4 weights in canonical form (see the module docstring), fetched part by part."""

    def __init__(self, n_layer: int, n_embd: int, n_vocab: int, n_ffn: int,
                 fetch: Callable[[Part], dict[str, np.ndarray]], source: str = "<memory>"):
        super().__init__(n_layer, fetch, source)
        self.n_embd, self.n_vocab, self.n_ffn = n_embd, n_vocab, n_ffn

    def __repr__(self) -> str:
        return (f"Weights(n_layer={self.n_layer}, n_embd={self.n_embd}, n_vocab={self.n_vocab}, "
                f"n_ffn={self.n_ffn}, source={self.source!r})")

    def decay(self, i: int) -> np.ndarray:
        """w = -exp(time_decay) of layer i, as the graph uses it (what the canonical form stores)."""
        return self.layer(i)["att.time_decay"]

    def _keys(self, part: Part):
        return _part_keys(part)

    def _like(self, fetch) -> Weights:
        return Weights(self.n_layer, self.n_embd, self.n_vocab, self.n_ffn, fetch, self.source)


def check_shapes(shapes: dict[str, tuple[int, ...]], source: str) -> tuple[int, int, int, int]:
    """Infer (n_layer, n_embd, n_vocab, n_ffn) and check every tensor is present and well shaped."""
    fix = "the file is damaged or not an RWKV-4 checkpoint; re-download or re-convert it"
    later = sorted(k for k in shapes if k.endswith(_LATER))
    if later:
        raise UserError(f"{source}: not an RWKV-4 checkpoint (it has {later[0]}, a tensor of a later RWKV "
                        "version); `rwkv2rknn export` tells the version from the tensor names")
    if "emb.weight" not in shapes or len(shapes["emb.weight"]) != 2:
        raise UserError(f"{source}: no 2-D tensor emb.weight; {fix}")
    V, C = shapes["emb.weight"]
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not layers:
        raise UserError(f"{source}: no blocks.N.* tensors; {fix}")
    L = max(layers) + 1
    F = shapes.get("blocks.0.ffn.key.weight", (4 * C,))[0]
    for name, want in canonical_shapes(L, C, V, F).items():
        if name not in shapes:
            raise UserError(f"{source}: tensor {name} is missing; {fix}")
        got = shapes[name]
        ok = got == want or (len(want) == 1 and int(np.prod(got)) == want[0] and all(d == 1 for d in got[:-1]))
        if not ok:
            raise UserError(f"{source}: tensor {name} has shape {list(got)}, expected {list(want)} "
                            f"(n_embd={C} from emb.weight); {fix}")
    return L, C, V, F


def fetcher(get: Callable[[str], np.ndarray], raw_decay: bool) -> Callable[[Part], dict[str, np.ndarray]]:
    """Turn a file-named getter into a part fetcher that returns canonical float32 arrays.

    `raw_decay`: time_decay holds the raw .pth value (converted to -exp(.)) rather than w (rwkv.cpp files)."""

    def fetch(part: Part) -> dict[str, np.ndarray]:
        out = {}
        for key in _part_keys(part):
            a = np.asarray(get(file_name(part, key)), dtype=np.float32)
            if a.ndim != 2:  # time_* are [1, 1, C] in .pth files
                a = a.reshape(-1)
            if key == "att.time_decay" and raw_decay:
                a = -np.exp(a)
            out[key] = a
        return out

    return fetch


def from_state_dict(get: Callable[[str], np.ndarray], shapes: dict[str, tuple[int, ...]], source: str,
                    raw_decay: bool = True) -> Weights:
    """Weights from a state dict's getter and shapes (raw time_decay, as .pth files store it, unless told)."""
    dims = check_shapes(shapes, source)
    return Weights(*dims, fetcher(get, raw_decay), source)


def from_tensors(tensors: dict[str, np.ndarray], source: str = "<memory>", raw_decay: bool = False) -> Weights:
    """Weights from a dict of file-named arrays (time_* may be [1,1,C] or [C]).

    `raw_decay`: time_decay holds the raw .pth value (converted to -exp(.)) rather than w.
    """
    shapes = {k: tuple(np.shape(v)) for k, v in tensors.items()}
    return from_state_dict(lambda name: np.asarray(tensors[name]), shapes, source, raw_decay)


def load_pth(path: str | os.PathLike) -> Weights:
    """Read a ChatRWKV / BlinkDL torch state dict (memory-mapped when the format allows)."""
    get, shapes = read_state_dict(path)
    return from_state_dict(get, shapes, str(path), raw_decay=True)


def save_pth(weights: Weights, path: str | os.PathLike) -> None:
    """Write a ChatRWKV-style .pth (time_* as [1,1,C], raw time_decay = log(-w)); for tests."""
    def items():
        for name, a in weights.tensors():
            if name.endswith("att.time_decay"):
                a = np.log(-a.astype(np.float64)).astype(np.float32)
            if ".time_" in name:
                a = a.reshape(1, 1, -1)
            yield name, a

    write_state_dict(items(), path)


def random_weights(layers: int, embd: int, vocab: int, ffn: int | None = None, seed: int = 0) -> Weights:
    """Random RWKV-4 weights at realistic scales, generated per part from a per-part seed.

    LN gamma/beta are deliberately not 1/0 (onnx-simplifier would drop a trivial Mul/Add and the
    published structure would not appear); decays span slow to fast channels like a trained model.
    """
    if min(layers, embd, vocab) < 1 or (ffn is not None and ffn < 1):
        raise UserError("random model sizes must be positive integers; fix --layers/--embd/--vocab/--ffn")
    C, V, F = embd, vocab, ffn or 4 * embd

    def fetch(part: Part) -> dict[str, np.ndarray]:
        if part in ("embed", "head"):
            return random_ends(part, seed, V, C)
        rng = layer_rng(seed, part)

        def u(lo, hi):
            return rng.uniform(lo, hi, C).astype(np.float32)

        out = {**random_ln(rng, "ln1", C), **random_ln(rng, "ln2", C)}
        # raw decay in [-3, 1.5] -> w = -exp(.) in about [-4.5, -0.05]
        out["att.time_decay"] = -np.exp(u(-3.0, 1.5))
        out["att.time_first"] = u(-1.0, 1.0)
        for k in ("att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "ffn.time_mix_k", "ffn.time_mix_r"):
            out[k] = u(0.05, 0.95)
        for k in ("att.key.weight", "att.value.weight", "att.receptance.weight", "att.output.weight",
                  "ffn.receptance.weight"):
            out[k] = random_normal(rng, (C, C), C ** -0.5)
        out["ffn.key.weight"] = random_normal(rng, (F, C), C ** -0.5)
        out["ffn.value.weight"] = random_normal(rng, (C, F), F ** -0.5)
        return out

    return Weights(layers, C, V, F, fetch, f"<random seed={seed}>")
