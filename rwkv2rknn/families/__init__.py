"""RWKV versions behind one interface: checkpoints, export, a model directory's layout, states and links.

The rest of rwkv2rknn asks the family of a model (found from a checkpoint's keys or from the inputs of
`mixing_0.onnx`) and never tests for a version. One module per version: rwkv4.py, rwkv7.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rwkv2rknn.errors import UserError


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor of a layer graph: carried from its output to its input on the next token."""

    input: str
    output: str
    rows_fp32: dict = field(default_factory=dict)  # initial values of rows while the state stays fp32 (else 0)


@dataclass(frozen=True)
class Family:
    """What the rest of rwkv2rknn needs to know about one RWKV version."""

    name: str            # "rwkv4"
    label: str           # "RWKV-4"
    # layer graph interface (llama.onnx style): input name -> rank, for layer 0 and for later layers
    layer0_inputs: dict
    layer0_outputs: dict
    layer_inputs: dict
    layer_outputs: dict
    states: tuple        # StateSpec per layer graph
    # graph-to-graph links beyond the residual stream (output -> input): (from layer, output, input) where
    # from layer is an index (0: the first layer feeds every later one, e.g. RWKV-7's v_first)
    extra_links: tuple = ()
    precision_seeds: tuple = ("Exp", "Log", "Max")  # ops the fp32 precision rule keeps on the CPU
    load_checkpoint: object = None   # (path) -> weights with embed()/layer(i)/head(), n_layer, n_embd, n_vocab
    random_weights: object = None    # (layers, embd, vocab, seed=..., ffn=None) -> weights
    export: object = None            # (weights, out_dir, dtype, weights_as, force, progress) -> list[Path]
    detect_keys: object = None       # (keys) -> bool: a checkpoint of this version
    notes: str = ""

    def layout(self, index: int) -> tuple[dict, dict]:
        return (self.layer0_inputs, self.layer0_outputs) if index == 0 else (self.layer_inputs, self.layer_outputs)

    def matches(self, ins: dict, outs: dict) -> bool:
        """Does mixing_0's interface ({name: (dtype, dims)}) look like this version's?"""
        want_in, want_out = self.layout(0)
        return set(ins) == set(want_in) and set(outs) == set(want_out)

    def links(self, n_layer: int) -> list[tuple[str, str, str, str]]:
        """Every (from graph, output, to graph, input) hand-off of a whole model, in execution order."""
        names = [f"mixing_{i}" for i in range(n_layer)]
        out = [("embed", "output", names[0], "input")] if names else []
        out += [(a, "output", b, "input") for a, b in zip(names, names[1:])]
        out.append((names[-1] if names else "embed", "output", "head", "x"))
        for src, output, inp in self.extra_links:
            out += [(names[src], output, names[i], inp) for i in range(src + 1, n_layer)]
        return out


def _registry() -> list[Family]:
    from rwkv2rknn.families import rwkv4, rwkv7

    return [rwkv4.FAMILY, rwkv7.FAMILY]


def names() -> list[str]:
    return [f.name for f in _registry()]


def get(name: str) -> Family:
    for f in _registry():
        if f.name == name:
            return f
    raise UserError(f"--family {name!r}: choose one of {', '.join(names())}")


def from_layout(path, ins: dict, outs: dict) -> Family:
    """The family whose layer interface mixing_0.onnx has; a one-line error naming what it has otherwise."""
    for f in _registry():
        if f.matches(ins, outs):
            return f
    got = ", ".join(f"{n}{ins[n][1]}" for n in ins) + " -> " + ", ".join(f"{n}{outs[n][1]}" for n in outs)
    want = "; ".join(f"{f.label}: {', '.join(f.layer0_inputs)} -> {', '.join(f.layer0_outputs)}" for f in _registry())
    raise UserError(f"{path}: inputs/outputs are {got}, which is no llama.onnx-style layer this tool knows "
                    f"({want}); export it with `rwkv2rknn export`, or split the files one by one")


def load_checkpoint(path) -> tuple[Family, object]:
    """(family, weights) of a checkpoint: the version is told by its tensor names."""
    from rwkv2rknn import checkpoint_files, checkpoints

    path = Path(path)
    other = checkpoint_files.open_other(path, _registry())  # rwkv.cpp .bin (RWKV-5/6/7), fla-hub directories
    if other is not None:
        return other
    if path.suffix == ".pth":
        keys = checkpoints.pth_keys(path)
        for f in _registry():
            if f.detect_keys(keys):
                return f, f.load_checkpoint(path)
        if checkpoints.looks_rwkv56(keys):
            raise UserError(f"{path}: this is an RWKV-5/6 checkpoint; supported are "
                            f"{', '.join(f.label for f in _registry())}")
    f = get("rwkv4")  # rwkv.cpp .bin files and anything else: the RWKV-4 reader says what is wrong
    return f, f.load_checkpoint(path)
