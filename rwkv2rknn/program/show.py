"""`python -m rwkv2rknn.run OUT --show-program [--json]`: the execution program as text or JSON."""

from __future__ import annotations

import json
from pathlib import Path

from rwkv2rknn.program import Program


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def describe(program: Program) -> dict:
    """The JSON form: the program itself plus a per-plan summary (steps, NPU calls, bytes, conversions)."""
    out = program.to_json()
    out["summary"] = {}
    for name, plan in program.plans.items():
        npu = sum(1 for s in plan.steps if s.op == "run" and s.device == "npu")
        out["summary"][name] = {
            "tokens_per_run": plan.tokens, "steps": len(plan.steps), "npu_calls": npu,
            "cpu_calls": sum(1 for s in plan.steps if s.op == "run" and s.device == "cpu"),
            "convert_steps": sum(1 for s in plan.steps if s.op == "convert"),
            "overlapped_steps": sum(1 for s in plan.steps if s.overlap),
            "converted_bytes_per_run": plan.converted_bytes,
            "converted_bytes_per_token": plan.converted_bytes_per_token}
    out["summary"]["buffers"] = len(program.buffers)
    out["summary"]["buffer_bytes"] = sum(b.nbytes for b in program.buffers if b.view_of is None)
    return out


def print_program(program: Program, root: Path, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(describe(program)))
        return
    bufs = program.buffers

    def bname(i: int) -> str:
        b = bufs[i]
        return f"#{i} {b.name.split('/', 1)[-1]}:{b.dtype}{b.shape}"

    print(f"execution program of {root} (version {program.version}, {program.producer or 'rwkv2rknn'}; "
          f"target {program.target})")
    if program.model:
        m = program.model
        print(f"model: {m.get('family')} {m.get('n_layer')} x {m.get('n_embd')}, vocab {m.get('vocab_size')}, "
              f"tokenizer {m.get('tokenizer')}")
    for name, plan in program.plans.items():
        npu = sum(1 for s in plan.steps if s.op == "run" and s.device == "npu")
        print(f"\nplan {name}: {plan.tokens} token(s) per run, {len(plan.steps)} steps, {npu} NPU call(s), "
              f"{_mb(plan.converted_bytes_per_token)} converted per token")
        for s in plan.steps:
            what = s.segment if s.op == "run" else "convert"
            mask = f" core_mask {s.core_mask}" if s.core_mask is not None else ""
            flags = (" overlap" if s.overlap else "") + (f" after {s.deps}" if s.deps else "")
            print(f"  {s.id:>3} {s.device} {what}{mask}{flags}")
            print(f"      in : {', '.join(bname(i) for i in s.inputs)}")
            print(f"      out: {', '.join(bname(i) for i in s.outputs)}")
        for c in plan.conversions:
            print(f"  converts {c['bytes']} B at step {c['step']}: {c['where']} ({c['tensor']})")
    if program.states:
        print("\nstates (ping-pong: read the first buffer and write the second at even parity; swapped at odd):")
        for st in program.states:
            shadow = f", fp16 copy {st.shadow}" if st.shadow else ""
            print(f"  {st.name}: {st.dtype}{st.shape} buffers {st.pair}{shadow}")
    total = sum(b.nbytes for b in bufs if b.view_of is None)
    print(f"\nbuffers: {len(bufs)} ({_mb(total)} allocated once)")
    for b in bufs:
        view = f" view of #{b.view_of} at byte {b.offset}" if b.view_of is not None else ""
        print(f"  #{b.id:<4} {b.role:<10} {b.dtype:<8} {str(b.shape):<16} {b.name}{view}")
