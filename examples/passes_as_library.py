#!/usr/bin/env python
"""Use the `passes` package as a library on any ONNX graph: normalize, place, partition, cut, print.

    python examples/passes_as_library.py                      # a small built-in demo graph
    python examples/passes_as_library.py model.onnx           # any ONNX file
    python examples/passes_as_library.py model.onnx --policy matmul --shape input=1,1024 -o segs/

Nothing here knows about RWKV, manifests or the rwkv2rknn CLI: `passes` works on onnx-graphsurgeon
graphs only. At the end the segments are run in order on onnxruntime and compared with the source
graph, which is the cutter's promise (chaining the segments by tensor name reproduces the graph).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from passes.cut import extract_segments
from passes.partition import DEFAULT_MIN_NPU_FLOPS, Grouping, MatMulCalls, WholeGraph, propose_segments
from passes.pipeline import normalize
from passes.placement import TARGETS, place
from passes.stats import boundary_bytes, flops_share


def demo_model(width: int = 256, vocab: int = 64, seed: int = 0) -> onnx.ModelProto:
    """token -> Gather -> MLP (2 MatMuls) -> Max/Sub/Exp (kept fp32) -> MatMul -> Sigmoid -> y, plus a state output."""
    rng = np.random.default_rng(seed)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)

    inits = [w("emb", vocab, width), w("W1", width, 2 * width), w("b1", 2 * width),
             w("W2", 2 * width, width), w("W3", width, width)]
    nodes = [
        helper.make_node("Gather", ["emb", "token"], ["x"], name="embed"),
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["h2"], name="fc1_bias"),
        helper.make_node("Relu", ["h2"], ["h3"], name="act"),
        helper.make_node("MatMul", ["h3", "W2"], ["h4"], name="fc2"),
        # A running max and an exponent: the precision rule keeps this chain fp32 on the CPU.
        helper.make_node("Max", ["h4", "state_in"], ["state_out"], name="running_max"),
        helper.make_node("Sub", ["h4", "state_out"], ["d"], name="shift"),
        helper.make_node("Exp", ["d"], ["e"], name="exp"),
        helper.make_node("MatMul", ["e", "W3"], ["h5"], name="fc3"),
        helper.make_node("Sigmoid", ["h5"], ["y"], name="gate"),
    ]
    graph = helper.make_graph(
        nodes, "demo",
        [helper.make_tensor_value_info("token", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width]),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, width])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def parse_shapes(specs: list[str]) -> dict[str, list[int]]:
    """NAME=D0,D1,... -> {NAME: [D0, D1, ...]}: fixes dynamic input dimensions before shape inference."""
    shapes = {}
    for spec in specs:
        name, _, dims = spec.partition("=")
        shapes[name] = [int(d) for d in dims.split(",") if d]
    return shapes


def random_feed(model: onnx.ModelProto, shapes: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random values for every graph input (integers: small indices, so Gather-style lookups stay in range)."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feed = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dims = shapes.get(inp.name) or [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.integer):
            feed[inp.name] = rng.integers(0, 2, size=dims).astype(dtype)
        else:
            feed[inp.name] = rng.standard_normal(dims).astype(dtype)
    return feed


def check_chain(source: onnx.ModelProto, cuts, shapes: dict) -> float:
    """Run the source graph and the segments in order on onnxruntime; return the largest output difference."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # onnxruntime's own fp16 folding breaks on some exported graphs: run the source as written.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feed = random_feed(source, shapes)
    ref_sess = ort.InferenceSession(source.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ref = dict(zip([o.name for o in ref_sess.get_outputs()], ref_sess.run(None, feed)))
    env = dict(feed)
    for cut in cuts:
        sess = ort.InferenceSession(cut.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        # Segment boundaries are fp32 (normalize upcasts fp16), so cast what an fp16 source fed in.
        seg_feed = {i.name: env[i.name].astype(helper.tensor_dtype_to_np_dtype(
            i.type.tensor_type.elem_type)) for i in cut.model.graph.input if i.name in names}
        env.update(zip([o.name for o in sess.get_outputs()], sess.run(None, seg_feed)))
    return max(float(np.abs(env[k].astype(np.float64) - v.astype(np.float64)).max()) for k, v in ref.items())


# How the partitioner groups a placement: a Grouping object per strategy (rwkv2rknn's policies hold theirs the
# same way, rwkv2rknn/policies.py).
GROUPINGS = {
    "cpu": WholeGraph("cpu", on="cpu"),  # no NPU at all
    "matmul": MatMulCalls(),  # each MatMul its own NPU call
    "fused": Grouping(),  # maximal NPU runs; tiny ones fold back to the CPU
    "layer": WholeGraph("layer", on="npu"),  # the whole graph one NPU model
    "deep": Grouping("deep", npu_first=True, fold_small=False),  # the NPU first, nothing folds back
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="an .onnx file (default: a built-in demo graph)")
    ap.add_argument("--policy", choices=list(GROUPINGS), default="fused")
    ap.add_argument("--target", choices=TARGETS, default="rk3588")
    ap.add_argument("--shape", action="append", default=[], metavar="NAME=D0,D1,...",
                    help="fix a dynamic input's dimensions (repeatable)")
    ap.add_argument("--min-npu-flops", type=int, default=DEFAULT_MIN_NPU_FLOPS,
                    help="NPU runs with fewer MatMul FLOPs go back to the CPU")
    ap.add_argument("-o", "--out", type=Path, help="also save each segment as OUT/s<i>.<backend>.onnx")
    ap.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison at the end")
    args = ap.parse_args(argv)

    if args.model:
        source = onnx.load(args.model)  # external weight files next to it are loaded too
        print(f"graph: {args.model} ({len(source.graph.node)} nodes)")
    else:
        source = demo_model()
        print(f"graph: built-in demo ({len(source.graph.node)} nodes); pass an .onnx path to use your own")
    shapes = parse_shapes(args.shape)

    # 1. Normalize: initializers, fp32 everywhere, static shapes, 2-D MatMuls, folded, sorted.
    graph = normalize(gs.import_onnx(source), shapes).graph
    # 2. Place: node name -> Placement(backend, reason), from the target's op table and the precision rule.
    placement = place(graph, target=args.target)
    # 3. Partition: one topological sweep into execution-ordered segments; tiny NPU runs fold back to CPU.
    segments = propose_segments(graph, placement, GROUPINGS[args.policy], min_npu_flops=args.min_npu_flops)
    # 4. Cut: each segment becomes a standalone ONNX model with typed, static boundary tensors.
    cuts = extract_segments(graph, segments)

    print(f"\nplacement ({args.target}):")
    for node in graph.nodes:
        p = placement[node.name]
        print(f"  {node.name:<28} {node.op:<14} {p.backend}  {p.reason}")

    print(f"\nsegments (policy {args.policy}):")
    for i, (seg, cut) in enumerate(zip(segments, cuts)):
        print(f"  s{i}  {cut.backend:<3}  {cut.nodes:>3} nodes  {cut.matmul_flops / 1e6:8.3f} MFLOP  ({seg.reason})")
        print(f"       in:  {', '.join(f'{t.name}{list(t.shape)}' for t in cut.inputs)}")
        print(f"       out: {', '.join(f'{t.name}{list(t.shape)}' for t in cut.outputs)}")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            onnx.save(cut.model, str(args.out / f"s{i}.{cut.backend}.onnx"))
    bb = boundary_bytes(cuts)
    n_npu = sum(c.backend == "npu" for c in cuts)
    print(f"\nsummary: {len(cuts)} segments, {n_npu} on the NPU, {100 * flops_share(cuts):.1f}% of MatMul FLOPs "
          f"on the NPU, {bb['total']:,} bytes into/out of NPU segments per run")
    if args.out:
        print(f"saved {len(cuts)} segment models in {args.out}/")
    if not args.no_check:
        try:
            diff = check_chain(source, cuts, shapes)
        except Exception as exc:  # noqa: BLE001  (the check is a bonus; the segments above stand)
            print(f"check skipped: onnxruntime could not run it ({type(exc).__name__}: {str(exc)[:200]})")
        else:
            fp16 = any(i.data_type == TensorProto.FLOAT16 for i in source.graph.initializer) or any(
                a.t.data_type == TensorProto.FLOAT16 for n in source.graph.node for a in n.attribute if a.name == "value")
            note = " (the source computes in float16, the segments in float32)" if fp16 else ""
            print(f"check: segments chained on onnxruntime vs the source graph: max abs difference {diff:.3g}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
