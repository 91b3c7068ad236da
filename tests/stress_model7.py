"""A long-memory RWKV-7 stress variant and the harness that measures fp16 matrix-state drift (docs/wkv7-precision.md).

RWKV-7's decay is w = exp(-e^-0.5 * sigmoid(w0 + lora_w(x))) per key channel, so 1 - w ~ 0.6065 * sigmoid(.):
w0 = -6.5 gives 1 - w ~ 9e-4 (a memory of ~1,100 tokens) and w0 = -10 gives 2.8e-5 (~36,000 tokens). fp16 has
a spacing of 2^-11 = 4.9e-4 just below 1, so any w above 1 - 2^-12 (1 - w < 2.4e-4) is stored as exactly 1,
and slower channels lose their decay entirely. The state S [H, N, N] (per head [value, key]) is kept bounded by
the decay and by the delta-rule removal -(S kk)(kk a)^T, whose per-key-channel rate a = sigmoid(a0 + lora_a(x))
is the "in-context learning rate". Where w -> 1 and a -> 0 on a key channel, nothing removes what that channel
writes: S's column sums v k over the whole memory.

The stress variant (`stress_weights7`) starts from the trained fixture (tests/fixtures/rwkv7-tiny-trained.pth,
so the model still reads text) and, on a fixed quarter of the key channels of every layer:
- w0 := U(W0_LO, W0_HI) = U(-11, -8): sigmoid 1.7e-5 .. 3.4e-4, 1 - w ~ 1e-5 .. 2e-4 before the LoRA;
- a0 := A0 = -3 (a ~ 0.05: little removal on those channels);
- k_a := K_A = 0.5 (k is scaled by 1 + (a - 1) k_a, ~0.5 here rather than ~a: the keys stay large).
Everything else is the fixture's. Over 1,000 held-out bytes its state reaches |S| in the hundreds (the fixture's
stays under ~100).

`python tests/stress_model7.py` prints the state magnitudes of the fixture and the variant over 1,000 held-out
bytes (onnxruntime fp32); benchmarks/wkv7_precision.py runs the study.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

FIXTURE7 = Path(__file__).resolve().parent / "fixtures" / "rwkv7-tiny-trained.pth"

W0_LO, W0_HI = -11.0, -8.0
A0 = -3.0
K_A = 0.5
SLOW_FRACTION = 0.25

CHECKPOINTS = (50, 100, 250, 500, 1000)

# -- the bound (docs/wkv7-precision.md) -------------------------------------------------------------------
STATE_BOUND = 0.01         # per layer: ||S - S_ref|| / ||S_ref|| (and each token-shift row) at every checkpoint
LOGITS_COSINE_MIN = 0.999  # per step, against onnxruntime fp32
ARGMAX_AGREE_MIN = 0.99    # over the run


def stress_weights7(base=None, seed: int = 0, fraction: float = SLOW_FRACTION, w0=(W0_LO, W0_HI),
                    a0: float | None = A0, k_a: float | None = K_A):
    """The long-memory variant of `base` (default: the trained fixture): see the module docstring.

    The slow channels are the same set in every layer (a seeded choice of `fraction` of C). a0 / k_a None:
    leave the fixture's.
    """
    from rwkv2rknn.families.rwkv7 import Weights7, load_pth7

    base = (load_pth7(FIXTURE7) if base is None else base).materialize()
    C = base.n_embd
    rng = np.random.default_rng([seed, 70])
    slow = np.sort(rng.choice(C, size=max(1, int(round(fraction * C))), replace=False))

    def fetch(part):
        out = dict(base._fetch(part))
        if part in ("embed", "head"):
            return out
        r = np.random.default_rng([seed, 71, part])
        w0v = out["att.w0"].copy()
        w0v[slow] = r.uniform(w0[0], w0[1], slow.size)
        out["att.w0"] = w0v.astype(np.float32)
        if a0 is not None:
            v = out["att.a0"].copy()
            v[slow] = a0
            out["att.a0"] = v.astype(np.float32)
        if k_a is not None:
            v = out["att.k_a"].copy()
            v[slow] = k_a
            out["att.k_a"] = v.astype(np.float32)
        return out

    w = Weights7(base.dims, fetch, f"<rwkv7 stress of {base.source} seed={seed}>")
    w.slow_channels = slow
    return w


def export7(weights, out_dir) -> Path:
    from rwkv2rknn.families.rwkv7 import export_model7

    export_model7(weights, out_dir, dtype="float16", progress=False, force=True)
    return Path(out_dir)


def heldout_tokens(n: int, offset: int = 0) -> np.ndarray:
    from conftest import heldout_bytes

    return np.frombuffer(heldout_bytes(n, offset), dtype=np.uint8).astype(np.int64)


# -- decays as the model computes them ----------------------------------------------------------------------

def decay_trace(weights, tokens) -> dict:
    """Run the fp64 numpy reference over `tokens`, recording per layer and key channel what sets the memory.

    Returns per layer: "one_minus_w_min" [C] (min over tokens of 1 - w), "one_minus_w_med" [C], "a_med" [C],
    "S_max" (max |S| over the run), "S_norm" (max ||S||), and "fp16_w_is_1" [C] (fraction of tokens on which
    w rounds to 1.0 in fp16).
    """
    from rwkv2rknn.families.rwkv7 import DECAY_SCALE, LN_EPS, RefModel7, _norm_last, _sigmoid

    ref = RefModel7(weights)
    L = weights.n_layer
    omw = [[] for _ in range(L)]
    av = [[] for _ in range(L)]
    orig = ref.block

    def block(i, x, st, v_first):
        p = ref.layers[i]
        h = _norm_last(x, p["ln1.weight"], p["ln1.bias"], LN_EPS)
        d = st[0][1] - h
        mw, ma = h + d * p["att.x_w"], h + d * p["att.x_a"]
        wl = np.tanh(mw @ p["att.w1"]) @ p["att.w2"]
        omw[i].append(-np.expm1(-DECAY_SCALE * _sigmoid(p["att.w0"] + wl)))
        av[i].append(_sigmoid(p["att.a0"] + (ma @ p["att.a1"]) @ p["att.a2"]))
        return orig(i, x, st, v_first)

    ref.block = block
    state = ref.init_state()
    s_max, s_norm = np.zeros(L), np.zeros(L)
    for t in tokens:
        _, state = ref.forward(int(t), state)
        for i, (_, S) in enumerate(state):
            s_max[i] = max(s_max[i], float(np.abs(S).max()))
            s_norm[i] = max(s_norm[i], float(np.linalg.norm(S)))
    out = []
    for i in range(L):
        o, a = np.array(omw[i]), np.array(av[i])
        w16 = np.exp(np.log1p(-o)).astype(np.float16)  # w = 1 - (1 - w), rounded as the NPU stores it
        out.append({"one_minus_w_min": o.min(0), "one_minus_w_med": np.median(o, 0), "a_med": np.median(a, 0),
                    "S_max": float(s_max[i]), "S_norm": float(s_norm[i]),
                    "fp16_w_is_1": (w16 == np.float16(1.0)).mean(0)})
    return out


# -- measuring a plan against onnxruntime fp32 ------------------------------------------------------------------

def fp32_reference(model_dir, out_dir) -> Path:
    """The reference split: no NPU at all, every boundary and state float32 (`--policy cpu --npu-io float32`)."""
    from rwkv2rknn.split import split_model

    split_model([model_dir], out_dir, policy="cpu", force=True, progress=False, prefill_chunk=0, npu_io="float32")
    return Path(out_dir) / "manifest.json"


def _rel(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    n = float(np.linalg.norm(ref))
    return float(np.linalg.norm(got - ref)) / n if n else float(np.linalg.norm(got))


def state_errors7(shift, wkv, shift_ref, wkv_ref) -> dict:
    """One layer: "wkv" ||S - S_ref|| / ||S_ref|| over all heads, "wkv_head" the worst head, "ffn_shift" and
    "att_shift" the two token-shift rows (relative L2 each)."""
    heads = [_rel(wkv[h], wkv_ref[h]) for h in range(wkv_ref.shape[0])]
    return {"wkv": _rel(wkv, wkv_ref), "wkv_head": max(heads), "ffn_shift": _rel(shift[0], shift_ref[0]),
            "att_shift": _rel(shift[1], shift_ref[1])}


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _pairs(states: list) -> list[tuple[np.ndarray, np.ndarray]]:
    """Chain.get_state() of an RWKV-7 model -> per layer (shift [2, C], wkv [H, N, N]) as float64."""
    if len(states) % 2:
        raise ValueError(f"{len(states)} states: not RWKV-7's two per layer (shift, wkv)")
    return [(np.asarray(states[k], np.float64), np.asarray(states[k + 1], np.float64))
            for k in range(0, len(states), 2)]


def measure7(manifest, tokens, reference, backend: str = "rknn-sim", every: int = 50, progress=None,
             states_at=()) -> dict:
    """Run `tokens` through `manifest` on `backend` and through `reference`'s onnxruntime chain (fp32 state),
    teacher forced, side by side.

    Returns {"cos": [T], "agree": [T] bool, "nll": [T] (the got side's next-byte loss, nats), "nll_ref": [T],
    "state": {t: [L] state_errors7}, "chan": {t: (got, ref) wkv [L, H, N, N]} for t in states_at, "seconds"}.
    """
    from rwkv2rknn.run.chain import Chain, runner_factory

    ref_chain = Chain(None, runner_factory(reference, "ort"))
    if any(st.dtype != "float32" for st in ref_chain.program.states):
        ref_chain.close()
        raise ValueError(f"{reference}: its states are not all float32 between tokens; no fp32 reference")
    got_chain = Chain(None, runner_factory(manifest, backend))
    cos, agree, nll, nll_ref, state, chan = [], [], [], [], {}, {}
    t0 = time.perf_counter()
    try:
        for i, tok in enumerate(tokens, start=1):
            g = np.array(got_chain.step(int(tok)), dtype=np.float64)
            r = np.array(ref_chain.step(int(tok)), dtype=np.float64)
            cos.append(_cos(g, r))
            agree.append(int(np.argmax(g)) == int(np.argmax(r)))
            if i < len(tokens):
                nxt = int(tokens[i])
                for lg, acc in ((g, nll), (r, nll_ref)):
                    m = lg.max()
                    acc.append(float(m + math.log(np.exp(lg - m).sum()) - lg[nxt]))
            if i % every == 0 or i in states_at:
                gs, rs = _pairs(got_chain.get_state()), _pairs(ref_chain.get_state())
                if i % every == 0:
                    state[i] = [state_errors7(a[0], a[1], b[0], b[1]) for a, b in zip(gs, rs)]
                    if progress is not None:
                        worst = max(e["wkv"] for e in state[i])
                        print(f"  token {i}: worst layer wkv rel {worst:.2e}, min cos so far {min(cos):.6f}",
                              file=progress, flush=True)
                if i in states_at:
                    chan[i] = (np.stack([a[1] for a in gs]), np.stack([b[1] for b in rs]))
    finally:
        got_chain.close()
        ref_chain.close()
    return {"cos": np.array(cos), "agree": np.array(agree), "nll": np.array(nll), "nll_ref": np.array(nll_ref),
            "state": state, "chan": chan, "seconds": time.perf_counter() - t0}


def column_errors(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per layer and key channel: ||S[:, :, c] - S_ref[:, :, c]|| / ||S_ref[:, :, c]|| (got, ref [L, H, N, N])
    -> [L, C] with channel c = head * N + key index (the layout of w0, a0)."""
    g, r = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    L, H, N, _ = r.shape
    num = np.sqrt(((g - r) ** 2).sum(axis=2)).reshape(L, H * N)
    den = np.sqrt((r ** 2).sum(axis=2)).reshape(L, H * N)
    return num / np.maximum(den, 1e-12)


# -- emulation: which rounding causes the drift -----------------------------------------------------------------

EMULATIONS = {  # name -> what is rounded to fp16 (float32 arithmetic otherwise)
    "fp32": "nothing",
    "w16": "the decay w (the state stays float32: the deep --state-update cpu split reads w from the NPU)",
    "S16": "the state S after every token (the update itself exact)",
    "w16+S16": "the decay w and the state S after every token",
    "ops16": "every input of the update (w, kk, a, v, k) and the result of every op of it, as the NPU graph runs "
             "it: S*w, S@kk, (S@kk)*(kk*a), the difference, v*k, the sum",
    "delta16": "as ops16, but the update written as S + ((S*(w - 1) - (S@kk)*(kk*a)) + v*k) with w - 1 "
               "computed without rounding w (Elu(x) = exp(x) - 1 in the legalized graph): one rounding of S",
}


def _r16(x):
    return np.asarray(x).astype(np.float16).astype(np.asarray(x).dtype)


def _update(S, decay_log, kk, a, v, k, mode: str, H: int, N: int):
    """S' = S diag(w) - (S kk)(kk a)^T + v k^T under emulation `mode` (EMULATIONS)."""
    w = np.exp(decay_log)
    if mode in ("fp32", "S16", "w16", "w16+S16"):
        if mode in ("w16", "w16+S16"):
            w = _r16(w)
        S = (S * w.reshape(H, 1, N) - (S @ kk[:, :, None]) * (kk * a.reshape(H, N))[:, None, :]
             + v.reshape(H, N, 1) * k.reshape(H, 1, N))
        return _r16(S) if mode in ("S16", "w16+S16") else S
    kk, a, v, k = _r16(kk), _r16(a), _r16(v), _r16(k)
    rm = _r16(_r16(S @ kk[:, :, None]) * _r16(kk * a.reshape(H, N))[:, None, :])
    vk = _r16(v.reshape(H, N, 1) * k.reshape(H, 1, N))
    if mode == "ops16":
        return _r16(_r16(_r16(S * _r16(w).reshape(H, 1, N)) - rm) + vk)
    if mode == "delta16":
        wm1 = _r16(np.expm1(decay_log))  # Elu(x) = exp(x) - 1: relative precision, no rounding of w itself
        return _r16(S + _r16(_r16(_r16(S * wm1.reshape(H, 1, N)) - rm) + vk))
    raise ValueError(f"emulation {mode!r}: choose one of {', '.join(EMULATIONS)}")


def _emulated_block(p: dict, i: int, x, shift, S, v_first, mode: str, H: int, N: int):
    """One RWKV-7 layer in float32 (the mixing graphs' math, written out) with the state update under
    emulation `mode` (EMULATIONS); the rest of the layer is float32."""
    from rwkv2rknn.families.rwkv7 import DECAY_SCALE, GN_EPS, L2_EPS, LN_EPS, _norm_last, _sigmoid

    h = _norm_last(x, p["ln1.weight"], p["ln1.bias"], LN_EPS)
    d = shift[1] - h
    m = {q: h + d * p[f"att.x_{q}"] for q in "rwkvag"}
    r, k, v = p["att.receptance.weight"] @ m["r"], p["att.key.weight"] @ m["k"], p["att.value.weight"] @ m["v"]
    wl = np.tanh(m["w"] @ p["att.w1"]) @ p["att.w2"]
    a = _sigmoid(p["att.a0"] + (m["a"] @ p["att.a1"]) @ p["att.a2"])
    g = _sigmoid(m["g"] @ p["att.g1"]) @ p["att.g2"]
    kk = (k * p["att.k_k"]).reshape(H, N)
    kk = kk / np.maximum(np.sqrt((kk * kk).sum(-1, keepdims=True)), L2_EPS)
    k = k * (1 + (a - 1) * p["att.k_a"])
    if i == 0:
        v_first = v
    else:
        v = v + (v_first - v) * _sigmoid(p["att.v0"] + (m["v"] @ p["att.v1"]) @ p["att.v2"])
    S = _update(S, -DECAY_SCALE * _sigmoid(p["att.w0"] + wl), kk, a, v, k, mode, H, N)
    y = (S @ r.reshape(H, N, 1))[:, :, 0]
    y = _norm_last(y, p["att.ln_x.weight"].reshape(H, N), p["att.ln_x.bias"].reshape(H, N), GN_EPS)
    y = (y + (r * k * p["att.r_k"].reshape(-1)).reshape(H, N).sum(-1, keepdims=True) * v.reshape(H, N)).reshape(-1)
    x = x + p["att.output.weight"] @ (y * g)
    c = _norm_last(x, p["ln2.weight"], p["ln2.bias"], LN_EPS)
    hid = np.maximum(p["ffn.key.weight"] @ (c + (shift[0] - c) * p["ffn.x_k"]), 0)
    return x + p["ffn.value.weight"] @ (hid * hid), np.stack([c, h]), S, v_first


def emulate(weights, tokens, modes=("w16", "S16", "w16+S16"), every: int = 50, dtype=np.float32) -> dict:
    """Each emulation of `modes` against the unrounded float32 run, teacher forced over `tokens`.

    `weights` should be the fp16-rounded weights the exported graphs hold (`rounded16`). Returns
    {mode: {"state": {t: [L] wkv rel error}, "cos": [T], "agree": [T]}}.
    """
    from rwkv2rknn.families.rwkv7 import LN_EPS, _norm_last

    cast = {k: v for k, v in weights.embed().items()}
    emb = {k: np.asarray(v, dtype) for k, v in cast.items()}
    layers = [{k: np.asarray(v, dtype) for k, v in weights.layer(i).items()} for i in range(weights.n_layer)]
    head = {k: np.asarray(v, dtype) for k, v in weights.head().items()}
    H, N, C, L = weights.n_head, weights.head_size, weights.n_embd, weights.n_layer
    runs = ["fp32", *modes]
    st = {m: [(np.zeros((2, C), dtype), np.zeros((H, N, N), dtype)) for _ in range(L)] for m in runs}
    out = {m: {"state": {}, "cos": [], "agree": []} for m in modes}
    for t, tok in enumerate(tokens, start=1):
        logits = {}
        for m in runs:
            x = _norm_last(emb["emb.weight"][int(tok)], emb["ln0.weight"], emb["ln0.bias"], LN_EPS)
            vf, new = None, []
            for i in range(L):
                x, sh, S, vf = _emulated_block(layers[i], i, x, st[m][i][0], st[m][i][1], vf, m, H, N)
                new.append((sh, S))
            st[m] = new
            logits[m] = head["head.weight"] @ _norm_last(x, head["ln_out.weight"], head["ln_out.bias"], LN_EPS)
        for m in modes:
            out[m]["cos"].append(_cos(logits[m], logits["fp32"]))
            out[m]["agree"].append(int(np.argmax(logits[m])) == int(np.argmax(logits["fp32"])))
            if t % every == 0:
                out[m]["state"][t] = [_rel(st[m][i][1], st["fp32"][i][1]) for i in range(L)]
    for m in modes:
        out[m]["cos"], out[m]["agree"] = np.array(out[m]["cos"]), np.array(out[m]["agree"])
    return out


def delta_form(model_dir, out_dir) -> Path:
    """Copy an exported RWKV-7 model with every layer's update rewritten as S' = S + ((S * (w - 1) - rm) + v k^T),
    w - 1 = Elu(decay_log) (exact: decay_log <= 0), instead of S' = (S * w - rm) + v k^T (an experiment for
    docs/wkv7-precision.md, not what the exporter writes). Same function; on an fp16 NPU the small terms are
    summed first and S is rounded once, and w, which fp16 holds only to 2^-11 next to 1, is never formed.
    """
    import shutil

    import onnx
    from onnx import helper

    src, out = Path(model_dir), Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    for path in sorted(out.glob("mixing_*.onnx")):
        m = onnx.load(str(path))
        nodes = list(m.graph.node)
        by_out = {o: n for n in nodes for o in n.output}
        dec_mul = next(n for n in nodes if n.op_type == "Mul" and "wkv_in" in n.input and "att.decay_row" in n.input)
        final = by_out["wkv_out"]
        reshape = by_out["att.decay_row"]
        if final.op_type != "Add" or reshape.op_type != "Reshape" or by_out[reshape.input[0]].op_type != "Exp":
            raise ValueError(f"{path}: the state update is not the exporter's S * w - rm + v k^T")
        exp = by_out[reshape.input[0]]
        elu = helper.make_node("Elu", [exp.input[0]], ["att.decay_m1"], name="att.decay_m1", alpha=1.0)
        row = helper.make_node("Reshape", ["att.decay_m1", reshape.input[1]], ["att.decay_m1_row"],
                               name="att.decay_m1_row")
        dec_mul.input[list(dec_mul.input).index("att.decay_row")] = "att.decay_m1_row"
        final.output[0] = "att.s_delta"
        add = helper.make_node("Add", ["wkv_in", "att.s_delta"], ["wkv_out"], name="att.s_plus_delta")
        new = []
        for n in nodes:
            if n is exp or n is reshape:
                continue
            if n is dec_mul:
                new += [elu, row]
            new.append(n)
            if n is final:
                new.append(add)
        del m.graph.node[:]
        m.graph.node.extend(new)
        onnx.checker.check_model(m)
        onnx.save(m, str(path))
    return out


def rounded16(weights):
    """The weights as an fp16 export holds them (every tensor rounded to float16, kept as float32)."""
    return weights._like(lambda part: {k: np.asarray(v, np.float16).astype(np.float32)
                                       for k, v in weights._fetch(part).items()}).materialize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1000)
    args = ap.parse_args(argv)
    from rwkv2rknn.families.rwkv7 import load_pth7

    toks = heldout_tokens(args.tokens)
    for name, w in (("trained", load_pth7(FIXTURE7)), ("stress", stress_weights7())):
        print(f"{name}: state over {args.tokens} held-out bytes (fp64 numpy reference)")
        print("| layer | min 1-w | channels with 1-w < 2.4e-4 on some token | max \\|S\\| | max \\|\\|S\\|\\| |")
        print("|---:|---:|---:|---:|---:|")
        for i, d in enumerate(decay_trace(w, toks)):
            print(f"| {i} | {d['one_minus_w_min'].min():.1e} | {int((d['fp16_w_is_1'] > 0).sum())} | "
                  f"{d['S_max']:.1f} | {d['S_norm']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
