"""RWKV-7 (x070): checkpoint reading, the numpy reference against the `rwkv` package, and the exported graphs."""

from __future__ import annotations

import collections
import importlib.util
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper, shape_inference
from rwkv_ref import cosine

from rwkv2rknn.errors import UserError
from rwkv2rknn.families.rwkv7 import (
    KEYS,
    RefModel7,
    build_embed7,
    build_head7,
    build_mixing7,
    detect,
    export_model7,
    load_pth7,
    lora_ranks,
    random_weights7,
    save_pth7,
    weights_from_state_dict,
)

LAYERS, EMBD, VOCAB, SEED = 2, 128, 512, 3
TOKENS = [int(t) for t in np.random.default_rng(77).integers(0, VOCAB, 16)]
ELEM = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT}
NP = {"float16": np.float16, "float32": np.float32}



@pytest.fixture(scope="module")
def weights():
    return random_weights7(LAYERS, EMBD, VOCAB, seed=SEED).materialize()


@pytest.fixture(scope="module")
def reference(weights):
    return RefModel7(weights).run(TOKENS)


@pytest.fixture(scope="module")
def exported(weights, tmp_path_factory):
    dirs = {}

    def get(dtype: str, weights_as: str = "constants"):
        if (dtype, weights_as) not in dirs:
            out = tmp_path_factory.mktemp(f"rwkv7_{dtype}_{weights_as}") / "m"
            export_model7(weights, out, dtype=dtype, weights_as=weights_as, progress=False)
            dirs[dtype, weights_as] = out
        return dirs[dtype, weights_as]

    return get


def _load_x070_package(monkeypatch):
    """The `rwkv` package's model module with RWKV-7 on, as a private copy.

    Another test imports rwkv.model for RWKV-4 in the same process; the module picks its model class at
    import time from the environment, so a separate module object keeps the two apart.
    """
    pytest.importorskip("torch")
    rwkv = pytest.importorskip("rwkv")
    monkeypatch.setenv("RWKV_V7_ON", "1")
    monkeypatch.setenv("RWKV_JIT_ON", "0")
    monkeypatch.setenv("RWKV_CUDA_ON", "0")
    spec = importlib.util.spec_from_file_location("_rwkv_model_x070", os.path.join(os.path.dirname(rwkv.__file__),
                                                                                    "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_graphs(directory, tokens, dtype: str, n_layer: int, n_head: int, head_size: int) -> np.ndarray:
    """Chain embed -> mixing_0..L-1 -> head on onnxruntime token by token; logits [T, V] as float64."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # the default refuses fp16 graphs
    so.intra_op_num_threads = 1

    def session(name):
        return ort.InferenceSession(str(directory / f"{name}.onnx"), so, providers=["CPUExecutionProvider"])

    embed, head = session("embed"), session("head")
    mixing = [session(f"mixing_{i}") for i in range(n_layer)]
    names = [[o.name for o in s.get_outputs()] for s in mixing]
    C = n_head * head_size
    shift = [np.zeros((2, C), NP[dtype]) for _ in range(n_layer)]
    wkv = [np.zeros((n_head, head_size, head_size), NP[dtype]) for _ in range(n_layer)]
    out = []
    for t in tokens:
        x = embed.run(None, {"token": np.array([t], np.int32)})[0]
        v_first = None
        for i, s in enumerate(mixing):
            feeds = {"input": x, "state_in": shift[i], "wkv_in": wkv[i]}
            if i:
                feeds["v_first"] = v_first
            res = dict(zip(names[i], s.run(None, feeds)))
            x, shift[i], wkv[i] = res["output"], res["state_out"], res["wkv_out"]
            if i == 0:
                v_first = res["v_first"]
        out.append(head.run(None, {"x": x})[0].astype(np.float64))
    return np.stack(out)


# -- checkpoint side --------------------------------------------------------------------------------------

def test_detect():
    w = random_weights7(2, 64, 32, seed=1)
    assert detect(name for name, _ in w.tensors())
    rwkv4 = ["emb.weight", "blocks.0.ln0.weight", "blocks.0.att.time_decay", "blocks.0.att.time_mix_k",
             "blocks.0.att.key.weight", "blocks.0.ffn.time_mix_r", "head.weight"]
    assert not detect(rwkv4)
    rwkv6 = ["blocks.0.att.time_maa_x", "blocks.0.att.time_decay_w1", "blocks.0.att.time_faaaa",
             "blocks.0.att.ln_x.weight"]
    assert not detect(rwkv6)
    assert detect(["emb.weight", "blocks.3.att.a0"])


def test_random_weights_per_part_and_scales():
    w = random_weights7(3, 256, 100, seed=5)
    assert (w.n_head, w.head_size, w.n_ffn) == (4, 64, 1024)
    again = random_weights7(3, 256, 100, seed=5)
    for i in range(3):
        a, b = w.layer(i), again.layer(i)
        assert all(np.array_equal(a[k], b[k]) for k in a)  # regenerated per part, bit for bit
    assert not np.array_equal(w.layer(1)["att.key.weight"], w.layer(2)["att.key.weight"])
    assert "att.v0" not in w.layer(0) and "att.v0" in w.layer(1)
    lay = w.layer(1)
    for key, sym in KEYS["layer"].items():
        if sym == (1, 1, "C"):  # vectors come flattened
            assert lay[key].shape == (256,), key
    assert lay["att.r_k"].shape == (4, 64)
    assert lay["att.w1"].shape == (256, w.lora_w) and lay["att.g2"].shape == (w.lora_g, 256)
    decay = np.exp(-0.606531 / (1 + np.exp(-lay["att.w0"].astype(np.float64))))
    assert decay.max() > 0.99 and decay.min() < 0.7  # slow and fast channels
    assert np.std(lay["ln1.weight"]) > 0.01 and np.abs(lay["ln1.bias"]).max() > 0.01
    assert min(lora_ranks(64).values()) >= 8
    assert lora_ranks(768) == {"Dw": 64, "Da": 64, "Dv": 32, "Dg": 128}  # the released 0.1B model's ranks


def test_pth_round_trip_and_bf16(tmp_path, weights):
    torch = pytest.importorskip("torch")
    save_pth7(weights, tmp_path / "m.pth")
    sd = torch.load(tmp_path / "m.pth", weights_only=True)
    assert tuple(sd["blocks.1.att.x_r"].shape) == (1, 1, EMBD)
    assert tuple(sd["blocks.0.att.r_k"].shape) == (EMBD // 64, 64)
    assert tuple(sd["blocks.1.att.w1"].shape) == (EMBD, weights.lora_w)
    back = load_pth7(tmp_path / "m.pth")
    assert back.dims == weights.dims
    for (n1, a1), (n2, a2) in zip(weights.tensors(), back.tensors()):
        assert n1 == n2 and a1.dtype == a2.dtype == np.float32 and np.array_equal(a1, a2), n1

    # a bf16 checkpoint that also carries the (ignored) layer-0 value LoRA, as trained files may
    sd16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    for k in ("v0", "v1", "v2"):
        sd16[f"blocks.0.att.{k}"] = sd16[f"blocks.1.att.{k}"].clone()
    torch.save(sd16, tmp_path / "b.pth")
    b = load_pth7(tmp_path / "b.pth")
    lay = b.layer(1)
    assert lay["att.key.weight"].dtype == np.float32 and "att.v0" not in b.layer(0)
    ref = sd16["blocks.1.att.key.weight"].to(torch.float32).numpy()
    assert np.array_equal(lay["att.key.weight"], ref)


@pytest.mark.parametrize("victim", ["blocks.1.att.k_a", "blocks.0.att.r_k", "head.weight", "blocks.0.att.w1",
                                    "blocks.1.att.v1"])
def test_loader_refuses_missing_tensor(tmp_path, weights, victim):
    torch = pytest.importorskip("torch")
    save_pth7(weights, tmp_path / "m.pth")
    sd = torch.load(tmp_path / "m.pth", weights_only=True)
    del sd[victim]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(UserError) as err:
        load_pth7(tmp_path / "broken.pth")
    msg = str(err.value)
    assert "\n" not in msg and victim in msg and "broken.pth" in msg and "missing" in msg


@pytest.mark.parametrize("victim, shape", [("blocks.1.att.w2", (5, EMBD)), ("blocks.0.att.x_g", (EMBD + 1,)),
                                           ("blocks.1.ffn.value.weight", (EMBD, EMBD))])
def test_loader_refuses_misshapen_tensor(weights, victim, shape):
    shapes = {name: a.shape for name, a in weights.tensors()}
    shapes[victim] = shape
    with pytest.raises(UserError) as err:
        weights_from_state_dict(lambda name: None, shapes, "model.pth")
    msg = str(err.value)
    assert "\n" not in msg and victim in msg and "model.pth" in msg and str(list(shape)) in msg


def test_loader_refuses_other_families(tmp_path):
    pytest.importorskip("torch")
    from rwkv2rknn.families.rwkv4 import random_weights, save_pth

    save_pth(random_weights(1, 32, 16, seed=0), tmp_path / "v4.pth")
    with pytest.raises(UserError, match="not an RWKV-7 checkpoint"):
        load_pth7(tmp_path / "v4.pth")


# -- reference against the rwkv package ---------------------------------------------------------------------

def test_reference_matches_rwkv_package(tmp_path, monkeypatch, weights, reference):
    module = _load_x070_package(monkeypatch)
    save_pth7(weights, tmp_path / "m.pth")
    theirs = module.RWKV(model=str(tmp_path / "m"), strategy="cpu fp32")
    assert type(theirs).__name__ == "RWKV_x070"
    state, ours = None, RefModel7(load_pth7(tmp_path / "m.pth"))
    cos, stateless = [], []
    for t, expect in zip(TOKENS, reference):
        out, state = theirs.forward([t], state)
        out = out.detach().double().numpy()
        cos.append(cosine(out, expect))
        stateless.append(cosine(out, ours.forward(t)[0]))
    print(f"rwkv package vs RefModel7: min cosine {min(cos):.12f} (1 - cos = {1 - min(cos):.2e})")
    assert min(cos) >= 0.9999, cos
    # the comparison is sensitive to the recurrence: without the state the logits differ a lot
    assert min(stateless[1:]) < 0.99


# -- graphs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, floor", [("float32", 0.99999), ("float16", 0.999)])
def test_graphs_match_reference(exported, weights, reference, dtype, floor):
    got = run_graphs(exported(dtype), TOKENS, dtype, weights.n_layer, weights.n_head, weights.head_size)
    cos = [cosine(g, r) for g, r in zip(got, reference)]
    print(f"{dtype} graphs vs RefModel7: min cosine {min(cos):.9f} (1 - cos = {1 - min(cos):.2e})")
    assert np.isfinite(got).all() and min(cos) >= floor, cos


def test_initializers_match_constants(exported, weights):
    a = run_graphs(exported("float32"), TOKENS[:4], "float32", weights.n_layer, weights.n_head, weights.head_size)
    b = run_graphs(exported("float32", "initializers"), TOKENS[:4], "float32", weights.n_layer, weights.n_head,
                   weights.head_size)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    m = onnx.load(exported("float32", "initializers") / "mixing_1.onnx")
    assert not any(n.op_type == "Constant" for n in m.graph.node)


def _io(model):
    def spec(v):
        t = v.type.tensor_type
        return v.name, t.elem_type, [d.dim_value for d in t.shape.dim]

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_graph_interfaces(exported, weights, dtype):
    C, V, H, N = weights.n_embd, weights.n_vocab, weights.n_head, weights.head_size
    f = ELEM[dtype]
    d = exported(dtype)
    files = sorted(p.name for p in d.iterdir() if p.suffix == ".onnx")
    assert files == sorted(["embed.onnx", "head.onnx"] + [f"mixing_{i}.onnx" for i in range(weights.n_layer)])
    expect = {
        "embed": ([("token", TensorProto.INT32, [1])], [("output", f, [C])]),
        "head": ([("x", f, [C])], [("output", f, [V])]),
        "mixing_0": ([("input", f, [C]), ("state_in", f, [2, C]), ("wkv_in", f, [H, N, N])],
                     [("output", f, [C]), ("state_out", f, [2, C]), ("wkv_out", f, [H, N, N]), ("v_first", f, [C])]),
        "mixing_1": ([("input", f, [C]), ("state_in", f, [2, C]), ("wkv_in", f, [H, N, N]), ("v_first", f, [C])],
                     [("output", f, [C]), ("state_out", f, [2, C]), ("wkv_out", f, [H, N, N])]),
    }
    for name, io in expect.items():
        model = onnx.load(d / f"{name}.onnx")
        onnx.checker.check_model(model, full_check=True)
        assert model.ir_version == 8 and model.opset_import[0].version == 16
        assert _io(model) == io, name


def _constants(model) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


@pytest.mark.parametrize("index", [0, 1])
def test_mixing_graph_structure(weights, index):
    """Weight-first projections, state products as [H,N,N] x [H,N,1], the only Exp on a non-positive argument."""
    H, N = weights.n_head, weights.head_size
    model = shape_inference.infer_shapes(build_mixing7(weights.layer(index), index, "float32"), strict_mode=True)
    consts = _constants(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    counts = collections.Counter(n.op_type for n in model.graph.node)
    state_products = []
    for n in model.graph.node:
        if n.op_type == "MatMul":
            a, b = n.input
            assert b not in consts, f"{n.name}: constant weight must be the first MatMul input"
            if a in consts:
                assert consts[a].ndim == 2 and len(shapes[b]) == 1
            else:
                state_products.append((shapes[a], shapes[b]))
        if n.op_type == "Exp":
            arg = producer[n.input[0]]
            assert arg.op_type == "Mul"
            ins = [producer.get(i) for i in arg.input]
            scale = [consts[i] for i in arg.input if i in consts]
            assert len(scale) == 1 and (scale[0] < 0).all()
            assert any(p is not None and p.op_type == "Sigmoid" for p in ins)
    assert state_products == [([H, N, N], [H, N, 1])] * 2
    assert counts["Exp"] == 1 and counts["LayerNormalization"] == 0 and counts["GroupNormalization"] == 0
    lora = 8 if index else 6  # w, a, g (+ v) as down/up pairs
    assert counts["MatMul"] == 4 + 2 + lora + 2


def test_small_graph_builders_match_reference(weights):
    import onnxruntime as ort

    ref = RefModel7(weights)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    emb = ort.InferenceSession(build_embed7(weights.embed(), "float32").SerializeToString(), so,
                               providers=["CPUExecutionProvider"])
    x = emb.run(None, {"token": np.array([TOKENS[0]], np.int32)})[0]
    assert cosine(x, ref.embedding(TOKENS[0])) > 0.999999
    head = ort.InferenceSession(build_head7(weights.head(), "float32").SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    y = head.run(None, {"x": x})[0]
    assert cosine(y, ref.logits(x.astype(np.float64))) > 0.999999


def test_export_rejects_bad_options(weights, tmp_path):
    with pytest.raises(UserError, match="dtype"):
        export_model7(weights, tmp_path / "a", dtype="bfloat16", progress=False)
    with pytest.raises(UserError, match="weights_as"):
        export_model7(weights, tmp_path / "b", weights_as="files", progress=False)
    assert not (tmp_path / "a").exists()
