"""What the benchmarks share: the model shapes they generate, and how they save their results."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
# (layers, n_embd, vocab) of the RWKV-4 Pile models the benchmarks imitate with random weights.
SHAPES = {"169M": (12, 768, 50277), "430M": (24, 1024, 50277)}
# RWKV-7 shapes people run today (World vocabulary): (layers, n_embd, vocab).
SHAPES7 = {"RWKV-7 0.4B": (24, 1024, 65536), "RWKV-7 1.5B": (24, 2048, 65536)}


def export_shape(work: Path, name: str) -> Path:
    """Random fp16 weights of a named shape in the llama.onnx layout, exported once per work dir."""
    from rwkv2rknn import families

    family = families.get("rwkv7" if name in SHAPES7 else "rwkv4")
    layers, embd, vocab = SHAPES7.get(name) or SHAPES[name]
    out = work / f"model-{name.replace(' ', '-')}"
    if not (out / "head.onnx").exists():
        family.export(family.random_weights(layers, embd, vocab, seed=0), out, dtype="float16", force=True,
                      progress=True)
    return out


def save_results(name: str, results) -> Path:
    path = RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return path
