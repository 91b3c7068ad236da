"""Layering runs one way: the imports of the packages (read with ast, function-level imports included) obey it.

- passes/ is the pure compiler: it never imports rwkv2rknn.
- rwkv2rknn/cost/ and rwkv2rknn/build/ sit below the split driver (rwkv2rknn/split.py) and beside the runtime
  (rwkv2rknn/run/): they import neither, directly or through any module they import. What the build needs of the
  runtime comes from its caller (rwkv2rknn/verify: build_manifest(..., runtime=RUNTIME)).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOP = ("passes", "rwkv2rknn")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for top in TOP for p in sorted((REPO / top).rglob("*.py"))}


MODULES = _modules()


def imports_of(path: Path, source: str | None = None) -> list[tuple[str, int]]:
    """(module imported, line) for every import statement of a file, at any depth, resolved to this repo's modules
    where it names one (`from rwkv2rknn import policies` -> rwkv2rknn.policies)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from package, up level - 1
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names if f"{base}.{a.name}" in MODULES]
    return out


def _in(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _violations(start: str, forbidden: tuple[str, ...], imports=imports_of) -> list[str]:
    """Import chains from the modules under `start` to a forbidden module (through this repo's modules)."""
    found = []
    roots = [m for m in MODULES if _in(m, start)]
    seen: dict[str, list[str]] = {}
    queue = [(m, [f"{m}"]) for m in roots]
    while queue:
        mod, chain = queue.pop()
        if mod in seen:
            continue
        seen[mod] = chain
        for target, line in imports(MODULES[mod]):
            step = chain + [f"{target} ({MODULES[mod].relative_to(REPO)}:{line})"]
            if any(_in(target, f) for f in forbidden):
                found.append(" -> ".join(step))
            elif target in MODULES and target not in seen:
                queue.append((target, step))
    return found


def test_passes_never_import_rwkv2rknn():
    bad = [f"{p.relative_to(REPO)}:{line}: {mod}" for p in sorted((REPO / "passes").rglob("*.py"))
           for mod, line in imports_of(p) if _in(mod, "rwkv2rknn")]
    assert not bad, "passes/ is the pure compiler; it imports rwkv2rknn:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", ["rwkv2rknn.cost", "rwkv2rknn.build"])
def test_cost_and_build_import_neither_the_split_driver_nor_the_runtime(package):
    bad = _violations(package, ("rwkv2rknn.split", "rwkv2rknn.run"))
    assert not bad, f"{package} reaches the split driver or the runtime:\n" + "\n".join(bad)


def test_the_walk_finds_a_violation():
    """The check can fail: a module of cost/ importing, inside a function, a module that imports the split driver is
    caught, with the chain that leads there."""
    planted = REPO / "rwkv2rknn" / "cost" / "plan.py"
    source = planted.read_text() + "\n\ndef _late():\n    from rwkv2rknn.preview import features_plan\n\n    return 1\n"

    def imports(path):
        return imports_of(path, source) if path == planted else imports_of(path)

    bad = _violations("rwkv2rknn.cost", ("rwkv2rknn.split", "rwkv2rknn.run"), imports)
    # the chain may reach cost/plan.py through another module of cost/ first (the walk records one chain per module)
    assert any("-> rwkv2rknn.preview (rwkv2rknn/cost/plan.py:" in b
               and "-> rwkv2rknn.split (rwkv2rknn/preview.py:" in b for b in bad), bad
