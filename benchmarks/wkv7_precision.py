"""RWKV-7 matrix-state precision: where the state update runs, measured in the simulator (docs/wkv7-precision.md).

Models: the trained fixture (tests/fixtures/rwkv7-tiny-trained.pth, 4 x 128) and its long-memory stress variant
(tests/stress_model7.py: a quarter of the key channels with w -> 1 and little removal). Text: the fixture's
held-out bytes. Plans, each split and built as a user types it (`--prefill-chunk 0`: the decode plan is what is
measured) and run in rknn-toolkit2's simulator (fp16) against onnxruntime fp32 (`--policy cpu --npu-io float32`):
  A        split --policy deep --state-update npu: the whole layer fp16 on the NPU, S kept fp16 between tokens;
  B-deep   split --policy deep --state-update cpu: the update fp32 on the CPU, the NPU reads an fp16 shadow;
  B-fused  split --policy fused: the recurrence (decay included) fp32 on the CPU;
  A-delta  A on graphs whose update is rewritten S + ((S (w - 1) - rm) + v k^T) (an experiment, not the tool).
Then numpy emulations that name the rounding behind each plan's error (and run past 1,000 tokens), the error per
key channel against its decay, and the predicted cost of each placement on the 0.4B and 1.5B RWKV-7 shapes
(PREDICTIONS from board profiles rk3588 and rk3588-c, not measurements).

    .venv/bin/python -m benchmarks.wkv7_precision [--parts sim,emulate,cost] [--tokens 1000] [--long 4000]

Writes benchmarks/results/wkv7_precision.json. The simulator part takes about 25 minutes on a loaded 2-core machine
(8 builds of 0.5-2 min, 8 runs of 1.5-3.5 min); it reuses the builds of an earlier run in the same --work.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, SHAPES7, export_shape, save_results

sys.path.insert(0, str(ROOT / "tests"))
import stress_model7 as sm  # noqa: E402

PLANS = {  # name -> (split arguments, model variant)
    "A": (["--policy", "deep", "--state-update", "npu"], ""),
    "B-deep": (["--policy", "deep", "--state-update", "cpu"], ""),
    "B-fused": (["--policy", "fused"], ""),
    "A-delta": (["--policy", "deep", "--state-update", "npu"], "-delta"),
}
# the emulation that reproduces each plan (checked against the simulator at --tokens)
EMULATION_OF = {"A": "ops16", "B-deep": "w16", "A-delta": "delta16"}
COST_PLANS = {  # name -> split_model keyword arguments
    "A": {"policy": "deep", "state_update": "npu"},
    "B-deep": {"policy": "deep", "state_update": "cpu"},
    "B-fused": {"policy": "fused"},
}
BOARDS = ("rk3588", "rk3588-c")
W_BINS = (1e-6, 1e-4, 2.44e-4, 1e-3, 1e-2, 1.0)  # 1 - w bins (2.44e-4: below it fp16 holds w as exactly 1)


def _cli(*args, log=None) -> None:
    cmd = [sys.executable, "-m", "rwkv2rknn", *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    print(f"$ rwkv2rknn {' '.join(map(str, args))}  ({time.perf_counter() - t0:.0f} s)", file=log or sys.stdout,
          flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")


def models(work: Path) -> dict[str, Path]:
    """Export the trained fixture and the stress variant (fp16), and the delta-form copies of both."""
    out = {"trained": work / "trained", "stress": work / "stress"}
    if not (out["trained"] / "head.onnx").exists():
        _cli("export", sm.FIXTURE7, "-o", out["trained"], "-q", "--force")
    if not (out["stress"] / "head.onnx").exists():
        sm.export7(sm.stress_weights7(), out["stress"])
    for name in ("trained", "stress"):
        if not (work / f"{name}-delta" / "head.onnx").exists():
            sm.delta_form(out[name], work / f"{name}-delta")
    return out


def weights_of(name: str):
    from rwkv2rknn.families.rwkv7 import load_pth7

    return load_pth7(sm.FIXTURE7) if name == "trained" else sm.stress_weights7()


def _npu_checked(manifest: Path) -> dict:
    """The build's NPU segments, refusing a fallback (a segment on the CPU in fp32 would pass for nothing)."""
    data = json.loads(manifest.read_text())
    build = json.loads((manifest.parent / "build.json").read_text())
    npu = [s for g in data["graphs"] for s in g["segments"] if s["backend"] == "npu"]
    bad = [s["id"] for s in npu if s["id"] not in build["segments"] or s.get("fallback_reason")]
    if not npu or bad:
        raise RuntimeError(f"{manifest}: NPU segments not built or fallen back: {bad}")
    return {s: {"ops": b.get("compiler", {}).get("ops"), "cpu_ops": len(b.get("compiler", {}).get("cpu_ops", []))}
            for s, b in build["segments"].items()}


def _summary(res: dict, trace: list[dict]) -> dict:
    """JSON of one measure7 result, with the per-key-channel errors at the last token binned by 1 - w."""
    out = {"seconds": res["seconds"], "cos": res["cos"].tolist(), "agree": res["agree"].astype(int).tolist(),
           "nll": float(res["nll"].mean()), "nll_ref": float(res["nll_ref"].mean()),
           "state": {str(t): v for t, v in res["state"].items()}}
    if res["chan"]:
        t = max(res["chan"])
        col = sm.column_errors(*res["chan"][t])
        out["channels"] = {"token": t, "bins": _binned(col, trace)}
    return out


def _binned(col: np.ndarray, trace: list[dict]) -> list[dict]:
    """Column errors [L, C] binned by each channel's median 1 - w over the run (all layers pooled)."""
    omw = np.stack([d["one_minus_w_med"] for d in trace])
    rows = []
    for lo, hi in zip(W_BINS[:-1], W_BINS[1:]):
        sel = (omw >= lo) & (omw < hi)
        if sel.any():
            e = col[sel]
            rows.append({"lo": lo, "hi": hi, "channels": int(sel.sum()), "median": float(np.median(e)),
                         "p90": float(np.percentile(e, 90)), "max": float(e.max())})
    return rows


def run_sim(work: Path, n_tokens: int, plans, names, rebuild: bool = False, log=sys.stdout) -> dict:
    src = models(work)
    tokens = sm.heldout_tokens(n_tokens)
    out = {}
    for name in names:
        trace = sm.decay_trace(weights_of(name), tokens)
        reference = sm.fp32_reference(src[name], work / f"{name}-ref")
        entry = out[name] = {
            "layers": [{"one_minus_w_min": float(d["one_minus_w_min"].min()),
                        "channels_w16_is_1": int((d["fp16_w_is_1"] > 0).sum()),
                        "S_max": d["S_max"], "S_norm": d["S_norm"]} for d in trace],
            "plans": {}}
        for plan in plans:
            args, variant = PLANS[plan]
            out_dir = work / f"{name}-{plan}"
            t0 = time.perf_counter()
            if rebuild or not (out_dir / "build.json").exists():  # a split replaces OUT, build record included
                _cli("split", work / f"{name}{variant}", "-o", out_dir, "--prefill-chunk", "0", "--force", "-q",
                     *args, log=log)
            _cli("build", out_dir, "-q", "--jobs", "1", "--no-verify", log=log)  # unchanged segments: cached
            built = time.perf_counter() - t0
            segs = _npu_checked(out_dir / "manifest.json")
            res = sm.measure7(out_dir / "manifest.json", tokens, reference, states_at=(n_tokens,), progress=None)
            entry["plans"][plan] = {"split_build_s": built, "segments": segs, **_summary(res, trace)}
            worst = max(e["wkv"] for e in res["state"][n_tokens])
            print(f"{name} {plan}: worst layer state error at {n_tokens} {worst:.2e}, logits cos min "
                  f"{res['cos'].min():.6f}, argmax {100 * res['agree'].mean():.1f}% ({res['seconds']:.0f} s)",
                  file=log, flush=True)
    return out


def run_emulation(n_tokens: int, long_tokens: int, names, log=sys.stdout) -> dict:
    """Every emulation at n_tokens (to match the simulator) and past it (long_tokens), per model."""
    out = {}
    for name in names:
        w = sm.rounded16(weights_of(name))
        t0 = time.perf_counter()
        res = sm.emulate(w, sm.heldout_tokens(max(n_tokens, long_tokens)),
                         modes=[m for m in sm.EMULATIONS if m != "fp32"], every=50)
        out[name] = {m: {"state": {str(t): v for t, v in r["state"].items()}, "cos": r["cos"].tolist(),
                         "agree": r["agree"].astype(int).tolist()} for m, r in res.items()}
        print(f"emulation {name}: {max(n_tokens, long_tokens)} tokens in {time.perf_counter() - t0:.0f} s", file=log,
              flush=True)
    return out


def _price(data: dict) -> dict:
    """(board, precision) -> decode/prefill ms per token, NPU calls, breakdown and board memory of one plan, as
    `rwkv2rknn estimate OUT --board B --precision P --json` computes them."""
    from rwkv2rknn.cost import estimate, load_profile
    from rwkv2rknn.cost.estimate import program_of
    from rwkv2rknn.cost.memory import board_memory

    out = {}
    for board in BOARDS:
        profile = load_profile(board)
        for precision in ("fp16", "w8a8"):
            program = program_of(data, precision)
            est = estimate(data, profile, program=program, precision=precision)
            mem = board_memory(data, program, precision, profile.npu_context_bytes)
            out[f"{board}/{precision}"] = {
                "decode_ms_per_token": est.decode_ms_per_token, "prefill_ms_per_token": est.prefill_ms_per_token,
                "npu_calls_per_token": est.npu_calls_per_token, "board_memory_bytes": mem.board_memory_bytes,
                "breakdown": dict(est.breakdown)}
    return out


def _linear(a: dict, b: dict, factor: float) -> dict:
    """a + factor * (b - a), over every number of a price dict (the plan of more identical layer groups)."""
    if isinstance(a, dict):
        return {k: _linear(a[k], b[k], factor) for k in a}
    return a + factor * (b - a)


def _layers(model: Path, n: int, work: Path) -> Path:
    """A model directory of the first n layers of `model` (links to its files): same widths, fewer layers."""
    out = work / f"{model.name}-{n}L"
    out.mkdir(parents=True, exist_ok=True)
    for name in ["embed", "head", *(f"mixing_{i}" for i in range(n))]:
        link = out / f"{name}.onnx"
        if not link.exists():
            link.symlink_to((model / f"{name}.onnx").resolve())
    return out


def _preview(model: Path, kw: dict) -> dict:
    from rwkv2rknn.split import split_model

    data, _ = split_model([model], preview=True, progress=False, **kw)
    return data


# Layers of the reduced models a deep plan of each shape is extrapolated from (whole groups: 24 x 1024 makes groups
# of 8 layers, 24 x 2048 groups of 2 with the head in the last), and whether the full shape is split too.
REDUCED = {"RWKV-7 0.4B": ((8, 16), True), "RWKV-7 1.5B": ((4, 6), False)}


def run_cost(work: Path, log=sys.stdout) -> dict:
    """Each placement priced (PREDICTIONS) on the RWKV-7 0.4B and 1.5B shapes.

    The estimator is `rwkv2rknn estimate`'s, on `split --preview` plans (nothing written). A plan of separate
    layers (fused) is priced from 2 layers repeated to 24 (rwkv2rknn.cost.plan.repeat_layers, exact: identical
    layers have identical features). A deep plan (merged groups, not repeatable) is priced from two reduced models
    of whole groups, extrapolated linearly in the number of groups; on 0.4B the full shape is split as well and
    checks the extrapolation. (A full 1.5B split holds ~20 GB in memory here.)
    """
    from rwkv2rknn.cost.plan import repeat_layers

    rows, checks = [], []
    for shape, (sizes, full) in REDUCED.items():
        model = export_shape(work, shape)
        n_layer = SHAPES7[shape][0]
        for plan, kw in COST_PLANS.items():
            t0 = time.perf_counter()
            if kw["policy"] == "fused":
                price, how = _price(repeat_layers(_preview(_layers(model, 2, work), kw), n_layer)), "2 layers repeated"
            else:
                a, b = (_price(_preview(_layers(model, n, work), kw)) for n in sizes)
                price = _linear(a, b, (n_layer - sizes[0]) / (sizes[1] - sizes[0]))
                how = f"extrapolated from {sizes[0]} and {sizes[1]} layers"
            if full:
                exact = _price(_preview(model, kw))
                checks.append({"shape": shape, "plan": plan, "how": how,
                               "decode_ms": {k: (v["decode_ms_per_token"], exact[k]["decode_ms_per_token"])
                                             for k, v in price.items()}})
                price, how = exact, "full shape"
            for key, v in price.items():
                board, precision = key.split("/")
                rows.append({"shape": shape, "plan": plan, "board": board, "precision": precision, "how": how, **v})
            c = price["rk3588-c/fp16"]
            print(f"{shape} {plan}: rk3588-c fp16 decode {c['decode_ms_per_token']:.1f} ms, prefill "
                  f"{c['prefill_ms_per_token']:.2f} ms/token ({how}; {time.perf_counter() - t0:.0f} s)", file=log,
                  flush=True)
    return {"label": "PREDICTIONS from board profiles (rk3588: Python RKNNLite; rk3588-c: librknnrt's C API), "
                     "not measurements", "rows": rows, "extrapolation_checks": checks}


# -- tables ----------------------------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.2f}%" if x < 0.1 else f"{100 * x:.1f}%"


def _state_tables(results: dict, cps: list[int]) -> list[str]:
    lines = []
    for name, entry in results.get("sim", {}).items():
        lines += [f"\n**{name}: state magnitudes over the run** (fp64 numpy reference)\n",
                  "| layer | min 1 - w | channels with w = 1 in fp16 on some token | max \\|S\\| | max \\|\\|S\\|\\| |",
                  "|---:|---:|---:|---:|---:|"]
        for k, d in enumerate(entry["layers"]):
            lines.append(f"| {k} | {d['one_minus_w_min']:.1e} | {d['channels_w16_is_1']} | {d['S_max']:.0f} | "
                         f"{d['S_norm']:.0f} |")
        lines += [f"\n**{name}: matrix-state error per layer, ||S - S_ref|| / ||S_ref||, at token t**\n",
                  "| plan | layer | " + " | ".join(str(c) for c in cps) + " | token shift (worst row, any t) |",
                  "|---|---:|" + "---:|" * len(cps) + "---:|"]
        for plan, p in entry["plans"].items():
            for k in range(len(entry["layers"])):
                vals = " | ".join(_pct(p["state"][str(c)][k]["wkv"]) for c in cps)
                shift = max(max(e[k]["ffn_shift"], e[k]["att_shift"]) for e in p["state"].values())
                lines.append(f"| {plan} | {k} | {vals} | {_pct(shift)} |")
        lines += [f"\n**{name}: logits against onnxruntime fp32** (min cosine over tokens 1..t; argmax agreement "
                  "and next-byte loss over the run)\n",
                  "| plan | " + " | ".join(f"cos @{c}" for c in cps) + " | argmax agree | loss (fp32) nats/byte |",
                  "|---|" + "---:|" * len(cps) + "---:|---:|"]
        for plan, p in entry["plans"].items():
            cos = np.array(p["cos"])
            vals = " | ".join(f"{cos[:c].min():.6f}" for c in cps)
            lines.append(f"| {plan} | {vals} | {100 * np.mean(p['agree']):.1f}% | {p['nll']:.4f} ({p['nll_ref']:.4f}) |")
    return lines


def _emulation_tables(results: dict) -> list[str]:
    lines = []
    sim, emu = results.get("sim", {}), results.get("emulation", {})
    n = results.get("tokens", 1000)
    if sim and emu:
        lines += [f"\n**Emulation against the simulator** (worst layer's state error at {n} tokens)\n",
                  "| model | plan (simulator) | its emulation | simulator | emulation |", "|---|---|---|---:|---:|"]
        for name in sim:
            for plan, mode in EMULATION_OF.items():
                if plan in sim[name]["plans"] and mode in emu.get(name, {}):
                    got = max(e["wkv"] for e in sim[name]["plans"][plan]["state"][str(n)])
                    em = max(emu[name][mode]["state"][str(n)])
                    lines.append(f"| {name} | {plan} | {mode} | {_pct(got)} | {_pct(em)} |")
    if emu:
        long_n = results.get("emulation_long_tokens", n)
        cps = [c for c in (250, 1000, 2000, 3000, 4000, 8000) if c <= long_n]
        lines += ["\n**Emulations past the simulator's run** (worst layer's state error at token t; logits: min "
                  "cosine and argmax agreement over the run, against the unrounded fp32 emulation)\n",
                  "| model | rounded to fp16 | " + " | ".join(str(c) for c in cps) + " | cos min | argmax |",
                  "|---|---|" + "---:|" * len(cps) + "---:|---:|"]
        for name, modes in emu.items():
            for mode, r in modes.items():
                vals = " | ".join(_pct(max(r["state"][str(c)])) for c in cps)
                lines.append(f"| {name} | {mode} | {vals} | {min(r['cos']):.6f} | {100 * np.mean(r['agree']):.1f}% |")
    return lines


def _channel_tables(results: dict) -> list[str]:
    lines = []
    for name, entry in results.get("sim", {}).items():
        plans = {p: v["channels"] for p, v in entry["plans"].items() if "channels" in v}
        if not plans:
            continue
        t = next(iter(plans.values()))["token"]
        lines += [f"\n**{name}: error per key channel (column of S) at token {t}, by the channel's median 1 - w** "
                  "(all layers; median / 90th percentile / max)\n",
                  "| 1 - w | channels | " + " | ".join(plans) + " |", "|---|---:|" + "---:|" * len(plans)]
        bins = {(b["lo"], b["hi"]): b["channels"] for v in plans.values() for b in v["bins"]}
        for (lo, hi), count in sorted(bins.items()):
            cells = []
            for v in plans.values():
                b = next((b for b in v["bins"] if (b["lo"], b["hi"]) == (lo, hi)), None)
                cells.append(f"{_pct(b['median'])} / {_pct(b['p90'])} / {_pct(b['max'])}" if b else "-")
            lines.append(f"| {lo:.2g} .. {hi:.2g} | {count} | " + " | ".join(cells) + " |")
    return lines


def _cost_tables(results: dict) -> list[str]:
    cost = results.get("cost")
    if not cost:
        return []
    lines = [f"\n**Predicted cost of each placement** ({cost['label']}; decode / prefill ms per token)\n",
             "| shape | plan | rk3588 fp16 | rk3588-c fp16 | rk3588-c w8a8 | NPU calls | conversion ms (rk3588-c fp16) | "
             "board memory GB (rk3588-c fp16) | priced from |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    rows = {(r["shape"], r["plan"], r["board"], r["precision"]): r for r in cost["rows"]}
    for shape, plan in dict.fromkeys((r["shape"], r["plan"]) for r in cost["rows"]):
        cells = []
        for board, precision in (("rk3588", "fp16"), ("rk3588-c", "fp16"), ("rk3588-c", "w8a8")):
            r = rows[(shape, plan, board, precision)]
            cells.append(f"{r['decode_ms_per_token']:.1f} / {r['prefill_ms_per_token']:.2f}")
        c = rows[(shape, plan, "rk3588-c", "fp16")]
        lines.append(f"| {shape} | {plan} | " + " | ".join(cells) + f" | {c['npu_calls_per_token']:g} | "
                     f"{c['breakdown']['conversion']:.2f} | {c['board_memory_bytes'] / 1e9:.2f} | {c['how']} |")
    return lines


def tables(results: dict) -> str:
    cps = [c for c in sm.CHECKPOINTS if c <= results.get("tokens", 1000)]
    return "\n".join(_state_tables(results, cps) + _emulation_tables(results) + _channel_tables(results)
                     + _cost_tables(results))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="sim,emulate,cost")
    ap.add_argument("--plans", default=",".join(PLANS))
    ap.add_argument("--models", default="trained,stress")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--long", type=int, default=4000, help="tokens of the emulations (past the simulator's run)")
    ap.add_argument("--rebuild", action="store_true", help="split and build again what --work already holds")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "rwkv2rknn-wkv7-precision"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    parts, names = args.parts.split(","), args.models.split(",")
    path = ROOT / "benchmarks" / "results" / "wkv7_precision.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update({"tokens": args.tokens, "text": "held-out bytes of the trained fixtures (tests/conftest.py)",
                    "label": "simulator (rknn-toolkit2 x86, fp16, rk3588) and numpy emulation; cost: PREDICTIONS"})
    if "sim" in parts:
        results.setdefault("sim", {}).update(run_sim(work, args.tokens, args.plans.split(","), names, args.rebuild))
        save_results("wkv7_precision", results)
    if "emulate" in parts:
        results.setdefault("emulation", {}).update(run_emulation(args.tokens, args.long, names))
        results["emulation_long_tokens"] = max(args.tokens, args.long)
        save_results("wkv7_precision", results)
    if "cost" in parts:
        results["cost"] = run_cost(work)
        save_results("wkv7_precision", results)
    print(tables(results))
    return results


if __name__ == "__main__":
    main()
