"""The family protocol: what every RWKV version provides, typed (rwkv2rknn/families/__init__.py registers them).

A family is one package under rwkv2rknn/families/ (rwkv4/, rwkv5/, ...) whose `FAMILY` is a `Family`:
- checkpoint reading: `detect(keys)`, `from_state_dict(get, shapes, source)` (the one reader every file format
  ends in), `load_pth`, `save_pth`, `random_weights`;
- graph builders: `build_embed`, `build_mixing`, `build_head`, and `export` (all of a model's graphs);
- a numpy reference model: `reference(weights)`;
- the layer interface (`layer0_inputs` ... `layer_outputs`), its recurrent `states` with their initial values,
  and the `links` between graphs;
- `precision`: where the fp32 precision rule of placement starts (passes/placement.py reads it);
- `state_tuning`: how a state-tuning file's `time_state` becomes the layer's matrix state (None: the version
  has no state tuning).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import onnx

Part = str | int  # "embed", "head", or a layer index
METADATA_KEY = "rwkv2rknn.family"  # a layer graph's metadata_props entry naming its family (GraphBuilder.model)


class Weights(Protocol):
    """A model's weights fetched part by part (rwkv2rknn.families.parts.PartedWeights)."""

    n_layer: int
    n_embd: int
    n_vocab: int
    source: str

    def embed(self) -> dict[str, np.ndarray]: ...
    def layer(self, i: int) -> dict[str, np.ndarray]: ...
    def head(self) -> dict[str, np.ndarray]: ...
    def tensors(self) -> Iterator[tuple[str, np.ndarray]]: ...
    def materialize(self) -> Weights: ...


class Reference(Protocol):
    """A numpy model in RNN mode: logits of one token from a state, and of a sequence from the initial state."""

    def forward(self, token: int, state=None) -> tuple[np.ndarray, object]: ...
    def run(self, tokens: Iterable[int]) -> np.ndarray: ...


class RandomWeights(Protocol):
    def __call__(self, layers: int, embd: int, vocab: int, seed: int = 0, ffn: int | None = None) -> Weights: ...


class Export(Protocol):
    def __call__(self, weights: Weights, out_dir: str | os.PathLike, dtype: str = "float16",
                 weights_as: str = "constants", force: bool = False, progress: bool = True) -> list[Path]: ...


class BuildPart(Protocol):
    """embed or head: (the part's tensors, dtype, weights_as) -> graph."""

    def __call__(self, part: dict[str, np.ndarray], dtype: str = "float16",
                 weights_as: str = "constants") -> onnx.ModelProto: ...


class BuildMixing(Protocol):
    def __call__(self, part: dict[str, np.ndarray], index: int = 0, dtype: str = "float16",
                 weights_as: str = "constants") -> onnx.ModelProto: ...


class FromStateDict(Protocol):
    """Check a state dict's names and shapes, infer the dimensions, wrap `get(name)` lazily; UserError naming
    `source` and the first missing or misshapen tensor otherwise."""

    def __call__(self, get: Callable[[str], np.ndarray], shapes: dict[str, tuple[int, ...]],
                 source: str) -> Weights: ...


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor of a layer graph: carried from its output to its input on the next token."""

    input: str
    output: str
    rows_fp32: dict = field(default_factory=dict)  # initial values of rows while the state stays fp32 (else 0)


@dataclass(frozen=True)
class Precision:
    """Where the fp32 precision rule of placement (passes/placement.precision_pinned) starts: nodes of these op
    types, and every node reading one of these state inputs (a recurrence with no such op in it, e.g. a fixed
    decay). From there it spreads downstream up to the next weight op, and to producers that feed only it."""

    ops: tuple[str, ...] = ("Exp", "Log", "Max")
    state_inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class StateTuning:
    """A state-tuning file's `blocks.N.att.time_state` [H, N, N] as the initial value of a layer state input: the
    graph's array is the file's with its axes permuted by `axes` (numpy.transpose). Data, not code: the split
    records it in the manifest's `model.state_tuning`, where the server (which has no families) reads it."""

    input: str                                      # the state input it initialises (e.g. "wkv_in")
    axes: tuple[int, ...] = (0, 1, 2)               # the file's layout -> the graph's

    def record(self) -> dict:
        return {"input": self.input, "axes": list(self.axes)}


@dataclass(frozen=True)
class Family:
    """What the rest of rwkv2rknn needs to know about one RWKV version (see the module docstring)."""

    name: str            # "rwkv4"
    label: str           # "RWKV-4"
    # layer graph interface (llama.onnx style): input name -> rank, for layer 0 and for later layers
    layer0_inputs: dict[str, int]
    layer0_outputs: dict[str, int]
    layer_inputs: dict[str, int]
    layer_outputs: dict[str, int]
    states: tuple[StateSpec, ...]
    detect: Callable[[Iterable[str]], bool]         # a state dict of this version, from its tensor names
    from_state_dict: FromStateDict
    load_pth: Callable[[str | os.PathLike], Weights]
    save_pth: Callable[[Weights, str | os.PathLike], None]
    random_weights: RandomWeights
    build_embed: BuildPart
    build_mixing: BuildMixing
    build_head: BuildPart
    export: Export
    reference: Callable[[Weights], Reference]
    # graph-to-graph links beyond the residual stream (output -> input): (from layer, output, input) where
    # from layer is an index (0: the first layer feeds every later one, e.g. RWKV-7's v_first)
    extra_links: tuple[tuple[int, str, str], ...] = ()
    precision: Precision = Precision()
    state_tuning: StateTuning | None = None
    # how the `rwkv` pip package runs this version: environment set before importing rwkv.model, and the
    # class it then picks (a test reference; the package reads a .pth)
    package_env: dict[str, str] = field(default_factory=dict)
    package_class: str = "RWKV"
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
