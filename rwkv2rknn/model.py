"""Loading source graphs: single ONNX files, or a model directory in the llama.onnx layout (any RWKV family)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from rwkv2rknn.errors import UserError

MIXING_RE = re.compile(r"^mixing_(\d+)\.onnx$")

# The llama.onnx interfaces of embed and head (shared/docs/llama-onnx-rwkv4.md): name -> rank. The layer
# graphs' interface is the family's (rwkv2rknn/families).
LAYOUT = {
    "embed": {"inputs": {"token": 1}, "outputs": {"output": 1}},
    "head": {"inputs": {"x": 1}, "outputs": {"output": 1}},
}


@dataclass
class SourceGraph:
    """One source graph. Its ModelProto is loaded on demand and can be dropped: a 24-layer model
    never needs all of its weights in memory at once."""

    name: str            # embed, mixing_3, head, or a file's stem
    path: Path
    _model: onnx.ModelProto | None = field(default=None, repr=False)

    @property
    def model(self) -> onnx.ModelProto:
        if self._model is None:
            self._model = load_onnx_file(self.path)
        return self._model

    def release(self) -> None:
        self._model = None


@dataclass
class RwkvModel:
    """A whole model directory: embed, the mixing layers in order, head."""

    directory: Path
    graphs: list[SourceGraph]
    n_layer: int
    n_embd: int
    vocab_size: int
    family: object       # rwkv2rknn.families.Family
    state_shapes: dict   # state input name -> shape (the same in every layer)
    float_dtype: str     # "float16" or "float32": what the source files use
    tokenizer_file: Path | None


def load_onnx_file(path: str | Path) -> onnx.ModelProto:
    """Load one ONNX file with a one-line error for every way a user's file can be wrong."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty; export or download it again")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf DecodeError, truncated external data, ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable ONNX model ({reason}); export or download it again") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise UserError(f"{path}: not an ONNX model (no graph nodes); export or download it again")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: invalid ONNX model ({reason[:200]}); export or download it again") from None
    return model


def _dims(value_info: onnx.ValueInfoProto) -> list:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def _elem_name(value_info: onnx.ValueInfoProto) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type).name


def io_signature(model: onnx.ModelProto) -> tuple[dict, dict]:
    """{name: (dtype, dims)} for graph inputs (minus initializers) and outputs."""
    inits = {t.name for t in model.graph.initializer}
    ins = {v.name: (_elem_name(v), _dims(v)) for v in model.graph.input if v.name not in inits}
    outs = {v.name: (_elem_name(v), _dims(v)) for v in model.graph.output}
    return ins, outs


def _check_layout(graph: SourceGraph, kind: str, want: dict | None = None) -> tuple[dict, dict]:
    ins, outs = io_signature(graph.model)
    graph.release()
    want = want or LAYOUT[kind]
    for side, have, expect in (("inputs", ins, want["inputs"]), ("outputs", outs, want["outputs"])):
        if set(have) != set(expect) or any(len(have[n][1]) != r for n, r in expect.items()):
            got = ", ".join(f"{n}{have[n][1]}" for n in have) or "none"
            need = ", ".join(f"{n} (rank {r})" for n, r in expect.items())
            raise UserError(
                f"{graph.path}: {side} are {got}, but a llama.onnx {kind} graph has {need}; "
                "export it with `rwkv2rknn export`, or split the files one by one"
            )
    return ins, outs


def load_model_dir(directory: str | Path) -> RwkvModel:
    """Find embed.onnx, mixing_0..L-1.onnx, head.onnx and check that they form one model."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory; check the path")
    layers = {}
    for p in directory.iterdir():
        m = MIXING_RE.match(p.name)
        if m:
            layers[int(m.group(1))] = p
    missing = [f for f in ("embed.onnx", "head.onnx") if not (directory / f).exists()]
    if not layers or missing:
        what = ", ".join(missing + ([] if layers else ["mixing_0.onnx ..."]))
        raise UserError(
            f"{directory}: not a llama.onnx-style model directory (missing {what}); "
            "pass a directory with embed.onnx, mixing_*.onnx and head.onnx, or the .onnx files themselves"
        )
    n_layer = max(layers) + 1
    gaps = [i for i in range(n_layer) if i not in layers]
    if gaps:
        raise UserError(
            f"{directory}: layer files have a gap (no mixing_{gaps[0]}.onnx, but mixing_{n_layer - 1}.onnx "
            "exists); copy the missing layers or export the model again"
        )
    graphs = [SourceGraph("embed", directory / "embed.onnx")]
    graphs += [SourceGraph(f"mixing_{i}", layers[i]) for i in range(n_layer)]
    graphs.append(SourceGraph("head", directory / "head.onnx"))

    _, e_out = _check_layout(graphs[0], "embed")
    n_embd = e_out["output"][1][0]
    float_dtype = e_out["output"][0]
    from rwkv2rknn import families

    ins0, outs0 = io_signature(graphs[1].model)
    declared = {p.key: p.value for p in graphs[1].model.metadata_props}.get(families.METADATA_KEY)
    family = families.from_layout(graphs[1].path, ins0, outs0, declared)
    state_shapes = None
    for i, g in enumerate(graphs[1:-1]):
        l_in, l_out = family.layout(i)
        ins, _ = _check_layout(g, f"{family.label} layer", {"inputs": l_in, "outputs": l_out})
        width = ins["input"][1][0]
        if width != n_embd:
            raise UserError(
                f"{g.path}: layer width {width} differs from embed.onnx width {n_embd}; "
                "all files must come from one model export"
            )
        shapes = {st.input: ins[st.input][1] for st in family.states}
        if state_shapes is not None and shapes != state_shapes:
            raise UserError(f"{g.path}: state shapes {shapes} differ from the other layers' {state_shapes}; "
                            "files of two models?")
        state_shapes = shapes
    h_in, h_out = _check_layout(graphs[-1], "head")
    if h_in["x"][1][0] != n_embd:
        raise UserError(f"{graphs[-1].path}: head width {h_in['x'][1][0]} differs from embed width {n_embd}")
    vocab = h_out["output"][1][0]
    dims = [vocab, n_embd] + [d for shape in state_shapes.values() for d in shape]
    if not all(isinstance(d, int) for d in dims):
        raise UserError(f"{directory}: model graphs have symbolic dimensions; export them with fixed shapes")
    tok = directory / "tokenizer.json"
    return RwkvModel(directory, graphs, n_layer, n_embd, vocab, family, state_shapes, float_dtype,
                     tok if tok.exists() else None)


def load_sources(paths: list[str | Path]) -> tuple[list[SourceGraph], RwkvModel | None]:
    """A single model directory, or one or more .onnx files (each becomes a graph named by its stem)."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and paths[0].is_dir():
        model = load_model_dir(paths[0])
        return model.graphs, model
    graphs, seen = [], set()
    for p in paths:
        if p.is_dir():
            raise UserError(f"{p}: a model directory must be the only MODEL argument")
        name = p.stem
        if name in seen:
            raise UserError(f"{p}: two inputs named {name!r}; split them in separate runs")
        seen.add(name)
        graphs.append(SourceGraph(name, p, load_onnx_file(p)))  # fail early, before any output
    return graphs, None
