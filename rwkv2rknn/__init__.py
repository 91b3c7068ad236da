"""rwkv2rknn: RWKV llama.onnx graphs -> hybrid onnxruntime + RKNN NPU models."""

__version__ = "0.1.0"
