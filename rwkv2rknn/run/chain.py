"""Executes a manifest: graphs in order, segments in order, over pluggable runners, one token per step.

The plan (which runner reads which names from which table, which outputs carry to the next graph
or the next token) is resolved once at load time; a step is then list lookups and runner calls.
State lives in the per-graph tensor tables: after a graph runs, its state output simply becomes
its state input for the next token (no copy, no conversion).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rwkv2rknn.errors import UserError
from rwkv2rknn.manifest import Manifest, runs_on
from rwkv2rknn.run.runners import (
    CORE_MASKS,
    OrtRunner,
    RknnLiteRunner,
    RknnSimRunner,
    Runner,
    rknnlite_available,
)

BACKENDS = ("ort", "rknn-sim", "rknn-lite", "auto")


def as_manifest(manifest) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)


def resolve_backend(manifest: Manifest, backend: str) -> str:
    """auto = rknn-lite when rknnlite imports and the manifest has built .rknn files, else ort."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    has_rknn = any("rknn" in s for _, s in manifest.segments())
    if backend == "auto":
        return "rknn-lite" if has_rknn and rknnlite_available() else "ort"
    if backend == "rknn-lite":
        if not rknnlite_available():
            raise UserError("--backend rknn-lite: rknn-toolkit-lite2 (rknnlite) is not installed; it runs only "
                            "on the RK3588 board; use --backend ort or rknn-sim on a PC")
        if not has_rknn:
            raise UserError(f"{manifest.path}: no segment has a .rknn file; run `rwkv2rknn build "
                            f"{manifest.root}` first, or use --backend ort")
    return backend


def runner_factory(manifest: Manifest, backend: str = "ort", core_mask: int | None = None,
                   threads: int | None = None) -> Callable[[dict, dict], Runner]:
    """(graph, segment) -> Runner. CPU segments and fallen-back NPU segments always run on ort.

    core_mask None: each NPU segment's `core_mask` from the manifest (the faster one predicted), else auto.
    """
    backend = resolve_backend(manifest, backend)

    def make(graph: dict, seg: dict) -> Runner:
        ins = [t["name"] for t in seg["inputs"]]
        outs = [t["name"] for t in seg["outputs"]]
        onnx_path = manifest.resolve(seg["onnx"])
        if runs_on(seg) == "cpu" or backend == "ort":
            return OrtRunner(onnx_path, ins, outs, threads=threads)
        if backend == "rknn-sim":
            return RknnSimRunner(onnx_path, ins, outs, target=manifest.target,
                                 precision=seg.get("precision", "fp16"),
                                 calib=str(manifest.resolve(seg["calib"])) if seg.get("calib") else None)
        if "rknn" not in seg:
            raise UserError(f"{manifest.path}: npu segment {seg['id']} has no .rknn file; run `rwkv2rknn build "
                            f"{manifest.root}`, or use --backend ort")
        mask = seg.get("core_mask", 0) if core_mask is None else core_mask
        return RknnLiteRunner(manifest.resolve(seg["rknn"]), ins, outs, core_mask=mask)

    make.backend = backend
    return make


def _run_steps(steps, table: dict) -> None:
    """Run a graph's segments in order, reading their inputs from and writing their outputs to `table`."""
    for fn, ins, outs, _ in steps:
        for n, v in zip(outs, fn([table[n] for n in ins])):
            table[n] = v


def _shape_fixer(fn, specs):
    """Runners outside onnxruntime may return [1, C] for [C] (reshape: a view), and float32 for a float16
    output (a state the NPU keeps in fp16 between calls): give the manifest's shapes and dtypes."""
    want = [(tuple(t["shape"]), np.dtype(t["dtype"])) for t in specs]

    def call(arrays):
        out = []
        for o, (shape, dt) in zip(fn(arrays), want):
            if o.shape != shape:
                o = o.reshape(shape)
            out.append(o if o.dtype == dt else o.astype(dt))
        return out
    return call


class _GraphPlan:
    __slots__ = ("carry", "links_in", "name", "outputs", "raw", "steps", "table")

    def __init__(self, name):
        self.name = name
        self.table: dict = {}
        self.links_in: list = []      # (dst name, src table, src name)
        self.raw: list = []           # (infer_list, input names, output names, segment id)
        self.steps: list = []         # raw, or raw wrapped in timers
        self.carry: list = []         # (state input name, state output name)
        self.outputs: list = []


class Chain:
    """A manifest bound to runners. `step(token) -> logits` for whole models, `run_graph` for single graphs.

    runners: a factory (graph dict, segment dict) -> Runner (default: everything on onnxruntime).
    timed: accumulate per-segment wall time in `segment_times` (a separate plan; zero cost when off).
    trace: a file to print every segment call with its inputs on (ggml-scheduler style), or None.
    record: a callable (segment id, feed dict) called before each segment (input tracing).
    """

    def __init__(self, manifest, runners: Callable[[dict, dict], Runner] | None = None, timed: bool = False,
                 trace=None, record: Callable[[str, dict], None] | None = None, progress: bool = False):
        self.manifest = as_manifest(manifest)
        self.model = self.manifest.model
        factory = runners or runner_factory(self.manifest, "ort")
        self.backend = getattr(factory, "backend", "custom")
        self.runners: dict[str, Runner] = {}
        self.segment_times: dict[str, list] = {}  # id -> [seconds, calls]
        self.plans: list[_GraphPlan] = []
        self.by_name: dict[str, _GraphPlan] = {}
        pairs = list(self.manifest.segments())
        bar = None
        if progress:
            from tqdm import tqdm
            # disable=None: no bar when stderr is not a terminal (pipes, logs, tests)
            bar = tqdm(total=len(pairs), desc=f"load ({self.backend})", unit="seg", file=sys.stderr, leave=False,
                       disable=None)
        decode = {g["name"] for g in self.manifest.graphs}
        for g in self.manifest.all_graphs():
            plan = _GraphPlan(g["name"])
            plan.outputs = [t["name"] for t in g["outputs"]]
            for seg in g["segments"]:
                runner = factory(g, seg)
                if bar is not None:
                    bar.set_postfix_str(seg["id"])
                runner.activate()
                if bar is not None:
                    bar.update()
                self.runners[seg["id"]] = runner
                ins = [t["name"] for t in seg["inputs"]]
                outs = [t["name"] for t in seg["outputs"]]
                fn = runner.infer_list
                if not isinstance(runner, OrtRunner):
                    fn = _shape_fixer(fn, seg["outputs"])
                if trace is not None or record is not None:
                    fn = self._traced(fn, seg, runner, ins, trace, record)
                plan.raw.append((fn, ins, outs, seg["id"]))
            if plan.name in decode:
                self.plans.append(plan)
            self.by_name[plan.name] = plan
        if bar is not None:
            bar.close()
        self.set_timing(timed)
        if self.model is not None:
            self._plan_model()

    def set_timing(self, on: bool) -> None:
        """Swap in a plan whose segment calls accumulate wall time in `segment_times` (or the plain one)."""
        self.timed = on
        for plan in self.by_name.values():
            plan.steps = [(self._timed(fn, sid) if on else fn, ins, outs, sid) for fn, ins, outs, sid in plan.raw]

    # -- plan ---------------------------------------------------------------------------------------
    def _plan_model(self):
        m = self.model
        for link in m["links"]:
            src, dst = link["from"], link["to"]
            if src["graph"] not in self.by_name or dst["graph"] not in self.by_name:
                raise UserError(f"{self.manifest.path}: link {src} -> {dst} names an unknown graph; split again")
            self.by_name[dst["graph"]].links_in.append((dst["name"], self.by_name[src["graph"]].table, src["name"]))
        self._init_state = []
        for st in m["state"]:
            plan = self.by_name[st["graph"]]
            plan.carry.append((st["input"], st["output"]))
            init = np.full(st["shape"], st["init"]["fill"], dtype=np.dtype(st["dtype"]))
            for row, value in st["init"].get("rows", {}).items():
                init[int(row)] = value
            self._init_state.append((plan.table, st["input"], init))
        self._token_buf = self._input_buffer(m["token_input"])
        self._logits_table = self.by_name[m["logits"]["graph"]].table
        self._logits_name = m["logits"]["name"]
        self.vocab_size = m["vocab_size"]
        self.chunk = 0
        if self.manifest.prefill:
            self._plan_prefill(self.manifest.prefill)
        self.reset()

    def _plan_prefill(self, p: dict) -> None:
        """The prefill plan: its graphs (and decode graphs it shares, e.g. the head) with its own links."""
        unknown = [n for n in p["order"] if n not in self.by_name]
        if unknown or len(p["state"]) != len(self._init_state):
            raise UserError(f"{self.manifest.path}: the prefill plan names unknown graphs or states; split again")
        links: dict[str, list] = {n: [] for n in p["order"]}
        for link in p["links"]:
            src, dst = link["from"], link["to"]
            links[dst["graph"]].append((dst["name"], self.by_name[src["graph"]].table, src["name"],
                                        bool(link.get("last"))))
        self._prefill_seq = [(self.by_name[n], links[n]) for n in p["order"]]
        self._prefill_state = [(self.by_name[st["graph"]].table, st["input"], st["output"]) for st in p["state"]]
        self._prefill_tokens = self._input_buffer(p["token_input"])
        self._prefill_logits = (self.by_name[p["logits"]["graph"]].table, p["logits"]["name"])
        self.chunk = int(p["chunk"])

    def _input_buffer(self, ref: dict) -> np.ndarray:
        """A zeroed array for graph input `ref` (the token ids), placed in its graph's table to be filled in."""
        g = next(x for x in self.manifest.all_graphs() if x["name"] == ref["graph"])
        spec = next(t for t in g["inputs"] if t["name"] == ref["name"])
        buf = np.zeros(spec["shape"] or [], dtype=np.dtype(spec["dtype"]))
        self.by_name[ref["graph"]].table[ref["name"]] = buf
        return buf

    def reset(self) -> None:
        """Back to the initial recurrent state (a fresh conversation)."""
        for table, name, init in self._init_state:
            table[name] = init.copy()

    def get_state(self) -> list[np.ndarray]:
        return [table[name] for table, name, _ in self._init_state]

    def set_state(self, arrays: list[np.ndarray]) -> None:
        for (table, name, _), a in zip(self._init_state, arrays):
            table[name] = a

    # -- execution ------------------------------------------------------------------------------------
    def step(self, token: int) -> np.ndarray:
        """Feed one token id; return the logits (float32 [V]) and advance the state."""
        self._token_buf.flat[0] = token
        for plan in self.plans:
            t = plan.table
            for dst, src_table, src in plan.links_in:
                t[dst] = src_table[src]
            _run_steps(plan.steps, t)
            for i, o in plan.carry:
                t[i] = t[o]
        return self._logits_table[self._logits_name]

    def prefill(self, tokens) -> np.ndarray:
        """Feed exactly `chunk` tokens through the prefill plan (M per call); the logits after the last one."""
        if len(tokens) != self.chunk:
            raise ValueError(f"prefill takes {self.chunk} tokens at a time, got {len(tokens)}")
        self._prefill_tokens.reshape(-1)[:] = np.asarray(tokens).reshape(-1)
        for (dt, din, _), (pt, pin, _) in zip(self._init_state, self._prefill_state):
            pt[pin] = dt[din]
        for plan, links in self._prefill_seq:
            t = plan.table
            for dst, src_table, src, last in links:
                t[dst] = src_table[src][-1] if last else src_table[src]
            _run_steps(plan.steps, t)
        for (dt, din, _), (pt, _, pout) in zip(self._init_state, self._prefill_state):
            dt[din] = pt[pout]
        table, name = self._prefill_logits
        return table[name]

    def feed(self, tokens, prefill: bool = True) -> np.ndarray:
        """Feed tokens: whole chunks through the prefill plan (when the manifest has one), the rest one by one."""
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
        """Run one graph's segments on `feed` (its graph inputs); return its graph outputs."""
        plan = self.by_name[name]
        t = dict(feed)
        _run_steps(plan.steps, t)
        return {n: t[n] for n in plan.outputs}

    def close(self) -> None:
        for r in self.runners.values():
            r.deactivate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- instrumentation (only in the plan when asked for) ---------------------------------------------
    def _timed(self, fn, sid):
        times = self.segment_times  # an entry appears with a segment's first call (a plan not run stays out)
        clock = time.perf_counter

        def call(arrays):
            t0 = clock()
            out = fn(arrays)
            acc = times.setdefault(sid, [0.0, 0])
            acc[0] += clock() - t0
            acc[1] += 1
            return out
        return call

    @staticmethod
    def _traced(fn, seg, runner, ins, trace, record):
        sid, backend = seg["id"], f"{seg['backend']}/{runner.name}"

        def call(arrays):
            if record is not None:
                record(sid, {n: np.array(a, copy=True) for n, a in zip(ins, arrays)})
            if trace is not None:
                desc = ", ".join(f"{n}:{a.dtype}{list(a.shape)}" + (
                    f"(|max| {float(np.abs(a).max()):.3g})" if a.size and a.dtype.kind == "f" else "")
                    for n, a in zip(ins, arrays))
                print(f"## SPLIT {sid} [{backend}] inputs: {desc}", file=trace, flush=True)
            return fn(arrays)
        return call


# -- realistic random inputs and input tracing ----------------------------------------------------------

def _gather_bound(onnx_path: Path, input_name: str) -> int | None:
    """For an integer input used as Gather indices: the size of the gathered axis (vocab for embed)."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:
        return None
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == input_name:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = inits.get(node.input[0])
            if dims:
                return int(dims[axis])
    return None


def random_feed(specs: list[dict], rng: np.random.Generator, onnx_paths=()) -> dict:
    """Realistic random graph inputs: normal activations; small positive finite values for state;
    valid indices for integer inputs."""
    feed = {}
    for spec in specs:
        dt = np.dtype(spec["dtype"])
        shape = tuple(spec["shape"])
        if dt.kind in "iu":
            bound = next((b for p in onnx_paths if (b := _gather_bound(p, spec["name"]))), 1)
            feed[spec["name"]] = rng.integers(0, bound, size=shape).astype(dt)
        elif "state" in spec["name"].lower():
            # aa/bb/pp rows of an RWKV state: positive keeps the WKV denominator away from zero.
            feed[spec["name"]] = rng.uniform(0.0, 0.5, size=shape).astype(dt)
        else:
            feed[spec["name"]] = rng.standard_normal(shape).astype(dt)
    return feed


def record_inputs(manifest, tokens: list[int]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Every segment's real inputs (onnxruntime fp32) while `tokens` go through the decode plan one by one and,
    from the state they leave, through the prefill plan in whole chunks (at least one: the text is repeated)."""
    manifest = as_manifest(manifest)
    seen: dict[str, list[dict[str, np.ndarray]]] = {s["id"]: [] for _, s in manifest.segments()}
    with Chain(manifest, runner_factory(manifest, "ort"), record=lambda sid, f: seen[sid].append(f)) as chain:
        chain.feed(tokens, prefill=False)
        if chain.chunk and tokens:
            text = list(tokens)
            while len(text) < chain.chunk:
                text += tokens
            chain.feed(text[:max(1, len(text) // chain.chunk) * chain.chunk])
    return seen


def trace_segment_inputs(manifest, n_tokens: int = 4, seed: int = 0) -> dict[str, list[dict[str, np.ndarray]]]:
    """Run the whole chain on onnxruntime fp32 and record every segment's real input feed.

    Whole-model manifests: `n_tokens` random token ids are fed from the initial state token by token, and
    (with a prefill plan) from the state they leave, `n_tokens // chunk` (at least one) chunks of random ids.
    Single-graph manifests ("model": null): each graph gets `n_tokens` random realistic input sets.
    Returns {segment id: [feed per call, in call order]} (arrays are copies).
    """
    manifest = as_manifest(manifest)
    rng = np.random.default_rng(seed)
    if manifest.model is not None:
        vocab = manifest.model["vocab_size"]
        return record_inputs(manifest, [int(t) for t in rng.integers(0, vocab, size=n_tokens)])
    seen: dict[str, list[dict[str, np.ndarray]]] = {s["id"]: [] for _, s in manifest.segments()}
    with Chain(manifest, runner_factory(manifest, "ort"), record=lambda sid, f: seen[sid].append(f)) as chain:
        for g in manifest.graphs:
            paths = [manifest.resolve(s["onnx"]) for s in g["segments"]]
            for _ in range(n_tokens):
                chain.run_graph(g["name"], random_feed(g["inputs"], rng, paths))
    return seen


def core_mask_value(text: str | None) -> int | None:
    """--core-mask: a name or number; None (not given) means each segment's mask from the manifest."""
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
