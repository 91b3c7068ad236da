#!/usr/bin/env bash
# Quickstart: a trained tiny RWKV-4 (.pth) -> export to the llama.onnx layout -> split -> build (RKNN simulator)
# -> run on onnxruntime and on the simulator, logits compared -> generate -> bench -> report.
# Run from the repo root after `make setup` (or just `make demo`). Everything lands in demo-out/.
#
# The model is tests/fixtures/rwkv4-tiny-trained.pth: 4 layers x 128, bytes as tokens, trained on the Python
# standard library's sources (tests/fixtures/rwkv4-tiny-trained.json), so what it writes looks like Python.
# Overrides: DEMO_OUT (output directory), DEMO_CKPT (another ChatRWKV .pth or rwkv.cpp .bin),
# DEMO_PROMPT, DEMO_TOKENS (tokens to generate), DEMO_TEMPERATURE, DEMO_SEED;
# DEMO_RANDOM=1 exports random weights instead (DEMO_LAYERS, DEMO_EMBD, DEMO_VOCAB; the text is noise then).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$here/.venv/bin:$PATH"
out=${DEMO_OUT:-demo-out}
ckpt=${DEMO_CKPT:-$here/tests/fixtures/rwkv4-tiny-trained.pth}
prompt=${DEMO_PROMPT:-def }
n_gen=${DEMO_TOKENS:-200}; temperature=${DEMO_TEMPERATURE:-0.8}; seed=${DEMO_SEED:-0}
# "def f(x):" as byte ids: the tokens both backends are compared on
check_tokens=100,101,102,32,102,40,120,41,58

if [ "${DEMO_RANDOM:-0}" = 1 ]; then
  layers=${DEMO_LAYERS:-2}; embd=${DEMO_EMBD:-256}; vocab=${DEMO_VOCAB:-256}
  echo "== 1. export a random ${layers}x${embd} RWKV-4 model (float16, llama.onnx layout) -> $out/model"
  rwkv2rknn export --random --layers "$layers" --embd "$embd" --vocab "$vocab" --seed 1 -o "$out/model" --force
  check_tokens=$(python -c "print(','.join(str(b % $vocab) for b in b'def f(x):'))")
else
  echo "== 1. export the checkpoint $ckpt (float16, llama.onnx layout) -> $out/model"
  rwkv2rknn export "$ckpt" -o "$out/model" --force
fi

echo "== 2. split: fp16 folding off, MatMul-heavy regions to the NPU -> $out/split"
rwkv2rknn split "$out/model" -o "$out/split" --force
echo "   (this model is tiny, 4 x 128: the prediction above says its NPU plan loses to the CPU on the board, as"
echo "    it should; the NPU pays off at real sizes: the 430M predictions in the README's Benchmarks section)"

echo "== 3. build the NPU segments for rk3588 (compiled, then verified in the rknn-toolkit2 simulator)"
rwkv2rknn build "$out/split" --target rk3588

echo "== 4. run: the same tokens on onnxruntime and on the RKNN simulator, logits compared"
python -m rwkv2rknn.run "$out/split/manifest.json" --backend ort --tokens "$check_tokens" --dump-logits "$out/ort.npy"
python -m rwkv2rknn.run "$out/split/manifest.json" --backend rknn-sim --tokens "$check_tokens" --dump-logits "$out/sim.npy"
python - "$out/ort.npy" "$out/sim.npy" <<'PY'
import sys, numpy as np
a, b = (np.load(p).ravel().astype(np.float64) for p in sys.argv[1:3])
cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
print(f"ort vs rknn-sim logits: cosine {cos:.6f}, max abs {np.abs(a - b).max():.4g}, "
      f"argmax {a.argmax()} / {b.argmax()}")
sys.exit(0 if cos >= 0.999 and a.argmax() == b.argmax() else 1)
PY

echo "== 5. generate $n_gen tokens after \"$prompt\" (temperature $temperature, seed $seed), then benchmark the runtime"
python -m rwkv2rknn.run "$out/split/manifest.json" --backend ort --prompt "$prompt" --max-tokens "$n_gen" \
    --temperature "$temperature" --seed "$seed"
python -m rwkv2rknn.run "$out/split/manifest.json" --backend ort --bench --max-tokens 32

echo "== 6. report: $out/report.html"
rwkv2rknn report "$out/split" -o "$out/report.html"
echo "done: open $out/report.html"
