"""Test helpers for the runtime: a manifest whose every graph is ONE cpu segment (the source copied)."""

from __future__ import annotations

import shutil
from pathlib import Path

from rwkv2rknn.fsio import sha256_file, write_json_atomic
from rwkv2rknn.manifest import FORMAT_VERSION, tensor_spec
from rwkv2rknn.model import io_signature, load_model_dir


def whole_graph_manifest(model_dir, out_dir, tokenizer: str | None = "bytes") -> Path:
    """Follow docs/contracts.md with one cpu segment per graph; works for fp32 model directories."""
    model = load_model_dir(model_dir)
    out = Path(out_dir)
    (out / "segments").mkdir(parents=True, exist_ok=True)
    graphs = []
    for src in model.graphs:
        ins, outs = io_signature(src.model)
        seg_path = out / "segments" / f"{src.name}.s0.onnx"
        shutil.copyfile(src.path, seg_path)
        specs_in = [tensor_spec(n, d, s) for n, (d, s) in ins.items()]
        specs_out = [tensor_spec(n, d, s) for n, (d, s) in outs.items()]
        graphs.append({"name": src.name,
                       "source": {"path": str(Path(src.path).resolve()), "sha256": sha256_file(src.path),
                                  "dtype": model.float_dtype},
                       "inputs": specs_in, "outputs": specs_out,
                       "segments": [{"id": f"{src.name}.s0", "backend": "cpu",
                                     "onnx": f"segments/{src.name}.s0.onnx", "sha256": sha256_file(seg_path),
                                     "inputs": specs_in, "outputs": specs_out}]})
    names = [g["name"] for g in graphs]
    links = [{"from": {"graph": a, "name": "output"}, "to": {"graph": b, "name": "input"}}
             for a, b in zip(names[:-2], names[1:-1])]
    links.append({"from": {"graph": names[-2], "name": "output"}, "to": {"graph": "head", "name": "x"}})
    state = [{"graph": f"mixing_{i}", "input": "state_in", "output": "state_out",
              "shape": list(model.state_shapes["state_in"]), "dtype": model.float_dtype,
              "init": {"fill": 0.0, "rows": {"4": -1e30} if model.float_dtype == "float32" else {}}}
             for i in range(model.n_layer)]
    data = {"format_version": FORMAT_VERSION, "producer": "tests", "target": "rk3588", "policy": "fused",
            "graphs": graphs,
            "model": {"n_layer": model.n_layer, "n_embd": model.n_embd, "vocab_size": model.vocab_size,
                      "tokenizer": tokenizer, "token_input": {"graph": "embed", "name": "token"},
                      "logits": {"graph": "head", "name": "output"}, "links": links, "state": state}}
    write_json_atomic(out / "manifest.json", data)
    return out / "manifest.json"
