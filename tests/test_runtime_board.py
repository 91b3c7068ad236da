"""The board's runtime on the trained fixture's fp16 build: no compiler inside, the C-API runner on a stand-in.

What the stand-ins show: our side of librknnrt's and rknn-toolkit-lite2's contracts (calls, bindings, the
program's buffers, zero copies, error messages, the state ping-pong, CPU work beside NPU calls). What they
cannot show: anything about the board itself (timings, native layouts, the NPU's numerics): the stand-in
computes each "model" with onnxruntime on the segment's ONNX.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from rwkv_ref import cosine
from standin import build, hooks

from rwkv2rknn.program import load as load_program
from rwkv2rknn.run.chain import Chain, runner_factory

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
pytestmark = [pytest.mark.rknn,
              pytest.mark.skipif(build.gcc() is None, reason="no C compiler to build the librknnrt stand-in")]


@pytest.fixture(scope="module")
def built(trained_cli_build):
    assert trained_cli_build.build.returncode == 0, trained_cli_build.build.stderr[-2000:]
    return trained_cli_build.out


@pytest.fixture(scope="module")
def so_path(tmp_path_factory) -> Path:
    return build.build_library(tmp_path_factory.mktemp("standin"))


def _onnx_map(out: Path) -> dict:
    prog = load_program(out / "program.json")
    segs = list(prog.segments.values()) + list(prog.probes)
    return {str((out / s.rknn).resolve()): str((out / s.onnx).resolve()) for s in segs if s.rknn}


@pytest.fixture(scope="module")
def standin(so_path, built, monkeypatch_module):
    monkeypatch_module.setenv("LIBRKNNRT_PATH", str(so_path))
    lib = hooks.standin(so_path)
    hooks.register_onnx_map(lib, _onnx_map(built))
    return lib


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _env(so_path, out, tmp_path, **extra) -> dict:
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(_onnx_map(out)))
    site = HERE / "standin" / "site"
    return {**os.environ, "LIBRKNNRT_PATH": str(so_path), "RKNN_STANDIN_MAP": str(mapping),
            "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra}


def runtime_only(*args, env=None, timeout=600):
    """`python -m rwkv2rknn.run ARGS` with the compiler's packages unimportable (tests/runtime_only.py)."""
    return subprocess.run([sys.executable, str(HERE / "runtime_only.py"), "rwkv2rknn.run", *map(str, args)],
                          capture_output=True, text=True, env=env or {**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=timeout, cwd=ROOT)


# -- the C-API runner --------------------------------------------------------------------------------------

def test_rknn_c_matches_ort_with_zero_copies_per_token(built, standin, heldout):
    tokens = list(heldout(64))
    with Chain(None, runner_factory(built, "ort")) as chain:
        ref = [chain.step(t).astype(np.float64).copy() for t in tokens]
    with Chain(None, runner_factory(built, "rknn-c")) as chain:
        standin.reset_counters()
        got = [chain.step(tokens[0]).astype(np.float64).copy()]
        first = standin.counters()
        for t in tokens[1:]:
            got.append(chain.step(t).astype(np.float64).copy())
        after = standin.counters()
        npu_steps = sum(1 for s in chain.program.decode.steps if s.device == "npu")
    cos = [cosine(a, b) for a, b in zip(got, ref)]
    print(f"rknn-c (stand-in) vs ort over 64 tokens: min logits cosine {min(cos):.7f}; "
          f"{after['runs'] - first['runs']} NPU runs for 63 tokens")
    assert min(cos) >= 0.9999
    assert after["runs"] - first["runs"] == 63 * npu_steps > 0
    for key in ("allocs", "alloc_bytes", "input_copies", "output_copies", "conversions", "restrides"):
        assert after[key] - first[key] == 0, (key, first[key], after[key])
    # and nothing went through the copying path at all: every buffer bound once, pass-through
    assert after["calls"]["rknn_inputs_set"] == after["calls"]["rknn_outputs_get"] == 0
    assert after["calls"]["rknn_set_io_mem"] - first["calls"]["rknn_set_io_mem"] == 0


def test_state_ping_pong_holds_over_1000_tokens(built, standin, heldout):
    """1,000 tokens of held-out text through the C runner: the states swap buffers every token, never copied;
    the logits still track onnxruntime's at the end (a state read from the wrong buffer diverges at once)."""
    tokens = list(heldout(1000))
    with Chain(None, runner_factory(built, "ort")) as ort_chain, Chain(None, runner_factory(built, "rknn-c")) as c:
        worst = 1.0
        for k, t in enumerate(tokens):
            a = ort_chain.step(t).astype(np.float64)
            b = c.step(t).astype(np.float64)
            if k % 50 == 0 or k == len(tokens) - 1:
                worst = min(worst, cosine(a, b))
        assert c.parity == ort_chain.parity == 0  # 1,000 swaps
        for x, y in zip(ort_chain.get_state(), c.get_state()):
            assert np.allclose(x, y, rtol=1e-3, atol=1e-3)
    assert worst >= 0.9999, worst


def test_c_runner_cli_and_failing_calls_are_one_line(built, so_path, tmp_path):
    env = _env(so_path, built, tmp_path)
    r = runtime_only(built, "--backend", "rknn-c", "--tokens", "100,101,102", "--dump-logits", tmp_path / "c.npy",
                     "-q", env=env)
    assert r.returncode == 0, r.stderr
    r2 = runtime_only(built, "--backend", "ort", "--tokens", "100,101,102", "--dump-logits", tmp_path / "o.npy", "-q")
    assert r2.returncode == 0, r2.stderr
    assert cosine(np.load(tmp_path / "c.npy"), np.load(tmp_path / "o.npy")) >= 0.9999
    for function, code, meaning in (("rknn_init", -6, "model invalid"), ("rknn_run", -7, "context invalid"),
                                    ("rknn_set_io_mem", -5, "parameter invalid"),
                                    ("rknn_create_mem", -4, "rknn_create_mem")):
        r = runtime_only(built, "--backend", "rknn-c", "--tokens", "1,2", "-q",
                         env={**env, "RKNN_STANDIN_FAIL": f"{function}:{code}"})
        err = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(err) == 1 and "Traceback" not in r.stderr, (function, r.stderr)
        assert function in err[0] and meaning in err[0], err[0]


def test_bench_reports_npu_times_and_converted_bytes(built, so_path, tmp_path):
    env = _env(so_path, built, tmp_path)
    r = runtime_only(built, "--backend", "rknn-c", "--bench", "--json", "-q", "--max-tokens", "8", env=env)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    prog = load_program(built / "program.json")
    assert res["converted_bytes_per_token"] == pytest.approx(prog.decode.converted_bytes_per_token)
    npu = {s.segment for s in prog.decode.steps if s.device == "npu"}
    assert npu <= set(res["npu_run_us"]) and all(v >= 0 for v in res["npu_run_us"].values())


def test_overlap_runs_cpu_steps_beside_npu_calls(built, standin):
    """With every NPU call held 20 ms in C (the GIL released), a CPU step the program marks `overlap` runs on
    the worker while the main thread is inside the next NPU call: their intervals intersect."""
    prog = load_program(built / "program.json")
    if not any(s.overlap for s in prog.decode.steps):
        pytest.skip("this plan has no CPU step that may overlap")
    standin.set_run_us(20000)
    try:
        timeline = []
        with Chain(None, runner_factory(built, "rknn-c"), timeline=timeline) as chain:
            chain.step(10)
        with Chain(None, runner_factory(built, "rknn-c"), timeline=[], overlap=False) as serial:
            serial.step(10)
    finally:
        standin.set_run_us(None)
    over = [e for e in timeline if e["overlap"]]
    npu = [e for e in timeline if e["device"] == "npu"]
    assert over and npu
    assert any(o["t0"] < n["t1"] and n["t0"] < o["t1"] for o in over for n in npu), timeline


# -- no compiler inside ------------------------------------------------------------------------------------

def test_runtime_needs_no_compiler(built, so_path, tmp_path):
    """Generation, --bench and both board runners (stand-ins) in a process where the compiler cannot be
    imported; and the guard itself works (the compiler's CLI fails under it)."""
    r = runtime_only(built, "--backend", "ort", "--prompt", "def ", "--max-tokens", "16", "--temperature", "0", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def ") and len(r.stdout) > 6
    r = runtime_only(built, "--backend", "ort", "--bench", "--json", "-q", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["converted_bytes_per_token"] >= 0
    r = runtime_only(built, "--show-program", "--json")
    assert r.returncode == 0, r.stderr
    r = runtime_only(built, "--backend", "rknn-c", "--tokens", "1,2,3", "-q", env=_env(so_path, built, tmp_path))
    assert r.returncode == 0, r.stderr
    fake = tmp_path / "fake"
    (fake / "rknnlite").mkdir(parents=True)
    (fake / "rknnlite" / "__init__.py").write_text("")
    (fake / "rknnlite" / "api.py").write_text(textwrap.dedent(FAKE_RKNNLITE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)]),
           "FAKE_MAP": json.dumps(_onnx_map(built))}
    r = runtime_only(built, "--backend", "rknn-lite", "--tokens", "1,2,3", "--max-tokens", "4", "-q", env=env)
    assert r.returncode == 0, r.stderr
    guard = subprocess.run([sys.executable, str(HERE / "runtime_only.py"), "rwkv2rknn.cli", "estimate", str(built)],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert guard.returncode != 0 and "compiler" in guard.stderr


FAKE_RKNNLITE = '''
import json, os
import numpy as np
import onnxruntime as ort


class RKNNLite:
    NPU_CORE_AUTO, NPU_CORE_0, NPU_CORE_1, NPU_CORE_2, NPU_CORE_0_1, NPU_CORE_0_1_2 = 0, 1, 2, 4, 3, 7

    def __init__(self, verbose=False):
        self.sess = None

    def load_rknn(self, path):
        onnx_path = json.loads(os.environ["FAKE_MAP"]).get(os.path.realpath(path))
        if onnx_path is None:
            return -1
        self.sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        return 0

    def init_runtime(self, core_mask=0):
        return 0

    def inference(self, inputs, data_type=None, data_format=None, inputs_pass_through=None, get_frame_id=False,
                  reuse_outputs=False):
        feed = {i.name: np.asarray(a).astype(np.float16 if "16" in i.type else np.float32)
                for i, a in zip(self.sess.get_inputs(), inputs)}
        return [np.asarray(o, np.float32) for o in self.sess.run(None, feed)]

    def release(self):
        self.sess = None
'''


def test_show_program_json_lists_steps_and_buffers_of_both_plans(built):
    r = runtime_only(built, "--show-program", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["format"] == "rwkv2rknn-program" and set(d["plans"]) == {"decode", "prefill"}
    n = len(d["buffers"])
    for plan in d["plans"].values():
        assert plan["steps"] and all(0 <= b < n for s in plan["steps"] for b in s["inputs"] + s["outputs"])
        assert all(s["op"] in ("run", "convert") for s in plan["steps"])
        assert plan["converted_bytes_per_token"] == pytest.approx(plan["converted_bytes"] / plan["tokens"])
    assert all({"id", "name", "dtype", "shape", "role"} <= set(b) for b in d["buffers"])
    assert d["states"] and all(len(s["pair"]) == 2 for s in d["states"])
    text = runtime_only(built, "--show-program")
    assert text.returncode == 0 and "plan decode" in text.stdout and "plan prefill" in text.stdout


def test_estimate_prices_exactly_the_bytes_the_runtime_converts(built):
    """`run --bench --json`'s converted_bytes_per_token, times the profile's rate, is the estimate's conversion."""
    r = runtime_only(built, "--backend", "ort", "--bench", "--json", "-q", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    converted = json.loads(r.stdout.strip().splitlines()[-1])["converted_bytes_per_token"]
    assert converted > 0
    for board in ("rk3588", "rk3588-c"):
        e = subprocess.run([sys.executable, "-m", "rwkv2rknn", "estimate", str(built), "--board", board, "--json"],
                           capture_output=True, text=True, cwd=ROOT)
        assert e.returncode == 0, e.stderr
        d = json.loads(e.stdout.strip().splitlines()[-1])
        conv = d["conversion"]
        assert conv["converted_bytes_per_token"] == pytest.approx(converted)
        assert conv["npu_runtime_bytes_per_token"] == 0  # an fp16 build: nothing left for the NPU's runtime
        assert d["breakdown"]["conversion"] == pytest.approx(converted * conv["cpu_convert_ns_per_byte"] * 1e-6)
        assert set(d["runtimes"]) >= {"rk3588", "rk3588-c"} and all(v["predicted"] for v in d["runtimes"].values())
