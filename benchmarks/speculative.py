"""Speculative decoding: measured on the trained pairs (host), predicted for RWKV-7 1.5B with a 0.1B-shape draft.

Measured (this machine, onnxruntime; `python -m rwkv2rknn.run` machinery): the trained 4 x 128 targets
(tests/fixtures/rwkv{4,7}-tiny-trained.pth, split with a verify plan of 4 drafts) and their 2 x 64 drafts
(tests/fixtures/rwkv{4,7}-tiny-draft.pth, trained the same way on the same text), bytes as tokens.
- Acceptance on 1,000 held-out tokens, teacher-forced: both models read the held-out text; at each position the
  greedy acceptance is whether the draft's argmax is the target's, the sampled one (temperature 1) is
  sum_x min(p(x), q(x)), the chance that speculative sampling keeps a draft (Leviathan et al. 2023).
- Generation of 1,000 tokens (8 held-out prompts x 125 tokens), greedy and at temperature 1 (top-p 1), plain and
  speculative in the same run (each prompt 3 times, alternating, the fastest kept): acceptance rate (kept drafts
  / drafts), the per-token acceptance p that gives the measured tokens per target pass under the estimate's model,
  tokens per target pass, where the time goes, and the host speed-up (plain ms/token / speculative ms/token),
  for k = 1, 2, 4 and two draft plans: the default split and
  `--policy cpu` (one onnxruntime session per graph: fewer calls, which is what costs on this host).
Predicted (`rwkv2rknn estimate --draft`, board profiles, NOT measurements): RWKV-7 1.5B (24 x 2048, vocab 65536)
with a 0.1B-shape draft (12 x 768, vocab 65536), random weights of the shapes (LoRA ranks of
families.rwkv7.lora_ranks), split (preview) with 2 layers and repeated to 24 / 12 (cost.speculative.repeat_layers:
the estimator is additive over identical layers), fused plans, under rk3588-c and rk3588, w8a8 and fp16, over
p = 0.5 ... 0.9 and at the measured acceptance rates; k picked per profile. Plus what the target of 35 ms/token
at p = 0.7 would take.

    .venv/bin/python -m benchmarks.speculative [--skip-predicted] [--skip-measured]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, save_results

FIXTURES = ROOT / "tests" / "fixtures"
K = 4
N_TOKENS = 1000
PROMPTS = 8
PROMPT_LEN = 64
REPEATS = 3  # each prompt's plain and speculative runs, alternating; the fastest of each is kept
SHAPES = {"target": ("RWKV-7 1.5B", 24, 2048), "draft": ("RWKV-7 0.1B", 12, 768)}
VOCAB = 65536
P_GRID = (0.5, 0.6, 0.7, 0.8, 0.9)
GOAL_MS, GOAL_P = 35.0, 0.7


def heldout(n: int, offset: int = 0) -> bytes:
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import heldout_bytes

    return heldout_bytes(n, offset)


# -- measured -----------------------------------------------------------------------------------------------------

def _split(work: Path, name: str, **kw) -> Path:
    from rwkv2rknn import families
    from rwkv2rknn.split import split_model

    model = work / name
    if not (model / "head.onnx").exists():
        fam, w = families.load_checkpoint(FIXTURES / f"{name}.pth")
        fam.export(w, model, dtype="float16", weights_as="constants", force=True, progress=False)
    tag = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
    out = work / f"{name}-out-{tag}"
    if not (out / "program.json").exists():
        split_model([model], out, progress=False, force=True, **kw)
    return out


def teacher_forced(target: Path, draft: Path, n: int = N_TOKENS) -> dict:
    """Acceptance on n held-out tokens: both models read the text through their decode plans."""
    from rwkv2rknn.run.chain import Chain
    from rwkv2rknn.run.sampling import distribution

    text = list(heldout(n + 1, 0))
    greedy, sampled = [], []
    with Chain(target) as t, Chain(draft) as d:
        for tok in text[:-1]:
            lt = np.array(t.step(tok), dtype=np.float64)
            ld = np.array(d.step(tok), dtype=np.float64)
            greedy.append(int(np.argmax(lt)) == int(np.argmax(ld)))
            sampled.append(float(np.minimum(distribution(lt, 1.0, 1.0), distribution(ld, 1.0, 1.0)).sum()))
    return {"tokens": n, "greedy": float(np.mean(greedy)), "temperature_1": float(np.mean(sampled))}


def generation(target: Path, draft: Path, k: int, temperature: float) -> dict:
    """1,000 tokens (8 prompts x 125), plain then speculative per prompt, in the same run."""
    from rwkv2rknn.run.chain import Chain
    from rwkv2rknn.run.sampling import Sampling, sample
    from rwkv2rknn.run.speculative import Speculator

    per = N_TOKENS // PROMPTS
    plain_s = spec_s = 0.0
    equal = 0
    with Chain(target) as t, Chain(draft) as d:
        spec = Speculator(t, d, k)
        for i in range(PROMPTS):  # warm-up: every plan once
            if i == 0:
                spec.start(list(heldout(PROMPT_LEN, 1)))
                list(spec.generate(Sampling(temperature, 1.0), 2 * k + 2))
                from rwkv2rknn.run.speculative import SpecStats

                spec.stats = SpecStats(k=k)
            prompt = list(heldout(PROMPT_LEN, 2000 + 47000 * i))
            best_plain = best_spec = float("inf")
            for _ in range(REPEATS):  # alternating, the fastest of each: other work on the machine only slows runs
                rng = np.random.default_rng(i)
                t.reset()
                logits = t.feed(prompt)
                t0 = time.perf_counter()
                plain = []
                for _ in range(per):
                    tok = sample(logits, temperature, 1.0, rng)
                    plain.append(tok)
                    logits = t.step(tok)
                best_plain = min(best_plain, time.perf_counter() - t0)
                spec.rng = np.random.default_rng(i)
                spec.start(prompt)
                t0 = time.perf_counter()
                got = list(spec.generate(Sampling(temperature, 1.0), per))
                best_spec = min(best_spec, time.perf_counter() - t0)
            plain_s += best_plain
            spec_s += best_spec
            equal += sum(a == b for a, b in zip(plain, got))
        st = spec.stats
    from rwkv2rknn.run.speculative import per_token_acceptance

    out = {"k": k, "temperature": temperature, "tokens": per * PROMPTS, "prompts": PROMPTS, "repeats": REPEATS,
           "plain_ms_per_token": 1e3 * plain_s / (per * PROMPTS), "speculative_ms_per_token": 1e3 * spec_s / (per * PROMPTS),
           "host_speedup": plain_s / spec_s, "acceptance": st.acceptance, "tokens_per_target_pass": st.tokens_per_pass,
           "acceptance_per_token": per_token_acceptance(st.tokens_per_pass, k),
           "draft_ms_per_token": 1e3 * st.draft_s / (per * PROMPTS),
           "target_ms_per_token": 1e3 * st.target_s / (per * PROMPTS),
           "time_share": st.to_dict()["time_share"], "stats": st.to_dict()}
    if temperature == 0:
        out["greedy_tokens_equal"] = equal
    return out


def measured(work: Path) -> dict:
    out = {}
    for family in ("rwkv4", "rwkv7"):
        target = _split(work, f"{family}-tiny-trained", verify_tokens=K)
        drafts = {"default": _split(work, f"{family}-tiny-draft"),
                  "cpu": _split(work, f"{family}-tiny-draft", policy="cpu")}
        fam = {"teacher_forced": teacher_forced(target, drafts["default"]), "generation": []}
        print(f"{family}: teacher-forced acceptance {fam['teacher_forced']}", flush=True)
        for plan, draft in drafts.items():
            for temperature in (0.0, 1.0):
                for k in (1, 2, 4):
                    r = generation(target, draft, k, temperature)
                    r["draft_plan"] = plan
                    fam["generation"].append(r)
                    print(f"  draft {plan:7s} T={temperature:g} k={k}: acceptance {r['acceptance']:.3f} (per token "
                          f"{r['acceptance_per_token']:.3f}), "
                          f"{r['tokens_per_target_pass']:.2f} tokens/pass, plain {r['plain_ms_per_token']:.2f} ms, "
                          f"spec {r['speculative_ms_per_token']:.2f} ms ({r['host_speedup']:.2f}x), draft "
                          f"{100 * r['time_share']['draft']:.0f}% of the time"
                          + (f", greedy equal {r['greedy_tokens_equal']}" if temperature == 0 else ""), flush=True)
        out[family] = fam
    return out


# -- predicted ----------------------------------------------------------------------------------------------------

def _shape_plan(work: Path, which: str) -> dict:
    """The 2-layer export of a shape split (preview, fused, features only), cached as JSON; the target with a
    verify plan of K drafts."""
    import json

    from rwkv2rknn import families
    from rwkv2rknn.split import split_model

    name, _, C = SHAPES[which]
    model = work / f"shape-{which}-2x{C}"
    cache = work / f"shape-{which}-2x{C}-plan.json"
    if cache.exists():
        return json.loads(cache.read_text())
    fam = families.get("rwkv7")
    if not (model / "head.onnx").exists():
        fam.export(fam.random_weights(2, C, VOCAB, seed=0), model, dtype="float16", force=True, progress=False)
    t0 = time.perf_counter()
    data, _ = split_model([model], policy="fused", preview=True, progress=False, board="rk3588-c", prefill_chunk=0,
                          verify_tokens=K if which == "target" else 0)
    print(f"split {name} (2 layers, preview): {time.perf_counter() - t0:.0f} s", flush=True)
    cache.write_text(json.dumps(data))
    return data


def predicted(work: Path, acceptances: dict) -> dict:
    from rwkv2rknn.cost.estimate import estimate
    from rwkv2rknn.cost.profile import load_profile
    from rwkv2rknn.cost.speculative import repeat_layers, speculative_estimate, tokens_per_pass

    target = repeat_layers(_shape_plan(work, "target"), SHAPES["target"][1])
    draft = repeat_layers(_shape_plan(work, "draft"), SHAPES["draft"][1])
    ps = tuple(sorted(set(P_GRID) | {round(v, 4) for v in acceptances.values()}))
    rows = []
    for board in ("rk3588-c", "rk3588"):
        prof = load_profile(board)
        for precision in ("w8a8", "fp16"):
            est = speculative_estimate(target, draft, prof, precision, ps)
            d = est.to_dict()
            plain = estimate(target, prof, precision=precision)
            d["plain_breakdown"] = plain.breakdown
            d["board"] = board
            # what 35 ms/token at p = 0.7 would take, by k: the largest draft step, and the floor with a free draft
            need = []
            for k in range(1, 16):
                e = tokens_per_pass(GOAL_P, k)
                pt = next(x for x in est.curve if x.p == GOAL_P and x.k == k)
                budget = GOAL_MS * e - pt.verify_ms - pt.rollback_ms - pt.snapshot_ms
                need.append({"k": k, "tokens_per_pass": e, "verify_ms": pt.verify_ms,
                             "free_draft_ms_per_token": (pt.verify_ms + pt.rollback_ms) / e,
                             "draft_step_ms_allowed": budget / (k + GOAL_P ** k)})
            d["goal"] = {"ms_per_token": GOAL_MS, "p": GOAL_P, "by_k": need}
            # the verify plan streaming at the N-split rate (three models pinned one per core, as the decode head)
            fast = dataclasses.replace(prof, name=f"{board}+verify-at-nsplit-rate",
                                       values={**prof.values, "npu_stream_gbps_mask7": prof.npu_stream_gbps_3core})
            hyp = speculative_estimate(target, draft, fast, precision, (GOAL_P,))
            d["if_verify_streamed_at_nsplit_rate"] = {"p": GOAL_P, "best": hyp.to_dict()["best"][str(GOAL_P)],
                                                      "verify_ms": hyp.verify_ms}
            rows.append(d)
            b = d["best"]
            print(f"{board:9s} {precision}: plain {est.plain_ms_per_token:.1f} ms/token, draft step "
                  f"{est.draft_ms_per_token:.1f} ms, verify k=4 {est.verify_ms[4]:.1f} ms; best: "
                  + ", ".join(f"p={p}: k={v['k']} {v['ms_per_token']:.1f}" for p, v in b.items()), flush=True)
    return {"label": "PREDICTIONS from board profiles, not measurements", "target": SHAPES["target"][0],
            "draft": SHAPES["draft"][0], "vocab": VOCAB, "verify_rows_built": K + 1,
            "measured_acceptance_used": acceptances, "rows": rows,
            "rkllm_ms_per_token": 72.0, "rkllm_source": "RKLLM 1.3.0, w8a8, RWKV7 1.5B, published "
                                                        "(shared/docs/rk3588-board-costs.md)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / ".work" / "speculative"))
    ap.add_argument("--skip-measured", action="store_true")
    ap.add_argument("--skip-predicted", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {}
    path = ROOT / "benchmarks" / "results" / "speculative.json"
    if path.exists():
        import json

        res = json.loads(path.read_text())
    if not args.skip_measured:
        res["measured"] = measured(work)
        res["machine"] = "this project's CI-class host (2 cores, no NPU), onnxruntime"
    if not args.skip_predicted:
        tf = (res.get("measured") or {}).get("rwkv7", {}).get("teacher_forced", {})
        acc = {f"rwkv7 tiny pair, {k}": tf[k] for k in ("greedy", "temperature_1") if k in tf}
        res["predicted"] = predicted(work, acc)
    save_results("speculative", res)


if __name__ == "__main__":
    main()
