"""The .pth (torch state dict) reader and writer every family shares: memory-mapped reading, one-line errors."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rwkv2rknn.errors import UserError
from rwkv2rknn.fsio import atomic_path


def check_file(path: Path) -> None:
    """A one-line error when `path` is not a non-empty file."""
    if not path.exists():
        raise UserError(f"{path}: no such file; check the checkpoint path")
    if not path.is_file():
        raise UserError(f"{path}: not a file; name a .pth or .bin checkpoint")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty; re-download or re-convert the checkpoint")


def import_torch():
    try:
        import torch
    except ImportError:
        raise UserError("reading .pth checkpoints needs PyTorch, which is not installed; "
                        "install torch (CPU build is enough), or convert the checkpoint on a PC") from None
    return torch


def pth_keys(path: str | os.PathLike) -> set[str]:
    """The tensor names of a torch state dict (memory-mapped: nothing is read but the index)."""
    path = Path(path)
    check_file(path)
    torch = import_torch()
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - old or damaged files: the reader gives the one-line error
        return set()
    return set(sd) if isinstance(sd, dict) else set()


def read_state_dict(path: str | os.PathLike) -> tuple[Callable[[str], np.ndarray], dict[str, tuple[int, ...]]]:
    """(get(name) -> float32 numpy array, {name: shape}) of a torch state dict, memory-mapped when the format
    allows (old non-zip files are read whole); bf16/fp16 tensors come back as float32."""
    path = Path(path)
    check_file(path)
    torch = import_torch()
    sd, errors = None, []
    for kwargs in ({"mmap": True}, {}):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
            break
        except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
            # torch appends advice to load with weights_only=False: wrong for a damaged file, unsafe anyway
            first = (str(exc).splitlines() or [""])[0].split(". ")[0][:160]
            errors.append(f"{type(exc).__name__}: {first}")
    if sd is None:
        raise UserError(f"{path}: cannot read as a torch checkpoint ({errors[-1]}); "
                        "the file is damaged, truncated or not a .pth state dict")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a plain state dict of tensors; save the model's state_dict()")

    def get(name: str) -> np.ndarray:
        return sd[name].detach().to(torch.float32).numpy()  # bfloat16 has no numpy type: convert on torch's side

    return get, {k: tuple(v.shape) for k, v in sd.items()}


def write_state_dict(tensors, path: str | os.PathLike) -> None:
    """Write {name: array} (or (name, array) pairs) as a float32 torch state dict, atomically."""
    torch = import_torch()
    items = tensors.items() if isinstance(tensors, dict) else tensors
    sd = {name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for name, a in items}
    with atomic_path(path) as tmp:
        torch.save(sd, tmp)
