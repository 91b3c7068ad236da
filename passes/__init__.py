"""passes: generic ONNX graph passes, placement, partitioning and cutting (knows nothing of RWKV files)."""
