"""`python -m rwkv2rknn.run OUT --check` (PC side): a single-graph split against its source graphs.

Random realistic inputs go through the program and through each source graph upcast to fp32 on onnxruntime.
It reads the source ONNX with the compiler's packages, so it lives outside the runtime's import path.
"""

from __future__ import annotations

import numpy as np

from rwkv2rknn.errors import UserError


def run_check(chain, root, args) -> int:
    from rwkv2rknn.feeds import random_feed
    from rwkv2rknn.manifest import Manifest
    from rwkv2rknn.run.runners import OrtRunner

    manifest = Manifest.load(root, check_files=False)
    rng = np.random.default_rng(args.seed or 0)
    npu = chain.backend in ("rknn-sim", "rknn-lite", "rknn-c") and any(
        s.device == "npu" for s in chain.program.segments.values())
    fp16 = any(b.dtype == "float16" for b in chain.program.buffers)
    failed = 0
    for g in manifest.graphs:
        src = manifest.resolve(g["source"]["path"])
        if not src.exists():
            raise UserError(f"{manifest.path}: source graph {g['source']['path']} of {g['name']} is missing; "
                            "--check compares against it: copy it back or split again")
        feed = random_feed(g["inputs"], rng, [manifest.resolve(s["onnx"]) for s in g["segments"]])
        got = chain.run_graph(g["name"], feed)
        with OrtRunner(_fp32_source(src), level="basic", label=str(src)) as ref_runner:
            ref = ref_runner.infer(feed)
        for name in got:
            a = np.asarray(got[name], np.float64).ravel()
            b = np.asarray(ref[name], np.float64).ravel()
            if a.size != b.size:
                raise UserError(f"{src}: output {name} has {b.size} values, the chain {a.size}; split again")
            max_abs = float(np.abs(a - b).max()) if a.size else 0.0
            denom = np.linalg.norm(a) * np.linalg.norm(b)
            cos = float(a @ b / denom) if denom else (1.0 if max_abs == 0 else 0.0)
            scale = float(np.abs(b).max()) if b.size else 0.0
            if npu:
                ok = cos >= 0.999
            elif fp16:  # the board's fp16 buffers between segments, computed in fp32 inside each
                ok = cos >= 0.9999 and max_abs <= 2e-2 * max(scale, 1e-30)
            else:
                ok = max_abs <= 1e-4 * max(scale, 1e-30) or max_abs <= 1e-6
            failed += not ok
            print(f"{g['name']}/{name}: max_abs {max_abs:.3e} (rel {max_abs / max(scale, 1e-30):.2e}) "
                  f"cosine {cos:.6f} {'ok' if ok else 'FAIL'}")
    tol = ("cosine >= 0.999" if npu else "cosine >= 0.9999, max_abs <= 2e-2 * max|ref| (fp16 buffers)" if fp16
           else "max_abs <= 1e-4 * max|ref|")
    print(f"check ({chain.backend}, tolerance {tol}): {'FAILED' if failed else 'passed'}")
    return 1 if failed else 0


def _fp32_source(path) -> bytes:
    """The source graph with fp16 upcast to fp32 (onnxruntime runs fp16-mixing graphs badly or not at all)."""
    import onnx
    import onnx_graphsurgeon as gs

    from passes.fp32 import fp16_to_fp32
    from passes.normalize import constants_to_initializers, remove_identities
    from rwkv2rknn.model import load_onnx_file

    graph = constants_to_initializers(gs.import_onnx(load_onnx_file(path))).graph
    graph = remove_identities(fp16_to_fp32(graph).graph).graph
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model.ir_version = min(model.ir_version, 10)
    return onnx.shape_inference.infer_shapes(model).SerializeToString()
