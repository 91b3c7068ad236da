"""Test helpers for passes: a llama.onnx-style RWKV-4 mixing graph built with onnx.helper, ORT runners."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


class _B:
    def __init__(self, fp16: bool, weights_as: str):
        self.nodes, self.inits = [], []
        self.fp16, self.weights_as = fp16, weights_as
        self.k = 0

    def name(self, p):
        self.k += 1
        return f"{p}_{self.k}"

    def const(self, arr, p="w", float_=True):
        arr = np.asarray(arr)
        if float_:
            arr = arr.astype(np.float16 if self.fp16 else np.float32)
        n = self.name(p)
        t = numpy_helper.from_array(arr, n)
        if self.weights_as == "constant" and float_:
            self.nodes.append(helper.make_node("Constant", [], [n], value=t))  # unnamed, like torch export
        else:
            self.inits.append(t)
        return n

    def op(self, op, inputs, **attrs):
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def ln(self, x, c, rng):
        mu = self.op("ReduceMean", [x], axes=[-1])
        d = self.op("Sub", [x, mu])
        var = self.op("ReduceMean", [self.op("Pow", [d, self.const(2.0, "two")])], axes=[-1])
        std = self.op("Sqrt", [self.op("Add", [var, self.const(1e-5, "eps")])])
        y = self.op("Div", [d, std])
        y = self.op("Mul", [y, self.const(1 + 0.1 * rng.standard_normal(c), "gamma")])
        return self.op("Add", [y, self.const(0.1 * rng.standard_normal(c), "beta")])

    def mm(self, w, x):
        return self.op("MatMul", [w, x])

    def maximum(self, a, b):
        if not self.fp16:
            return self.op("Max", [a, b])
        a32 = self.op("Cast", [a], to=TensorProto.FLOAT)
        b32 = self.op("Cast", [b], to=TensorProto.FLOAT)
        return self.op("Cast", [self.op("Max", [a32, b32])], to=TensorProto.FLOAT16)


def rwkv_mixing_model(c=64, seed=0, fp16=True, weights_as="constant") -> onnx.ModelProto:
    """One RWKV-4 layer as llama.onnx exports it: weight-first MatMuls, Gather state rows, Cast-wrapped Max."""
    rng = np.random.default_rng(seed)
    b = _B(fp16, weights_as)
    s = 1.0 / np.sqrt(c)

    def w(o, i):
        return b.const(rng.standard_normal((o, i)) * s, "W")

    idx = [b.const(np.array(i, dtype=np.int64), f"idx{i}", float_=False) for i in range(5)]
    rows = [b.op("Gather", ["state_in", idx[i]], axis=0) for i in range(5)]
    s0, s1, aa, bb, pp = rows
    x = "input"
    xa = b.ln(x, c, rng)

    def mix(xx, ss):
        mu = rng.uniform(0, 1, c)
        return b.op("Add", [b.op("Mul", [xx, b.const(mu, "mu")]), b.op("Mul", [ss, b.const(1 - mu, "omu")])])

    xk, xv, xr = mix(xa, s1), mix(xa, s1), mix(xa, s1)
    r = b.op("Sigmoid", [b.mm(w(c, c), xr)])
    k = b.mm(w(c, c), xk)
    v = b.mm(w(c, c), xv)
    ww = b.op("Add", [b.const(rng.uniform(-1, 1, c), "u"), k])
    q = b.maximum(pp, ww)
    e1 = b.op("Exp", [b.op("Sub", [pp, q])])
    e2 = b.op("Exp", [b.op("Sub", [ww, q])])
    num = b.op("Add", [b.op("Mul", [e1, aa]), b.op("Mul", [e2, v])])
    den = b.op("Add", [b.op("Mul", [e1, bb]), e2])
    wkv = b.op("Div", [num, den])
    x1 = b.op("Add", [x, b.mm(w(c, c), b.op("Mul", [r, wkv]))])
    ww2 = b.op("Add", [pp, b.const(-np.exp(rng.uniform(-2, 1, c)), "w")])
    q2 = b.maximum(ww2, k)
    f1 = b.op("Exp", [b.op("Sub", [ww2, q2])])
    f2 = b.op("Exp", [b.op("Sub", [k, q2])])
    aa2 = b.op("Add", [b.op("Mul", [f1, aa]), b.op("Mul", [f2, v])])
    bb2 = b.op("Add", [b.op("Mul", [f1, bb]), f2])
    xf = b.ln(x1, c, rng)
    fk, fr = mix(xf, s0), mix(xf, s0)
    rr = b.op("Sigmoid", [b.mm(w(c, c), fr)])
    kk = b.op("Relu", [b.mm(w(4 * c, c), fk)])
    kk = b.op("Mul", [kk, kk])
    y = b.op("Add", [x1, b.op("Mul", [rr, b.mm(w(c, 4 * c), kk)])])
    shp = b.const(np.array([1, -1], dtype=np.int64), "shape", float_=False)
    new_rows = [b.op("Reshape", [t, shp]) for t in (xf, xa, aa2, bb2, q2)]
    b.nodes.append(helper.make_node("Concat", new_rows, ["state_out"], axis=0))
    b.nodes.append(helper.make_node("Identity", [y], ["output"]))
    ft = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    g = helper.make_graph(
        b.nodes, "mixing",
        [helper.make_tensor_value_info("input", ft, [c]), helper.make_tensor_value_info("state_in", ft, [5, c])],
        [helper.make_tensor_value_info("output", ft, [c]), helper.make_tensor_value_info("state_out", ft, [5, c])],
        initializer=b.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 16)], producer_name="test")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def mixing_feeds(c, seed=1, dtype=np.float32):
    rng = np.random.default_rng(seed)
    state = rng.standard_normal((5, c)).astype(np.float32)
    state[2:4] = np.abs(state[2:4])
    return {"input": rng.standard_normal(c).astype(dtype), "state_in": state.astype(dtype)}


def groupings() -> dict:
    """Policy name -> its passes.partition.Grouping, from the policy registry (rwkv2rknn/policies.py)."""
    from rwkv2rknn import policies

    return {p.name: p.grouping for p in policies.concrete()}


def helper_graph(nodes, inputs, outputs, inits=(), opset=16):
    """A normalized gs graph from onnx.helper nodes; inputs/outputs: [(name, shape)], all float32; float
    initializers become float32, integer ones keep their dtype."""
    import onnx_graphsurgeon as gs

    from passes.pipeline import normalize

    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    vo = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs]
    init = [numpy_helper.from_array(np.asarray(v, dtype=np.float32 if np.asarray(v).dtype.kind == "f" else None), k)
            for k, v in inits]
    m = helper.make_model(helper.make_graph(nodes, "g", vi, vo, initializer=init),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return normalize(gs.import_onnx(m)).graph


def export_checked(g) -> onnx.ModelProto:
    """gs graph -> ONNX model, passing onnx.checker's full check."""
    import onnx_graphsurgeon as gs

    m = gs.export_onnx(g)
    onnx.checker.check_model(m, full_check=True)
    return m


def rknn_build_and_run(model: onnx.ModelProto, path, samples=(), in_names=()):
    """Compile `model` with rknn-toolkit2 (rk3588, fp16, verbose) and run each feed of `samples` (inputs in the
    order `in_names`) in its simulator; returns (the compiler's parsed per-op table, outputs per sample)."""
    from rknn.api import RKNN

    from rwkv2rknn.compiler_table import capture_fds, parse_compiler_table

    import contextlib

    onnx.save(model, str(path))
    rknn = RKNN(verbose=True)
    # the verbose compiler writes check*.onnx into the working directory: keep them beside the model
    with contextlib.chdir(Path(path).parent):
        return _build_and_run(rknn, path, samples, in_names, capture_fds, parse_compiler_table)


def _build_and_run(rknn, path, samples, in_names, capture_fds, parse_compiler_table):
    try:
        with capture_fds() as cap:
            assert rknn.config(target_platform="rk3588") == 0
            assert rknn.load_onnx(model=str(path)) == 0
            ret = rknn.build(do_quantization=False)
            ok_rt = rknn.init_runtime() if samples and ret == 0 else 0
        assert ret == 0 and ok_rt == 0, cap.text[-3000:]
        outs = []
        for feed in samples:
            with capture_fds():
                outs.append(rknn.inference(inputs=[feed[n] for n in in_names], data_format=["nchw"] * len(in_names)))
        return parse_compiler_table(cap.text), outs
    finally:
        rknn.release()


def session(model: onnx.ModelProto, basic=False):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if basic:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    else:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_model(model, feeds, basic=False):
    sess = session(model, basic)
    names = [o.name for o in sess.get_outputs()]
    want = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in want})))


def run_segments(cuts, feeds):
    """Run cut segments in order, binding tensors by name through one table."""
    table = dict(feeds)
    for cs in cuts:
        onnx.checker.check_model(cs.model)
        out = run_model(cs.model, {i.name: table[i.name] for i in cs.inputs})
        for o in cs.outputs:
            assert out[o.name].dtype == np.dtype(o.dtype), o
            assert list(out[o.name].shape) == list(o.shape), o
        table.update(out)
    return table


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) if a.size else 0.0
