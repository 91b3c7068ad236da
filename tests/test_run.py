"""The hybrid runtime: chain numerics, tracing, the CLI (tokens, logits, bench, check, chat), errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from run_support import whole_graph_manifest
from rwkv_ref import RefModel, cosine

from rwkv2rknn.families.rwkv4 import random_weights
from rwkv2rknn.run.__main__ import main as run_main
from rwkv2rknn.verify.trace import trace_segment_inputs
from rwkv2rknn.run.chain import Chain

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TOKENS = [1, 5, 200, 7, 9, 64, 33, 250]


def _split_model():
    try:
        from rwkv2rknn.split import split_model
    except ImportError as exc:  # the lead's split driver may not have landed yet
        pytest.skip(f"rwkv2rknn.split.split_model not available yet ({exc})")
    return split_model


@pytest.fixture(scope="module")
def whole(tiny_fp32, tmp_path_factory):
    return whole_graph_manifest(tiny_fp32, tmp_path_factory.mktemp("whole"))


@pytest.fixture(scope="module")
def split(tiny_fp32, tmp_path_factory):
    """The default split: the board's buffer dtypes (fp16 at every NPU segment's boundary)."""
    out = tmp_path_factory.mktemp("split") / "out"
    _split_model()([tiny_fp32], out, progress=False)
    return out / "manifest.json"


@pytest.fixture(scope="module")
def split32(tiny_fp32, tmp_path_factory):
    """fp32 boundaries everywhere (--npu-io float32): the cut alone, exact on onnxruntime."""
    out = tmp_path_factory.mktemp("split32") / "out"
    _split_model()([tiny_fp32], out, progress=False, npu_io="float32")
    return out / "manifest.json"


@pytest.fixture(scope="module")
def single(tiny_fp16, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    _split_model()([tiny_fp16 / "mixing_1.onnx", tiny_fp16 / "head.onnx", tiny_fp16 / "embed.onnx"], out,
                   progress=False)
    return out / "manifest.json"


@pytest.fixture(scope="module")
def ref_logits():
    return RefModel(random_weights(2, 64, 256, seed=0)).run(TOKENS)


def _cli(*args, stdin=None, timeout=300):
    return subprocess.run([PY, "-m", "rwkv2rknn.run", *map(str, args)], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


# -- chain numerics ------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["whole", "split32", "split"])
def test_chain_matches_reference(which, request, ref_logits):
    manifest = request.getfixturevalue(which)
    with Chain(manifest) as chain:
        got = np.stack([chain.step(t).copy() for t in TOKENS])
    for a, b in zip(got, ref_logits):
        assert cosine(a, b) > 0.99999
    if which == "split":  # fp16 between NPU and CPU segments: within fp16's resolution of values about 2
        assert np.abs(got - ref_logits).max() < 4e-3
    else:
        assert got.dtype == np.float32 and np.abs(got - ref_logits).max() < 1e-4


def test_reset_restarts_the_state(split):
    with Chain(split) as chain:
        first = chain.feed(TOKENS[:3]).copy()
        chain.feed(TOKENS[3:])
        chain.reset()
        again = chain.feed(TOKENS[:3])
    np.testing.assert_array_equal(first, again)


def test_state_is_carried_without_copies(split):
    """A state is two buffers that swap roles each token: what one token writes the next reads, in place."""
    with Chain(split) as chain:
        st = chain.program.states[0]
        a, b = (chain.arrays[i] for i in st.pair)
        assert a.dtype == np.float32 and a.ctypes.data != b.ctypes.data

        def state_io(parity):
            for _, _, step, ins in chain._raw[("decode", parity)]:
                seg = chain.program.segments.get(step.segment)
                if seg is not None and "state_in" in [t.name for t in seg.inputs] and step.graph == "mixing_0":
                    return ins[[t.name for t in seg.inputs].index("state_in")]
        assert state_io(0).ctypes.data == a.ctypes.data and state_io(1).ctypes.data == b.ctypes.data
        before = chain.get_state()[0]
        chain.step(3)  # reads a, writes b
        assert chain.parity == 1 and not np.array_equal(b, before) and np.array_equal(chain.get_state()[0], b)
        chain.step(4)  # reads b, writes a
        assert chain.parity == 0 and np.array_equal(chain.get_state()[0], a)


def test_trace_segment_inputs_whole_model(split):
    from rwkv2rknn.manifest import Manifest

    m = Manifest.load(split)
    traced = trace_segment_inputs(m, n_tokens=3, seed=1)
    assert set(traced) == {s["id"] for _, s in m.segments()}
    shared = set(m.prefill["order"]) - {g["name"] for g in m.prefill["graphs"]}  # e.g. the head, once per chunk
    for g, seg in m.segments():
        feeds = traced[seg["id"]]
        # decode segments: the 3 tokens one by one; prefill segments: one chunk from the state they leave
        assert len(feeds) == (1 if g["name"].startswith("prefill.") else 4 if g["name"] in shared else 3)
        for feed in feeds:
            assert list(feed) == [t["name"] for t in seg["inputs"]]
            for t in seg["inputs"]:
                assert feed[t["name"]].dtype == np.dtype(t["dtype"])
                assert list(feed[t["name"]].shape) == t["shape"]
                assert np.isfinite(feed[t["name"]]).all() or "state" in t["name"]
    # deterministic in the seed
    again = trace_segment_inputs(m, n_tokens=3, seed=1)
    sid = m.graphs[1]["segments"][0]["id"]
    for a, b in zip(traced[sid], again[sid]):
        for n in a:
            np.testing.assert_array_equal(a[n], b[n])


def test_trace_segment_inputs_single_graphs(single):
    traced = trace_segment_inputs(single, n_tokens=2)
    assert traced and all(len(v) == 2 for v in traced.values())
    for sid, feeds in traced.items():
        for feed in feeds:
            for name, a in feed.items():
                assert np.isfinite(a).all(), (sid, name)
    tok = [f["token"] for f in traced["embed.s0"]]
    assert all(0 <= int(t[0]) < 256 for t in tok)


# -- CLI: tokens, logits ----------------------------------------------------------------------------

def test_tokens_dump_logits(split, tmp_path, ref_logits, capsys):
    out = tmp_path / "l.npy"
    assert run_main([str(split), "--tokens", ",".join(map(str, TOKENS)), "--dump-logits", str(out),
                     "--backend", "ort", "-q"]) == 0
    assert capsys.readouterr().out == ""  # --tokens without --max-tokens generates nothing
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (256,)
    assert cosine(got, ref_logits[-1]) > 0.99999
    assert [p.name for p in tmp_path.iterdir()] == ["l.npy"]  # nothing half-written left beside it


@pytest.mark.parametrize("spelled", ["1 2 3", "1, 2, 3", " 1,2 3 "])
def test_tokens_separated_by_spaces(split, tmp_path, spelled):
    """"1 2 3" is three ids, never the one id 123."""
    want, got = tmp_path / "want.npy", tmp_path / "got.npy"
    assert run_main([str(split), "--tokens", "1,2,3", "--dump-logits", str(want), "--backend", "ort", "-q"]) == 0
    assert run_main([str(split), "--tokens", spelled, "--dump-logits", str(got), "--backend", "ort", "-q"]) == 0
    assert np.array_equal(np.load(want), np.load(got))


def test_empty_tokens_and_prompt_refused(split, capsys):
    assert run_main([str(split), "--tokens", "", "-q"]) == 2
    assert "--tokens: no ids given" in capsys.readouterr().err
    assert run_main([str(split), "--prompt", "", "--bench", "-q"]) == 2
    assert "--prompt encodes to no tokens" in capsys.readouterr().err


def test_generated_control_characters_not_written(split, capsys):
    assert run_main([str(split), "--prompt", "Hi", "--max-tokens", "64", "--seed", "0", "-q"]) == 0
    out = capsys.readouterr().out
    assert not any(ord(c) < 0x20 and c not in "\t\n" for c in out), repr(out)


def test_tokens_then_generate_ids(split, capsys):
    assert run_main([str(split), "--tokens", "1,2", "--max-tokens", "5", "--temperature", "0", "-q"]) == 0
    out = capsys.readouterr().out
    assert len(out.encode()) >= 1  # bytes tokenizer from the manifest: 5 decoded bytes
    assert not re.fullmatch(r"(\d+ )+\n", out), out  # text, not the ids printed one by one


def test_tokens_alone_say_what_was_fed(split, capsys):
    assert run_main([str(split), "--tokens", "1,2", "--backend", "ort", "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "fed 2 token(s); next token by argmax: " in captured.err and "--max-tokens N" in captured.err


def test_prompt_streams_text(split, capsys):
    assert run_main([str(split), "--prompt", "Hi", "--max-tokens", "8", "--seed", "3", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hi")


def test_rwkv_pip_package_agrees(tiny_fp32, split, tmp_path):
    """The `rwkv` PyPI package (torch, cpu fp32) on the same weights as a .pth, 16 tokens."""
    pytest.importorskip("rwkv")
    from rwkv2rknn.families.rwkv4 import save_pth

    save_pth(random_weights(2, 64, 256, seed=0), tmp_path / "m.pth")
    tokens = [int(t) for t in np.random.default_rng(5).integers(0, 256, 16)]
    code = (
        "import os, sys, numpy as np\n"
        "os.environ['RWKV_JIT_ON'] = '0'; os.environ['RWKV_CUDA_ON'] = '0'\n"
        "from rwkv.model import RWKV\n"
        f"m = RWKV(model={str(tmp_path / 'm')!r}, strategy='cpu fp32')\n"  # the package appends .pth
        f"out, state = m.forward({tokens}, None)\n"
        f"np.save({str(tmp_path / 'pip.npy')!r}, out.float().numpy())\n"
    )
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = _cli(split, "--backend", "ort", "--tokens", ",".join(map(str, tokens)), "--dump-logits",
               tmp_path / "ours.npy", "-q")
    assert res.returncode == 0, res.stderr
    a, b = np.load(tmp_path / "pip.npy"), np.load(tmp_path / "ours.npy")
    assert cosine(a, b) >= 0.9999
    assert int(a.argmax()) == int(b.argmax())


@pytest.mark.rknn
def test_rknn_sim_npu_segments(split, tmp_path):
    pytest.importorskip("rknn.api")
    from rwkv2rknn.manifest import Manifest

    assert any(s["backend"] == "npu" for _, s in Manifest.load(split).segments()), "split made no npu segment"
    res = {}
    for backend in ("ort", "rknn-sim"):
        out = tmp_path / f"{backend}.npy"
        r = _cli(split, "--backend", backend, "--tokens", ",".join(map(str, TOKENS)), "--dump-logits", out)
        assert r.returncode == 0, r.stderr[-2000:]
        res[backend] = np.load(out)
    assert res["rknn-sim"].dtype == np.float32
    assert cosine(res["ort"], res["rknn-sim"]) >= 0.999
    assert int(res["ort"].argmax()) == int(res["rknn-sim"].argmax())


# -- bench, trace ------------------------------------------------------------------------------------

def test_bench_json_last_line(split):
    r = _cli(split, "--bench", "--json", "--max-tokens", "4", "-q")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("prefill_ms_per_token", "decode_ms_per_token", "tokens_per_s", "peak_rss_mb", "segments"):
        assert key in data
    assert data["decode_ms_per_token"] > 0 and data["peak_rss_mb"] > 0
    assert set(data["segments"]) >= {"embed.s0", "head.s0"}


def test_bench_without_decode_steps_gives_no_overhead_figure(split):
    r = _cli(split, "--bench", "--json", "--max-tokens", "0", "--tokens", "1,2,3", "-q")
    assert r.returncode == 0, r.stderr
    assert "no decode steps timed, so no overhead figure" in r.stdout and "nan" not in r.stdout.lower()
    data = json.loads(r.stdout.strip().splitlines()[-1])  # strict JSON: no NaN
    assert data["decode_ms_per_token"] is None and data["tokens_per_s"] is None and data["decode_tokens"] == 0


def test_timing_off_means_plain_runner_calls(split):
    with Chain(split) as chain:
        for key, calls in chain._flat.items():
            for (fn, *_), (raw, *_) in zip(calls, chain._raw[key]):
                assert fn is raw
        chain.set_timing(True)
        chain.step(1)
        assert all(c == 1 for _, c in chain.segment_times.values())


def test_trace_prints_each_segment_call(split):
    r = _cli(split, "--tokens", "1", "--trace", "-q")
    assert r.returncode == 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("## STEP")]
    assert any("mixing_0.s0" in ln and "state_in:float32[5, 64]" in ln for ln in lines)


# -- check (single-graph manifests) ---------------------------------------------------------------------

def test_check_passes(single):
    r = _cli(single, "--check", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "passed" in r.stdout.splitlines()[-1]


def test_check_fails_over_tolerance(single, tmp_path, tiny_fp16):
    """Point mixing_1's source at another layer: same interface, other weights -> exit 1."""
    from rwkv2rknn.fsio import sha256_file

    d = tmp_path / "out"
    shutil.copytree(single.parent, d)
    data = json.loads((d / "manifest.json").read_text())
    g = next(g for g in data["graphs"] if g["name"] == "mixing_1")
    g["source"] = {**g["source"], "path": str(tiny_fp16 / "mixing_0.onnx"),
                   "sha256": sha256_file(tiny_fp16 / "mixing_0.onnx")}
    (d / "manifest.json").write_text(json.dumps(data))
    r = _cli(d, "--check", "-q")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL" in r.stdout


# -- user errors: one line, exit 2 --------------------------------------------------------------------

def _one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in err[0], err[0]


def test_errors_exit_2(split, tmp_path):
    _one_line_error(_cli(split, "--tokens", "1,256"), "256")
    _one_line_error(_cli(split, "--tokens", "1,x"), "--tokens")
    _one_line_error(_cli(split, "--backend", "rknn-lite", "--tokens", "1"), "rknn")
    _one_line_error(_cli(tmp_path / "nowhere", "--tokens", "1"), "no manifest")
    _one_line_error(_cli(split, "--tokens", "1", "--tokenizer", "world", "--max-tokens", "1"), "vocab")
    _one_line_error(_cli(split, "--tokens", "1", "--dump-logits", tmp_path / "x.txt"), ".npy")
    _one_line_error(_cli(split), "nothing to do")
    _one_line_error(_cli(split, "--json", "--tokens", "1"), "--bench")
    _one_line_error(_cli(split, "--tokens", "1", "--core-mask", "9"), "core-mask")


def test_manifest_problems_exit_2(split, tmp_path):
    d = tmp_path / "out"
    shutil.copytree(split.parent, d)
    data = json.loads((d / "manifest.json").read_text())
    seg = data["graphs"][1]["segments"][0]["onnx"]
    # altered file
    with open(d / seg, "ab") as f:
        f.write(b"\0")
    _one_line_error(_cli(d, "--tokens", "1"), "sha256")
    # missing file
    (d / seg).unlink()
    _one_line_error(_cli(d, "--tokens", "1"), "missing")
    # newer format
    shutil.copyfile(split.parent / seg, d / seg)
    data["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(data))
    _one_line_error(_cli(d, "--tokens", "1"), "newer")


# -- chat ---------------------------------------------------------------------------------------------

def test_chat_piped_stdin(split):
    r = _cli(split, "--chat", "--max-tokens", "6", "--seed", "0", "-q", stdin="hello\nhow are you\n/quit\nnever read\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Bot:") == 2


def test_chat_eof_ends(split):
    r = _cli(split, "--chat", "--max-tokens", "3", "-q", stdin="")
    assert r.returncode == 0 and r.stdout == ""


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_chat_in_tmux(split, tmp_path):
    import time

    sock = f"rwkv2rknn-test-{os.getpid()}"
    session = "chat"
    cmd = f"cd {ROOT} && {PY} -m rwkv2rknn.run {split} --chat --max-tokens 4 --temperature 0 -q; echo EXITED=$?; sleep 60"
    tmux = ["tmux", "-L", sock]
    subprocess.run(tmux + ["new-session", "-d", "-s", session, "-x", "200", "-y", "50", cmd], check=True)
    try:
        def screen():
            return subprocess.run(tmux + ["capture-pane", "-p", "-t", session], capture_output=True,
                                  text=True).stdout

        def wait_for(text, timeout=60):
            end = time.monotonic() + timeout  # a wait for the screen, not a speed check
            while time.monotonic() < end:
                s = screen()
                if text(s):
                    return s
                time.sleep(0.2)
            raise AssertionError(f"timed out; screen:\n{screen()}")

        wait_for(lambda s: "User:" in s)
        subprocess.run(tmux + ["send-keys", "-t", session, "hello there", "Enter"], check=True)
        wait_for(lambda s: "Bot:" in s and s.count("User:") >= 2)
        subprocess.run(tmux + ["send-keys", "-t", session, "/quit", "Enter"], check=True)
        s = wait_for(lambda s: "EXITED=" in s)
        assert "EXITED=0" in s
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True)


# -- pieces ---------------------------------------------------------------------------------------------

def test_sampling():
    from rwkv2rknn.run.sampling import sample

    logits = np.array([0.1, 3.0, 0.2, 2.9], np.float32)
    assert sample(logits, temperature=0) == 1
    assert sample(logits, temperature=1.0, top_p=0.0) == 1
    rng = np.random.default_rng(0)
    draws = {sample(logits, 1.0, 0.6, rng) for _ in range(200)}
    assert draws <= {1, 3} and len(draws) == 2
    a = [sample(logits, 1.0, 1.0, np.random.default_rng(7)) for _ in range(3)]
    assert len(set(a)) == 1


def test_stream_decoder_holds_partial_utf8():
    from rwkv2rknn.run.tokenizers import BytesTokenizer, StreamDecoder

    dec = StreamDecoder(BytesTokenizer())
    pieces = [dec.add(b) for b in "aé€".encode()]
    assert "".join(pieces) == "aé€"
    assert pieces[1] == ""  # first byte of é held back


def test_world_tokenizer_without_torch():
    code = ("import sys\nfrom rwkv2rknn.run.tokenizers import WorldTokenizer\nt = WorldTokenizer()\n"
            "ids = t.encode('Hello world')\nassert t.decode_bytes(ids) == b'Hello world'\n"
            "assert t.vocab_size == 65530 or t.vocab_size >= 65000, t.vocab_size\n"
            "assert 'torch' not in sys.modules\n")
    r = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_session_options_do_not_spin():
    from rwkv2rknn.run.runners import cpu_count, session_options

    so = session_options()
    assert so is session_options()  # one for the whole process
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.intra_op_num_threads == cpu_count() and so.inter_op_num_threads == 1


# -- three NPU cores: N-split pieces in the program -------------------------------------------------------

@pytest.fixture(scope="module")
def wide_head(model_factory, tmp_path_factory):
    """A 2 x 256 model with the World vocabulary's 65,536 logits: its head is split over the three cores."""
    src = model_factory(layers=2, embd=256, vocab=65536)
    out = tmp_path_factory.mktemp("nsplit")
    _split_model()([src], out / "split", progress=False, prefill_chunk=0)
    _split_model()([src], out / "whole", progress=False, prefill_chunk=0, nsplit=False)
    return out / "split", out / "whole"


def test_nsplit_head_runs_as_three_pieces_into_one_buffer(wide_head):
    from rwkv2rknn.cost import estimate, load_profile
    from rwkv2rknn.manifest import Manifest
    from rwkv2rknn.program import load

    split, whole = wide_head
    prog = load(split / "program.json")
    group = [s for s in prog.decode.steps if s.parallel]
    assert len(group) == 3 and {prog.segments[s.segment].core_mask for s in group} == {1, 2, 4}
    views = [prog.buffers[s.outputs[0]] for s in group]
    assert len({v.view_of for v in views}) == 1 and views[0].view_of == prog.decode.logits
    assert [v.offset for v in views] == sorted(v.offset for v in views) and views[0].offset == 0
    with Chain(split) as a, Chain(whole) as b:
        for t in TOKENS:
            x, y = a.step(t).copy(), b.step(t).copy()
        np.testing.assert_array_equal(x, y)
    # priced as pieces running at once: the group costs its slowest piece, not the sum
    data = Manifest.load(split).data
    e = estimate(data, load_profile("rk3588-c"))
    head = next(g for g in e.decode.graphs if g.name == "head")
    assert e.decode.breakdown["overlap"] < -0.5 * sum(s.ms for s in head.segments)
    w = estimate(Manifest.load(whole).data, load_profile("rk3588-c"))
    assert e.decode_ms_per_token < w.decode_ms_per_token
