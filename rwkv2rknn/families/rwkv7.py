"""RWKV-7 ("x070", Goose): checkpoint reading, a numpy RNN reference, and per-layer ONNX graphs.

Canonical form (`Weights7`), fetched part by part like the RWKV-4 `Weights`:
- float32 numpy arrays named as in the .pth without the `blocks.{i}.` prefix;
- time-mix and other per-channel vectors (`att.x_r` ... `att.x_g`, `att.w0`, `att.a0`, `att.v0`,
  `att.k_k`, `att.k_a`, `ffn.x_k`; stored [1, 1, C]) are flattened to [C]; `att.r_k` stays [H, N];
- LoRA matrices stay as stored (`w1` [C, Dw], `w2` [Dw, C], ...: the input side first), Linear
  weights are [out, in];
- layer 0 has no `att.v0/v1/v2` (the reference ignores them there; a checkpoint may carry them).

Graphs (opset 16, IR 8, static shapes, no batch dimension), per file of a model directory:
| file | inputs | outputs |
|---|---|---|
| embed.onnx | `token` int32 [1] | `output` [C] |
| mixing_0.onnx | `input` [C], `state_in` [2, C], `wkv_in` [H, N, N] | `output`, `state_out`, `wkv_out`, `v_first` [C] |
| mixing_i.onnx (i > 0) | the same + `v_first` [C] | `output`, `state_out`, `wkv_out` |
| head.onnx | `x` [C] | `output` [V] |
`state_in` rows: 0 = ffn shift (LN2 output of the previous token), 1 = att shift (LN1 output), the
order of the first two RWKV-4 rows. `wkv_in` is the matrix state S, per head [value, key].
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx

from rwkv2rknn.checkpoints import PartedWeights, _check_file, _import_torch, random_ends, random_ln, random_normal
from rwkv2rknn.errors import UserError
from rwkv2rknn.export import DTYPES, WEIGHTS_AS, _GraphBuilder, build_embed, build_head, write_graphs
from rwkv2rknn.fsio import atomic_path

LN_EPS = 1e-5  # LayerNorm (ln0, ln1, ln2, ln_out)
GN_EPS = 64e-5  # GroupNorm ln_x over each head
L2_EPS = 1e-12  # kk = x / max(|x|, eps), per head
DECAY_SCALE = 0.606531  # w = exp(-DECAY_SCALE * sigmoid(.)); exp(-0.5) as the reference rounds it
HEAD_SIZE = 64

Part = str | int

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


def _file_name(part: Part, key: str) -> str:
    if part == "embed":
        return key if key == "emb.weight" else f"blocks.0.{key}"
    if part == "head":
        return key
    return f"blocks.{part}.{key}"


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

    def _file_name(self, part: Part, key: str) -> str:
        return _file_name(part, key)

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
        if name not in shapes:
            raise UserError(f"{source}: tensor {name} is missing; {fix}")
        if len(shapes[name]) != ndim:
            raise UserError(f"{source}: tensor {name} has shape {list(shapes[name])}, expected {ndim} "
                            f"dimensions; {fix}")
        return tuple(shapes[name])

    V, C = need("emb.weight", 2)
    H, N = need("blocks.0.att.r_k", 2)
    if H * N != C:
        raise UserError(f"{source}: tensor blocks.0.att.r_k has shape {[H, N]}, but heads x head size must "
                        f"equal n_embd={C} (from emb.weight); {fix}")
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    L = max(layers) + 1
    dims = {"L": L, "C": C, "V": V, "H": H, "N": N,
            "Dw": need("blocks.0.att.w1", 2)[1], "Da": need("blocks.0.att.a1", 2)[1],
            "Dg": need("blocks.0.att.g1", 2)[1], "F": need("blocks.0.ffn.key.weight", 2)[0]}
    if L > 1:
        dims["Dv"] = need("blocks.1.att.v1", 2)[1]
    else:  # one layer: the value LoRA is unused; take its rank from layer 0 when stored
        dims["Dv"] = shapes["blocks.0.att.v1"][-1] if len(shapes.get("blocks.0.att.v1", ())) == 2 else 0

    for part in ["embed", *range(L), "head"]:
        for key in _part_keys(part):
            name = _file_name(part, key)
            if name not in shapes:
                raise UserError(f"{source}: tensor {name} is missing; {fix}")
            want = _canonical_shape(_symbolic(part, key), dims)
            got = tuple(shapes[name])
            vector_ok = len(want) == 1 and int(np.prod(got)) == want[0] and all(d == 1 for d in got[:-1])
            if got != want and not vector_ok:
                raise UserError(f"{source}: tensor {name} has shape {list(got)}, expected {list(want)} "
                                f"(n_embd={C}, {H} heads of {N}); {fix}")

    def fetch(part: Part) -> dict[str, np.ndarray]:
        return {key: np.asarray(get(_file_name(part, key)), dtype=np.float32)
                .reshape(_canonical_shape(_symbolic(part, key), dims)) for key in _part_keys(part)}

    return Weights7(dims, fetch, source)


def from_tensors7(tensors: dict[str, np.ndarray], source: str = "<memory>") -> Weights7:
    """Weights7 from a dict of file-named arrays (vectors may be [1, 1, C] or [C])."""
    return weights_from_state_dict(lambda name: tensors[name], {k: tuple(np.shape(v)) for k, v in tensors.items()},
                                   source)


# -- .pth ---------------------------------------------------------------------------------------------

def load_pth7(path: str | os.PathLike) -> Weights7:
    """Read an RWKV-7 torch state dict (memory-mapped when the format allows; bf16/fp16 become fp32)."""
    path = Path(path)
    _check_file(path)
    torch = _import_torch()
    sd, errors = None, []
    for kwargs in ({"mmap": True}, {}):  # old non-zip files cannot be mapped
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
            break
        except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
            first = (str(exc).splitlines() or [""])[0].split(". ")[0][:160]
            errors.append(f"{type(exc).__name__}: {first}")
    if sd is None:
        raise UserError(f"{path}: cannot read as a torch checkpoint ({errors[-1]}); "
                        "the file is damaged, truncated or not a .pth state dict")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a plain state dict of tensors; save the model's state_dict()")

    def get(name: str) -> np.ndarray:
        return sd[name].detach().to(torch.float32).numpy()  # bfloat16 has no numpy type

    return weights_from_state_dict(get, {k: tuple(v.shape) for k, v in sd.items()}, str(path))


def save_pth7(weights: Weights7, path: str | os.PathLike) -> None:
    """Write the .pth layout the `rwkv` package reads (vectors as [1, 1, C], r_k [H, N]); for tests."""
    torch = _import_torch()
    sd = {}
    for name, a in weights.tensors():
        key = name.split(".", 2)[2] if name.startswith("blocks.") else name
        if key in VECTOR_KEYS:
            a = a.reshape(1, 1, -1)
        sd[name] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    with atomic_path(path) as tmp:
        torch.save(sd, tmp)


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
        rng = np.random.default_rng([seed, 2, part])

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


# -- numpy reference ------------------------------------------------------------------------------------

def _norm_last(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    d = x - mu
    return d / np.sqrt((d * d).mean(axis=-1, keepdims=True) + eps) * g + b


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class RefModel7:
    """RWKV-7 in RNN mode from `Weights7`, computing in `dtype` (float64 by default).

    State: one (shift [2, C], wkv [H, N, N]) pair per layer, the layout of the mixing graphs
    (shift row 0 = ffn shift, row 1 = att shift; wkv per head [value, key]).
    """

    def __init__(self, weights: Weights7, dtype=np.float64):
        self.dtype = dtype

        def cast(d):
            return {k: np.asarray(v, dtype=dtype) for k, v in d.items()}

        self.embed = cast(weights.embed())
        self.layers = [cast(weights.layer(i)) for i in range(weights.n_layer)]
        self.head = cast(weights.head())
        self.n_layer, self.n_embd, self.n_vocab = weights.n_layer, weights.n_embd, weights.n_vocab
        self.n_head, self.head_size = weights.n_head, weights.head_size

    def init_state(self) -> list[tuple[np.ndarray, np.ndarray]]:
        H, N = self.n_head, self.head_size
        return [(np.zeros((2, self.n_embd), self.dtype), np.zeros((H, N, N), self.dtype))
                for _ in range(self.n_layer)]

    def embedding(self, token: int) -> np.ndarray:
        e = self.embed
        return _norm_last(e["emb.weight"][token], e["ln0.weight"], e["ln0.bias"], LN_EPS)

    def block(self, i: int, x: np.ndarray, state: tuple[np.ndarray, np.ndarray], v_first: np.ndarray | None):
        """One layer: (x, (shift, wkv), v_first) -> (x, (shift, wkv), v_first)."""
        w = self.layers[i]
        H, N = self.n_head, self.head_size
        shift, S = state
        c_prev, h_prev = shift[0], shift[1]

        h = _norm_last(x, w["ln1.weight"], w["ln1.bias"], LN_EPS)
        d = h_prev - h
        m = {q: h + d * w[f"att.x_{q}"] for q in "rwkvag"}
        r = w["att.receptance.weight"] @ m["r"]
        k = w["att.key.weight"] @ m["k"]
        v = w["att.value.weight"] @ m["v"]
        w_lora = np.tanh(m["w"] @ w["att.w1"]) @ w["att.w2"]
        a = _sigmoid(w["att.a0"] + (m["a"] @ w["att.a1"]) @ w["att.a2"])
        g = _sigmoid(m["g"] @ w["att.g1"]) @ w["att.g2"]

        kk = (k * w["att.k_k"]).reshape(H, N)
        kk = kk / np.maximum(np.sqrt((kk * kk).sum(axis=-1, keepdims=True)), L2_EPS)
        k = k * (1 + (a - 1) * w["att.k_a"])
        if i == 0:
            v_first = v
        else:
            v = v + (v_first - v) * _sigmoid(w["att.v0"] + (m["v"] @ w["att.v1"]) @ w["att.v2"])
        decay = np.exp(-DECAY_SCALE * _sigmoid(w["att.w0"] + w_lora))

        # S[h] = S[h] diag(w) - (S[h] kk) (kk a)^T + v k^T, with S[h] indexed [value, key]
        S = (S * decay.reshape(H, 1, N)
             - (S @ kk[:, :, None]) * (kk * a.reshape(H, N))[:, None, :]
             + v.reshape(H, N, 1) * k.reshape(H, 1, N))
        y = (S @ r.reshape(H, N, 1))[:, :, 0]
        y = _norm_last(y, w["att.ln_x.weight"].reshape(H, N), w["att.ln_x.bias"].reshape(H, N), GN_EPS)
        bonus = (r * k * w["att.r_k"].reshape(-1)).reshape(H, N).sum(axis=-1, keepdims=True)
        y = (y + bonus * v.reshape(H, N)).reshape(-1)
        x = x + w["att.output.weight"] @ (y * g)

        c = _norm_last(x, w["ln2.weight"], w["ln2.bias"], LN_EPS)
        hid = np.maximum(w["ffn.key.weight"] @ (c + (c_prev - c) * w["ffn.x_k"]), 0)
        x = x + w["ffn.value.weight"] @ (hid * hid)
        return x, (np.stack([c, h]), S), v_first

    def logits(self, x: np.ndarray) -> np.ndarray:
        hd = self.head
        return hd["head.weight"] @ _norm_last(x, hd["ln_out.weight"], hd["ln_out.bias"], LN_EPS)

    def forward(self, token: int, state: list | None = None) -> tuple[np.ndarray, list]:
        """One token: (logits [V], the new state); the state passed in is not modified."""
        state = self.init_state() if state is None else state
        x, v_first, new = self.embedding(int(token)), None, []
        for i in range(self.n_layer):
            x, st, v_first = self.block(i, x, state[i], v_first)
            new.append(st)
        return self.logits(x), new

    def run(self, tokens: Iterable[int]) -> np.ndarray:
        """Logits [T, V] of a token sequence from the zero state."""
        state, out = self.init_state(), []
        for t in tokens:
            logits, state = self.forward(t, state)
            out.append(logits)
        return np.stack(out)


# -- ONNX graphs ----------------------------------------------------------------------------------------

def _check_options(dtype: str, weights_as: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; use float16 or float32")
    if weights_as not in WEIGHTS_AS:
        raise UserError(f"weights_as {weights_as!r} is not supported; use constants or initializers")


def build_embed7(part: dict[str, np.ndarray], dtype: str = "float16", weights_as: str = "constants") -> onnx.ModelProto:
    """`token` int32 [1] -> LN0(emb[token]) -> `output` [C]: the same graph as RWKV-4's."""
    _check_options(dtype, weights_as)
    return build_embed(part, dtype, weights_as)


def build_head7(part: dict[str, np.ndarray], dtype: str = "float16", weights_as: str = "constants") -> onnx.ModelProto:
    """`x` [C] -> head(LN_out(x)) -> `output` [V]: the same graph as RWKV-4's."""
    _check_options(dtype, weights_as)
    return build_head(part, dtype, weights_as)


def build_mixing7(part: dict[str, np.ndarray], index: int = 0, dtype: str = "float16",
                  weights_as: str = "constants") -> onnx.ModelProto:
    """One RWKV-7 block in RNN mode (I/O in the module docstring).

    Constant-weight projections are MatMul(W[out, in], x[in]); the LoRA matrices enter transposed so
    they are weight-first too. The products with the matrix state are MatMul([H, N, N], [H, N, 1]);
    outer products are broadcast Muls. The only Exp is the decay, whose argument is -0.606531 * sigmoid.
    """
    _check_options(dtype, weights_as)
    b = _GraphBuilder(dtype, weights_as)
    b._names.update({"input", "state_in", "wkv_in", "v_first"} if index else {"input", "state_in", "wkv_in"})
    C = part["ln1.weight"].shape[0]
    H, N = part["att.r_k"].shape
    f32 = np.float32
    consts = b.ln_constants()
    gn_consts = {"two": consts["two"], "eps": b.weight("gn_eps", np.array(GN_EPS))}
    # fp16 cannot hold 1e-12: use its smallest subnormal (only a zero vector tells them apart)
    l2_eps = max(L2_EPS, float(np.finfo(np.float16).smallest_subnormal)) if b.fp16 else L2_EPS

    def shape(name, dims):
        return b.index(name, dims)

    hn, col, row, flat = shape("shape_hn", [H, N]), shape("shape_col", [H, N, 1]), \
        shape("shape_row", [H, 1, N]), shape("shape_flat", [-1])
    last_axis = b.index("axes_last", [-1])

    def const(key: str, array: np.ndarray | None = None) -> str:
        return b.weight(key, part[key] if array is None else array)

    def linear(key: str, x: str, out: str, transpose: bool = False) -> str:
        w = part[key].T if transpose else part[key]
        return b.op("MatMul", [b.weight(key, w), x], out)

    def lora(x: str, first: str, second: str, name: str, mid_op: str | None = None) -> str:
        """x @ first @ second as weight-first MatMuls, with an optional activation in between."""
        t = linear(first, x, f"{name}.down", transpose=True)
        if mid_op:
            t = b.op(mid_op, [t], f"{name}.{mid_op.lower()}")
        return linear(second, t, f"{name}.up", transpose=True)

    s_ffn = b.op("Gather", ["state_in", b.index("row_0", 0)], "ffn_shift", axis=0)
    s_att = b.op("Gather", ["state_in", b.index("row_1", 1)], "att_shift", axis=0)

    # time mixing
    h = b.layer_norm("input", "ln1", part["ln1.weight"], part["ln1.bias"], consts)
    d = b.op("Sub", [s_att, h], "att.delta")
    m = {q: b.op("Add", [h, b.op("Mul", [d, const(f"att.x_{q}")])], f"att.m_{q}") for q in "rwkvag"}
    r = linear("att.receptance.weight", m["r"], "att.r")
    k = linear("att.key.weight", m["k"], "att.k")
    v = linear("att.value.weight", m["v"], "v_first" if index == 0 else "att.v_lin")
    w_lora = lora(m["w"], "att.w1", "att.w2", "att.w_lora", "Tanh")
    a = b.op("Sigmoid", [b.op("Add", [const("att.a0"), lora(m["a"], "att.a1", "att.a2", "att.a_lora")])], "att.a")
    g = lora(m["g"], "att.g1", "att.g2", "att.g", "Sigmoid")

    # kk = per-head L2 normalisation of k * k_k
    kkr = b.op("Reshape", [b.op("Mul", [k, const("att.k_k")]), hn], "att.kk_raw")
    ssq = b.op("ReduceSum", [b.op("Mul", [kkr, kkr]), last_axis], "att.kk_sumsq", keepdims=1)
    nrm = b.op("Max", [b.op("Sqrt", [ssq]), b.weight("l2_eps", np.array(l2_eps))], "att.kk_norm")
    kk = b.op("Div", [kkr, nrm], "att.kk")  # [H, N]
    # k * (1 + (a - 1) * k_a) = k * ((1 - k_a) + a * k_a)
    k_a = part["att.k_a"].astype(f32)
    kscale = b.op("Add", [const("att.one_minus_k_a", f32(1) - k_a), b.op("Mul", [a, const("att.k_a")])])
    k = b.op("Mul", [k, kscale], "att.k_mod")
    if index:
        gate = b.op("Sigmoid", [b.op("Add", [const("att.v0"), lora(m["v"], "att.v1", "att.v2", "att.v_lora")])],
                    "att.v_gate")
        v = b.op("Add", [v, b.op("Mul", [b.op("Sub", ["v_first", v]), gate])], "att.v")
    decay_arg = b.op("Mul", [b.op("Sigmoid", [b.op("Add", [const("att.w0"), w_lora])]),
                             b.weight("decay_scale", np.array(-DECAY_SCALE))], "att.decay_log")  # <= 0
    decay = b.op("Exp", [decay_arg], "att.decay")

    # S = S * w[key] - (S kk) (kk a)^T + v k^T ; y = S r
    S = "wkv_in"
    s_kk = b.op("MatMul", [S, b.op("Reshape", [kk, col], "att.kk_col")], "att.s_kk")  # [H, N, 1]
    kka = b.op("Reshape", [b.op("Mul", [kk, b.op("Reshape", [a, hn])]), row], "att.kka_row")
    s_dec = b.op("Mul", [S, b.op("Reshape", [decay, row], "att.decay_row")], "att.s_decayed")
    s_rm = b.op("Sub", [s_dec, b.op("Mul", [s_kk, kka])], "att.s_removed")
    vk = b.op("Mul", [b.op("Reshape", [v, col], "att.v_col"), b.op("Reshape", [k, row], "att.k_row")], "att.vk")
    S_new = b.op("Add", [s_rm, vk], "wkv_out")
    y = b.op("Reshape", [b.op("MatMul", [S_new, b.op("Reshape", [r, col], "att.r_col")]), hn], "att.y")
    y = b.layer_norm(y, "att.ln_x", part["att.ln_x.weight"].reshape(H, N), part["att.ln_x.bias"].reshape(H, N),
                     gn_consts)
    rk = b.op("Mul", [b.op("Mul", [r, k]), const("att.r_k", part["att.r_k"].reshape(-1))])
    bonus = b.op("ReduceSum", [b.op("Reshape", [rk, hn]), last_axis], "att.bonus", keepdims=1)  # [H, 1]
    y = b.op("Add", [y, b.op("Mul", [bonus, b.op("Reshape", [v, hn])])], "att.y_bonus")
    y = b.op("Mul", [b.op("Reshape", [y, flat]), g], "att.y_gated")
    x1 = b.op("Add", ["input", linear("att.output.weight", y, "att.out")], "x1")

    # channel mixing
    c = b.layer_norm(x1, "ln2", part["ln2.weight"], part["ln2.bias"], consts)
    fk = b.op("Add", [c, b.op("Mul", [b.op("Sub", [s_ffn, c]), const("ffn.x_k")])], "ffn.m_k")
    hid = b.op("Relu", [linear("ffn.key.weight", fk, "ffn.k")], "ffn.relu")
    hid = b.op("Mul", [hid, hid], "ffn.sq")
    b.op("Add", [x1, linear("ffn.value.weight", hid, "ffn.v")], "output")

    shape_row = b.index("state_row_shape", [1, -1])
    rows = [b.op("Reshape", [t, shape_row], f"state_row_{i}") for i, t in enumerate((c, h))]
    b.op("Concat", rows, "state_out", axis=0)

    inputs = [b.value("input", [C]), b.value("state_in", [2, C]), b.value("wkv_in", [H, N, N])]
    outputs = [b.value("output", [C]), b.value("state_out", [2, C]), b.value("wkv_out", [H, N, N])]
    (inputs if index else outputs).append(b.value("v_first", [C]))
    return b.model(f"mixing_{index}", inputs, outputs)


def export_model7(weights: Weights7, out_dir: str | os.PathLike, dtype: str = "float16",
                  weights_as: str = "constants", progress: bool = True, force: bool = False) -> list[Path]:
    """Write embed.onnx, mixing_0..L-1.onnx and head.onnx into `out_dir` (all or nothing).

    One part is fetched, built, written and dropped at a time: peak memory is about one layer's
    weights (or the embedding) a few times over.
    """
    _check_options(dtype, weights_as)
    return write_graphs(weights, out_dir, (build_embed7, build_mixing7, build_head7), dtype, weights_as, force,
                        progress)


# -- the family: what the rest of rwkv2rknn asks about RWKV-7 ------------------------------------------------

def _random_family(layers, embd, vocab, seed=0, ffn=None):
    if ffn is not None:
        raise UserError("--ffn is not used by RWKV-7 random weights (the FFN is 4 x C); leave it out")
    return random_weights7(layers, embd, vocab, seed=seed)


def _export_family(weights, out_dir, dtype="float16", weights_as="constants", force=False, progress=True):
    return export_model7(weights, out_dir, dtype=dtype, weights_as=weights_as, force=force, progress=progress)


def _family():
    from rwkv2rknn.families import Family, StateSpec

    state = {"input": 1, "state_in": 2, "wkv_in": 3}
    out = {"output": 1, "state_out": 2, "wkv_out": 3}
    return Family(
        name="rwkv7", label="RWKV-7",
        layer0_inputs=state, layer0_outputs={**out, "v_first": 1},
        layer_inputs={**state, "v_first": 1}, layer_outputs=out,
        states=(StateSpec("state_in", "state_out"), StateSpec("wkv_in", "wkv_out")),
        extra_links=((0, "v_first", "v_first"),),
        # the matrix-state update: the decay's Exp and everything after it up to the next projection
        precision_seeds=("Exp", "Log", "Max"),
        load_checkpoint=load_pth7, random_weights=_random_family, export=_export_family, detect_keys=detect,
        notes="state_in [2, C]: ffn shift, att shift; wkv_in [H, N, N]: the matrix state; v_first [C] from layer 0",
    )


FAMILY = _family()
