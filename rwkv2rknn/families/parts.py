"""Weights fetched part by part ("embed", a layer index, "head"), and the random draws every family shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

Part = str | int


def file_name(part: Part, key: str) -> str:
    """The checkpoint-file name of a part's key: emb.weight and blocks.0.ln0.* for the embed part, ln_out.* and
    head.weight for the head part, blocks.{i}.{key} for layer i."""
    if part == "embed":
        return key if key == "emb.weight" else f"blocks.0.{key}"
    if part == "head":
        return key
    return f"blocks.{part}.{key}"


def flat_vector(shape) -> int | None:
    """n when `shape` is [n] or [1, ..., 1, n] (a per-channel vector as .pth files store it), else None."""
    shape = tuple(shape)
    if shape and all(d == 1 for d in shape[:-1]):
        return int(shape[-1])
    return None


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
        return file_name(part, key)

    def _like(self, fetch):
        raise NotImplementedError


# -- random draws -------------------------------------------------------------------------------------------

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


def layer_rng(seed: int, part: int) -> np.random.Generator:
    """The generator of one layer's random draws (per part, so any layer can be drawn again alone)."""
    return np.random.default_rng([seed, 2, part])


# -- weights described by a table of symbolic shapes ----------------------------------------------------------

def canonical_shape(sym: tuple, dims: dict[str, int]) -> tuple[int, ...]:
    """A stored shape in symbols (e.g. ("H", "N"), (1, 1, "C")) with `dims` filled in; [1, 1, C] becomes [C]."""
    if sym == (1, 1, "C"):
        return (dims["C"],)
    return tuple(d if isinstance(d, int) else dims[d] for d in sym)


class TableWeights(PartedWeights):
    """Weights whose tensors a family lists in a table: {"embed"|"layer"|"head": {key: symbolic stored shape}}.

    Dimensions (`dims`): L layers, C n_embd, V vocab, F ffn width, H heads of N, and the family's own.
    """

    TABLE: dict[str, dict[str, tuple]] = {}

    def __init__(self, dims: dict[str, int], fetch: Callable[[Part], dict[str, np.ndarray]], source: str = "<memory>"):
        super().__init__(dims["L"], fetch, source)
        self.dims = dict(dims)
        self.n_embd, self.n_vocab, self.n_ffn = dims["C"], dims["V"], dims["F"]
        self.n_head, self.head_size = dims["H"], dims["N"]

    def __repr__(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.dims.items())
        return f"{type(self).__name__}({dims}, source={self.source!r})"

    def _keys(self, part: Part):
        return list(self.TABLE["layer" if isinstance(part, int) else part])

    def _like(self, fetch):
        return type(self)(self.dims, fetch, self.source)


def check_table(table: dict[str, dict[str, tuple]], shapes: dict[str, tuple[int, ...]], dims: dict[str, int],
                source: str, fix: str) -> None:
    """Every tensor of the table present with its shape (a vector may be stored [C] or [1, 1, C]); a one-line
    UserError naming `source` and the first missing or misshapen tensor otherwise."""
    from rwkv2rknn.errors import UserError

    for part in ["embed", *range(dims["L"]), "head"]:
        for key, sym in table["layer" if isinstance(part, int) else part].items():
            name = file_name(part, key)
            if name not in shapes:
                raise UserError(f"{source}: tensor {name} is missing; {fix}")
            want, got = canonical_shape(sym, dims), tuple(shapes[name])
            if got != want and not (len(want) == 1 and flat_vector(got) == want[0]):
                raise UserError(f"{source}: tensor {name} has shape {list(got)}, expected {list(want)} "
                                f"(n_embd={dims['C']}, {dims['H']} heads of {dims['N']}); {fix}")


def table_fetcher(table: dict[str, dict[str, tuple]], get: Callable[[str], np.ndarray], dims: dict[str, int],
                  convert: Callable[[str, np.ndarray], np.ndarray] | None = None):
    """A part fetcher over a file-named getter: float32 arrays in their canonical shapes, `convert(key, array)`
    applied last (e.g. a stored value the graph uses in another form)."""

    def fetch(part: Part) -> dict[str, np.ndarray]:
        out = {}
        for key, sym in table["layer" if isinstance(part, int) else part].items():
            a = np.asarray(get(file_name(part, key)), dtype=np.float32).reshape(canonical_shape(sym, dims))
            out[key] = convert(key, a) if convert else a
        return out

    return fetch


def need_shape(shapes: dict[str, tuple[int, ...]], name: str, ndim: int, source: str, fix: str) -> tuple[int, ...]:
    """The shape of tensor `name`, which must be there with `ndim` dimensions; a one-line UserError otherwise."""
    from rwkv2rknn.errors import UserError

    if name not in shapes:
        raise UserError(f"{source}: tensor {name} is missing; {fix}")
    if len(shapes[name]) != ndim:
        raise UserError(f"{source}: tensor {name} has shape {list(shapes[name])}, expected {ndim} dimensions; {fix}")
    return tuple(shapes[name])


def head_grid(shapes: dict[str, tuple[int, ...]], name: str, n_embd: int, source: str, fix: str) -> tuple[int, int]:
    """(heads, head size) from a per-head [H, N] tensor, which must tile n_embd."""
    from rwkv2rknn.errors import UserError

    H, N = need_shape(shapes, name, 2, source, fix)
    if H * N != n_embd:
        raise UserError(f"{source}: tensor {name} has shape {[H, N]}, but heads x head size must "
                        f"equal n_embd={n_embd} (from emb.weight); {fix}")
    return H, N


def n_layers(shapes) -> int:
    """1 + the largest N of the blocks.N.* names (0 when there is none)."""
    import re

    found = [int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))]
    return max(found) + 1 if found else 0
