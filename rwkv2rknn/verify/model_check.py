"""Whole-model verify: a text through the built chain in the simulator against onnxruntime fp32, logits compared.

`python -m rwkv2rknn.verify.model_check JOB.json` runs in a child of `rwkv2rknn build` (the simulator
is native code that can crash); it writes {"tokens", "logits_cosine_min", "argmax_agree", ...}. The build names
this module through rwkv2rknn.verify.RUNTIME (its `check_module`).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def run_logits(manifest, backend: str, tokens: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits of the chain on one backend from the initial state: [T, V] token by token through the decode
    plan, and (with a prefill plan) [T // chunk, V] after each whole chunk through the prefill plan."""
    return run_plans(manifest, backend, tokens)[:2]


def run_plans(manifest, backend: str, tokens: list[int]):
    """run_logits, and (with a verify plan) the logits of every row of consecutive verify passes over the text,
    [passes * rows, V], each pass keeping all its rows (None without a verify plan)."""
    from rwkv2rknn.run.chain import Chain, runner_factory

    with Chain(manifest, runner_factory(manifest, backend)) as chain:
        steps = np.stack([np.array(chain.step(int(t)), dtype=np.float32, copy=True) for t in tokens])
        chunks = None
        if chain.chunk and len(tokens) >= chain.chunk:
            chain.reset()
            m = chain.chunk
            chunks = np.stack([np.array(chain.prefill(tokens[i:i + m]), dtype=np.float32, copy=True)
                               for i in range(0, len(tokens) - m + 1, m)])
        rows = None
        if chain.verify_rows and len(tokens) >= chain.verify_rows:
            chain.reset()
            r, out = chain.verify_rows, []
            for i in range(0, len(tokens) - r + 1, r):
                out.append(np.array(chain.verify(tokens[i:i + r]), dtype=np.float32, copy=True))
                chain.commit(r - 1)
            rows = np.concatenate(out)
        return steps, chunks, rows


def compare_logits(got: np.ndarray, ref: np.ndarray) -> dict:
    """Per-step cosine (the worst one), argmax agreement and worst rel_l2 of two logits sequences."""
    from rwkv2rknn.numerics import cosine, rel_l2

    cos = [cosine(g, r) for g, r in zip(got, ref)]
    agree = [int(np.argmax(g)) == int(np.argmax(r)) for g, r in zip(got, ref)]
    rel = [rel_l2(g, r, 0.0) for g, r in zip(got, ref)]
    worst = int(np.nanargmin(cos)) if cos and not all(np.isnan(cos)) else 0
    return {"tokens": len(cos), "logits_cosine_min": float(np.min(cos)) if cos else 1.0,
            "worst_step": worst, "argmax_agree": float(np.mean(agree)) if agree else 1.0,
            "logits_rel_l2_max": float(np.max(rel)) if rel else 0.0}


def check_model(manifest_path, tokens: list[int], backend: str = "rknn-sim") -> dict:
    from rwkv2rknn.manifest import Manifest

    m = Manifest.load(manifest_path)
    ref, ref_chunks, ref_rows = run_plans(m, "ort", tokens)
    got, got_chunks, got_rows = run_plans(m, backend, tokens)
    out = {**compare_logits(got, ref), "backend": backend, "reference": "onnxruntime fp32"}
    if ref_chunks is not None:
        pre = compare_logits(got_chunks, ref_chunks)
        out["prefill"] = {"chunks": pre["tokens"], "chunk": m.prefill["chunk"],
                          "logits_cosine_min": pre["logits_cosine_min"], "argmax_agree": pre["argmax_agree"]}
    if ref_rows is not None:
        ver = compare_logits(got_rows, ref_rows)
        out["verify"] = {"rows": m.data["verify"]["rows"], "passes": ver["tokens"] // m.data["verify"]["rows"],
                         "logits_cosine_min": ver["logits_cosine_min"], "argmax_agree": ver["argmax_agree"]}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m rwkv2rknn.verify.model_check JOB.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        job = json.load(f)
    from rwkv2rknn.compile_worker import _die_with_parent

    _die_with_parent(job.get("parent_pid"))
    result = check_model(job["manifest"], job["tokens"], job.get("backend", "rknn-sim"))
    tmp = f"{job['result']}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, job["result"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
