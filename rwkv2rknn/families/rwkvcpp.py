"""rwkv.cpp model files (.bin) of every RWKV version, read back into the .pth layout the `rwkv` package reads.

The format (rwkv.cpp docs/FILE_FORMAT.md, rwkv_file_format.inc):
- a header of six int32 (little-endian): magic 0x67676d66 ("ggmf"), file version 100 or 101, n_vocab,
  n_embed, n_layer, and the data type of most tensors;
- then tensors up to the end of the file: int32 dim count (1..3), int32 name length, int32 data type, the
  dims innermost first (ggml order: PyTorch's shape reversed), the UTF-8 name, the data;
- data types: 0 FP32, 1 FP16; 2 and up are quantized (Q4_0, Q4_1, ..., Q5_0, Q5_1, Q8_0, ...).

The version is told by the tensor names as rwkv.cpp's loader does: `att.r_k` -> 7, `att.time_maa_x` -> 6,
`att.ln_x` -> 5 (5.2 with `att.gate`, else 5.1), else 4. rwkv.cpp's converter (convert_pytorch_to_ggml.py)
rearranges the .pth tensors; `read_state_dict` undoes that, per version:
- every version: `.time_*` tensors are squeezed (size-1 dims dropped); matrices may be FP16 while vectors
  and small tensors stay FP32;
- 4: `att.time_decay` holds -exp(time_decay);
- 5.1 (no gate): `att.time_decay` holds exp(-exp(.)) and `att.time_first` exp(.), both reshaped [H, 1, 1];
- 5.2: `att.time_decay` holds exp(-exp(.)) with a trailing 1 ([H, N, 1]); `att.time_faaaa` gets one too;
- 6: decays are not transformed, only reshaped: `att.time_decay` [H, N, 1], `att.time_faaaa` [H, N, 1];
  `att.time_maa_w1`, `att.time_decay_w1`, `att.time_decay_w2` are transposed, `att.time_maa_w2` has its
  last two dims swapped;
- 7: the six token-shift mixes `att.x_r, x_w, x_k, x_v, x_a, x_g` are concatenated into `att.x_rwkvag`
  [6, 1, C] (in that order), and the LoRA matrices `w1 w2 a1 a2 v1 v2 g1 g2` are transposed.

The result is a plain {name: numpy array} dict with the .pth's names and shapes (`.time_*` vectors
[1, 1, C] as the trainers store them, RWKV-4's time_decay/time_first [C], RWKV-5.1's [H]). Values are exact
except the decays of versions 4 and 5 (4: time_decay; 5.1: time_decay, time_first; 5.2: time_decay), which
rwkv.cpp stores only through exp: they come back as log(-w) / log(-log(w)) to float32 rounding, and
exp(-exp(.)) of them gives the stored value back. Large tensors are memory-mapped (copy-on-write): nothing
is read until it is used, and FP16 tensors stay FP16.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rwkv2rknn.errors import UserError

MAGIC = 0x67676D66
FILE_VERSIONS = (100, 101)
FLOAT_TYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2")}
TYPE_NAMES = ("FP32", "FP16", "Q4_0", "Q4_1", "Q4_1_O", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1",
              "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K")
VERSIONS = ("4", "5.1", "5.2", "6", "7")

_RECONVERT = "re-convert the .pth with rwkv.cpp's convert_pytorch_to_ggml.py (FP16 or FP32)"


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: its stored type, its PyTorch-order shape and where its data starts."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class BinFile:
    """The header and tensor table of an rwkv.cpp file (no tensor data)."""

    path: Path
    file_version: int
    n_vocab: int
    n_embd: int
    n_layer: int
    data_type: int
    tensors: dict[str, Entry]

    @property
    def arch_version(self) -> str:
        return arch_version(self.tensors)


def has_magic(path: str | os.PathLike) -> bool:
    """Whether a file starts with rwkv.cpp's magic."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and struct.unpack("<i", head)[0] == MAGIC


def _type_name(code: int) -> str:
    return TYPE_NAMES[code] if 0 <= code < len(TYPE_NAMES) else f"unknown type {code}"


def _refuse_quantized(path: Path, code: int, what: str) -> None:
    raise UserError(f"{path}: {what} quantized ({_type_name(code)}); rwkv2rknn reads fp32/fp16 weights only: "
                    "export from the .pth, or from an FP16/FP32 .bin made by rwkv.cpp's convert_pytorch_to_ggml.py")


def scan(path: str | os.PathLike) -> BinFile:
    """Read the header and the tensor table (names, types, shapes, offsets); one-line UserError on bad input."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; check the checkpoint path")
    size = path.stat().st_size
    tensors: dict[str, Entry] = {}
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            raise UserError(f"{path}: truncated: {len(head)} bytes, shorter than an rwkv.cpp header; "
                            f"re-download it or {_RECONVERT}")
        magic, version, n_vocab, n_embd, n_layer, data_type = struct.unpack("<6i", head)
        if magic != MAGIC:
            hint = (" (it is a zip file: a PyTorch checkpoint? rename a BlinkDL state dict to .pth)"
                    if head[:2] == b"PK" else "")
            raise UserError(f"{path}: wrong magic 0x{magic & 0xFFFFFFFF:08x} (rwkv.cpp files start with "
                            f"0x{MAGIC:08x}, 'ggmf'){hint}; not an rwkv.cpp model file")
        if version not in FILE_VERSIONS:
            raise UserError(f"{path}: rwkv.cpp file version {version} is not one of "
                            f"{', '.join(map(str, FILE_VERSIONS))}; {_RECONVERT}")
        if data_type not in FLOAT_TYPES:
            _refuse_quantized(path, data_type, "the file is")
        pos = 24
        while pos < size:
            fixed = f.read(12)
            if len(fixed) < 12:
                raise UserError(f"{path}: truncated tensor header at byte {pos}; re-download it or {_RECONVERT}")
            n_dims, key_len, dtype = struct.unpack("<3i", fixed)
            if not 1 <= n_dims <= 3 or not 0 < key_len <= 4096:
                raise UserError(f"{path}: corrupt tensor header at byte {pos} (dims {n_dims}, name length "
                                f"{key_len}); re-download it or {_RECONVERT}")
            rest = f.read(4 * n_dims + key_len)
            if len(rest) < 4 * n_dims + key_len:
                raise UserError(f"{path}: truncated tensor header at byte {pos}; re-download it or {_RECONVERT}")
            dims = struct.unpack(f"<{n_dims}i", rest[: 4 * n_dims])
            try:
                name = rest[4 * n_dims:].decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}: tensor name at byte {pos} is not UTF-8; the file is damaged; "
                                f"re-download it or {_RECONVERT}") from None
            if dtype not in FLOAT_TYPES:
                _refuse_quantized(path, dtype, f"tensor {name} is")
            if any(d <= 0 for d in dims):
                raise UserError(f"{path}: tensor {name} has bad dims {list(dims)}; the file is damaged; {_RECONVERT}")
            if name in tensors:
                raise UserError(f"{path}: tensor {name} appears twice; the file is damaged; {_RECONVERT}")
            shape = tuple(reversed(dims))
            offset = pos + 12 + len(rest)
            nbytes = int(np.prod(shape)) * FLOAT_TYPES[dtype].itemsize
            if offset + nbytes > size:
                raise UserError(f"{path}: truncated: tensor {name} needs {nbytes} bytes at byte {offset}, the file "
                                f"has {size}; re-download it or {_RECONVERT}")
            tensors[name] = Entry(FLOAT_TYPES[dtype], shape, offset)
            pos = offset + nbytes
            f.seek(pos)
    emb = tensors.get("emb.weight")
    if emb is None:
        raise UserError(f"{path}: no emb.weight tensor; not an RWKV model file; {_RECONVERT}")
    if emb.shape != (n_vocab, n_embd):
        raise UserError(f"{path}: header says n_vocab={n_vocab}, n_embed={n_embd} but emb.weight is "
                        f"{list(emb.shape)}; the file is damaged; {_RECONVERT}")
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))}
    if layers and max(layers) + 1 != n_layer:
        raise UserError(f"{path}: header says n_layer={n_layer} but the tensors have {max(layers) + 1} layers; "
                        f"the file is damaged; {_RECONVERT}")
    return BinFile(path, version, n_vocab, n_embd, n_layer, data_type, tensors)


def arch_version(names) -> str:
    """The RWKV version of an rwkv.cpp file from its tensor names, as rwkv.cpp's loader tells it."""
    names = set(names)
    if "blocks.0.att.r_k" in names:
        return "7"
    if "blocks.0.att.time_maa_x" in names:
        return "6"
    if "blocks.0.att.ln_x.weight" in names:
        return "5.2" if "blocks.0.att.gate.weight" in names else "5.1"
    return "4"


# -- undoing the converter ------------------------------------------------------------------------------

def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _log_neg(w: np.ndarray) -> np.ndarray:
    """t with -exp(t) = w, to float32 rounding (w < 0; w = 0 or -inf come back as finite extremes)."""
    x = np.clip(-w.astype(np.float64), 1e-45, np.finfo(np.float32).max)
    return _f32(np.log(x))


def _log_neg_log(d: np.ndarray) -> np.ndarray:
    """t with exp(-exp(t)) = d, to float32 rounding (d in (0, 1]; d = 1 comes back as t = log(2^-30))."""
    x = -np.log(np.clip(d.astype(np.float64), 1e-45, 1.0))
    return _f32(np.log(np.maximum(x, 2.0 ** -30)))


def _one_head(a: np.ndarray) -> np.ndarray:
    """[N, 1] -> [1, N, 1]: the converter squeezes `.time_*` tensors, which drops H of a one-head model's [H, N]."""
    return a[None] if a.ndim == 2 and a.shape[-1] == 1 else a


def _vec3(a: np.ndarray) -> np.ndarray:
    """A squeezed vector back to the trainers' [1, 1, C]."""
    return a.reshape(1, 1, -1)


def _transposed(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T)


class _Undo:
    """Turns one stored tensor into the .pth tensor(s) it came from; checks the shapes it relies on."""

    def __init__(self, path: Path, version: str):
        self.path, self.version = path, version

    def _bad(self, name: str, a: np.ndarray, want: str):
        raise UserError(f"{self.path}: tensor {name} has shape {list(a.shape)}, expected {want} in an RWKV-"
                        f"{self.version} rwkv.cpp file; the file is damaged; {_RECONVERT}")

    def __call__(self, name: str, a: np.ndarray) -> list[tuple[str, np.ndarray]]:
        short = name.split(".", 2)[2] if name.startswith("blocks.") else name
        v = self.version
        if v == "7":
            return self._v7(name, short, a)
        if v == "6":
            return [(name, self._v6(name, short, a))]
        if v.startswith("5"):
            return [(name, self._v5(name, short, a))]
        return [(name, self._v4(name, short, a))]

    def _v4(self, name, short, a):
        if short == "att.time_decay":
            return _log_neg(self._vector(name, a))
        if short == "att.time_first":
            return self._vector(name, a)
        if ".time_" in short:
            return _vec3(self._vector(name, a))
        return a

    def _v5(self, name, short, a):
        if short in ("att.time_decay", "att.time_first", "att.time_faaaa"):
            a = _one_head(a) if self.version != "5.1" else a
            if a.ndim != 3 or a.shape[-1] != 1:
                self._bad(name, a, "[H, N, 1] (5.2) or [H, 1, 1] (5.1)")
            if self.version == "5.1":  # exp(-exp(.)) resp. exp(.), reshaped (-1, 1, 1) from [H]
                flat = a.reshape(-1)
                if short == "att.time_decay":
                    return _log_neg_log(flat)
                return _f32(np.log(flat.astype(np.float64))) if short == "att.time_first" else flat
            grid = a.reshape(a.shape[:2])  # 5.2: [H, N]
            return _log_neg_log(grid) if short == "att.time_decay" else grid
        if ".time_" in short:
            return _vec3(self._vector(name, a))
        return a

    def _v6(self, name, short, a):
        if short in ("att.time_decay", "att.time_faaaa"):
            a = _one_head(a)
            if a.ndim != 3 or a.shape[-1] != 1:
                self._bad(name, a, "[H, N, 1]")
            return _vec3(a) if short == "att.time_decay" else a.reshape(a.shape[:2])
        if short in ("att.time_maa_w1", "att.time_decay_w1", "att.time_decay_w2"):
            if a.ndim != 2:
                self._bad(name, a, "a matrix")
            return _transposed(a)
        if short == "att.time_maa_w2":
            if a.ndim != 3:
                self._bad(name, a, "[5, C, D]")
            return np.ascontiguousarray(a.transpose(0, 2, 1))
        if ".time_" in short:
            return _vec3(self._vector(name, a))
        return a

    def _v7(self, name, short, a):
        if short == "att.x_rwkvag":
            if a.ndim != 3 or a.shape[:2] != (6, 1):
                self._bad(name, a, "[6, 1, C]")
            prefix = name[: -len("x_rwkvag")]
            return [(f"{prefix}x_{q}", a[i: i + 1]) for i, q in enumerate("rwkvag")]
        if re.fullmatch(r"att\.[wavg][12]", short):
            if a.ndim != 2:
                self._bad(name, a, "a matrix")
            return [(name, _transposed(a))]
        return [(name, a)]

    def _vector(self, name, a):
        if a.ndim != 1:
            self._bad(name, a, "a vector")
        return a


def read_state_dict(path: str | os.PathLike) -> tuple[str, dict[str, np.ndarray]]:
    """(RWKV version, state dict in the .pth layout) of an rwkv.cpp file; see the module docstring."""
    info = scan(path)
    version = info.arch_version
    data = np.memmap(info.path, dtype=np.uint8, mode="c")
    undo = _Undo(info.path, version)
    out: dict[str, np.ndarray] = {}
    for name, e in info.tensors.items():
        count = int(np.prod(e.shape))
        raw = data[e.offset: e.offset + count * e.dtype.itemsize].view(e.dtype).reshape(e.shape)
        for key, a in undo(name, raw):
            out[key] = a
    return version, out
