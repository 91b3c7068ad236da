"""Recording real segment inputs for the build (verification and calibration): the program run on onnxruntime.

Above build/ and run/: it runs the runtime's Chain over the compiler's Manifest; the build gets it through
rwkv2rknn.verify.RUNTIME, never by importing it.
"""

from __future__ import annotations

import numpy as np

from rwkv2rknn.feeds import random_feed
from rwkv2rknn.manifest import as_manifest
from rwkv2rknn.run.chain import Chain, runner_factory


def record_inputs(manifest, tokens: list[int]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Every segment's real inputs (the program on onnxruntime, in its buffers' dtypes) while `tokens` go through the
    decode plan one by one and, from the state they leave, through the prefill plan in whole chunks (at least one:
    the text is repeated), then through one pass of the verify plan."""
    manifest = as_manifest(manifest)
    seen: dict[str, list[dict[str, np.ndarray]]] = {s["id"]: [] for _, s in manifest.segments()}

    def keep(sid, feed):
        seen.setdefault(sid, []).append(feed)

    with Chain(manifest, runner_factory(manifest, "ort"), record=keep) as chain:
        chain.feed(tokens, prefill=False)
        if chain.chunk and tokens:
            text = list(tokens)
            while len(text) < chain.chunk:
                text += tokens
            chain.feed(text[:max(1, len(text) // chain.chunk) * chain.chunk])
        if chain.verify_rows and tokens:  # and one verify pass over the first rows of the text
            text = list(tokens)
            while len(text) < chain.verify_rows:
                text += tokens
            chain.verify(text[:chain.verify_rows])
            chain.commit(chain.verify_rows - 1)
    return seen


def trace_segment_inputs(manifest, n_tokens: int = 4, seed: int = 0) -> dict[str, list[dict[str, np.ndarray]]]:
    """Run the whole chain on onnxruntime fp32 and record every segment's real input feed.

    Whole-model manifests: `n_tokens` random token ids are fed from the initial state token by token, and
    (with a prefill plan) from the state they leave, `n_tokens // chunk` (at least one) chunks of random ids.
    Single-graph manifests ("model": null): each graph gets `n_tokens` random realistic input sets.
    Returns {segment id: [feed per call, in call order]} (arrays are copies).
    """
    manifest = as_manifest(manifest)
    rng = np.random.default_rng(seed)
    if manifest.model is not None:
        vocab = manifest.model["vocab_size"]
        return record_inputs(manifest, [int(t) for t in rng.integers(0, vocab, size=n_tokens)])
    seen: dict[str, list[dict[str, np.ndarray]]] = {s["id"]: [] for _, s in manifest.segments()}
    with Chain(manifest, runner_factory(manifest, "ort"), record=lambda sid, f: seen[sid].append(f)) as chain:
        for g in manifest.graphs:
            paths = [manifest.resolve(s["onnx"]) for s in g["segments"]]
            for _ in range(n_tokens):
                chain.run_graph(g["name"], random_feed(g["inputs"], rng, paths))
    return seen
