"""Make a model directory the way the published llama.onnx RWKV-4 files were made, for tests.

The pipeline (shared/docs/llama-onnx-rwkv4.md): one small torch module per file ->
`torch.onnx.export(opset_version=16)` (the TorchScript exporter, `dynamo=False`) -> onnx-simplifier ->
onnxconverter-common's `convert_float_to_float16` (fp16 I/O, `keep_io_types=False`) -> IR version 8.
The modules are written here from the RWKV-4 RNN math in that doc; weights come from a canonical
`rwkv2rknn.families.rwkv4.Weights` (time_decay already `w = -exp(raw)`), so `tests/rwkv_ref.RefModel` on the
same `Weights` is the reference. Our own exporter (rwkv2rknn/families/rwkv4/graph.py) imitates this layout by hand;
these files are what the real tool chain emits, with all its incidental differences.

Run as a script to write a directory and print op counts against the doc's list:
    python tests/published_pipeline.py OUT_DIR [--layers 2 --embd 64 --vocab 256]
"""

from __future__ import annotations

import collections
import io
import warnings
from pathlib import Path

import numpy as np
import onnx

# The doc's op counts of one published mixing graph.
DOC_MIXING_OPS = {"MatMul": 7, "ReduceMean": 4, "Sub": 6, "Pow": 2, "Sqrt": 2, "Div": 3, "Add": 17, "Mul": 21,
                  "Gather": 5, "Sigmoid": 2, "Relu": 1, "Exp": 4, "Max": 2, "Cast": 6, "Reshape": 5,
                  "Concat": 1, "Constant": 25}
LN_EPS = 1e-5


WEIGHTS_AS = ("parameters", "tensors")


def _modules(weights_as: str = "parameters"):
    """The three torch modules (imported lazily: torch is a test-only dependency).

    weights_as="parameters": nn.Parameters, which the TorchScript exporter writes as initializers.
    weights_as="tensors": plain tensor attributes, traced as constants: the exporter writes Constant
    nodes, and the result has exactly the doc's op counts (25 Constant, int64 index initializers).
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    if weights_as not in WEIGHTS_AS:
        raise ValueError(f"weights_as={weights_as!r}: choose one of {WEIGHTS_AS}")

    def param(a):
        t = torch.from_numpy(np.array(a, dtype=np.float32))
        return nn.Parameter(t, requires_grad=False) if weights_as == "parameters" else t

    def ln(x, g, b):
        return F.layer_norm(x, (x.shape[-1],), g, b, LN_EPS)

    class Embed(nn.Module):
        def __init__(self, w: dict):
            super().__init__()
            self.emb = param(w["emb.weight"])
            self.ln0_w, self.ln0_b = param(w["ln0.weight"]), param(w["ln0.bias"])

        def forward(self, token):                       # int32 [1]
            x = self.emb[token]                         # [1, C]
            return ln(x, self.ln0_w, self.ln0_b).flatten()

    class Mixing(nn.Module):
        def __init__(self, w: dict):
            super().__init__()
            for k, v in w.items():
                if k == "att.time_decay":
                    # the checkpoint stores the raw decay; the graph computes w = -exp(raw)
                    v = np.log(-np.asarray(v, np.float64))
                setattr(self, k.replace(".", "_"), param(v))

        def forward(self, x, state):                    # [C], [5, C]
            s_ffn, s_att, aa, bb, pp = state[0], state[1], state[2], state[3], state[4]
            xa = ln(x, self.ln1_weight, self.ln1_bias)
            mk, mv, mr = self.att_time_mix_k, self.att_time_mix_v, self.att_time_mix_r
            xk = xa * mk + s_att * (1 - mk)
            xv = xa * mv + s_att * (1 - mv)
            xr = xa * mr + s_att * (1 - mr)
            r = torch.sigmoid(self.att_receptance_weight @ xr)
            k = self.att_key_weight @ xk
            v = self.att_value_weight @ xv
            ww = self.att_time_first + k
            q = torch.maximum(pp, ww)
            e1, e2 = torch.exp(pp - q), torch.exp(ww - q)
            wkv = (e1 * aa + e2 * v) / (e1 * bb + e2)
            x1 = x + self.att_output_weight @ (r * wkv)
            ww = pp + (-torch.exp(self.att_time_decay))
            q2 = torch.maximum(ww, k)
            e1, e2 = torch.exp(ww - q2), torch.exp(k - q2)
            aa2, bb2 = e1 * aa + e2 * v, e1 * bb + e2
            xf = ln(x1, self.ln2_weight, self.ln2_bias)
            fk = xf * self.ffn_time_mix_k + s_ffn * (1 - self.ffn_time_mix_k)
            fr = xf * self.ffn_time_mix_r + s_ffn * (1 - self.ffn_time_mix_r)
            kk = torch.square(torch.relu(self.ffn_key_weight @ fk))
            y = x1 + torch.sigmoid(self.ffn_receptance_weight @ fr) * (self.ffn_value_weight @ kk)
            rows = [t.reshape(1, -1) for t in (xf, xa, aa2, bb2, q2)]
            return y, torch.cat(rows)

    class Head(nn.Module):
        def __init__(self, w: dict):
            super().__init__()
            self.ln_w, self.ln_b = param(w["ln_out.weight"]), param(w["ln_out.bias"])
            self.head = param(w["head.weight"])

        def forward(self, x):                           # [C]
            return self.head @ ln(x, self.ln_w, self.ln_b)

    return Embed, Mixing, Head


def export_published(module, args: tuple, input_names: list[str], output_names: list[str],
                     keep_io_types: bool = False) -> onnx.ModelProto:
    """torch.onnx.export (TorchScript, opset 16) -> onnxsim.simplify -> convert_float_to_float16."""
    import onnxsim
    import torch
    from onnxconverter_common import float16

    buf = io.BytesIO()
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated in torch 2.9+
        torch.onnx.export(module, args, buf, opset_version=16, dynamo=False, do_constant_folding=True,
                          input_names=input_names, output_names=output_names)
    model = onnx.load_from_string(buf.getvalue())
    model, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnx-simplifier could not validate its output")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "some values were clamped to the fp16 range"
        model = float16.convert_float_to_float16(model, keep_io_types=keep_io_types)
    onnx.checker.check_model(model)
    return model


def make_published_model(weights, out_dir: str | Path, keep_io_types: bool = False,
                         weights_as: str = "parameters") -> Path:
    """Write embed.onnx, mixing_{i}.onnx, head.onnx for `weights` through the published pipeline."""
    import torch

    Embed, Mixing, Head = _modules(weights_as)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    C = weights.n_embd
    token = torch.zeros(1, dtype=torch.int32)
    x = torch.zeros(C, dtype=torch.float32)
    state = torch.zeros(5, C, dtype=torch.float32)
    jobs = [("embed", Embed(weights.embed()), (token,), ["token"], ["output"])]
    jobs += [(f"mixing_{i}", Mixing(weights.layer(i)), (x, state), ["input", "state_in"], ["output", "state_out"])
             for i in range(weights.n_layer)]
    jobs.append(("head", Head(weights.head()), (x,), ["x"], ["output"]))
    for name, module, args, ins, outs in jobs:
        model = export_published(module, args, ins, outs, keep_io_types=keep_io_types)
        onnx.save(model, str(out / f"{name}.onnx"))
    return out


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def op_count_diff(model: onnx.ModelProto, want: dict[str, int] = DOC_MIXING_OPS) -> dict[str, tuple[int, int]]:
    """{op: (got, doc)} for every op whose count differs from the doc's list."""
    got = op_counts(model)
    return {op: (got.get(op, 0), want.get(op, 0)) for op in sorted(set(got) | set(want))
            if got.get(op, 0) != want.get(op, 0)}


def main(argv=None) -> int:
    import argparse

    from rwkv2rknn.families.rwkv4 import random_weights

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--embd", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-io-types", action="store_true")
    ap.add_argument("--weights-as", choices=WEIGHTS_AS, default="parameters")
    a = ap.parse_args(argv)
    out = make_published_model(random_weights(a.layers, a.embd, a.vocab, seed=a.seed), a.out,
                               keep_io_types=a.keep_io_types, weights_as=a.weights_as)
    m = onnx.load(str(out / "mixing_0.onnx"))
    print("mixing_0 ops:", op_counts(m))
    print("differences from the doc (got, doc):", op_count_diff(m))
    print("initializers:", len(m.graph.initializer), "ir", m.ir_version,
          "opset", [(o.domain, o.version) for o in m.opset_import])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
