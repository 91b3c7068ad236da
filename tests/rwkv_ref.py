"""Helpers that chain exported RWKV-4 graphs on onnxruntime, and cosine; the numpy RWKV-4 reference (RefModel) is
rwkv2rknn.families.rwkv4's, re-exported here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rwkv2rknn.families.rwkv4 import PP_INIT, RefModel  # noqa: F401 - the RWKV-4 numpy reference lives in the family


class OrtChain:
    """Exported graphs of one model directory as onnxruntime sessions, run token by token."""

    def __init__(self, model_dir, providers=("CPUExecutionProvider",)):
        import onnxruntime as ort

        model_dir = Path(model_dir)
        so = ort.SessionOptions()
        # The default (extended) level refuses the fp16 mixing graphs (a known onnxruntime trap).
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.log_severity_level = 3

        def mk(name):
            return ort.InferenceSession(str(model_dir / f"{name}.onnx"), so, providers=list(providers))

        self.embed = mk("embed")
        n = 0
        while (model_dir / f"mixing_{n}.onnx").exists():
            n += 1
        self.mixing = [mk(f"mixing_{i}") for i in range(n)]
        self.head = mk("head")
        ty = self.mixing[0].get_inputs()[1].type if n else self.head.get_inputs()[0].type
        self.dtype = np.float16 if "float16" in ty else np.float32
        self.n_embd = self.head.get_inputs()[0].shape[0]

    def init_state(self) -> list[np.ndarray]:
        # -1e30 overflows fp16; with aa = bb = 0 a start of pp = 0 gives the same outputs.
        pp = PP_INIT if self.dtype == np.float32 else 0.0
        states = []
        for _ in self.mixing:
            s = np.zeros((5, self.n_embd), dtype=self.dtype)
            s[4] = pp
            states.append(s)
        return states

    def forward(self, token: int, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        (x,) = self.embed.run(None, {"token": np.array([token], dtype=np.int32)})
        new = []
        for sess, st in zip(self.mixing, states):
            x, s = sess.run(None, {"input": x, "state_in": st})
            new.append(s)
        (logits,) = self.head.run(None, {"x": x})
        return logits, new

    def run(self, tokens) -> np.ndarray:
        states, out = self.init_state(), []
        for t in tokens:
            logits, states = self.forward(int(t), states)
            out.append(logits.astype(np.float32))
        return np.stack(out)


def run_chain(model_dir, tokens, providers=("CPUExecutionProvider",)) -> np.ndarray:
    """Run an exported model directory on onnxruntime over `tokens`; logits [T, V] as float32."""
    return OrtChain(model_dir, providers).run(tokens)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
