"""rwkv.cpp model files (.bin, `ggmf` magic, versions 100/101, fp32 or fp16 tensors) of RWKV-4: read and write.

The file holds a 24-byte header (magic, version, n_vocab, n_embd, n_layer, data type) and then per tensor
(dims, name length, data type), the dims innermost first, the name, the data. RWKV-4's converter stores
att.time_decay as w = -exp(raw), the canonical form's value (rwkv2rknn/families/rwkv4/checkpoint.py).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from rwkv2rknn.errors import UserError
from rwkv2rknn.families.pth import check_file
from rwkv2rknn.families.rwkv4.checkpoint import Weights, check_shapes, fetcher, load_pth
from rwkv2rknn.fsio import atomic_path

BIN_MAGIC = 0x67676D66
BIN_VERSIONS = (100, 101)  # rwkv.cpp RWKV_FILE_VERSION_MIN .. MAX
BIN_WRITE_VERSION = 101
_BIN_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2")}
_BIN_DTYPE_CODES = {"float32": 0, "float16": 1}


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
    check_file(path)
    index, (n_layer, n_embd, n_vocab) = _bin_index(path)
    dims = check_shapes({k: v[1] for k, v in index.items()}, str(path))
    if dims[:3] != (n_layer, n_embd, n_vocab):
        raise UserError(f"{path}: header says n_layer={n_layer}, n_embd={n_embd}, n_vocab={n_vocab} but the "
                        f"tensors give {dims[0]}, {dims[1]}, {dims[2]}; the file is damaged; re-convert it")

    def get(name: str) -> np.ndarray:
        dtype, shape, offset = index[name]
        return np.fromfile(path, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)

    return Weights(*dims, fetcher(get, raw_decay=False), str(path))


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


def load_checkpoint(path: str | os.PathLike) -> Weights:
    """Pick the reader from the suffix: .pth (torch state dict) or .bin (rwkv.cpp)."""
    path = Path(path)
    if path.suffix == ".pth":
        return load_pth(path)
    if path.suffix == ".bin":
        return load_bin(path)
    raise UserError(f"{path}: unknown checkpoint type {path.suffix or '(no suffix)'!r}; "
                    "give a ChatRWKV .pth or an rwkv.cpp fp32/fp16 .bin")
