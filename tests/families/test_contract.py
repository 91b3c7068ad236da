"""The family contract: every RWKV version of rwkv2rknn.families passes the same clauses, driven only by its Family.

For each family (tiny random weights at realistic scales, 2 layers x 64, vocab 64):
- its .pth round-trips through the version detector (no other family claims the keys) and its reader;
- its numpy reference matches the `rwkv` pip package (how to run the package is a family fact);
- its exported graphs on onnxruntime, chained through the family's layer interface, states and links, match
  the reference and the package;
- a split under every policy, with and without a prefill plan, runs (onnxruntime) to the package's logits;
- a build runs in the rknn-toolkit2 simulator to the package's logits (cosine >= 0.999, the same argmax);
- its trained fixture (tests/fixtures/<family>-tiny-trained.pth, where there is one) does all that too;
- an rwkv.cpp .bin of its weights reads back to the same logits (skipped, saying why, where the family has no
  rwkv.cpp reader in this branch).
A new family registered in rwkv2rknn.families runs here unchanged; a clause it fails names it.
Nothing outside rwkv2rknn/families/ tests for a version: `test_no_version_test_outside_families` checks it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from rwkv2rknn import families, policies

FAMILIES = families.all_families()
IDS = [f.name for f in FAMILIES]
LAYERS, EMBD, VOCAB, SEED = 2, 64, 64, 11
TOKENS = [int(t) for t in np.random.default_rng(5).integers(0, VOCAB, 12)]
ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
HELDOUT_TOKENS = 24
PREFILL = 4  # prompt tokens per prefill call: small graphs, and TOKENS is 3 whole chunks

_CACHE: dict = {}


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def worst(got, want) -> float:
    return min(cosine(a, b) for a, b in zip(got, want))


# -- the rwkv package, as the family says to run it ----------------------------------------------------------

@contextmanager
def _environ(env: dict):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def package_module(family):
    """A private copy of rwkv.model imported under the family's environment (the module picks its classes from
    the environment at import time, so each setting gets its own module object)."""
    pytest.importorskip("torch")
    rwkv = pytest.importorskip("rwkv")
    env = {"RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0", **family.package_env}
    key = ("module", tuple(sorted(env.items())))
    if key not in _CACHE:
        name = "_rwkv_model_" + "_".join(f"{k}{v}" for k, v in sorted(env.items()))
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(rwkv.__file__), "model.py"))
        module = importlib.util.module_from_spec(spec)
        with _environ(env):
            spec.loader.exec_module(module)
        _CACHE[key] = module
    return _CACHE[key]


def package_logits(family, pth: Path, tokens) -> np.ndarray:
    """Logits [T, V] of the `rwkv` package (strategy cpu fp32) on a .pth, token by token from its zero state."""
    import torch

    cls = getattr(package_module(family), family.package_class)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _environ({"RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0", **family.package_env}):  # read again at runtime
            model = cls(str(pth)[:-4], "cpu fp32")
            state, out = None, []
            for t in tokens:
                logits, state = model.forward([int(t)], state)
                out.append(logits.detach().double().numpy())
    finally:
        torch.set_num_threads(threads)
    return np.stack(out)


# -- per family, once per session ------------------------------------------------------------------------------

def _case(family, tmp_path_factory) -> dict:
    """Random weights of the family, their .pth, the package's and the reference's logits."""
    key = ("case", family.name)
    if key not in _CACHE:
        d = tmp_path_factory.mktemp(f"contract_{family.name}")
        w = family.random_weights(LAYERS, EMBD, VOCAB, seed=SEED).materialize()
        family.save_pth(w, d / "m.pth")
        _CACHE[key] = {"dir": d, "weights": w, "pth": d / "m.pth",
                       "reference": family.reference(w).run(TOKENS)}
    return _CACHE[key]


def _package(family, case) -> np.ndarray:
    if "package" not in case:
        case["package"] = package_logits(family, case["pth"], TOKENS)
    return case["package"]


def _exported(family, case, dtype: str) -> Path:
    key = f"export_{dtype}"
    if key not in case:
        out = case["dir"] / f"model_{dtype}"
        family.export(family.load_pth(case["pth"]), out, dtype=dtype, progress=False)
        case[key] = out
    return case[key]


@pytest.fixture(params=FAMILIES, ids=IDS)
def family(request):
    return request.param


@pytest.fixture
def case(family, tmp_path_factory):
    return _case(family, tmp_path_factory)


def run_graphs(family, directory: Path, tokens, dtype: str) -> np.ndarray:
    """The exported graphs chained on onnxruntime by the family's interface alone: its layer inputs and outputs,
    its states (zero, or their fp32 initial rows in an fp32 model) and its links."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # the default refuses fp16 graphs
    so.intra_op_num_threads = 1
    np_dtype = np.float16 if dtype == "float16" else np.float32

    def session(name):
        return ort.InferenceSession(str(directory / f"{name}.onnx"), so, providers=["CPUExecutionProvider"])

    embed, head = session("embed"), session("head")
    n_layer = sum(1 for _ in directory.glob("mixing_*.onnx"))
    layers = [session(f"mixing_{i}") for i in range(n_layer)]
    states = []
    for s in layers:
        shapes = {i.name: i.shape for i in s.get_inputs()}
        st = {}
        for spec in family.states:
            a = np.zeros(shapes[spec.input], np_dtype)
            if dtype == "float32":
                for row, value in spec.rows_fp32.items():
                    a[int(row)] = value
            st[spec.input] = a
        states.append(st)
    links = [(a, o, b, i) for a, o, b, i in family.links(n_layer) if a.startswith("mixing_") and b.startswith("mixing_")]
    out = []
    for t in tokens:
        x = embed.run(None, {"token": np.array([t], np.int32)})[0]
        produced: dict = {}
        for k, s in enumerate(layers):
            name = f"mixing_{k}"
            feeds = {"input": x, **states[k]}
            feeds.update({i: produced[(a, o)] for a, o, b, i in links if b == name and i != "input"})
            res = dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))
            for spec in family.states:
                states[k][spec.input] = res[spec.output]
            produced.update({(name, o): v for o, v in res.items()})
            x = res["output"]
        out.append(head.run(None, {"x": x})[0].astype(np.float64))
    return np.stack(out)


def chain_logits(out_dir: Path, tokens, backend: str = "ort") -> np.ndarray:
    from rwkv2rknn.manifest import Manifest
    from rwkv2rknn.run.chain import Chain, runner_factory

    m = Manifest.load(out_dir / "manifest.json")
    with Chain(m, runner_factory(m, backend)) as chain:
        return np.stack([chain.step(int(t)).astype(np.float64) for t in tokens])


# -- checkpoints -------------------------------------------------------------------------------------------------

def test_pth_is_detected_and_read_back(family, case):
    from rwkv2rknn.families.pth import pth_keys

    keys = pth_keys(case["pth"])
    claim = [f.name for f in FAMILIES if f.detect(keys)]
    assert claim == [family.name], f"{family.label}: its .pth keys are claimed by {claim}"
    found, back = families.load_checkpoint(case["pth"])
    assert found is family
    assert (back.n_layer, back.n_embd, back.n_vocab) == (LAYERS, EMBD, VOCAB)
    for (n1, a1), (n2, a2) in zip(case["weights"].tensors(), back.tensors()):
        assert n1 == n2 and a1.dtype == a2.dtype == np.float32, f"{family.label}: {n1} / {n2}"
        np.testing.assert_allclose(a2, a1, rtol=1e-6, atol=1e-7, err_msg=f"{family.label}: {n1}")


def test_reference_matches_the_rwkv_package(family, case):
    pkg = _package(family, case)
    cos = worst(pkg, case["reference"])
    stateless = family.reference(case["weights"])
    unshifted = worst(pkg[1:], [stateless.forward(t)[0] for t in TOKENS[1:]])
    print(f"{family.label}: reference vs the rwkv package, worst cosine {cos:.12f}; without the state {unshifted:.4f}")
    assert cos >= 0.9999, f"{family.label}: the reference differs from the package ({cos})"
    assert unshifted < 0.999, f"{family.label}: the comparison does not see the recurrence"


# -- graphs ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, floor", [("float32", 0.99999), ("float16", 0.999)])
def test_exported_graphs_on_onnxruntime(family, case, dtype, floor):
    got = run_graphs(family, _exported(family, case, dtype), TOKENS, dtype)
    cos_ref, cos_pkg = worst(got, case["reference"]), worst(got, _package(family, case))
    print(f"{family.label} {dtype} graphs: vs reference {cos_ref:.9f}, vs the rwkv package {cos_pkg:.9f}")
    assert np.isfinite(got).all()
    assert cos_ref >= floor, f"{family.label} {dtype}: onnxruntime vs the family's reference {cos_ref}"
    assert cos_pkg >= min(floor, 0.9999), f"{family.label} {dtype}: onnxruntime vs the rwkv package {cos_pkg}"


def test_graph_builders_are_the_export(family, case):
    """export writes exactly what the family's three builders make."""
    import onnx

    d = _exported(family, case, "float32")
    w = family.load_pth(case["pth"])  # what was exported (a .pth may store a value in another form)
    built = {"embed": family.build_embed(w.embed(), "float32"), "head": family.build_head(w.head(), "float32"),
             **{f"mixing_{i}": family.build_mixing(w.layer(i), i, "float32") for i in range(LAYERS)}}
    for name, model in built.items():
        onnx.checker.check_model(model)
        on_disk = onnx.load(str(d / f"{name}.onnx"))
        assert model.graph.SerializeToString() == on_disk.graph.SerializeToString(), f"{family.label}: {name}"
        ins = {i.name: len(i.type.tensor_type.shape.dim) for i in model.graph.input}
        outs = {o.name: len(o.type.tensor_type.shape.dim) for o in model.graph.output}
        if name.startswith("mixing_"):
            assert (ins, outs) == family.layout(int(name.split("_")[1])), f"{family.label}: {name}'s interface"


# -- split -------------------------------------------------------------------------------------------------------

_DEFAULT_SPLITS = {("fused", PREFILL), ("deep", PREFILL)}  # the rest: slow (each policy's own tests cover it)
SPLITS = [pytest.param(p, chunk, marks=() if (p, chunk) in _DEFAULT_SPLITS else pytest.mark.slow,
                       id=f"{p}-{'prefill' if chunk else 'decode'}")
          for p in policies.names() for chunk in (0, PREFILL)]


def _split(family, case, policy: str, chunk: int) -> tuple[Path, dict]:
    from rwkv2rknn.split import split_model

    key = f"split_{policy}_{chunk}"
    if key not in case:
        out = case["dir"] / f"out_{policy}_{chunk}"
        data, _ = split_model([_exported(family, case, "float16")], out, policy=policy, prefill_chunk=chunk,
                              progress=False)
        case[key] = (out, data)
    return case[key]


@pytest.mark.parametrize("policy, chunk", SPLITS)
def test_split_runs_to_the_package(family, case, policy, chunk):
    from rwkv2rknn.manifest import Manifest
    from rwkv2rknn.run.chain import Chain

    out, data = _split(family, case, policy, chunk)
    assert data["model"]["family"] == family.name
    assert len(data["model"]["state"]) == LAYERS * len(family.states)
    pkg = _package(family, case)
    got = chain_logits(out, TOKENS)
    cos = worst(got, pkg)
    print(f"{family.label} split {policy} (prefill chunk {chunk}): onnxruntime chain vs the rwkv package {cos:.8f}")
    assert cos >= 0.9999, f"{family.label} {policy}: the split's logits differ from the package's ({cos})"
    assert int(got[-1].argmax()) == int(pkg[-1].argmax())
    m = Manifest.load(out / "manifest.json")
    assert bool(m.prefill) == bool(chunk)
    if chunk:
        with Chain(m) as chain:
            last = chain.feed(TOKENS).astype(np.float64)
        assert cosine(last, pkg[-1]) >= 0.9999, f"{family.label} {policy}: the prefill plan's logits"


def test_fused_keeps_the_recurrence_fp32_on_the_cpu(family, case):
    """The precision seeds placement reads are the family's: every state update lands in a CPU segment."""
    out, data = _split(family, case, "fused", PREFILL)
    for g in data["graphs"]:
        if g["name"].startswith("mixing_"):
            update = [p for p in g["placement"] if "precision rule" in p["reason"]]
            assert update, f"{family.label}: nothing pinned by the precision rule in {g['name']}"
            assert all(p["backend"] == "cpu" for p in update), f"{family.label}: {g['name']}"


# -- build and the simulator ---------------------------------------------------------------------------------------

def _build(out: Path) -> None:
    pytest.importorskip("rknn.api", reason="rknn-toolkit2 is not installed (build compiles with it)")
    from rwkv2rknn.build.driver import build_manifest

    build_manifest(out, runtime=None, probes=False, verify_model=False, progress=False, jobs=1)


def _assert_built(family, out: Path) -> None:
    """Some of the layer's work really runs on the (simulated) NPU: a built .rknn segment of a mixing graph."""
    from rwkv2rknn.manifest import Manifest

    m = Manifest.load(out / "manifest.json")
    built = [s["id"] for g in m.data["graphs"] if "mixing" in g["name"] or "group" in g["name"]
             for s in g["segments"] if s["backend"] == "npu" and s.get("rknn")]
    assert built, f"{family.label}: no NPU segment of a layer was built"


@pytest.mark.rknn
def test_build_runs_in_the_simulator(family, tmp_path):
    """One layer, one plan (fused, decode only: the fastest build), built and run in the simulator against the
    package; the 2-layer model's plans and the trained fixtures are checked the same way in the slow run."""
    from rwkv2rknn.split import split_model

    w = family.random_weights(1, EMBD, VOCAB, seed=SEED + 1)
    family.save_pth(w, tmp_path / "m.pth")
    family.export(family.load_pth(tmp_path / "m.pth"), tmp_path / "model", progress=False)
    split_model([tmp_path / "model"], tmp_path / "out", prefill_chunk=0, progress=False)
    _build(tmp_path / "out")
    _assert_built(family, tmp_path / "out")
    tokens = TOKENS[:5]
    pkg = package_logits(family, tmp_path / "m.pth", tokens)
    sim = chain_logits(tmp_path / "out", tokens, "rknn-sim")
    cos = worst(sim, pkg)
    print(f"{family.label}: simulator chain vs the rwkv package, worst cosine {cos:.6f}")
    assert cos >= 0.999, f"{family.label}: the simulator's logits differ from the package's ({cos})"
    assert int(sim[-1].argmax()) == int(pkg[-1].argmax())


@pytest.mark.slow
@pytest.mark.rknn
@pytest.mark.parametrize("policy", ["fused", "deep"])
def test_two_layer_plans_run_in_the_simulator(family, case, policy):
    out, _ = _split(family, case, policy, PREFILL)
    _build(out)
    _assert_built(family, out)
    pkg = _package(family, case)
    sim = chain_logits(out, TOKENS, "rknn-sim")
    cos = worst(sim, pkg)
    print(f"{family.label} {policy}: simulator chain vs the rwkv package, worst cosine {cos:.6f}")
    assert cos >= 0.999 and int(sim[-1].argmax()) == int(pkg[-1].argmax())


# -- the trained fixtures ------------------------------------------------------------------------------------------

def _trained(family):
    pth = FIXTURES / f"{family.name}-tiny-trained.pth"
    if not pth.is_file():
        pytest.skip(f"{family.label}: no trained fixture ({pth.name}) in tests/fixtures")
    return pth


def _heldout(n: int) -> list[int]:
    from conftest import heldout_bytes

    return list(heldout_bytes(n, offset=1000))


def _trained_case(family, tmp_path_factory, policy: str, chunk: int) -> dict:
    from rwkv2rknn.split import split_model

    key = ("trained", family.name, policy, chunk)
    if key not in _CACHE:
        pth = _trained(family)
        d = tmp_path_factory.mktemp(f"trained_{family.name}")
        found, w = families.load_checkpoint(pth)
        assert found is family
        family.export(w, d / "model", progress=False)
        split_model([d / "model"], d / "out", policy=policy, prefill_chunk=chunk, progress=False)
        tokens = _heldout(HELDOUT_TOKENS)
        _CACHE[key] = {"out": d / "out", "tokens": tokens, "package": package_logits(family, pth, tokens)}
    return _CACHE[key]


@pytest.mark.parametrize("policy", ["fused", pytest.param("deep", marks=pytest.mark.slow)])
def test_trained_fixture_on_onnxruntime(family, tmp_path_factory, policy):
    tc = _trained_case(family, tmp_path_factory, policy, 0 if policy == "fused" else PREFILL)  # quick by default
    got = chain_logits(tc["out"], tc["tokens"])
    cos = worst(got, tc["package"])
    agree = float(np.mean(got.argmax(-1) == tc["package"].argmax(-1)))
    print(f"{family.label} trained, {policy}: onnxruntime vs the rwkv package over {len(got)} held-out bytes: "
          f"worst cosine {cos:.8f}, argmax agrees on {agree:.0%}")
    assert cos >= 0.9999 and int(got[-1].argmax()) == int(tc["package"][-1].argmax())


@pytest.mark.slow
@pytest.mark.rknn
@pytest.mark.parametrize("policy", ["fused", "deep"])
def test_trained_fixture_in_the_simulator(family, tmp_path_factory, policy):
    tc = _trained_case(family, tmp_path_factory, policy, PREFILL)
    _build(tc["out"])
    _assert_built(family, tc["out"])
    sim = chain_logits(tc["out"], tc["tokens"], "rknn-sim")
    cos = worst(sim, tc["package"])
    agree = float(np.mean(sim.argmax(-1) == tc["package"].argmax(-1)))
    print(f"{family.label} trained, {policy}: simulator vs the rwkv package over {len(sim)} held-out bytes: "
          f"worst cosine {cos:.6f}, argmax agrees on {agree:.0%}")
    assert cos >= 0.999 and int(sim[-1].argmax()) == int(tc["package"][-1].argmax())


# -- rwkv.cpp files --------------------------------------------------------------------------------------------------

def test_rwkvcpp_bin_reads_back_to_the_same_logits(family, case, tmp_path):
    """A .bin in rwkv.cpp's format (ggmf, fp16) of the family's weights exports to the .pth's logits.

    The writer is the family's own `save_bin` where it has one, else the test-side writer that follows rwkv.cpp's
    converter step by step (tests/ggml_writer.py) from the family's .pth; the reader is `families.load_checkpoint`."""
    module = importlib.import_module(f"rwkv2rknn.families.{family.name}")
    if hasattr(module, "save_bin"):
        module.save_bin(case["weights"], tmp_path / "m.bin", dtype="float16")
    else:
        import torch
        from ggml_writer import write_rwkvcpp

        family.save_pth(case["weights"], tmp_path / "m.pth")
        sd = {k: v.float().numpy() for k, v in torch.load(tmp_path / "m.pth", weights_only=True).items()}
        write_rwkvcpp(sd, tmp_path / "m.bin", "FP16")
    found, back = families.load_checkpoint(tmp_path / "m.bin")
    assert found is family
    family.export(back, tmp_path / "model", dtype="float32", progress=False)
    got = run_graphs(family, tmp_path / "model", TOKENS, "float32")
    cos = worst(got, _package(family, case))
    assert cos >= 0.9999, f"{family.label}: the .bin's logits differ from the .pth's ({cos})"


# -- the seam ----------------------------------------------------------------------------------------------------------

def _strings(tree: ast.AST):
    """String constants of a module that are not docstrings (docstrings describe; code tests)."""
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_no_version_test_outside_families():
    """No module of the package outside rwkv2rknn/families/ names a version in its code (a string it compares,
    looks up or prints): everything about a version is asked of its family."""
    names = {f.name for f in FAMILIES} | {f.label for f in FAMILIES}
    pattern = re.compile("|".join(re.escape(n) for n in sorted(names)) + r"|\bx0[4-7]\d\b", re.IGNORECASE)
    package = ROOT / "rwkv2rknn"
    hits = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("rwkv2rknn", "families"):
            continue
        for line, s in _strings(ast.parse(path.read_text(), str(path))):
            if pattern.search(s):
                hits.append(f"{rel}:{line}: {s[:80]!r}")
    assert not hits, "version names outside rwkv2rknn/families/:\n" + "\n".join(hits)
    # and the check can fail: it finds a planted one
    planted = ast.parse('def f(m):\n    """RWKV-7 is fine in a docstring."""\n    return m == "rwkv7"\n')
    assert [s for _, s in _strings(planted) if pattern.search(s)] == ["rwkv7"]


def test_every_family_fills_the_protocol():
    from rwkv2rknn.families.base import Family

    for f in FAMILIES:
        assert isinstance(f, Family)
        for field in ("detect", "from_state_dict", "load_pth", "save_pth", "random_weights", "build_embed",
                      "build_mixing", "build_head", "export", "reference"):
            assert callable(getattr(f, field)), f"{f.label}: {field} is not callable"
        assert set(f.layer0_inputs) >= {"input"} and set(f.layer0_outputs) >= {"output"}
        assert {s.input for s in f.states} <= set(f.layer0_inputs), f.label
        assert {s.output for s in f.states} <= set(f.layer0_outputs), f.label
        assert set(f.precision.state_inputs) <= {s.input for s in f.states}, f.label
        if f.state_tuning is not None:
            assert f.state_tuning.input in {s.input for s in f.states}
            assert sorted(f.state_tuning.axes) == [0, 1, 2]
    assert len(set(IDS)) == len(IDS)
