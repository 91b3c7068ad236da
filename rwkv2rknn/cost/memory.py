"""Predicted board memory of a split or a build: what the runtime holds while it serves both plans.

A PREDICTION from the plan, like the time estimate: every .rknn the program loads holds its weights (fp16, or int8
for the heavy MatMuls of a w8a8 build), every onnxruntime session holds its segment's initializers as stored, and
the program's buffers (activations, ping-pong states, the logits) are allocated once. Two NPU segments whose weights
are the same tensors (equal `weights_sha256`, e.g. a decode segment and its prefill counterpart) hold them twice
unless they share one weight memory; the figure says how much that would save (`shareable_bytes`). onnxruntime
memory-maps a segment's external weights file (rwkv2rknn/weights.py): CPU segments of both plans with the same
weights read one copy from the page cache, and it is counted once. The NPU
runtime's internal tensors per context are counted as the segment's activations in fp16 (an upper bound: the
runtime reuses that memory between ops), its command buffers as the profile's `npu_context_bytes` (judgement until a
board reports RKNN_QUERY_MEM_SIZE). A Gather table (the embedding) counts at its stored size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rwkv2rknn.manifest import runs_on


@dataclass
class Memory:
    board_memory_bytes: int        # the total below
    npu_weight_bytes: dict         # plan -> bytes of the weights its .rknn files hold
    cpu_weight_bytes: dict         # plan -> bytes of the initializers its onnxruntime sessions hold
    buffer_bytes: int              # the program's buffers (states included), allocated once
    npu_contexts: int
    npu_context_bytes: int         # internal tensors (activations, fp16) + npu_contexts x the profile's per-context bytes
    shared_bytes: int              # weights counted once because two segments share one .rknn / weight memory
    shareable_bytes: int           # weights held twice that one weight memory would hold once
    largest: list = field(default_factory=list)  # the five largest segments: {id, device, bytes}

    def to_dict(self) -> dict:
        return asdict(self)


def _npu_bytes(seg: dict, precision: str) -> int:
    fp16 = int(seg["cost"]["weight_bytes"]["fp16"])
    prec = seg.get("precision") or precision
    if prec != "w8a8":
        return fp16
    share = (seg.get("hybrid") or {}).get("int8_weight_share", 1.0)
    return int(fp16 * (1.0 - 0.5 * share))


def board_memory(data: dict, program, precision: str = "fp16", context_bytes: int = 0) -> Memory:
    """data: manifest data with every segment's `cost` features (estimate.with_features); program: its execution
    program (or None: buffers are then not counted); precision: for NPU segments without a recorded one."""
    plans = {"decode": data["graphs"]}
    pre = data.get("prefill")
    if isinstance(pre, dict) and pre.get("graphs"):
        plans["prefill"] = pre["graphs"]
    npu: dict[str, int] = {}
    cpu: dict[str, int] = {}
    held: dict[str, int] = {}          # weights_sha256 -> bytes already counted
    shared = shareable = contexts = internal = 0
    seen_files: set[str] = set()
    cpu_files: set[str] = set()
    sizes = []
    for plan, graphs in plans.items():
        npu[plan] = cpu[plan] = 0
        for g in graphs:
            for seg in g["segments"]:
                side = runs_on(seg)
                if side == "npu":
                    b = _npu_bytes(seg, precision)
                    key = seg.get("rknn") or seg["id"]
                    if key in seen_files or seg.get("shares_weights_with"):  # one context, or one weight memory
                        shared += b
                        continue
                    seen_files.add(key)
                    contexts += 1
                    internal += 2 * int(seg["cost"].get("elementwise_elems", 0))
                    h = seg.get("weights_sha256")
                    if h and h in held:
                        shareable += min(b, held[h])
                    elif h:
                        held[h] = b
                    npu[plan] += b
                else:
                    b = int(seg["cost"]["weight_bytes"]["stored"]) + int(seg["cost"].get("gather_table_bytes", 0))
                    h = seg.get("weights_sha256")
                    if h and h in cpu_files:  # onnxruntime maps the same weights file: one copy in the page cache
                        shared += b
                        continue
                    if h:
                        cpu_files.add(h)
                    cpu[plan] += b
                sizes.append({"id": seg["id"], "device": side, "bytes": b})
    buffers = 0
    if program is not None:
        buffers = sum(buf.nbytes for buf in program.buffers if buf.view_of is None)
    ctx = internal + contexts * int(context_bytes)
    total = sum(npu.values()) + sum(cpu.values()) + buffers + ctx
    largest = sorted(sizes, key=lambda s: -s["bytes"])[:5]
    return Memory(total, npu, cpu, buffers, contexts, ctx, shared, shareable, largest)


__all__ = ["Memory", "board_memory"]
