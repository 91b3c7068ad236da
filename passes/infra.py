"""Pass infrastructure: one result type for every graph pass, and a manager that names the pass that failed.

A pass takes a gs.Graph (then its own arguments) and returns a PassResult: the graph (the same object rewritten
in place, or a new one), its notes (what it has to say: legalize's per-node Notes, the state rule's CPU nodes,
the token batching's plan) and whether it changed anything. A PassManager runs passes in order, gathers their
notes, and when one raises it raises PassError naming that pass (inside nested managers: the path to it) and the
passes that ran before it. Modelled on onnx-ir's pass infrastructure (PassResult, PassManager, PassError).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from passes.graphutil import toposort


@dataclass(frozen=True)
class PassResult:
    graph: gs.Graph
    notes: tuple = ()
    modified: bool = field(kw_only=True)


Pass = Callable[[gs.Graph], PassResult]


class PassError(RuntimeError):
    """A pass run by a PassManager raised. `path`: the failing pass, outermost pipeline first; `cause`: what it
    raised; `done`: the passes of the innermost pipeline that ran before it."""

    def __init__(self, path: tuple[str, ...], cause: BaseException, done: tuple[str, ...] = ()):
        self.path, self.cause, self.done = tuple(path), cause, tuple(done)
        super().__init__(f"pass {' > '.join(self.path)} failed: {cause}")

    @property
    def name(self) -> str:
        """The pass that raised (the innermost one)."""
        return self.path[-1]


def pass_name(p) -> str:
    if isinstance(p, functools.partial):
        return pass_name(p.func)
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


class bind:  # noqa: N801 (used like a function: bind(fix_input_shapes, shapes))
    """A pass with its arguments after the graph fixed, keeping the pass's name (or `name`)."""

    def __init__(self, fn: Callable[..., PassResult], *args, name: str | None = None, **kwargs):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.name = name or pass_name(fn)

    def __call__(self, graph: gs.Graph) -> PassResult:
        return self.fn(graph, *self.args, **self.kwargs)

    def __repr__(self) -> str:
        return f"bind({self.name})"


class PassManager:
    """Run `passes` in order on a graph; one PassResult with every pass's notes, modified if any pass was."""

    def __init__(self, passes: Sequence[Pass], name: str = "pipeline"):
        self.passes = list(passes)
        self.name = name

    def __call__(self, graph: gs.Graph) -> PassResult:
        notes: list = []
        modified = False
        done: list[str] = []
        for p in self.passes:
            name = pass_name(p)
            try:
                result = p(graph)
            except PassError as exc:  # a nested pipeline: keep the path to the pass that raised
                path = exc.path if exc.path[:1] == (name,) else (name, *exc.path)
                raise PassError((self.name, *path), exc.cause, exc.done) from exc.cause
            except Exception as exc:
                raise PassError((self.name, name), exc, tuple(done)) from exc
            if not isinstance(result, PassResult):
                raise PassError((self.name, name), TypeError(f"returned {type(result).__name__}, not a PassResult"),
                                tuple(done))
            graph = result.graph
            notes.extend(result.notes)
            modified = modified or result.modified
            done.append(name)
        return PassResult(graph, tuple(notes), modified=modified)

    def __repr__(self) -> str:
        return f"PassManager({self.name}: {', '.join(pass_name(p) for p in self.passes)})"


def wiring(graph: gs.Graph) -> tuple:
    """The graph's nodes in order, the tensors they read and write, its inputs and outputs (and which tensors are
    constants): compare two with `same_wiring` to tell whether a rewrite changed the graph."""
    tensors = [t for n in graph.nodes for t in (*n.inputs, *n.outputs)] + list(graph.inputs) + list(graph.outputs)
    return (list(graph.nodes), tensors, [isinstance(t, gs.Constant) for t in tensors])


def same_wiring(a: tuple, b: tuple) -> bool:
    return all(len(x) == len(y) and all(p is q if not isinstance(p, bool) else p == q for p, q in zip(x, y))
               for x, y in zip(a, b))


def sort(graph: gs.Graph) -> PassResult:
    """Stable topological sort (passes.graphutil.toposort) as a pass."""
    before = list(graph.nodes)
    toposort(graph)
    return PassResult(graph, modified=len(before) != len(graph.nodes) or any(
        a is not b for a, b in zip(before, graph.nodes)))


def tidy(graph: gs.Graph) -> PassResult:
    """Remove what no output needs (gs cleanup), then sort."""
    before = wiring(graph)
    toposort(graph.cleanup())
    return PassResult(graph, modified=not same_wiring(before, wiring(graph)))
