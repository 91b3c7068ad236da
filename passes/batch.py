"""Token batching: derive an M-token graph from a single-token recurrent graph (shifted states, unrolled recurrences)."""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import onnx_graphsurgeon as gs

from passes.batch_ops import Emitter, Val, batch_node
from passes.graphutil import static_shape, toposort
from passes.infra import PassResult
from passes.matmul2d import cancel_reshapes
from passes.normalize import infer_shapes

_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
                         "Multinomial"})


@dataclass
class StateUnit:
    """One independently carried piece of a state: a row read by Gather and written by Concat, or a whole tensor."""
    state_in: str
    state_out: str
    row: int | None   # None: the whole state tensor
    shape: list       # its value: the row shape, or the state's shape
    reads: list       # source tensors holding the value before the token (row Gathers' outputs, or the state input)
    write: gs.Tensor  # source tensor holding the value after the token (same number of elements as `shape`)
    kind: str = ""    # "shift": written from the token alone; "recurrent": written from itself (an unrolled scan)
    scan: int | None = None

    @property
    def label(self) -> str:
        return self.state_in if self.row is None else f"{self.state_in}[{self.row}]"


@dataclass
class Scan:
    """Recurrent units that feed each other, and the nodes on the paths from their reads to their writes."""
    units: list   # indices into BatchPlan.units
    nodes: list   # the loop body, in source order


@dataclass
class BatchPlan:
    graph: gs.Graph
    order: list   # source nodes, topologically sorted
    units: list
    scans: list
    token_inputs: list
    shared_inputs: list

    def summary(self) -> str:
        lines = []
        for u in self.units:
            how = f"scan {u.scan}" if u.kind == "recurrent" else "shifted by one token"
            lines.append(f"{u.label}: {u.kind} ({how}; written from {u.write.name!r})")
        for k, s in enumerate(self.scans):
            lines.append(f"scan {k}: {len(s.nodes)} nodes per token: {', '.join(n.name for n in s.nodes)}")
        lines.append(f"per-token inputs: {self.token_inputs}; shared inputs: {self.shared_inputs}")
        return "\n".join(lines)


def _shape(t):
    if isinstance(t, gs.Constant):
        return list(t.values.shape)
    return static_shape(t)


def _const_index(t):
    if not isinstance(t, gs.Constant) or t.values.size != 1 or t.values.ndim > 1 or t.values.dtype.kind not in "iu":
        return None
    return int(np.asarray(t.values).reshape(-1)[0])


def _has_subgraph(node) -> bool:
    return any(isinstance(v, gs.Graph) or (isinstance(v, (list, tuple)) and any(isinstance(x, gs.Graph) for x in v))
               for v in node.attrs.values())


def _outer_inputs(node) -> list:
    """Tensors of the enclosing graph that `node`'s subgraphs (If/Loop/Scan bodies) read by name."""
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        for v in n.attrs.values():
            for sg in v if isinstance(v, (list, tuple)) else [v]:
                if not isinstance(sg, gs.Graph):
                    continue
                inner = {t.name for t in sg.inputs} | {t.name for x in sg.nodes for t in x.outputs}
                for x in sg.nodes:
                    out.extend(t for t in x.inputs if isinstance(t, gs.Variable) and t.name and t.name not in inner)
                    stack.append(x)
    return out


def _all_inputs(node) -> list:
    return list(node.inputs) + (_outer_inputs(node) if _has_subgraph(node) else [])


def _units_of(sin, sout, consumers, producer, graph_outputs):
    """Split one state pair into rows when it is read by Gather(axis 0, constant row) and written by row Concat."""
    S = static_shape(sin)
    prod = producer.get(sout.name)
    if _shape(sout) != S:
        where = f"node {prod.name!r}" if prod is not None else "no node"
        raise ValueError(f"state output {sout.name!r} (written by {where}) has shape {_shape(sout)} but state input "
                         f"{sin.name!r} has {S}: a state must keep its shape from token to token")
    cons = consumers.get(sin.name, [])
    row_of = {}
    rows_ok = bool(S) and prod is not None and prod.op == "Concat" and sin.name not in graph_outputs
    if rows_ok:
        axis = int(prod.attrs.get("axis", 0))
        rows_ok = (axis == 0 or axis == -len(S)) and len(prod.inputs) == S[0] \
            and all((_shape(w) or [0])[:1] == [1] for w in prod.inputs)
    for n in cons if rows_ok else []:
        idx = _const_index(n.inputs[1]) if n.op == "Gather" and len(n.inputs) == 2 else None
        axis = int(n.attrs.get("axis", 0)) if n.op == "Gather" else None
        if idx is None or n.inputs[0] is not sin or axis not in (0, -len(S)) or not -S[0] <= idx < S[0]:
            rows_ok = False
            break
        row_of[id(n)] = idx % S[0]
    if not rows_ok:
        return [StateUnit(sin.name, sout.name, None, S, [sin] if cons else [], sout)]
    units = []
    for r in range(S[0]):
        w = prod.inputs[r]
        up = producer.get(w.name)
        if up is not None and up.op == "Reshape" and _shape(up.inputs[0]) == S[1:]:
            w = up.inputs[0]  # Reshape(x, [1, -1]) of a row-shaped x: the row is x itself
        reads = [n.outputs[0] for n in cons if row_of[id(n)] == r]
        units.append(StateUnit(sin.name, sout.name, r, list(S[1:]), reads, w))
    return units


def plan_batch(graph: gs.Graph, state_pairs, token_inputs=None) -> BatchPlan:
    """Find the state units, classify each as shift or recurrent, and the scan bodies; the graph is not modified."""
    if not graph.opset or graph.opset < 11:
        raise ValueError(f"graph opset {graph.opset}: token batching needs opset >= 11")
    g_inputs = {t.name: t for t in graph.inputs}
    g_outputs = {t.name: t for t in graph.outputs}
    state_ins = [a for a, _ in state_pairs]
    for a, b in state_pairs:
        if a not in g_inputs:
            raise ValueError(f"state input {a!r} is not a graph input (inputs: {sorted(g_inputs)})")
        if b not in g_outputs:
            raise ValueError(f"state output {b!r} is not a graph output (outputs: {sorted(g_outputs)})")
    if len(set(state_ins)) != len(state_ins) or len({b for _, b in state_pairs}) != len(state_pairs):
        raise ValueError(f"state pairs {state_pairs} name a tensor twice")
    others = [t.name for t in graph.inputs if t.name not in state_ins]
    if token_inputs is None:
        token = others
    else:
        bad = [n for n in token_inputs if n not in others]
        if bad:
            raise ValueError(f"token inputs {bad} are not non-state graph inputs (those are {others})")
        token = [n for n in others if n in token_inputs]
    shared = [n for n in others if n not in token]

    def missing_shapes(g):
        return [t.name for t in g.tensors().values()
                if isinstance(t, gs.Variable) and t.name and (static_shape(t) is None or t.dtype is None)]

    if missing_shapes(graph):
        graph = infer_shapes(graph.copy()).graph
        still = missing_shapes(graph)
        if still:
            raise ValueError(f"tensors {still[:5]} have no static shape/dtype; run passes.pipeline.normalize first")
        g_inputs = {t.name: t for t in graph.inputs}
        g_outputs = {t.name: t for t in graph.outputs}
    order = toposort(SimpleNamespace(nodes=list(graph.nodes))).nodes
    producer, consumers = {}, {}
    for n in order:
        for t in n.outputs:
            producer[t.name] = n
        for t in _all_inputs(n):
            if t.name:
                consumers.setdefault(t.name, []).append(n)

    units = []
    for a, b in state_pairs:
        units.extend(_units_of(g_inputs[a], g_outputs[b], consumers, producer, g_outputs))

    # bits[t] = the units whose value before the token tensor t depends on
    bits, read_of = {}, {}
    for i, u in enumerate(units):
        for r in u.reads:
            bits[r.name] = 1 << i
            read_of[r.name] = i
    for n in order:
        b = 0
        for t in _all_inputs(n):
            b |= bits.get(t.name, 0)
        if b:
            for t in n.outputs:
                if t.name not in read_of:
                    bits[t.name] = bits.get(t.name, 0) | b
    reach = [bits.get(u.write.name, 0) if isinstance(u.write, gs.Variable) else 0 for u in units]
    changed = True
    while changed:  # transitive closure over the (few) units
        changed = False
        for i in range(len(units)):
            r = reach[i]
            for j in range(len(units)):
                if r >> j & 1:
                    r |= reach[j]
            if r != reach[i]:
                reach[i], changed = r, True

    scans = []
    for i, u in enumerate(units):
        if not reach[i] >> i & 1:
            u.kind = "shift"
            continue
        u.kind = "recurrent"
        if u.scan is not None:
            continue
        group = [j for j in range(len(units)) if reach[i] >> j & 1 and reach[j] >> i & 1]
        for j in group:
            units[j].scan = len(scans)
        scans.append(Scan(group, _body(group, units, bits, read_of, producer, order)))

    for n in order:
        if _has_subgraph(n) or n.op in _RANDOM_OPS:
            where = next((s for s in scans if any(x is n for x in s.nodes)), None)
            if where is not None:
                labels = [units[j].label for j in where.units]
                raise ValueError(f"node {n.name!r} ({n.op}) is on the recurrence of state {labels}: the recurrence "
                                 "cannot be recognised as plain per-token ops (control flow or randomness); "
                                 "cannot unroll it")
            if n.op in _RANDOM_OPS:
                continue  # token-parallel randomness is only as reproducible as the source
            raise ValueError(f"node {n.name!r} ({n.op}) holds a subgraph; token batching does not handle subgraphs")
    return BatchPlan(graph, order, units, scans, token, shared)


def _body(group, units, bits, read_of, producer, order):
    """Nodes on a path from a read of the group's units to a write of one of them."""
    mask = 0
    for j in group:
        mask |= 1 << j
    body, seen = set(), set()
    stack = [units[j].write for j in group if isinstance(units[j].write, gs.Variable)]
    while stack:
        t = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        if t.name in read_of or not bits.get(t.name, 0) & mask:
            continue
        p = producer.get(t.name)
        if p is None or id(p) in body:
            continue
        body.add(id(p))
        stack.extend(x for x in _all_inputs(p) if isinstance(x, gs.Variable) and x.name)
    return [n for n in order if id(n) in body]


class _Batcher:
    def __init__(self, plan: BatchPlan, m: int):
        g = plan.graph
        self.plan, self.m = plan, m
        self.units = plan.units
        self.em = Emitter(m, g.opset, g.tensors().keys(), [n.name for n in g.nodes])
        for t in g.outputs:
            self.em.protect(t.name)
        self.producer = {t.name: n for n in plan.order for t in n.outputs}
        self.pos = {id(n): k for k, n in enumerate(plan.order)}
        self.read_of = {r.name: i for i, u in enumerate(self.units) for r in u.reads}
        self.scan_of = {t.name: k for k, s in enumerate(plan.scans) for n in s.nodes for t in n.outputs if t.name}
        self.env, self.consts = {}, {}
        self.steps, self.next_vals, self.init, self.final, self.block = {}, {}, {}, {}, {}
        self.t_index, self.slices = {}, {}
        self.inputs = {}
        state_ins = {u.state_in for u in self.units}
        for t in g.inputs:
            s = static_shape(t)
            if t.name in state_ins:
                self.inputs[t.name] = gs.Variable(self.em.claim(t.name), dtype=t.dtype, shape=s)
            elif t.name in plan.token_inputs:
                v = gs.Variable(self.em.claim(t.name), dtype=t.dtype, shape=[m] + s)
                self.inputs[t.name] = v
                self.env[t.name] = Val(v, True, s)
            else:
                v = gs.Variable(self.em.claim(t.name), dtype=t.dtype, shape=s)
                self.inputs[t.name] = v
                self.env[t.name] = Val(v, False, s)

    # ---- values -------------------------------------------------------------------------------------------
    def val(self, t) -> Val:
        if t is None or not t.name:
            return Val(None, False, [])
        if isinstance(t, gs.Constant):
            c = self.consts.get(t.name)
            if c is None:
                c = gs.Constant(t.name, t._values, data_location=t.data_location, export_dtype=t._export_dtype)
                self.consts[t.name] = c
            return Val(c, False, list(t.values.shape))
        v = self.env.get(t.name)
        if v is None and t.name in self.scan_of:
            v = self._stack_body(t, self.scan_of[t.name])
        if v is None:
            raise ValueError(f"internal: tensor {t.name!r} used before it was batched")
        return v

    def _stack_body(self, t, s):
        shape = _shape(t)
        out = gs.Variable(self.em.claim(t.name), dtype=t.dtype, shape=[self.m] + shape)
        self.em.stack([step[t.name] for step in self.steps[s]], shape, f"{t.name}__stack", out=out)
        self.env[t.name] = Val(out, True, shape)
        return self.env[t.name]

    def _index(self, t):
        if t not in self.t_index:
            self.t_index[t] = self.em.const(f"token_{t}", t)
        return self.t_index[t]

    # ---- items --------------------------------------------------------------------------------------------
    def item_of(self, t):
        if not isinstance(t, gs.Variable) or not t.name:
            return None
        if t.name in self.read_of:
            return ("read", self.read_of[t.name])
        if t.name in self.scan_of:
            return ("scan", self.scan_of[t.name])
        p = self.producer.get(t.name)
        return None if p is None else ("node", id(p))

    def deps(self, item):
        kind, k = item
        if kind == "node":
            ts = self.nodes[k].inputs
        elif kind == "read":
            u = self.units[k]
            if u.kind == "recurrent":
                return {("scan", u.scan)}
            ts = [u.write]
        else:
            s = self.plan.scans[k]
            inside = {t.name for n in s.nodes for t in n.outputs}
            carried = {r.name for j in s.units for r in self.units[j].reads}
            ts = [t for n in s.nodes for t in n.inputs if t.name not in inside and t.name not in carried]
        return {d for d in map(self.item_of, ts) if d is not None}

    def key(self, item):
        kind, k = item
        if kind == "node":
            return self.pos[k]
        if kind == "scan":
            return min(self.pos[id(n)] for n in self.plan.scans[k].nodes) if self.plan.scans[k].nodes else -1
        firsts = [self.pos[id(c)] for r in self.units[k].reads for c in self.consumers.get(r.name, [])]
        return min(firsts) - 0.5 if firsts else len(self.pos)

    def run(self) -> gs.Graph:
        plan, em, m = self.plan, self.em, self.m
        self.nodes = {id(n): n for n in plan.order}
        self.consumers = {}
        for n in plan.order:
            for t in n.inputs:
                self.consumers.setdefault(t.name, []).append(n)
        state_outs = {u.state_out for u in self.units}
        roots = [self.item_of(t) for t in plan.graph.outputs if t.name not in state_outs]
        roots += [self.item_of(u.write) for u in self.units if u.kind == "shift"]
        roots += [("scan", k) for k in range(len(plan.scans))]
        deps, stack = {}, [r for r in roots if r is not None]
        while stack:
            it = stack.pop()
            if it in deps:
                continue
            deps[it] = self.deps(it)
            stack.extend(d for d in deps[it] if d not in deps)
        users = {it: [] for it in deps}
        indeg = {it: len(d) for it, d in deps.items()}
        for it, ds in deps.items():
            for d in ds:
                users[d].append(it)
        ready = [(self.key(it), it) for it, n in indeg.items() if n == 0]
        heapq.heapify(ready)
        done = 0
        while ready:
            _, it = heapq.heappop(ready)
            done += 1
            self.emit(it)
            for u in users[it]:
                indeg[u] -= 1
                if indeg[u] == 0:
                    heapq.heappush(ready, (self.key(u), u))
        if done != len(deps):
            raise ValueError("internal: the batched graph would have a cycle")
        outputs = []
        for o in plan.graph.outputs:
            if o.name in state_outs:
                outputs.append(self.state_output(o))
                continue
            v, s = self.val(o), _shape(o)
            t = v.tensor if v.batched else em.expand(v.tensor, s, f"{o.name}__tokens")
            outputs.append(self.bind(t, o.name, o.dtype, [m] + s, outputs))
        g = plan.graph
        out = gs.Graph(nodes=em.nodes, inputs=[self.inputs[t.name] for t in g.inputs], outputs=outputs,
                       name=g.name, opset=g.opset, import_domains=g.import_domains, ir_version=g.ir_version)
        return out

    def bind(self, t, name, dtype, shape, taken):
        """A graph output named `name` holding `t`: `t` itself renamed, or an Identity of it."""
        inputs = {id(v) for v in self.inputs.values()}
        if isinstance(t, gs.Variable) and id(t) not in inputs and all(t is not x for x in taken):
            t.name = name
            return t
        out = gs.Variable(name, dtype=dtype, shape=list(shape))
        self.em.node("Identity", f"{name}__identity", [t], [out])
        return out

    # ---- emission -----------------------------------------------------------------------------------------
    def emit(self, item):
        kind, k = item
        if kind == "node":
            self.emit_node(self.nodes[k])
        elif kind == "read":
            self.emit_read(k)
        else:
            self.emit_scan(k)

    def emit_node(self, n):
        em, m = self.em, self.m
        if n.op in ("Shape", "Size") and len(n.inputs) == 1 and _shape(n.inputs[0]) is not None:
            s = np.array(_shape(n.inputs[0]), dtype=np.int64)
            if n.op == "Shape":
                rank = len(s)
                start, end = int(n.attrs.get("start", 0)), int(n.attrs.get("end", rank))
                value = s[start:end]
            else:
                value = np.array(int(np.prod(s)), dtype=np.int64)
            c = gs.Constant(em.claim(n.outputs[0].name), value)
            self.env[n.outputs[0].name] = Val(c, False, list(value.shape))
            return
        ins = [self.val(t) for t in n.inputs]
        batched = any(v.batched for v in ins if v.tensor is not None)
        outs = []
        for y in n.outputs:
            if not y.name:
                outs.append(gs.Variable.empty())
                continue
            s = _shape(y)
            var = gs.Variable(em.claim(y.name), dtype=y.dtype, shape=[m] + s if batched else s)
            outs.append(var)
            self.env[y.name] = Val(var, batched, s)
        if batched:
            batch_node(em, n, ins, outs, [_shape(y) if y.name else [] for y in n.outputs])
        else:
            em.node(n.op, n.name, [v.tensor if v.tensor is not None else gs.Variable.empty() for v in ins], outs,
                    n.attrs, n.domain, exact=True)

    def init_value(self, u):
        """The unit's value before the first token, shaped like the unit."""
        sin = self.inputs[u.state_in]
        if u.row is None:
            return sin
        return self.em.op("Gather", f"{u.label}__init", [sin, self._row_const(u)], sin.dtype, u.shape, {"axis": 0})

    def _row_const(self, u):
        return self.em.const(f"{u.state_in}__row{u.row}", u.row)

    def init_block(self, u):
        """The value before the first token as [1] + shape."""
        sin = self.inputs[u.state_in]
        if u.row is None:
            return self.em.reshape(sin, u.shape, [1] + u.shape, f"{u.label}__init")
        return self.em.slice0(sin, u.row, u.row + 1, static_shape(sin), f"{u.label}__init")

    def shift_block(self, i):
        """A shift unit's written values for all tokens as [M] + shape."""
        if i not in self.block:
            u, m, em = self.units[i], self.m, self.em
            w = self.val(u.write)
            t = w.tensor if w.batched else em.expand(w.tensor, w.shape, f"{u.label}__write")
            self.block[i] = em.reshape(t, [m] + w.shape, [m] + u.shape, f"{u.label}__write")
        return self.block[i]

    def emit_read(self, i):
        u, m, em = self.units[i], self.m, self.em
        S = u.shape
        if u.kind == "shift":
            init = self.init_block(u)
            if m > 1:
                prev = em.slice0(self.shift_block(i), 0, m - 1, [m] + S, f"{u.label}__prev")
                rows = em.op("Concat", f"{u.label}__shifted", [init, prev], init.dtype, [m] + S, {"axis": 0})
            else:
                rows = init
        else:
            rows = em.stack([self.init[i]] + self.next_vals[i][:m - 1], S, f"{u.label}__before")
        for r in u.reads:
            rs = _shape(r)
            t = em.reshape(rows, [m] + S, [m] + rs, f"{r.name}__read")
            if len(u.reads) == 1 and r.name not in self.inputs:
                em.rename(t, r.name)
            self.env[r.name] = Val(t, True, rs)

    def emit_scan(self, k):
        em, m = self.em, self.m
        sc = self.plan.scans[k]
        carry = {}
        for i in sc.units:
            carry[i] = self.init[i] = self.init_value(self.units[i])
            self.next_vals[i] = []
        slices, steps = self.slices, []
        for t in range(m):
            local = {}
            for i in sc.units:
                u = self.units[i]
                for r in u.reads:
                    local[r.name] = em.reshape(carry[i], u.shape, _shape(r), f"{r.name}__t{t}")
            for n in sc.nodes:
                ins = []
                for x in n.inputs:
                    if not x.name:
                        ins.append(gs.Variable.empty())
                    elif x.name in local:
                        ins.append(local[x.name])
                    else:
                        v = self.val(x)
                        if v.batched:
                            key = (x.name, t)
                            if key not in slices:
                                slices[key] = em.op("Gather", f"{x.name}__t{t}", [v.tensor, self._index(t)],
                                                    v.tensor.dtype, v.shape, {"axis": 0})
                            ins.append(slices[key])
                        else:
                            ins.append(v.tensor)
                outs = []
                for y in n.outputs:
                    if not y.name:
                        outs.append(gs.Variable.empty())
                        continue
                    var = em.var(f"{y.name}__t{t}", y.dtype, _shape(y))
                    local[y.name] = var
                    outs.append(var)
                em.node(n.op, f"{n.name}__t{t}", ins, outs, n.attrs, n.domain)
            for i in sc.units:
                u = self.units[i]
                w = local.get(u.write.name)
                if w is None:
                    raise ValueError(f"internal: recurrent state {u.label} written from outside its scan")
                nv = em.reshape(w, _shape(u.write), u.shape, f"{u.label}__t{t}")
                self.next_vals[i].append(nv)
                carry[i] = nv
            steps.append(local)
        self.steps[k] = steps
        self.final.update(carry)

    def state_output(self, o):
        em, m = self.em, self.m
        units = [(i, u) for i, u in enumerate(self.units) if u.state_out == o.name]
        pieces = []
        for i, u in units:
            if u.kind == "shift":
                last = em.slice0(self.shift_block(i), m - 1, m, [m] + u.shape, f"{u.label}__last")
            else:
                last = em.reshape(self.final[i], u.shape, [1] + u.shape, f"{u.label}__last")
            pieces.append(last)
        S = static_shape(o)
        if units[0][1].row is None:
            t = em.reshape(pieces[0], [1] + S, S, f"{o.name}__state")
        elif len(pieces) == 1:
            t = pieces[0]
        else:
            t = em.op("Concat", f"{o.name}__rows", pieces, o.dtype, S, {"axis": 0})
        return self.bind(t, o.name, o.dtype, S, [])


def _check_static(graph: gs.Graph) -> None:
    for n in graph.nodes:
        for t in n.outputs:
            if t.name and (t.dtype is None or static_shape(t) is None):
                raise ValueError(f"batched graph: tensor {t.name!r} of node {n.name!r} ({n.op}) has no static "
                                 f"shape/dtype after shape inference ({t.shape}, {t.dtype})")


def batch_tokens(graph: gs.Graph, m: int, state_pairs, token_inputs=None) -> PassResult:
    """The graph computing `m` tokens per run (a new graph; `graph`, a normalized single-token graph, is left
    untouched); its one note is the BatchPlan: which state parts are shifts, which are scans, and their bodies.

    state_pairs: (state input, state output) names; every other input is per token ([C] -> [m, C]) unless
    `token_inputs` lists the per-token ones (the rest are then the same for all tokens). Per-token outputs
    become [m, ...]; state outputs keep their shape and hold the state after the m-th token.
    Raises ValueError naming the node when a part of the graph cannot be batched.
    """
    m = int(m)
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    return batched_by(_Batcher, graph, m, state_pairs, token_inputs)


def batched_by(batcher: type, graph: gs.Graph, m: int, state_pairs, token_inputs=None) -> PassResult:
    """Plan the batching of `graph`, run `batcher(plan, m)` (_Batcher or a subclass) and finish the new graph:
    shapes inferred and static, no-op reshapes gone, sorted; its one note is the BatchPlan."""
    plan = plan_batch(graph, [tuple(p) for p in state_pairs], token_inputs)
    out = batcher(plan, m).run()
    toposort(out.cleanup())
    infer_shapes(out)
    _check_static(out)
    cancel_reshapes(out)
    return PassResult(toposort(out.cleanup()), (plan,), modified=True)
