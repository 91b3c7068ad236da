"""The runtime: executes the program (rwkv2rknn/program) over onnxruntime and the NPU's runtimes.

Needs only numpy and onnxruntime (tokenizers, rknn-toolkit-lite2 and librknnrt where they are used); it never
imports the compiler (onnx, onnx-graphsurgeon, rknn-toolkit2, torch, passes/).
"""

from rwkv2rknn.run.chain import Chain  # noqa: F401
