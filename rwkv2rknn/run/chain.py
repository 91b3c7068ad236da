"""The interpreter of the execution program (docs/runtime-abi.md): buffers allocated once, steps bound once.

At load every buffer of the program is allocated (numpy, or NPU memory under the C API), every step is
bound to its runner with the buffers it reads and writes, for both parities of the ping-pong states. A token
is then: write its id into the token buffer, call the bound steps in order (CPU steps marked `overlap` on a
worker thread beside the next NPU step, joined at the end), flip the parity. Nothing is allocated, converted
or looked up by name per token; the only conversions are the program's own (casts inside CPU graphs and its
few convert steps).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from rwkv2rknn.errors import UserError
from rwkv2rknn.program import Program, Segment
from rwkv2rknn.run.runners import CORE_MASKS, OrtRunner, Runner
from rwkv2rknn.run.source import open_program

BACKENDS = ("ort", "rknn-sim", "rknn-lite", "rknn-c", "auto")


def _librknnrt_loadable() -> bool:
    try:
        from rwkv2rknn.run.librknnrt import load_library
    except ImportError:
        return False
    try:
        load_library()
    except Exception:
        return False
    return True


def resolve_backend(program: Program, backend: str, root: Path | None = None) -> str:
    """auto: rknn-c where librknnrt loads, else rknn-lite where rknnlite imports (both need a build), else ort."""
    from rwkv2rknn.run.runners import rknnlite_available

    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    built = any(s.rknn for s in program.segments.values())
    where = root or Path(".")
    if backend == "auto":
        if built and _librknnrt_loadable():
            return "rknn-c"
        return "rknn-lite" if built and rknnlite_available() else "ort"
    if backend == "rknn-lite" and not rknnlite_available():
        raise UserError("--backend rknn-lite: rknn-toolkit-lite2 (rknnlite) is not installed; it runs only on the "
                        "RK3588 board; use --backend ort or rknn-sim on a PC")
    if backend == "rknn-c" and not _librknnrt_loadable():
        raise UserError("--backend rknn-c: librknnrt.so cannot be loaded (set LIBRKNNRT_PATH, or install the "
                        "board's /usr/lib/librknnrt.so); it runs only on the RK3588; use --backend ort on a PC")
    if backend in ("rknn-lite", "rknn-c") and not built:
        raise UserError(f"{where}: no segment has a .rknn file; run `rwkv2rknn build {where}` first, or use "
                        "--backend ort")
    return backend


class Backend:
    """Makes a runner per segment for one backend name; CPU segments always run on onnxruntime."""

    def __init__(self, program: Program, root: Path, name: str, core_mask: int | None = None,
                 threads: int | None = None):
        self.program, self.root, self.name = program, Path(root), name
        self.core_mask, self.threads = core_mask, threads
        self.npu = None
        if name == "rknn-c":
            from rwkv2rknn.run.rknn_c import CApiBackend

            self.npu = CApiBackend(program, self.root)
        elif name == "rknn-sim":
            import importlib

            # the simulator compiles: it lives with the compiler, imported only when chosen on a PC
            self.sim_runner = importlib.import_module("rwkv2rknn.simulate").RknnSimRunner

    def runner(self, seg: Segment, mask: int | None = None) -> Runner:
        """The runner of one segment (mask: a core mask for this runner, over the program's and --core-mask)."""
        ins, outs = [t.name for t in seg.inputs], [t.name for t in seg.outputs]
        label = seg.id
        if seg.device == "cpu" or self.name == "ort":
            return OrtRunner(self.root / seg.onnx, ins, outs, threads=self.threads, label=f"{self.root / seg.onnx}")
        if self.name == "rknn-sim":
            return self.sim_runner(self.root / seg.onnx, ins, outs, target=self.program.target,
                                   precision=seg.precision or "fp16", label=label,
                                   calib=str(self.root / seg.calib) if seg.calib else None,
                                   hybrid=bool(seg.hybrid))
        if not seg.rknn:
            raise UserError(f"{self.root}: NPU segment {seg.id} has no .rknn file; run `rwkv2rknn build {self.root}`, "
                            "or use --backend ort")
        if mask is None:
            mask = (seg.core_mask or 0) if self.core_mask is None else self.core_mask
        if self.name == "rknn-c":
            return self.npu.runner(seg, mask)
        from rwkv2rknn.run.runners import RknnLiteRunner

        return RknnLiteRunner(self.root / seg.rknn, ins, outs, core_mask=mask,
                              input_dtypes=[t.dtype for t in seg.inputs], label=label)

    def allocate(self, nbytes: int, npu: bool) -> np.ndarray:
        """The bytes of one buffer: NPU memory under the C API when an NPU step touches it, else numpy."""
        if npu and self.npu is not None:
            return self.npu.allocate(nbytes)
        return np.zeros(nbytes, dtype=np.uint8)

    def close(self) -> None:
        if self.npu is not None:
            self.npu.close()


def runner_factory(source, backend: str = "ort", core_mask: int | None = None, threads: int | None = None):
    """A backend for a program (or anything open_program takes): `factory(segment) -> Runner`."""
    from rwkv2rknn.run.source import check_files

    program, root = open_program(source)
    name = resolve_backend(program, backend, root)
    check_files(program, root, name)
    b = Backend(program, root, name, core_mask, threads)
    b.backend = name
    return b


class _Bound:
    """One plan, one parity: the bound calls in order, which may overlap, and where each came from."""

    __slots__ = ("calls",)

    def __init__(self):
        self.calls: list = []   # (call, overlap, step)


class Chain:
    """A program bound to runners. `step(token) -> logits`, `prefill(tokens)`, `feed`, `run_graph` (single graphs).

    source: a Program, an output directory / manifest.json / program.json, or an object with `.program()`.
    runners: a Backend (runner_factory(...)); default onnxruntime for everything.
    timed: accumulate per-segment wall time in `segment_times` (a separate binding; zero cost when off).
    trace: a file to print every step with its inputs on, or None. record: (segment id, feed dict) before each
    run step (the build's verification inputs). overlap: run steps the program marks `overlap` on a worker.
    timeline: a list to append {step, segment, device, overlap, t0, t1} to for every call (a debugging aid).
    """

    def __init__(self, source, runners=None, timed: bool = False, trace=None,
                 record: Callable[[str, dict], None] | None = None, progress: bool = False, overlap: bool = True,
                 timeline: list | None = None):
        if runners is not None and hasattr(runners, "program"):  # the backend's own program: lowered once
            self.program, self.root = runners.program, runners.root
        else:
            self.program, self.root = open_program(source)
        p = self.program
        self.backend_obj = runners if runners is not None else runner_factory((p, self.root), "ort")
        self.backend = getattr(self.backend_obj, "backend", getattr(self.backend_obj, "name", "custom"))
        self.model = p.model
        self.vocab_size = (p.model or {}).get("vocab_size")
        self.segment_times: dict[str, list] = {}
        self.converted_bytes = 0.0   # bytes the program's steps converted (casts, convert steps), as executed
        self._trace, self._record, self._timeline = trace, record, timeline
        self._overlap = overlap
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rwkv2rknn-cpu") if overlap else None
        self.overlap_seconds = 0.0   # measured: CPU time spent on the worker while the main thread went on
        self._alloc_buffers()
        self.runners: dict[str, Runner] = {}
        self._activate(progress)
        self._bind_all()
        self.set_timing(timed)
        self.parity = 0
        self.chunk = p.prefill.tokens if p.prefill else 0
        self.verify_rows = p.verify.tokens if p.verify else 0  # a verify plan: the last token and rows - 1 drafts
        self._verified = 0  # real rows of the last verify run, until commit()
        if p.model is not None:
            self.reset()

    # -- load ----------------------------------------------------------------------------------------------
    def _alloc_buffers(self) -> None:
        p = self.program
        npu_touch = set()
        for plan in p.plans.values():
            for s in plan.steps:
                if s.device == "npu":
                    npu_touch.update(s.inputs + s.outputs)
        swap = p.swap_map()
        npu_touch |= {swap[b] for b in npu_touch if b in swap}  # a ping-pong pair serves both parities
        for b in p.buffers:
            if b.view_of is not None and b.id in npu_touch:
                npu_touch.add(b.view_of)
        self.arrays: list[np.ndarray] = [None] * len(p.buffers)  # type: ignore[list-item]
        for b in p.buffers:
            if b.view_of is None:
                raw = self.backend_obj.allocate(b.nbytes, b.id in npu_touch)
                self.arrays[b.id] = raw[:b.nbytes].view(np.dtype(b.dtype)).reshape(b.shape)
        for b in p.buffers:
            if b.view_of is not None:
                base = self.arrays[b.view_of]
                raw = base.reshape(-1).view(np.uint8)[b.offset:b.offset + b.nbytes]
                self.arrays[b.id] = raw.view(np.dtype(b.dtype)).reshape(b.shape)

    def _activate(self, progress: bool) -> None:
        segs = list(self.program.segments.values())
        bar = None
        if progress:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:  # disable=None: no bar when stderr is not a terminal
                bar = tqdm(total=len(segs), desc=f"load ({self.backend})", unit="seg", file=sys.stderr, leave=False,
                           disable=None)
        for seg in segs:
            r = self.backend_obj.runner(seg)
            if bar is not None:
                bar.set_postfix_str(seg.id)
            r.activate()
            self.runners[seg.id] = r
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()

    def _arrays_for(self, ids, tensors, parity: int):
        swap = self._swap if parity else {}
        out = []
        for k, b in enumerate(ids):
            a = self.arrays[swap.get(b, b)]
            if tensors is not None and list(a.shape) != list(tensors[k].shape):
                a = a.reshape(tensors[k].shape)  # [C] vs [1, C]: the same bytes
            out.append(a)
        return out

    def _bind_all(self) -> None:
        p = self.program
        self._swap = p.swap_map()
        self._raw: dict[tuple[str, int], list] = {}
        for plan in p.plans.values():
            for parity in ((0, 1) if p.states else (0,)):
                calls = []
                for s in plan.steps:
                    if s.op == "run":
                        seg = p.segments[s.segment]
                        ins = self._arrays_for(s.inputs, seg.inputs, parity)
                        outs = self._arrays_for(s.outputs, seg.outputs, parity)
                        fn = self.runners[s.segment].bind(ins, outs)
                    else:
                        src, dst = self._arrays_for(s.inputs, None, parity)[0], self._arrays_for(s.outputs, None,
                                                                                                  parity)[0]
                        fn = _converter(src, dst)
                        ins, outs = [src], [dst]
                    if self._trace is not None or self._record is not None:
                        fn = self._traced(fn, s, ins)
                    if self._timeline is not None:
                        fn = self._clocked(fn, s)
                    calls.append((fn, s.overlap and self._overlap, s, ins))
                self._raw[(plan.name, parity)] = calls

    def set_timing(self, on: bool) -> None:
        """Swap in calls that accumulate wall time per segment in `segment_times` (or the plain ones)."""
        self.timed = on
        self._bound, self._flat = {}, {}
        for key, calls in self._raw.items():
            bound = [(self._timed(fn, s) if on else fn, ov, s.converted_bytes) for fn, ov, s, _ in calls]
            self._flat[key] = bound  # by step id (one graph alone)
            self._bound[key] = _grouped(bound, [s.parallel for _, _, s, _ in calls])

    # -- state ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the initial recurrent state (a fresh conversation), parity 0."""
        self.parity = 0
        for st in self.program.states:
            a = self.arrays[st.pair[0]]
            a[...] = st.init_fill
            for row, value in st.init_rows.items():
                a[int(row)] = value
            if st.shadow:
                s16 = self.arrays[st.shadow[0]]
                np.copyto(s16, np.clip(a, -65504, 65504), casting="unsafe")

    def _state_arrays(self, which: int = 0) -> list:
        swap = self._swap if self.parity else {}
        return [self.arrays[swap.get(st.pair[which], st.pair[which])] for st in self.program.states]

    def get_state(self) -> list[np.ndarray]:
        """Copies of the current recurrent states (in the program's order)."""
        return [a.copy() for a in self._state_arrays()]

    def set_state(self, arrays: list[np.ndarray]) -> None:
        for st, dst, a in zip(self.program.states, self._state_arrays(), arrays):
            np.copyto(dst, np.asarray(a).reshape(dst.shape), casting="unsafe")
            if st.shadow:
                swap = self._swap if self.parity else {}
                np.copyto(self.arrays[swap.get(st.shadow[0], st.shadow[0])], dst, casting="unsafe")

    # -- execution -----------------------------------------------------------------------------------------
    def _run(self, plan: str) -> None:
        calls = self._bound[(plan, self.parity)]
        futures = []
        pool = self._pool
        converted = 0
        try:
            for fn, overlap, nbytes in calls:
                converted += nbytes
                if overlap:
                    futures.append(pool.submit(fn))
                else:
                    fn()
        finally:
            for f in futures:
                f.result()
        self.converted_bytes += converted

    def _logits(self, plan) -> np.ndarray:
        b = plan.logits
        return self.arrays[self._swap.get(b, b) if self.parity else b]

    def step(self, token: int) -> np.ndarray:
        """Feed one token id; return the logits (a view: valid until the next call) and advance the state."""
        plan = self.program.decode
        self.arrays[plan.token].reshape(-1)[0] = token
        self._run("decode")
        logits = self._logits(plan)
        self.parity ^= 1 if self.program.states else 0
        return logits

    def prefill(self, tokens) -> np.ndarray:
        """Feed exactly `chunk` tokens through the prefill plan (M per call); the logits after the last one."""
        plan = self.program.prefill
        if plan is None or len(tokens) != plan.tokens:
            raise ValueError(f"prefill takes {self.chunk} tokens at a time, got {len(tokens)}")
        self.arrays[plan.token].reshape(-1)[:] = np.asarray(tokens).reshape(-1)
        self._run("prefill")
        logits = self._logits(plan)
        self.parity ^= 1 if self.program.states else 0
        return logits

    def verify(self, tokens) -> np.ndarray:
        """Run the verify plan on 1..rows tokens (the last accepted one, then drafts; padded with the last): the logits
        after every row, [rows, vocab] (a view, valid until the next run). The state stays where it was until
        commit(j) keeps the state after row j."""
        plan = self.program.verify
        n = len(tokens)
        if plan is None or not 1 <= n <= plan.tokens:
            raise ValueError(f"verify takes 1 to {self.verify_rows} tokens, got {n}")
        ids = self.arrays[plan.token].reshape(-1)
        ids[:n] = np.asarray(tokens).reshape(-1)
        ids[n:] = ids[n - 1]
        self._run("verify")
        self._verified = n
        logits = self._logits(plan)
        return logits.reshape(plan.tokens, -1)

    def commit(self, row: int) -> None:
        """After verify(tokens): keep the state after tokens[0..row] (row 0: only the first token). The last row's
        state is where every run writes its state (a parity flip, no copy); an earlier row's is copied from the row
        buffers the verify plan wrote into the current state (and its fp16 copy, if the state keeps one)."""
        plan = self.program.verify
        if not 0 <= row < self._verified:
            raise ValueError(f"commit({row}): the last verify run had {self._verified} token(s)")
        self._verified = 0
        if row == plan.tokens - 1:
            self.parity ^= 1
            return
        swap = self._swap if self.parity else {}
        for item in plan.state_rows:
            st = self.program.states[item["state"]]
            dst = self.arrays[swap.get(st.pair[0], st.pair[0])]
            np.copyto(dst, self.arrays[item["rows"][row]].reshape(dst.shape), casting="unsafe")
            if st.shadow:
                s16 = self.arrays[swap.get(st.shadow[0], st.shadow[0])]
                np.copyto(s16, np.clip(dst, -65504, 65504), casting="unsafe")
                self.converted_bytes += dst.size * 4

    def feed(self, tokens, prefill: bool = True) -> np.ndarray:
        """Feed tokens: whole chunks through the prefill plan (when there is one), the rest one by one."""
        tokens = [int(t) for t in tokens]
        logits = None
        i = 0
        if prefill and self.chunk:
            while len(tokens) - i >= self.chunk:
                logits = self.prefill(tokens[i:i + self.chunk])
                i += self.chunk
        for tok in tokens[i:]:
            logits = self.step(tok)
        return logits

    def run_graph(self, name: str, feed: dict) -> dict:
        """Run graph `name` alone on `feed` (its inputs, by name); return copies of its outputs.

        For a whole model this writes the graph's input buffers (links, states) directly: a test of one graph's
        cut, not a token of the model (call reset() before generating again)."""
        info = self.program.graphs.get(name)
        if info is None:
            raise KeyError(f"{name}: not a graph of this program")
        swap = self._swap if self.parity else {}
        for tname, b in info["inputs"].items():
            if tname in feed:
                a = self.arrays[swap.get(b, b)]
                np.copyto(a, np.asarray(feed[tname]).reshape(a.shape), casting="unsafe")
        calls = self._flat[(info.get("plan", "decode"), self.parity)]
        for fn, _, nbytes in (calls[k] for k in sorted(info["steps"])):
            fn()
            self.converted_bytes += nbytes
        return {t: self.arrays[swap.get(b, b)].copy() for t, b in info["outputs"].items()}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for calls in getattr(self, "_bound", {}).values():
            for fn, _, _ in calls:
                if isinstance(fn, _ParallelCall) and fn.pool is not None:
                    fn.pool.shutdown(wait=True)
        for r in self.runners.values():
            r.deactivate()
        close = getattr(self.backend_obj, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- instrumentation (only bound when asked for) -----------------------------------------------------
    def _timed(self, fn, step):
        times = self.segment_times  # an entry appears with a segment's first call
        clock = time.perf_counter
        sid = step.segment or f"convert.{step.id}"
        lock = threading.Lock()

        def call():
            t0 = clock()
            fn()
            dt = clock() - t0
            with lock:
                acc = times.setdefault(sid, [0.0, 0])
                acc[0] += dt
                acc[1] += 1
        return call

    def _clocked(self, fn, step):
        timeline, clock, overlap = self._timeline, time.perf_counter, step.overlap and self._overlap

        def call():
            t0 = clock()
            fn()
            timeline.append({"step": step.id, "segment": step.segment, "device": step.device, "overlap": overlap,
                             "t0": t0, "t1": clock()})
        return call

    def _traced(self, fn, step, ins):
        trace, record = self._trace, self._record
        seg = self.program.segments.get(step.segment) if step.segment else None
        names = [t.name for t in seg.inputs] if seg else [self.program.buffers[b].name for b in step.inputs]
        label = f"{step.segment or 'convert'} [{step.device}/{self.backend}]"

        def call():
            if record is not None and seg is not None:
                record(seg.id, {n: np.array(a, copy=True) for n, a in zip(names, ins)})
            if trace is not None:
                desc = ", ".join(f"{n}:{a.dtype}{list(a.shape)}" + (
                    f"(|max| {float(np.abs(a).max()):.3g})" if a.size and a.dtype.kind == "f" else "")
                    for n, a in zip(names, ins))
                print(f"## STEP {step.id} {label} inputs: {desc}", file=trace, flush=True)
            fn()
        return call


def _grouped(bound: list, groups: list) -> list:
    """Bound calls with each run of consecutive calls of one parallel group (N-split pieces) made one call that
    runs them at once; the group's converted bytes add up."""
    out, k = [], 0
    while k < len(bound):
        g = groups[k]
        j = k + 1
        while g and j < len(bound) and groups[j] == g:
            j += 1
        if j - k > 1:
            fns = [fn for fn, _, _ in bound[k:j]]
            out.append((_ParallelCall(fns), False, sum(nb for _, _, nb in bound[k:j])))
        else:
            out.append(bound[k])
        k = j
    return out


class _ParallelCall:
    """Runs its calls at once on threads of its own (created on first use) and waits for all of them."""

    def __init__(self, fns: list):
        self.fns = fns
        self.pool = None

    def __call__(self):
        if self.pool is None:
            self.pool = ThreadPoolExecutor(len(self.fns), thread_name_prefix="rwkv2rknn-npu")
        for f in [self.pool.submit(fn) for fn in self.fns]:
            f.result()


def _converter(src: np.ndarray, dst: np.ndarray):
    flat_src, flat_dst = src.reshape(-1), dst.reshape(-1)
    return lambda: np.copyto(flat_dst, flat_src, casting="unsafe")


def core_mask_value(text: str | None) -> int | None:
    """--core-mask: a name or number; None (not given) means each segment's mask from the program."""
    if text is None or text == "plan":
        return None
    if text in CORE_MASKS:
        return CORE_MASKS[text]
    try:
        v = int(text, 0)
    except ValueError:
        v = -1
    if v not in CORE_MASKS.values():
        raise UserError(f"--core-mask {text!r}: choose plan, {', '.join(CORE_MASKS)} or 0,1,2,3,4,7")
    return v


__all__ = ["BACKENDS", "Backend", "Chain", "core_mask_value", "resolve_backend", "runner_factory"]
