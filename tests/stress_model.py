"""A long-memory RWKV-4 stress model, and the harness that measures fp16 state drift on it (docs/wkv-precision.md).

Why: random_weights draws raw time_decay from [-3, 1.5] (slowest |w| ~ 0.05) and keys of unit scale, so
its WKV state stays small (4 x 128 over 1,000 tokens of inspect.py: bb <= 26, pp <= 3.7) and fp16 has little
to lose. Trained RWKV-4 models have channels that remember for thousands of tokens (the issue: some |w| ~ 3e-4,
raw time_decay about -8) and keys with large, persistent offsets, so the running max pp sits at 5-20 and
the denominator bb sums hundreds of tokens. In fp16 that is exactly where the recurrence breaks: next to
pp ~ 16 (fp16 spacing 2^-6) a decay of 3e-4 rounds away (pp + w == pp), and next to bb ~ 300 (spacing
0.25) an increment exp(k - pp) of 0.05 rounds away.

The generator (`stress_weights`) starts from `random_weights` and overrides, per layer:
- att.time_decay: raw values spread from `decay_lo[i]` (default -8, -6.5, -7.5, -5 for layers 0..3, so
  the slowest |w| is 3.4e-4, 1.5e-3, 5.5e-4, 6.7e-3) up to +3, shaped like the RWKV-4 init
  (lo + (hi - lo) * t**p with p from 0.7 to 2 over the depth; most channels slow in deep layers),
  then shuffled over the channels; canonical w = -exp(raw);
- att.time_first: U(-2, 1.5) (RWKV-4 init: log(0.3) + {-0.5, 0, 0.5}; trained tiny fixture: -2.2 .. -0.6);
- keys with a persistent per-channel offset: LN1's bias gets a large component B = 16 on 4 "massive
  activation" channels (a unit direction e), and the key weights read it: Wk = diag(s) R + (m / B) e^T
  with R orthogonal to e. So k_c ~ m_c (1 + N(0, 1/B)) + s_c N(0, ~1): offsets m_c ~ U(-2, 12) make pp
  reach 5-20, and channels with a small spread s_c (log-uniform 0.25 .. 2.5) add an increment of
  order 0.1 .. 1 to bb every token, which on slow channels sums to hundreds.
Everything else (LayerNorms, mixes, value/receptance/output/FFN weights, embedding, head) is random_weights'.

`python tests/stress_model.py [--out DIR]` prints the state magnitudes the model reaches over 1,000 tokens of
`inspect.py` on onnxruntime fp32; `--measure` runs the whole study (plans A, B, C on this model and the trained
fixture; about 10 minutes), `--sweep` the per-layer drift against min |w| behind `fp16_state_safe` (no build).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from rwkv2rknn.families.rwkv4 import Weights, random_weights

# Slowest raw time_decay per layer (cycled for more layers): |w|min = exp(lo) = 3.4e-4, 1.5e-3, 5.5e-4, 6.7e-3.
DECAY_LO = (-8.0, -6.5, -7.5, -5.0)
DECAY_HI = 3.0
OFFSET_B = 16.0      # size of LN1's bias along the massive-activation direction e
N_HOT = 4            # channels e is spread over
KEY_OFFSET = (-2.0, 12.0)  # U(lo, hi): persistent key offset m_c
KEY_SPREAD = (0.25, 2.5)   # log-uniform: per-channel key spread s_c
TIME_FIRST = (-2.0, 1.5)

ROWS = {"aa": 2, "bb": 3, "pp": 4}
CHECKPOINTS = (50, 100, 250, 500, 1000)
PLANS = {  # plan letter -> split arguments
    "A": ["--policy", "deep", "--state-update", "cpu"],
    "B": ["--policy", "deep", "--state-update", "npu"],
    "C": ["--policy", "fused"],
}
PLAN_NAMES = {"A": "deep, --state-update cpu", "B": "deep, --state-update npu", "C": "fused (fp32 recurrence on CPU)"}


# -- the per-layer rule (a proposal; derived in docs/wkv-precision.md) -------------------------------------

STATE_BOUND = 0.01        # per-layer state relative error (aa, bb, pp rows) a plan must stay under
LOGITS_COSINE_MIN = 0.999  # per step, against onnxruntime fp32
ARGMAX_AGREE_MIN = 0.99    # over the run
# The fp16 update (isolated: the simulator, exact inputs, checked every 10 tokens up to 1,000, two seeds of
# the stress variants + the trained fixture) stayed under STATE_BOUND whenever a layer's memory
# min(tokens, 1 / min|w|) was <= 5 tokens (worst 0.57%); at 7.4 tokens it reached 0.98%, from 10 on 1.3 .. 2.3%.
FP16_STATE_MAX_MEMORY = 5.0


def fp16_state_safe(decays, tokens: int, max_memory: float = FP16_STATE_MAX_MEMORY) -> bool:
    """Whether a layer's recurrent state may be updated in fp16 (on the NPU) for a context of `tokens`.

    decays: the layer's time_decay as the graph holds it (w = -exp(raw); the sign is ignored). The state
    of a channel sums about min(tokens, 1/|w|) past tokens; each fp16 update rounds pp + w (losing up to
    half an fp16 step of pp, all of w when |w| is below it) and the aa/bb accumulation (2^-11 relative),
    and those errors add up over the memory. Safe when the slowest channel's memory is at most
    `max_memory` tokens (measured threshold: docs/wkv-precision.md).
    """
    w = np.abs(np.asarray(decays, dtype=np.float64)).ravel()
    if w.size == 0:
        return True
    slowest = float(w.min())
    memory = float(tokens) if slowest == 0.0 else min(float(tokens), 1.0 / slowest)
    return memory <= max_memory


def raw_decays(layer: int, n_layer: int, embd: int, lo: float, hi: float = DECAY_HI, seed: int = 0) -> np.ndarray:
    """Raw time_decay of one layer: lo .. hi shaped like the RWKV-4 init, shuffled over channels."""
    t = np.arange(embd) / max(1, embd - 1)
    p = 0.7 + 1.3 * (layer / max(1, n_layer - 1))
    raw = lo + (hi - lo) * t ** p
    return np.random.default_rng([seed, 17, layer]).permutation(raw).astype(np.float32)


def stress_weights(layers: int = 4, embd: int = 128, vocab: int = 256, seed: int = 0,
                   decay_lo: tuple[float, ...] = DECAY_LO, decay_hi: float = DECAY_HI) -> Weights:
    """The long-memory stress model (see the module docstring); canonical Weights, time_decay = w = -exp(raw)."""
    base = random_weights(layers, embd, vocab, seed=seed)
    C = embd

    def fetch(part):
        if part in ("embed", "head"):
            return base.embed() if part == "embed" else base.head()
        out = base.layer(part)
        rng = np.random.default_rng([seed, 11, part])
        lo = decay_lo[part % len(decay_lo)]
        out["att.time_decay"] = (-np.exp(raw_decays(part, layers, C, lo, decay_hi, seed).astype(np.float64))
                                 ).astype(np.float32)
        out["att.time_first"] = rng.uniform(*TIME_FIRST, C).astype(np.float32)
        hot = rng.choice(C, size=min(N_HOT, C), replace=False)
        e = np.zeros(C)
        e[hot] = 1.0 / math.sqrt(len(hot))
        out["ln1.bias"] = (out["ln1.bias"] + OFFSET_B * e).astype(np.float32)
        r = rng.standard_normal((C, C)) / math.sqrt(C)
        r -= np.outer(r @ e, e)  # the spread part does not read the offset
        m = rng.uniform(*KEY_OFFSET, C)
        s = np.exp(rng.uniform(math.log(KEY_SPREAD[0]), math.log(KEY_SPREAD[1]), C))
        out["att.key.weight"] = (s[:, None] * r + (m / OFFSET_B)[:, None] * e[None, :]).astype(np.float32)
        return out

    return Weights(layers, C, vocab, base.n_ffn, fetch, f"<stress seed={seed}>")


def text_tokens(n: int, source: str | None = None) -> np.ndarray:
    """The first n bytes of a Python stdlib source (inspect.py by default) as byte tokens."""
    path = Path(source) if source else Path(inspect.__file__)
    data = path.read_bytes()
    if len(data) < n:
        raise ValueError(f"{path}: only {len(data)} bytes, {n} tokens asked")
    return np.frombuffer(data[:n], dtype=np.uint8).astype(np.int64)


def export_stress(out_dir, **kw) -> Path:
    from rwkv2rknn.families.rwkv4 import export_model

    export_model(stress_weights(**kw), out_dir, dtype="float16", progress=False)
    return Path(out_dir)


# -- running a plan against its onnxruntime fp32 reference --------------------------------------------

def decays_of_model(model_dir) -> list[np.ndarray]:
    """w (= -exp(raw)) of every layer as the exported graphs hold it (fp16-rounded for an fp16 export)."""
    import onnx
    from onnx import numpy_helper

    out = []
    i = 0
    while (Path(model_dir) / f"mixing_{i}.onnx").exists():
        m = onnx.load(str(Path(model_dir) / f"mixing_{i}.onnx"))
        consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node if n.op_type == "Constant"}
        consts.update({t.name: numpy_helper.to_array(t) for t in m.graph.initializer})
        out.append(np.asarray(consts["att.time_decay"], dtype=np.float64).ravel())
        i += 1
    return out


def split_and_build(model_dir, out_dir, plan: str, layers_per_call: int | None = None, log=None,
                    verify: bool = True) -> Path:
    """`rwkv2rknn split MODEL --policy ... -o OUT` then `rwkv2rknn build OUT --jobs 1`, as a user types them.

    verify False: `build --no-verify` (the caller runs the model in the simulator itself).
    """
    exe = [sys.executable, "-m", "rwkv2rknn"]
    # --prefill-chunk 0: the decode plan only (what is measured; a prefill plan doubles the build)
    split = exe + ["split", str(model_dir), "-o", str(out_dir), "-q", "--force", "--prefill-chunk", "0"] + PLANS[plan]
    if layers_per_call is not None and plan in ("A", "B"):
        split += ["--layers-per-call", str(layers_per_call)]
    build = exe + ["build", str(out_dir), "-q", "--jobs", "1"] + ([] if verify else ["--no-verify"])
    for cmd in (split, build):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if log is not None:
            print("$ " + " ".join(cmd[2:]), file=log)
            print(proc.stdout[-2000:], file=log)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return Path(out_dir) / "manifest.json"


def rel(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    n = float(np.linalg.norm(ref))
    return float(np.linalg.norm(got - ref)) / n if n else float(np.linalg.norm(got))


def state_errors(got: np.ndarray, ref: np.ndarray) -> dict:
    """Errors of one layer's state [5, C] against the reference.

    aa, bb, pp: ||got - ref|| / ||ref|| of the raw rows (what the issue measured). aa and bb are stored
    relative to exp(pp), so a pp that drifted by d rescales them by exp(-d); aa_al, bb_al compare the
    represented sums (aa * exp(pp - pp_ref)); dpp is max |pp - pp_ref| (absolute: the log of the mass error).
    """
    g, r = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    out = {row: rel(g[j], r[j]) for row, j in ROWS.items()}
    scale = np.exp(np.clip(g[4] - r[4], -50, 50))
    out["aa_al"] = rel(g[2] * scale, r[2])
    out["bb_al"] = rel(g[3] * scale, r[3])
    out["dpp"] = float(np.abs(g[4] - r[4]).max())
    return out


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def fp32_reference(model_dir, out_dir) -> Path:
    """A split whose onnxruntime chain is the fp32 reference: fused policy, every tensor and state float32."""
    from rwkv2rknn.split import split_model

    split_model([model_dir], out_dir, policy="fused", force=True, progress=False, prefill_chunk=0)
    return Path(out_dir) / "manifest.json"


def _fp32_state_chain(manifest):
    """The onnxruntime chain of `manifest`, refused unless it carries every state in float32."""
    from rwkv2rknn.manifest import Manifest
    from rwkv2rknn.run.chain import Chain, runner_factory

    m = Manifest.load(manifest)
    dtypes = {st.get("dtype", "float32") for st in m.model["state"]}
    if dtypes != {"float32"}:
        raise ValueError(f"{manifest}: its state is {sorted(dtypes)} between tokens, so its onnxruntime chain is not "
                         "an fp32 reference; pass reference= an fp32 split (fp32_reference)")
    return Chain(m, runner_factory(m, "ort"))


def measure(manifest, tokens, backend: str = "rknn-sim", every: int = 50, states_at=(), progress=None,
            reference=None) -> dict:
    """Run `tokens` through the manifest on `backend` and on onnxruntime fp32 side by side (teacher forced).

    reference: the manifest whose onnxruntime chain is the reference (default: `manifest` itself). It must
    keep its state float32: a `--state-update npu` split declares its state float16 at the NPU boundary,
    and its onnxruntime chain then rounds the state to fp16 every token like the NPU does (no reference).

    Returns {"cos": [T] logits cosine, "agree": [T] bool argmax agreement, "state": {t: [L][row] rel error}
    at t = every, 2*every, ... (1-based token counts), "chan": {t: (got, ref) states [L,5,C]} for t in
    states_at, "ref_mag": per layer {max_bb, pp_min, pp_max, max_aa} over the run, "seconds"}.
    """
    from rwkv2rknn.manifest import Manifest
    from rwkv2rknn.run.chain import Chain, runner_factory

    m = Manifest.load(manifest)
    ref_chain = _fp32_state_chain(manifest if reference is None else reference)
    got_chain = Chain(m, runner_factory(m, backend))
    L = len(ref_chain.get_state())
    cos, agree, state, chan = [], [], {}, {}
    mag = [{"max_bb": 0.0, "max_aa": 0.0, "pp_min": math.inf, "pp_max": -math.inf} for _ in range(L)]
    t0 = time.perf_counter()
    try:
        for i, tok in enumerate(tokens, start=1):
            g = np.array(got_chain.step(int(tok)), dtype=np.float64)
            r = np.array(ref_chain.step(int(tok)), dtype=np.float64)
            cos.append(_cos(g, r))
            agree.append(int(np.argmax(g)) == int(np.argmax(r)))
            rs = ref_chain.get_state()
            for k, s in enumerate(rs):
                mag[k]["max_bb"] = max(mag[k]["max_bb"], float(np.abs(s[3]).max()))
                mag[k]["max_aa"] = max(mag[k]["max_aa"], float(np.abs(s[2]).max()))
                if i > 1:  # pp starts at 0 (fp16 source); its range from the first update on
                    mag[k]["pp_min"] = min(mag[k]["pp_min"], float(s[4].min()))
                    mag[k]["pp_max"] = max(mag[k]["pp_max"], float(s[4].max()))
            if i % every == 0:
                gs_ = got_chain.get_state()
                state[i] = [state_errors(gs_[k], rs[k]) for k in range(L)]
                if progress is not None:
                    worst = max(lay[row] for lay in state[i] for row in ROWS)
                    print(f"  token {i}: worst state rel {worst:.2e}, min cos so far {min(cos):.6f}",
                          file=progress, flush=True)
            if i in states_at:
                chan[i] = (np.stack([np.array(s) for s in got_chain.get_state()]),
                           np.stack([np.array(s) for s in rs]))
    finally:
        got_chain.close()
        ref_chain.close()
    return {"cos": np.array(cos), "agree": np.array(agree), "state": state, "chan": chan, "ref_mag": mag,
            "seconds": time.perf_counter() - t0}


def isolated_update(manifest, tokens, every: int = 50, states_at=()) -> dict:
    """Each layer's state update in fp16 (the simulator) fed with exact inputs: its own drift, nothing upstream.

    `manifest`: a deep `--state-update cpu` split (no build needed). Its CPU segments that write state
    outputs are the fp32 update; here each is compiled for the simulator (fp16) and fed, every token,
    the inputs onnxruntime fp32 gives it (k, v, LN outputs) with the simulator's own previous state.
    Returns {"state": {t: [L] state_errors}, "chan": {t: (got, ref) [L,5,C]}, "seconds"}.
    """
    from rwkv2rknn.manifest import Manifest
    from rwkv2rknn.run.chain import Chain, runner_factory
    from rwkv2rknn.run.runners import RknnSimRunner

    m = Manifest.load(manifest)
    pairs = {st["input"]: st["output"] for st in m.model["state"]}
    updates = [seg for _, seg in m.segments()
               if seg["backend"] == "cpu" and any(o["name"] in pairs.values() for o in seg["outputs"])]
    if not updates:
        raise ValueError(f"{manifest}: no CPU state-update segment; split with --policy deep --state-update cpu")
    sims = {}
    for seg in updates:
        ins, outs = [t["name"] for t in seg["inputs"]], [t["name"] for t in seg["outputs"]]
        shapes = [tuple(t["shape"]) for t in seg["outputs"]]
        runner = RknnSimRunner(m.resolve(seg["onnx"]), ins, outs, target=m.target).activate()
        sims[seg["id"]] = (runner, ins, outs, shapes)
    fed: dict = {}
    _fp32_state_chain(manifest).close()  # the reference must carry fp32 state
    ref_chain = Chain(m, runner_factory(m, "ort"), record=lambda sid, feed: fed.__setitem__(sid, feed)
                      if sid in sims else None)
    own = {st["input"]: np.array(a) for st, a in zip(m.model["state"], ref_chain.get_state())}
    order = [st["input"] for st in m.model["state"]]
    state, chan = {}, {}
    t0 = time.perf_counter()
    try:
        for i, tok in enumerate(tokens, start=1):
            ref_chain.step(int(tok))
            new = {}
            for sid, (runner, ins, outs, shapes) in sims.items():
                feed = [own[n] if n in own else fed[sid][n] for n in ins]
                for n, v, shape in zip(outs, runner.infer_list(feed), shapes):
                    new[n] = np.asarray(v, np.float32).reshape(shape)
            for a, b in pairs.items():
                if b in new:
                    own[a] = new[b]
            rs = ref_chain.get_state()
            if i % every == 0:
                state[i] = [state_errors(own[n], r) for n, r in zip(order, rs)]
            if i in states_at:
                chan[i] = (np.stack([own[n] for n in order]), np.stack([np.array(r) for r in rs]))
    finally:
        ref_chain.close()
        for runner, *_ in sims.values():
            runner.deactivate()
    return {"state": state, "chan": chan, "seconds": time.perf_counter() - t0}


def magnitudes(model_dir, n_tokens: int = 1000) -> list[dict]:
    """State magnitudes the model reaches on onnxruntime fp32 (split with the fused policy, all on ort)."""
    import tempfile

    from rwkv2rknn.manifest import Manifest
    from rwkv2rknn.run.chain import Chain, runner_factory
    from rwkv2rknn.split import split_model

    with tempfile.TemporaryDirectory() as tmp:
        split_model([model_dir], Path(tmp) / "out", progress=False, prefill_chunk=0)
        m = Manifest.load(Path(tmp) / "out" / "manifest.json")
        chain = Chain(m, runner_factory(m, "ort"))
        L = len(chain.get_state())
        mag = [{"max_bb": 0.0, "max_aa": 0.0, "pp_min": math.inf, "pp_max": -math.inf, "bb_over_100": 0}
               for _ in range(L)]
        for i, tok in enumerate(text_tokens(n_tokens), start=1):
            chain.step(int(tok))
            for k, s in enumerate(chain.get_state()):
                mag[k]["max_bb"] = max(mag[k]["max_bb"], float(s[3].max()))
                mag[k]["max_aa"] = max(mag[k]["max_aa"], float(np.abs(s[2]).max()))
                mag[k]["bb_over_100"] = max(mag[k]["bb_over_100"], int((s[3] > 100).sum()))
                if i > 1:
                    mag[k]["pp_min"] = min(mag[k]["pp_min"], float(s[4].min()))
                    mag[k]["pp_max"] = max(mag[k]["pp_max"], float(s[4].max()))
        chain.close()
    return mag


def print_magnitudes(model_dir, n_tokens: int = 1000, file=sys.stdout) -> list[dict]:
    mag = magnitudes(model_dir, n_tokens)
    decays = decays_of_model(model_dir)
    print(f"state magnitudes over {n_tokens} tokens of inspect.py, onnxruntime fp32 ({model_dir}):", file=file)
    print("| layer | min \\|w\\| | max bb | channels with bb > 100 | max \\|aa\\| | pp range |", file=file)
    print("|---:|---:|---:|---:|---:|---|", file=file)
    for k, (g, w) in enumerate(zip(mag, decays)):
        print(f"| {k} | {np.abs(w).min():.2e} | {g['max_bb']:.1f} | {g['bb_over_100']} | {g['max_aa']:.1f} | "
              f"{g['pp_min']:.2f} .. {g['pp_max']:.2f} |", file=file)
    return mag


def ref_vs_fp64(model_dir, weights: Weights, n_tokens: int, every: int = 50) -> dict:
    """The onnxruntime fp32 reference itself against fp64 numpy (tests/rwkv_ref.py) on the fp16-rounded weights."""
    import tempfile

    from rwkv_ref import RefModel

    from rwkv2rknn.families.rwkv4 import from_tensors
    from rwkv2rknn.manifest import Manifest
    from rwkv2rknn.run.chain import Chain, runner_factory
    from rwkv2rknn.split import split_model

    rounded = from_tensors({k: np.asarray(a, np.float16).astype(np.float32) for k, a in weights.tensors()})
    ref = RefModel(rounded)
    state = ref.init_state()
    state[:, 4] = 0.0  # the fp16-source manifest starts pp at 0 (same outputs: aa = bb = 0)
    out = {"cos": [], "state": {}}
    with tempfile.TemporaryDirectory() as tmp:
        split_model([model_dir], Path(tmp) / "out", progress=False, prefill_chunk=0)
        m = Manifest.load(Path(tmp) / "out" / "manifest.json")
        with Chain(m, runner_factory(m, "ort")) as chain:
            for i, tok in enumerate(text_tokens(n_tokens), start=1):
                got = chain.step(int(tok))
                want, state = ref.forward(int(tok), state)
                out["cos"].append(_cos(got, want))
                if i % every == 0:
                    st = chain.get_state()
                    out["state"][i] = [state_errors(st[k], state[k]) for k in range(len(st))]
    out["cos"] = np.array(out["cos"])
    return out


SWEEP = {  # decay_lo per layer of the stress-model variants the per-layer rule is derived from
    "stress": DECAY_LO,
    "stress-mid": (-4.0, -3.0, -2.0, -1.0),
    "stress-edge": (-2.8, -2.5, -2.3, -2.0),
    "stress-near": (-1.6, -1.4, -1.2, -1.0),
    "stress-fast": (-0.5, 0.0, 0.5, 1.0),
}


def decay_sweep(out: Path, n_tokens: int = 1000, variants: dict | None = None, log=sys.stdout, every: int = 10,
                seed: int = 0) -> dict:
    """isolated_update on stress-model variants and the trained fixture: per-layer fp16 drift vs min |w|.

    Needs no build: each model is split (deep, --state-update cpu) and its update segments compiled for
    the simulator in-process. Returns {model: {"min_abs_w": [L], "state": {t: [L] state_errors}}}.
    """
    from rwkv2rknn.split import split_model

    variants = SWEEP if variants is None else variants
    models = {name: export_stress(out / f"sweep-{name}", decay_lo=lo, seed=seed) for name, lo in variants.items()}
    trained = out / "trained"
    if not (trained / "head.onnx").exists():
        fixture = Path(__file__).parent / "fixtures" / "rwkv4-tiny-trained.pth"
        subprocess.run([sys.executable, "-m", "rwkv2rknn", "export", str(fixture), "-o", str(trained), "-q",
                        "--force"], check=True)
    models["trained"] = trained
    tokens = text_tokens(n_tokens)
    result = {}
    for name, model_dir in models.items():
        split_model([model_dir], out / f"sweep-{name}-A", policy="deep", state_update="cpu", force=True,
                    progress=False, prefill_chunk=0)
        res = isolated_update(out / f"sweep-{name}-A" / "manifest.json", tokens, every=every, states_at=(n_tokens,))
        decays = decays_of_model(model_dir)
        g, r = res["chan"][n_tokens]
        result[name] = {"min_abs_w": [float(np.abs(w).min()) for w in decays],
                        "state": {str(t): v for t, v in res["state"].items()},
                        "chan_bb_al": (per_channel_aligned(g, r, 3)).tolist(),
                        "abs_w": [np.abs(w).tolist() for w in decays]}
        worst = [max(e["aa"], e["bb"], e["pp"]) for e in res["state"][n_tokens]]
        print(f"sweep {name}: {res['seconds']:.0f} s; worst raw state rel error per layer at {n_tokens}: "
              + ", ".join(f"{w:.2e} (min|w| {m:.1e})" for w, m in zip(worst, result[name]["min_abs_w"])),
              file=log, flush=True)
    (out / "sweep.json").write_text(json.dumps(result))
    return result


def per_channel_aligned(got: np.ndarray, ref: np.ndarray, row: int) -> np.ndarray:
    """|got * exp(pp - pp_ref) - ref| / |ref| of one state row, per layer and channel: [L, C]."""
    g, r = got.astype(np.float64), ref.astype(np.float64)
    scaled = g[:, row] * np.exp(np.clip(g[:, 4] - r[:, 4], -50, 50))
    return np.abs(scaled - r[:, row]) / np.maximum(np.abs(r[:, row]), 1e-6)


def per_channel_error(got: np.ndarray, ref: np.ndarray, row: int) -> np.ndarray:
    """|got - ref| / (|ref| + tiny) of one state row, per layer and channel: [L, C]."""
    g, r = got[:, row].astype(np.float64), ref[:, row].astype(np.float64)
    return np.abs(g - r) / np.maximum(np.abs(r), 1e-6)


def run_study(out: Path, n_tokens: int = 1000, log=sys.stdout) -> dict:
    """Plans A, B, C on the stress model and the trained fixture; writes out/results.json and out/channels.npz."""
    fixture = Path(__file__).parent / "fixtures" / "rwkv4-tiny-trained.pth"
    models = {"stress": export_stress(out / "stress")}
    trained = out / "trained"
    subprocess.run([sys.executable, "-m", "rwkv2rknn", "export", str(fixture), "-o", str(trained), "-q", "--force"],
                   check=True)
    models["trained"] = trained
    tokens = text_tokens(n_tokens)
    results: dict = {"tokens": n_tokens, "text": Path(inspect.__file__).name, "models": {}}
    channels = {}
    for name, model_dir in models.items():
        decays = decays_of_model(model_dir)
        entry = {"min_abs_w": [float(np.abs(w).min()) for w in decays], "plans": {}}
        reference = fp32_reference(model_dir, out / f"{name}-ref")
        for plan in PLANS:
            t0 = time.perf_counter()
            manifest = split_and_build(model_dir, out / f"{name}-{plan}", plan, log=log)
            build_s = time.perf_counter() - t0
            print(f"{name} plan {plan} ({PLAN_NAMES[plan]}): split + build {build_s:.0f} s", file=log, flush=True)
            res = measure(manifest, tokens, states_at=(250, 1000, n_tokens), progress=log, reference=reference)
            entry["plans"][plan] = {
                "build_s": build_s, "run_s": res["seconds"],
                "cos": res["cos"].tolist(), "agree": res["agree"].astype(int).tolist(),
                "state": {str(t): v for t, v in res["state"].items()}, "ref_mag": res["ref_mag"],
            }
            for t, (g, r) in res["chan"].items():
                channels[f"{name}.{plan}.{t}.got"] = g
                channels[f"{name}.{plan}.{t}.ref"] = r
        if name == "stress":
            chk = ref_vs_fp64(model_dir, stress_weights(), n_tokens)
            entry["ref_vs_fp64"] = {"cos_min": float(chk["cos"].min()),
                                    "state": {str(t): v for t, v in chk["state"].items()}}
        results["models"][name] = entry
        (out / "results.json").write_text(json.dumps(results))
    np.savez_compressed(out / "channels.npz", **channels)
    return results


def _fmt(x: float) -> str:
    return f"{100 * x:.3f}%" if x < 0.1 else f"{100 * x:.1f}%"


def tables(results: dict, checkpoints=CHECKPOINTS, compact=("C",)) -> str:
    """The markdown tables of docs/wkv-precision.md from results.json (plans in `compact`: worst row per layer)."""
    lines = []
    cps = [c for c in checkpoints if c <= results["tokens"]]
    for name, entry in results["models"].items():
        lines.append(f"\n**{name}: state relative error ||got - ref|| / ||ref|| per layer and row**\n")
        lines.append("| plan | layer (min \\|w\\|) | row | " + " | ".join(str(c) for c in cps) + " |")
        lines.append("|---|---|---|" + "---:|" * len(cps))
        for plan, p in entry["plans"].items():
            for k, w in enumerate(entry["min_abs_w"]):
                if plan in compact:
                    vals = " | ".join(_fmt(max(p["state"][str(c)][k][r] for r in ROWS)) for c in cps)
                    lines.append(f"| {plan} | {k} ({w:.1e}) | worst of aa, bb, pp | {vals} |")
                    continue
                for row in ROWS:
                    vals = " | ".join(_fmt(p["state"][str(c)][k][row]) for c in cps)
                    lines.append(f"| {plan} | {k} ({w:.1e}) | {row} | {vals} |")
        lines.append(f"\n**{name}: logits against onnxruntime fp32 (min cosine and argmax agreement over tokens 1..t)**\n")
        lines.append("| plan | " + " | ".join(f"cos min @{c}" for c in cps) + " | argmax agree (all) | worst step |")
        lines.append("|---|" + "---:|" * len(cps) + "---:|---:|")
        for plan, p in entry["plans"].items():
            cos = np.array(p["cos"])
            vals = " | ".join(f"{cos[:c].min():.6f}" for c in cps)
            lines.append(f"| {plan} | {vals} | {100 * np.mean(p['agree']):.1f}% | {int(np.argmin(cos)) + 1} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/wkv-stress", help="working directory")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--measure", action="store_true",
                    help="run the whole study (plans A, B, C on the stress model and the trained fixture)")
    ap.add_argument("--sweep", action="store_true",
                    help="per-layer fp16 update drift against min |w| (stress variants + trained; no build)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = export_stress(out / "stress")
    print_magnitudes(model, args.tokens)
    if args.measure:
        results = run_study(out, args.tokens)
        print(tables(results))
    if args.sweep:
        decay_sweep(out, args.tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
