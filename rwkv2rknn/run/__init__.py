"""The hybrid runtime: executes a manifest token by token over onnxruntime and RKNN runners."""

from rwkv2rknn.run.chain import Chain, trace_segment_inputs  # noqa: F401
