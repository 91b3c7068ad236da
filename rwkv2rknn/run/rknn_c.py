"""The C-API backend (`--backend rknn-c`): .rknn segments through librknnrt, zero-copy between buffers.

Every program buffer an NPU step touches is NPU memory (rknn_create_mem), allocated once at load; CPU steps
read and write it through a numpy view of the same bytes. Each NPU step's context binds its input and output
buffers with rknn_set_io_mem: where the model's native tensor is the buffer's dtype and plain layout, with
pass_through (the bytes go to the NPU as they are); otherwise the runtime converts, and the program's
accounting says so. A segment bound twice (the two parities of a ping-pong state, or the head in both plans)
gets a second context from rknn_dup_context: the weights are loaded once and nothing is rebound per token.
A token is then one rknn_run per NPU step.
"""

from __future__ import annotations

import numpy as np

from rwkv2rknn.errors import UserError
from rwkv2rknn.program import Program, Segment
from rwkv2rknn.run import librknnrt as rt
from rwkv2rknn.run.runners import Runner


def _user_error(exc: rt.RknnCallError) -> UserError:
    return UserError(f"{exc}; check the NPU driver (dmesg) and that the .rknn was built for this board")


class CApiBackend:
    """The library, the contexts and the NPU memory of one program."""

    def __init__(self, program: Program, root):
        try:
            self.lib = rt.load_library()
        except rt.RknnLibraryError as exc:
            raise UserError(str(exc)) from None
        self.program, self.root = program, root
        self.contexts: dict[str, rt.Context] = {}   # segment id -> its first context
        self.all_contexts: list[rt.Context] = []
        self.blocks: list[tuple[int, int, rt.Mem]] = []  # (address, size, mem) of every allocation
        self.converted_in_runtime = 0                     # bytes per run of tensors bound without pass-through

    def context(self, seg: Segment) -> rt.Context:
        ctx = self.contexts.get(seg.id)
        if ctx is None:
            try:
                ctx = rt.Context.open(self.lib, self.root / seg.rknn, seg.id)
            except rt.RknnCallError as exc:
                raise _user_error(exc) from None
            self.contexts[seg.id] = ctx
            self.all_contexts.append(ctx)
        return ctx

    def allocate(self, nbytes: int) -> np.ndarray:
        """nbytes of NPU memory as a uint8 view (allocated through the first NPU segment's context)."""
        first = next(s for s in self.program.segments.values() if s.device == "npu" and s.rknn)
        ctx = self.context(first)
        try:
            mem = ctx.create_mem(max(1, nbytes))
        except rt.RknnCallError as exc:
            raise _user_error(exc) from None
        self.blocks.append((mem.addr, mem.size, mem))
        return mem.array(np.uint8, (mem.size,))

    def find(self, a: np.ndarray) -> tuple[rt.Mem, int]:
        """The allocation holding array `a` and its byte offset in it."""
        ptr = a.__array_interface__["data"][0]
        for addr, size, mem in self.blocks:
            if addr <= ptr < addr + size:
                return mem, ptr - addr
        raise RuntimeError("a buffer of an NPU step is not NPU memory (the interpreter allocated it elsewhere)")

    def runner(self, seg: Segment, core_mask: int) -> CApiRunner:
        return CApiRunner(self, seg, core_mask)

    def close(self) -> None:
        for _, _, mem in self.blocks:
            if mem.ptr is not None and self.all_contexts:
                try:
                    self.all_contexts[0].destroy_mem(mem)
                except rt.RknnCallError:
                    pass
        self.blocks = []
        for ctx in reversed(self.all_contexts):
            try:
                ctx.destroy()
            except rt.RknnCallError:
                pass
        self.all_contexts, self.contexts = [], {}


class CApiRunner(Runner):
    """One .rknn segment: its contexts, each bound once to the buffers of one step (and parity)."""

    name = "rknn-c"

    def __init__(self, backend: CApiBackend, seg: Segment, core_mask: int):
        super().__init__()
        self.backend, self.seg, self.core_mask = backend, seg, core_mask
        self.input_names = [t.name for t in seg.inputs]
        self.output_names = [t.name for t in seg.outputs]
        self.bound: list[rt.Context] = []
        self.pass_through = {"in": 0, "out": 0, "converted": 0}

    def _activate(self):
        self.backend.context(self.seg)

    def _new_context(self) -> rt.Context:
        first = self.backend.context(self.seg)
        ctx = first if not self.bound else first.dup(f"{self.seg.id}#{len(self.bound)}")
        if ctx is not first:
            self.backend.all_contexts.append(ctx)
        if self.core_mask:
            ctx.set_core_mask(self.core_mask)
        self.bound.append(ctx)
        return ctx

    @staticmethod
    def _order(attrs: list[rt.TensorAttr], names: list[str]) -> list[rt.TensorAttr]:
        """The model's tensors in the program's order: by name where the .rknn kept the ONNX names."""
        by_name = {a.name: a for a in attrs}
        if all(n in by_name for n in names):
            return [by_name[n] for n in names]
        return list(attrs[:len(names)])

    def _bind_one(self, ctx: rt.Context, attr: rt.TensorAttr, a: np.ndarray) -> None:
        mem, offset = self.backend.find(a)
        plain = rt.TENSOR_TYPES.get(a.dtype)
        native_ok = attr.type == plain and attr.size_with_stride in (0, a.nbytes) and attr.n_elems == a.size
        view = ctx.create_mem_from_fd(mem, offset, a.nbytes)
        ctx.set_io_mem(view, attr.to_struct(pass_through=native_ok, type=plain if not native_ok else None))
        if not native_ok:  # the runtime converts this tensor on every run (priced, and counted here)
            self.pass_through["converted"] += a.size * 4

    def bind(self, inputs, outputs):
        try:
            ctx = self._new_context()
            ins = self._order(ctx.input_attrs(native=True), self.input_names)
            outs = self._order(ctx.output_attrs(native=True), self.output_names)
            for attr, a in zip(ins, inputs):
                self._bind_one(ctx, attr, a)
            for attr, a in zip(outs, outputs):
                self._bind_one(ctx, attr, a)
        except rt.RknnCallError as exc:
            raise _user_error(exc) from None
        run = ctx.run

        def call():
            try:
                run()
            except rt.RknnCallError as exc:
                raise _user_error(exc) from None
        return call

    def perf_run_us(self) -> int:
        """The NPU's own time of the last run of this segment's first bound context (RKNN_QUERY_PERF_RUN)."""
        ctx = self.bound[0] if self.bound else self.backend.context(self.seg)
        return ctx.perf_run_us()

    def infer_list(self, arrays: list) -> list:
        """The copying path (inputs_set / outputs_get), for calibration and checks: allocates per call."""
        ctx = self.backend.context(self.seg)
        try:
            items = [(i, np.ascontiguousarray(a), 0, rt.TENSOR_TYPES[np.asarray(a).dtype], rt.RKNN_TENSOR_UNDEFINED)
                     for i, a in enumerate(arrays)]
            ctx.inputs_set(items)
            ctx.run()
            return ctx.outputs_get(len(self.output_names), want_float=False)
        except rt.RknnCallError as exc:
            raise _user_error(exc) from None
