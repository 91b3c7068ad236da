"""Hand-made manifests of small MatMul segments for the build tests (no export or split needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from passes.cut import extract_segments
from passes.partition import Segment
from rwkv2rknn.fsio import sha256_file
from rwkv2rknn.manifest import FORMAT_VERSION, validate

WIDTH = 64


def _graph(width: int, seed: int) -> onnx.ModelProto:
    """x[1,W] -> Mul (cpu) -> 4 x (MatMul, Add, Relu) -> MatMul -> y[1,W/2]."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    nodes.append(helper.make_node("Mul", ["x", const("two", np.array([2.0]))], ["h0"], name="scale"))
    h = "h0"
    for i in range(4):
        w = const(f"W{i}", rng.standard_normal((width, width)) / np.sqrt(width))
        b = const(f"b{i}", rng.standard_normal(width) * 0.1)
        nodes += [helper.make_node("MatMul", [h, w], [f"m{i}"], name=f"MatMul_{i}"),
                  helper.make_node("Add", [f"m{i}", b], [f"a{i}"], name=f"Add_{i}"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"Relu_{i}")]
        h = f"r{i}"
    w = const("Wout", rng.standard_normal((width, width // 2)) / np.sqrt(width))
    nodes.append(helper.make_node("MatMul", [h, w], ["y"], name="MatMul_out"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width // 2])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m)


def make_manifest(out: Path, width: int = WIDTH, seed: int = 0) -> Path:
    """OUT/manifest.json with segments g.s0 (cpu: Mul), g.s1 (npu: 4 MatMuls), g.s2 (npu: 1 MatMul)."""
    out = Path(out)
    (out / "segments").mkdir(parents=True, exist_ok=True)
    src = out / "source.onnx"
    model = _graph(width, seed)
    onnx.save(model, src)
    graph = gs.import_onnx(model)
    nodes = graph.nodes
    segs = [Segment("cpu", nodes[:1], "test"), Segment("npu", nodes[1:-1], "test"),
            Segment("npu", nodes[-1:], "test")]
    entries = []
    for i, (seg, cut) in enumerate(zip(segs, extract_segments(graph, segs))):
        sid = f"g.s{i}"
        path = out / "segments" / f"{sid}.onnx"
        onnx.save(cut.model, path)
        entries.append({"id": sid, "backend": seg.backend, "onnx": f"segments/{sid}.onnx",
                        "sha256": sha256_file(path),
                        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in cut.inputs],
                        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in cut.outputs],
                        "nodes": cut.nodes, "matmul_flops": int(cut.matmul_flops)})
    placement = [{"node": n.name, "op": n.op, "segment": f"g.s{k}", "backend": s.backend, "reason": "test"}
                 for k, s in enumerate(segs) for n in s.nodes]
    data = {"format_version": FORMAT_VERSION, "producer": "tests", "target": "rk3588", "policy": "fused",
            "graphs": [{"name": "g", "source": {"path": "source.onnx", "sha256": sha256_file(src)},
                        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, width]}],
                        "outputs": [{"name": "y", "dtype": "float32", "shape": [1, width // 2]}],
                        "segments": entries, "placement": placement}],
            "model": None}
    validate(data)
    (out / "manifest.json").write_text(json.dumps(data, indent=1))
    return out / "manifest.json"


def run_chain_ort(manifest_path: Path, feeds: dict) -> dict:
    """Every graph's segments in order on onnxruntime fp32 (ignores backends): all tensors by name."""
    from rwkv2rknn.manifest import Manifest

    data = Manifest.load(manifest_path, check_files=False).data  # bisected halves live in build.json
    root = Path(manifest_path).parent
    env = dict(feeds)
    for g in data["graphs"]:
        for seg in g["segments"]:
            sess = ort.InferenceSession(str(root / seg["onnx"]), providers=["CPUExecutionProvider"])
            names = [i.name for i in sess.get_inputs()]
            outs = sess.run(None, {n: env[n] for n in names})
            env.update(zip([o.name for o in sess.get_outputs()], outs))
    return env
