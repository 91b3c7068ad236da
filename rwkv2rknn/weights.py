"""Weights once on disk: a segment's large initializers live in content-addressed files beside it.

The decode plan and the prefill plan cut the same source weights into their segments, so a split used to write
every weight twice (fp32: the 1.5B RWKV-7 shape came to 11-12 GB against a 2.9 GB fp16 checkpoint). Each
initializer of at least MIN_BYTES is written once to `segments/weights/<sha256>.bin` and the segment's ONNX
refers to it as ONNX external data (location relative to the segment file); a tensor another segment already
wrote is not written again. onnxruntime, `onnx.load` and rknn-toolkit2 read external data themselves.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
from onnx import numpy_helper

from rwkv2rknn.fsio import write_bytes_atomic

MIN_BYTES = 4096  # smaller tensors stay inside the graph file
WEIGHTS_DIR = "weights"


def save_segment(model: onnx.ModelProto, path: str | os.PathLike, min_bytes: int = MIN_BYTES) -> dict:
    """Save `model` to `path` with its large initializers as shared external data; returns
    {"weights_sha256": one hash over the external tensors (equal for two segments with the same weights),
     "external_bytes": their size, "written_bytes": the bytes this call wrote (0 when all were there),
     "tensors": [{name, file (relative to the segment's directory), dtype, shape}] of the external tensors}."""
    path = Path(path)
    store = path.parent / WEIGHTS_DIR
    store.mkdir(exist_ok=True)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    digest = hashlib.sha256()
    external = written = 0
    tensors = []
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        data = numpy_helper.to_array(t).tobytes()  # little-endian, as ONNX raw_data is
        if len(data) < min_bytes:
            continue
        h = hashlib.sha256(data).hexdigest()
        digest.update(f"{t.name}:{list(t.dims)}:{t.data_type}:{h};".encode())
        target = store / f"{h}.bin"
        if not target.exists():
            write_bytes_atomic(target, data)
            written += len(data)
        external += len(data)
        dims, dtype, name = list(t.dims), t.data_type, t.name
        tensors.append({"name": name, "file": f"{WEIGHTS_DIR}/{h}.bin",
                        "dtype": onnx.helper.tensor_dtype_to_np_dtype(dtype).name, "shape": dims})
        t.Clear()
        t.name, t.data_type = name, dtype
        t.dims.extend(dims)
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", f"{WEIGHTS_DIR}/{h}.bin"), ("offset", "0"), ("length", str(len(data)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    onnx.save(m, str(path))
    return {"weights_sha256": digest.hexdigest() if external else None, "external_bytes": external,
            "written_bytes": written, "tensors": tensors}


def referenced_files(onnx_path: str | os.PathLike) -> list[Path]:
    """The external data files a saved segment refers to (without reading them)."""
    path = Path(onnx_path)
    model = onnx.load(str(path), load_external_data=False)
    out = []
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc:
                out.append(path.parent / loc)
    return out
