#!/usr/bin/env bash
# Quickstart: a random RWKV-4 model in the llama.onnx layout -> split -> build (RKNN simulator) -> run -> report.
# Run from the repo root after `make setup` (or just `make demo`). Everything lands in demo-out/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$here/.venv/bin:$PATH"
out=${DEMO_OUT:-demo-out}
layers=${DEMO_LAYERS:-2}; embd=${DEMO_EMBD:-256}; vocab=${DEMO_VOCAB:-256}

echo "== 1. export a random ${layers}x${embd} RWKV-4 model (float16, llama.onnx layout) -> $out/model"
rwkv2rknn export --random --layers "$layers" --embd "$embd" --vocab "$vocab" --seed 1 -o "$out/model" --force

echo "== 2. split: fp16 folding off, MatMul-heavy regions to the NPU -> $out/split"
rwkv2rknn split "$out/model" -o "$out/split" --force

echo "== 3. build the NPU segments for rk3588 (compiled, then verified in the rknn-toolkit2 simulator)"
rwkv2rknn build "$out/split" --target rk3588

echo "== 4. run: the same tokens on onnxruntime and on the RKNN simulator, logits compared"
python -m rwkv2rknn.run "$out/split/manifest.json" --backend ort --tokens 72,101,108,108,111 --dump-logits "$out/ort.npy"
python -m rwkv2rknn.run "$out/split/manifest.json" --backend rknn-sim --tokens 72,101,108,108,111 --dump-logits "$out/sim.npy"
python - "$out/ort.npy" "$out/sim.npy" <<'PY'
import sys, numpy as np
a, b = (np.load(p).ravel().astype(np.float64) for p in sys.argv[1:3])
cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
print(f"ort vs rknn-sim logits: cosine {cos:.6f}, max abs {np.abs(a - b).max():.4g}, "
      f"argmax {a.argmax()} / {b.argmax()}")
sys.exit(0 if cos >= 0.999 and a.argmax() == b.argmax() else 1)
PY

echo "== 5. generate a few tokens and benchmark the hybrid runtime"
python -m rwkv2rknn.run "$out/split/manifest.json" --backend ort --prompt "Hello" --max-tokens 16 --seed 0
python -m rwkv2rknn.run "$out/split/manifest.json" --backend ort --bench --max-tokens 32

echo "== 6. report: $out/report.html"
rwkv2rknn report "$out/split" -o "$out/report.html"
echo "done: open $out/report.html"
