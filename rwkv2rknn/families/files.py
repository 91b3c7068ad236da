"""Checkpoint files other than a .pth, handed to the families as the .pth state dict they came from.

- rwkv.cpp `.bin` files of RWKV-5/6/7 (rwkv2rknn/families/rwkvcpp.py): the rearrangements of rwkv.cpp's converter
  undone. RWKV-4 `.bin` files stay with the RWKV-4 reader (rwkv2rknn/families/rwkv4/), which keeps the stored
  -exp(time_decay) as it is (exact) instead of taking its log;
- Hugging Face RWKV-7 directories in the fla-hub layout (rwkv2rknn/families/rwkv7/flahub.py): config.json + *.safetensors.

`open_other(path, families)` returns (family, weights), or None for a path the .pth / RWKV-4 readers take.
Each ends in the family's own `from_state_dict(get, shapes, source)`, the reader every file format ends in.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rwkv2rknn.families import rwkvcpp
from rwkv2rknn.families.rwkv7 import flahub
from rwkv2rknn.errors import UserError


def from_state_dict(state_dict: dict, source: str, families, version: str) -> tuple[object, object]:
    """(family, weights) of a state dict in the .pth layout; a one-line error when no family reads it."""
    keys = set(state_dict)
    for family in families:
        if family.detect(keys):
            shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
            return family, family.from_state_dict(lambda name: np.asarray(state_dict[name], dtype=np.float32),
                                                   shapes, source)
    labels = ", ".join(f.label for f in families)
    raise UserError(f"{source}: this is an RWKV-{version} checkpoint; supported are {labels}")


def open_other(path: str | os.PathLike, families) -> tuple[object, object] | None:
    """(family, weights) of an rwkv.cpp .bin (RWKV-5/6/7) or an fla-hub directory; None for other paths."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory; check the checkpoint path")
    if flahub.is_candidate(path):
        return from_state_dict(flahub.read_state_dict(path), str(path), families, "7")
    if path.suffix == ".bin":
        if rwkvcpp.scan(path).arch_version == "4":
            return None
        version, state_dict = rwkvcpp.read_state_dict(path)
        return from_state_dict(state_dict, str(path), families, version)
    return None
