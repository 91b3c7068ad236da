"""RWKV versions behind one interface: checkpoints, export, a numpy reference, a model directory's layout, states
and links (the protocol: rwkv2rknn/families/base.py).

The rest of rwkv2rknn asks the family of a model (found from a checkpoint's keys or from the inputs of
`mixing_0.onnx`) and never tests for a version. One package per version: rwkv4/, rwkv5/, rwkv6/, rwkv7/;
shared pieces: graph.py (a graph builder, the embed and head graphs, the directory writer), pth.py (the .pth
reader), parts.py (part-by-part weights, random draws).
"""

from __future__ import annotations

from pathlib import Path

from rwkv2rknn.errors import UserError
from rwkv2rknn.families.base import METADATA_KEY, Family, Precision, StateSpec, StateTuning

DEFAULT = "rwkv4"  # the family of `export --random` without --family


def _registry() -> list[Family]:
    from rwkv2rknn.families import rwkv4, rwkv5, rwkv6, rwkv7

    return [rwkv4.FAMILY, rwkv5.FAMILY, rwkv6.FAMILY, rwkv7.FAMILY]


def all_families() -> list[Family]:
    return list(_registry())


def names() -> list[str]:
    return [f.name for f in _registry()]


def get(name: str) -> Family:
    for f in _registry():
        if f.name == name:
            return f
    raise UserError(f"--family {name!r}: choose one of {', '.join(names())}")


def from_layout(path, ins: dict, outs: dict, declared: str | None = None) -> Family:
    """The family of a layer graph: the one its metadata names (METADATA_KEY, written by every family's exporter)
    when its interface fits, else the first whose layer interface mixing_0.onnx has (RWKV-5 and RWKV-6 share
    one: a graph from another exporter is taken as the first); a one-line error naming what it has otherwise."""
    for f in _registry():
        if f.name == declared and f.matches(ins, outs):
            return f
    for f in _registry():
        if f.matches(ins, outs):
            return f
    got = ", ".join(f"{n}{ins[n][1]}" for n in ins) + " -> " + ", ".join(f"{n}{outs[n][1]}" for n in outs)
    want = "; ".join(f"{f.label}: {', '.join(f.layer0_inputs)} -> {', '.join(f.layer0_outputs)}" for f in _registry())
    raise UserError(f"{path}: inputs/outputs are {got}, which is no llama.onnx-style layer this tool knows "
                    f"({want}); export it with `rwkv2rknn export`, or split the files one by one")


def from_keys(keys, source) -> Family:
    """The family of a state dict, told by its tensor names; a one-line error when none claims it."""
    keys = set(keys)
    for f in _registry():
        if f.detect(keys):
            return f
    raise UserError(f"{source}: no RWKV version this tool reads has these tensor names (supported: "
                    f"{', '.join(f.label for f in _registry())}); the file is damaged or another model")


def load_checkpoint(path) -> tuple[Family, object]:
    """(family, weights) of a checkpoint: the version is told by its tensor names (a .pth, an rwkv.cpp .bin, an
    fla-hub directory: rwkv2rknn/families/files.py)."""
    from rwkv2rknn.families import files as checkpoint_files
    from rwkv2rknn.families.pth import read_state_dict
    from rwkv2rknn.families.rwkv4 import FAMILY as rwkv4, load_checkpoint as rwkv4_file

    path = Path(path)
    other = checkpoint_files.open_other(path, _registry())  # rwkv.cpp .bin (RWKV-5/6/7), fla-hub directories
    if other is not None:
        return other
    if path.suffix == ".pth":
        get, shapes = read_state_dict(path)
        family = from_keys(shapes, path)
        return family, family.from_state_dict(get, shapes, str(path))
    # rwkv.cpp .bin files and anything else: the RWKV-4 reader reads them or says what is wrong
    return rwkv4, rwkv4_file(path)


__all__ = ["DEFAULT", "METADATA_KEY", "Family", "Precision", "StateSpec", "StateTuning", "all_families", "from_keys",
           "from_layout", "get", "load_checkpoint", "names"]
