"""Inputs for the build: real activations to verify segments on, calibration tokens and datasets for w8a8."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Protocol

import numpy as np

from rwkv2rknn.errors import UserError
from rwkv2rknn.manifest import Manifest

# Built-in text for w8a8 calibration and the whole-model check, tokenized by the manifest's tokenizer.
DEFAULT_CALIB_TEXT = ("The quick brown fox jumps over the lazy dog. In a hole in the ground there lived "
                      "a hobbit. 1, 2, 3: def f(x): return x * 2\n")
MAX_CALIB_TOKENS = 64
MIN_CHECK_TOKENS = 16


def say(msg: str) -> None:
    print(f"rwkv2rknn build: {msg}", file=sys.stderr)


def random_samples(entry: dict, n: int, seed: int) -> list[dict]:
    """Normal float inputs (zeros for integer ones) in a segment's declared shapes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        feed = {}
        for t in entry["inputs"]:
            dt = np.dtype(t["dtype"])
            if dt.kind == "f":
                feed[t["name"]] = rng.standard_normal(t["shape"]).astype(dt)
            else:
                feed[t["name"]] = np.zeros(t["shape"], dtype=dt)
        out.append(feed)
    return out


class Runtime(Protocol):
    """What a build needs of the runtime (rwkv2rknn/run), handed in by the build's caller: build/ never imports the
    runtime (rwkv2rknn.verify.RUNTIME is the one backed by it)."""

    check_module: str  # `python -m <check_module> JOB.json` runs the whole-model check in a child process

    def tokenizer(self, hint: str, root: Path, vocab: int):
        """The tokenizer a manifest names (an object with .encode(text) -> ids); UserError when there is none."""
        ...

    def segment_inputs(self, manifest: Manifest, ids: list[int] | None, n_tokens: int, seed: int) -> dict:
        """{segment id: [input feed per call]} from a run of the chain on onnxruntime: a whole model fed `ids`
        (or `n_tokens` random tokens); single graphs `n_tokens` random realistic input sets."""
        ...


def trace(runtime: Runtime | None, manifest: Manifest, ids: list[int] | None, n_tokens: int,
          seed: int) -> dict | None:
    """Real activations of every segment from an onnxruntime run of the chain; None if unavailable.

    With `ids`, whole models are fed those tokens; otherwise `n_tokens` random ones.
    """
    if runtime is None:
        return None
    try:
        return runtime.segment_inputs(manifest, ids, n_tokens, seed)
    except ImportError:  # the runtime is not installed here
        return None
    except Exception as exc:  # noqa: BLE001 (verification still runs, on random inputs; say so)
        say(f"warning: tracing the chain on onnxruntime failed ({type(exc).__name__}: {exc}); using random inputs")
        return None


def calib_tokens(manifest: Manifest, calib: str | None, minimum: int = 1, runtime: Runtime | None = None) -> list[int]:
    """Token ids from a file of integers, a text file, or the built-in text (manifest's tokenizer, from `runtime`).

    At least `minimum` ids (the text is repeated when it is shorter), at most MAX_CALIB_TOKENS.
    """
    model = manifest.model or {}
    vocab = int(model.get("vocab_size") or 256)
    if calib is not None:
        path = Path(calib)
        if not path.is_file():
            raise UserError(f"--calib {calib}: no such file; give a text file or a file of token ids")
        text = path.read_text(errors="replace")
        words = text.replace(",", " ").split()
        if words and all(w.lstrip("-").isdigit() for w in words):
            ids = [int(w) for w in words]
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise UserError(f"{path}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
            return _fit(ids, minimum)
    else:
        text = DEFAULT_CALIB_TEXT
    hint = model.get("tokenizer")
    if hint is None and vocab == 256:
        hint = "bytes"
    ids = None
    if hint is not None:
        try:
            if runtime is None:
                raise UserError(f"no tokenizer {hint!r}: the build was given no runtime to read text with")
            ids = runtime.tokenizer(hint, manifest.root, vocab).encode(text)
        except UserError as exc:
            if calib is not None:  # the user's own text: say what is missing
                raise UserError(f"{exc} (calibration text); or pass --calib FILE of token ids") from None
            say(f"note: no tokenizer to read the built-in text with ({exc}); verifying and calibrating on a "
                "fixed spread of token ids instead (pass --calib FILE of token ids for real text)")
    elif calib is not None:
        raise UserError(f"--calib {calib}: {manifest.path} names no tokenizer to read text with; "
                        "give a file of whitespace-separated token ids")
    if ids is None:  # no tokenizer at hand: a fixed spread of ids over the vocabulary
        ids = [(i * 7919 + 13) % vocab for i in range(32)]
    return _fit([i % vocab for i in ids], minimum)


def _fit(ids: list[int], minimum: int) -> list[int]:
    ids = ids or [0]
    while len(ids) < minimum:
        ids = ids + ids
    return ids[:max(MAX_CALIB_TOKENS, minimum)]


def derive_samples(models: list, samples: list[dict]) -> list[list[dict]]:
    """Inputs of each piece of a bisected segment: run the pieces in order on onnxruntime."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                for m in models]
    per_piece = [[] for _ in models]
    for feed in samples:
        env = dict(feed)
        for k, sess in enumerate(sessions):
            names = [i.name for i in sess.get_inputs()]
            per_piece[k].append({n: env[n] for n in names})
            outs = sess.run(None, {n: env[n] for n in names})
            env.update(zip([o.name for o in sess.get_outputs()], outs))
    return per_piece
