"""RWKV-4 checkpoint readers (.pth, rwkv.cpp .bin, random) to one canonical, lazily loaded form.

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
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from rwkv2rknn.errors import UserError
from rwkv2rknn.fsio import atomic_path

BIN_MAGIC = 0x67676D66
BIN_VERSIONS = (100, 101)  # rwkv.cpp RWKV_FILE_VERSION_MIN .. MAX
BIN_WRITE_VERSION = 101
_BIN_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2")}
_BIN_DTYPE_CODES = {"float32": 0, "float16": 1}

EMBED_KEYS = ("emb.weight", "ln0.weight", "ln0.bias")
HEAD_KEYS = ("ln_out.weight", "ln_out.bias", "head.weight")
LAYER_KEYS = (
    "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
    "att.time_decay", "att.time_first", "att.time_mix_k", "att.time_mix_v", "att.time_mix_r",
    "att.key.weight", "att.value.weight", "att.receptance.weight", "att.output.weight",
    "ffn.time_mix_k", "ffn.time_mix_r",
    "ffn.key.weight", "ffn.value.weight", "ffn.receptance.weight",
)

# Parts are fetched as a whole: "embed", "head", or a layer index.
Part = str | int


def _file_name(part: Part, key: str) -> str:
    """The checkpoint-file name of a canonical key of a part."""
    if part == "embed":
        return key if key == "emb.weight" else f"blocks.0.{key}"
    if part == "head":
        return key
    return f"blocks.{part}.{key}"


def _part_keys(part: Part) -> tuple[str, ...]:
    return EMBED_KEYS if part == "embed" else HEAD_KEYS if part == "head" else LAYER_KEYS


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


class PartedWeights:
    """Weights fetched part by part ("embed", a layer index, "head"), so a big model is never held twice.

    Subclasses (one per RWKV version) name each part's tensors (`_keys`, `_file_name`) and how to make a
    copy of themselves around another fetch function (`_like`).
    """

    def __init__(self, n_layer: int, fetch: Callable[[Part], dict[str, np.ndarray]], source: str = "<memory>"):
        self.n_layer = n_layer
        self.source = source
        self._fetch = fetch

    def embed(self) -> dict[str, np.ndarray]:
        return self._fetch("embed")

    def layer(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.n_layer:
            raise IndexError(f"layer {i} out of range 0..{self.n_layer - 1}")
        return self._fetch(i)

    def head(self) -> dict[str, np.ndarray]:
        return self._fetch("head")

    def parts(self) -> Iterator[tuple[Part, dict[str, np.ndarray]]]:
        yield "embed", self.embed()
        for i in range(self.n_layer):
            yield i, self.layer(i)
        yield "head", self.head()

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every tensor as (checkpoint-file name, canonical array), one part in memory at a time."""
        for part, tensors in self.parts():
            for key in self._keys(part):
                yield self._file_name(part, key), tensors[key]

    def materialize(self):
        """An in-memory copy (for small models: tests, references)."""
        cache = dict(self.parts())
        return self._like(lambda part: dict(cache[part]))

    def _keys(self, part: Part):
        raise NotImplementedError

    def _file_name(self, part: Part, key: str) -> str:
        raise NotImplementedError

    def _like(self, fetch):
        raise NotImplementedError


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

    def _file_name(self, part: Part, key: str) -> str:
        return _file_name(part, key)

    def _like(self, fetch) -> Weights:
        return Weights(self.n_layer, self.n_embd, self.n_vocab, self.n_ffn, fetch, self.source)


def from_tensors(tensors: dict[str, np.ndarray], source: str = "<memory>", raw_decay: bool = False) -> Weights:
    """Weights from a dict of file-named arrays (time_* may be [1,1,C] or [C]).

    `raw_decay`: time_decay holds the raw .pth value (converted to -exp(.)) rather than w.
    """
    shapes = {k: tuple(np.shape(v)) for k, v in tensors.items()}
    dims = _check_shapes(shapes, source)
    return Weights(*dims, _fetcher(lambda name: np.asarray(tensors[name]), raw_decay), source)


# -- validation -------------------------------------------------------------------------------------

def looks_rwkv56(keys) -> bool:
    """Tensor names only RWKV-5/6 checkpoints have among the versions read here (RWKV-7 has ln_x too, so
    callers ask the RWKV-7 detector first)."""
    return any(k.endswith(("att.time_faaaa", "att.ln_x.weight")) for k in keys)


def _check_shapes(shapes: dict[str, tuple[int, ...]], source: str) -> tuple[int, int, int, int]:
    """Infer (n_layer, n_embd, n_vocab, n_ffn) and check every tensor is present and well shaped."""
    fix = "the file is damaged or not an RWKV-4 checkpoint; re-download or re-convert it"
    if looks_rwkv56(shapes):
        raise UserError(f"{source}: this is an RWKV-5/6 checkpoint; only RWKV-4 models are supported")
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


def _fetcher(get: Callable[[str], np.ndarray], raw_decay: bool) -> Callable[[Part], dict[str, np.ndarray]]:
    """Turn a file-named getter into a part fetcher that returns canonical float32 arrays."""

    def fetch(part: Part) -> dict[str, np.ndarray]:
        out = {}
        for key in _part_keys(part):
            a = np.asarray(get(_file_name(part, key)), dtype=np.float32)
            if a.ndim != 2:  # time_* are [1, 1, C] in .pth files
                a = a.reshape(-1)
            if key == "att.time_decay" and raw_decay:
                a = -np.exp(a)
            out[key] = a
        return out

    return fetch


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file; check the checkpoint path")
    if not path.is_file():
        raise UserError(f"{path}: not a file; name a .pth or .bin checkpoint")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty; re-download or re-convert the checkpoint")


# -- .pth ---------------------------------------------------------------------------------------------

def _import_torch():
    try:
        import torch
    except ImportError:
        raise UserError("reading .pth checkpoints needs PyTorch, which is not installed; "
                        "install torch (CPU build is enough), or convert the checkpoint on a PC") from None
    return torch


def pth_keys(path: str | os.PathLike) -> set[str]:
    """The tensor names of a torch state dict (memory-mapped: nothing is read but the index)."""
    path = Path(path)
    _check_file(path)
    torch = _import_torch()
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - old or damaged files: the reader gives the one-line error
        return set()
    return set(sd) if isinstance(sd, dict) else set()


def load_pth(path: str | os.PathLike) -> Weights:
    """Read a ChatRWKV / BlinkDL torch state dict (memory-mapped when the format allows)."""
    path = Path(path)
    _check_file(path)
    torch = _import_torch()
    sd = None
    errors = []
    # mmap keeps the tensors in the page cache instead of a private copy; old (non-zip)
    # files cannot be mapped, so fall back to a plain load.
    for kwargs in ({"mmap": True}, {}):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
            break
        except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
            first = str(exc).splitlines()[0] if str(exc) else ""
            # torch appends advice to load with weights_only=False: wrong for a damaged file, unsafe anyway
            first = first.split(". ")[0][:160]
            errors.append(f"{type(exc).__name__}: {first}")
    if sd is None:
        raise UserError(f"{path}: cannot read as a torch checkpoint ({errors[-1]}); "
                        "the file is damaged, truncated or not a .pth state dict")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a plain state dict of tensors; save the model's state_dict()")
    dims = _check_shapes({k: tuple(v.shape) for k, v in sd.items()}, str(path))

    def get(name: str) -> np.ndarray:
        # bfloat16 has no numpy type: convert on the torch side.
        return sd[name].detach().to(torch.float32).numpy()

    return Weights(*dims, _fetcher(get, raw_decay=True), str(path))


def save_pth(weights: Weights, path: str | os.PathLike) -> None:
    """Write a ChatRWKV-style .pth (time_* as [1,1,C], raw time_decay = log(-w)); for tests."""
    torch = _import_torch()
    sd = {}
    for name, a in weights.tensors():
        if name.endswith("att.time_decay"):
            a = np.log(-a.astype(np.float64)).astype(np.float32)
        if ".time_" in name:
            a = a.reshape(1, 1, -1)
        sd[name] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    with atomic_path(path) as tmp:
        torch.save(sd, tmp)


# -- rwkv.cpp .bin ------------------------------------------------------------------------------------

def _bin_index(path: Path) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int]], tuple[int, ...]]:
    """Scan tensor headers without reading data: name -> (dtype, PyTorch-order shape, data offset)."""
    size = path.stat().st_size
    fix = "re-convert the checkpoint with rwkv.cpp's convert_pytorch_to_ggml.py"
    index = {}
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            raise UserError(f"{path}: truncated header ({len(head)} bytes); {fix}")
        magic, version, n_vocab, n_embd, n_layer, data_type = struct.unpack("<6i", head)
        if magic != BIN_MAGIC:
            raise UserError(f"{path}: wrong magic 0x{magic & 0xFFFFFFFF:08x} (expected 0x{BIN_MAGIC:08x}); "
                            "not an rwkv.cpp model file")
        if version not in BIN_VERSIONS:
            raise UserError(f"{path}: rwkv.cpp file version {version} is not supported "
                            f"(known: {', '.join(map(str, BIN_VERSIONS))}); {fix}")
        if data_type not in _BIN_DTYPES:
            raise UserError(f"{path}: data type {data_type} is quantized; only fp32/fp16 files are "
                            "supported; convert the .pth to an fp16 or fp32 .bin instead")
        pos = 24
        while pos < size:
            hdr = f.read(12)
            if len(hdr) < 12:
                raise UserError(f"{path}: truncated tensor header at byte {pos}; {fix}")
            n_dims, key_len, dtype = struct.unpack("<3i", hdr)
            if not 1 <= n_dims <= 4 or not 0 < key_len <= 1024:
                raise UserError(f"{path}: corrupt tensor header at byte {pos} "
                                f"(dims={n_dims}, key length={key_len}); {fix}")
            raw = f.read(4 * n_dims + key_len)
            if len(raw) < 4 * n_dims + key_len:
                raise UserError(f"{path}: truncated tensor header at byte {pos}; {fix}")
            dims = struct.unpack(f"<{n_dims}i", raw[: 4 * n_dims])
            try:
                key = raw[4 * n_dims:].decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}: tensor name at byte {pos} is not UTF-8; {fix}") from None
            if dtype not in _BIN_DTYPES:
                raise UserError(f"{path}: tensor {key} has quantized data type {dtype}; only fp32/fp16 "
                                "files are supported; convert the .pth to an fp16 or fp32 .bin instead")
            if any(d <= 0 for d in dims):
                raise UserError(f"{path}: tensor {key} has bad dims {list(dims)}; {fix}")
            shape = tuple(reversed(dims))  # ggml stores ne0 (the innermost dim) first
            offset = f.tell()
            nbytes = int(np.prod(shape)) * _BIN_DTYPES[dtype].itemsize
            if offset + nbytes > size:
                raise UserError(f"{path}: truncated: tensor {key} needs {nbytes} bytes at byte {offset}, "
                                f"file has {size}; re-download or {fix}")
            index[key] = (_BIN_DTYPES[dtype], shape, offset)
            pos = offset + nbytes
            f.seek(pos)
    return index, (n_layer, n_embd, n_vocab)


def load_bin(path: str | os.PathLike) -> Weights:
    """Read an rwkv.cpp model file (fp32 or fp16 tensors; quantized files are refused)."""
    path = Path(path)
    _check_file(path)
    index, (n_layer, n_embd, n_vocab) = _bin_index(path)
    dims = _check_shapes({k: v[1] for k, v in index.items()}, str(path))
    if dims[:3] != (n_layer, n_embd, n_vocab):
        raise UserError(f"{path}: header says n_layer={n_layer}, n_embd={n_embd}, n_vocab={n_vocab} but the "
                        f"tensors give {dims[0]}, {dims[1]}, {dims[2]}; the file is damaged; re-convert it")

    def get(name: str) -> np.ndarray:
        dtype, shape, offset = index[name]
        return np.fromfile(path, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)

    return Weights(*dims, _fetcher(get, raw_decay=False), str(path))


def save_bin(weights: Weights, path: str | os.PathLike, dtype: str = "float32") -> None:
    """Write an rwkv.cpp model file: 2-D tensors in `dtype`, 1-D tensors fp32 (as rwkv.cpp does)."""
    if dtype not in _BIN_DTYPE_CODES:
        raise ValueError(f"dtype must be float32 or float16, not {dtype!r}")
    code = _BIN_DTYPE_CODES[dtype]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<6i", BIN_MAGIC, BIN_WRITE_VERSION, weights.n_vocab, weights.n_embd,
                            weights.n_layer, code))
        for name, a in weights.tensors():
            tcode = code if a.ndim == 2 else 0
            a = np.ascontiguousarray(a, dtype=_BIN_DTYPES[tcode])
            key = name.encode("utf-8")
            f.write(struct.pack("<3i", a.ndim, len(key), tcode))
            f.write(struct.pack(f"<{a.ndim}i", *reversed(a.shape)))
            f.write(key)
            f.write(a.tobytes())


# -- random -------------------------------------------------------------------------------------------

def random_normal(rng: np.random.Generator, shape, std: float, mean: float = 0.0) -> np.ndarray:
    """float32 normal samples, drawn in float32 so large random models stay within memory."""
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= np.float32(std)
    if mean:
        a += np.float32(mean)
    return a


def random_ln(rng: np.random.Generator, prefix: str, C: int) -> dict[str, np.ndarray]:
    """Non-trivial LayerNorm gamma/beta: 1 + N(0, 0.1) and N(0, 0.1)."""
    return {f"{prefix}.weight": 1 + random_normal(rng, C, 0.1), f"{prefix}.bias": random_normal(rng, C, 0.1)}


def random_ends(part: str, seed: int, V: int, C: int) -> dict[str, np.ndarray]:
    """The embedding and head parts every family shares (same seeds, so the same draws)."""
    if part == "embed":
        rng = np.random.default_rng([seed, 1])
        return {"emb.weight": random_normal(rng, (V, C), 1.0), **random_ln(rng, "ln0", C)}
    rng = np.random.default_rng([seed, 3])
    return {**random_ln(rng, "ln_out", C), "head.weight": random_normal(rng, (V, C), C ** -0.5)}


def random_weights(layers: int, embd: int, vocab: int, ffn: int | None = None, seed: int = 0) -> Weights:
    """Random RWKV-4 weights at realistic scales, generated per part from a per-part seed.

    LN gamma/beta are deliberately not 1/0 (onnx-simplifier would drop a trivial Mul/Add and the
    published structure would not appear); decays span slow to fast channels like a trained model.
    """
    if min(layers, embd, vocab) < 1 or (ffn is not None and ffn < 1):
        raise UserError("random model sizes must be positive integers; fix --layers/--embd/--vocab/--ffn")
    C, V, F = embd, vocab, ffn or 4 * embd

    normal = random_normal

    def ln(rng, prefix):
        return random_ln(rng, prefix, C)

    def fetch(part: Part) -> dict[str, np.ndarray]:
        if part in ("embed", "head"):
            return random_ends(part, seed, V, C)
        rng = np.random.default_rng([seed, 2, part])

        def u(lo, hi):
            return rng.uniform(lo, hi, C).astype(np.float32)

        out = {**ln(rng, "ln1"), **ln(rng, "ln2")}
        # raw decay in [-3, 1.5] -> w = -exp(.) in about [-4.5, -0.05]
        out["att.time_decay"] = -np.exp(u(-3.0, 1.5))
        out["att.time_first"] = u(-1.0, 1.0)
        for k in ("att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "ffn.time_mix_k", "ffn.time_mix_r"):
            out[k] = u(0.05, 0.95)
        for k in ("att.key.weight", "att.value.weight", "att.receptance.weight", "att.output.weight",
                  "ffn.receptance.weight"):
            out[k] = normal(rng, (C, C), C ** -0.5)
        out["ffn.key.weight"] = normal(rng, (F, C), C ** -0.5)
        out["ffn.value.weight"] = normal(rng, (C, F), F ** -0.5)
        return out

    return Weights(layers, C, V, F, fetch, f"<random seed={seed}>")


def load_checkpoint(path: str | os.PathLike) -> Weights:
    """Pick the reader from the suffix: .pth (torch state dict) or .bin (rwkv.cpp)."""
    path = Path(path)
    if path.suffix == ".pth":
        return load_pth(path)
    if path.suffix == ".bin":
        return load_bin(path)
    raise UserError(f"{path}: unknown checkpoint type {path.suffix or '(no suffix)'!r}; "
                    "give a ChatRWKV .pth or an rwkv.cpp fp32/fp16 .bin")
