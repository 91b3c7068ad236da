"""Run a module as the board would: with the compiler's packages unimportable.

    python tests/runtime_only.py MODULE ARGS...     (e.g. rwkv2rknn.run OUT --tokens 1,2 --max-tokens 4)

A meta-path finder refuses the compiler's imports (onnx, onnx-graphsurgeon, the rknn-toolkit2 simulator,
torch, jsonschema, passes/ and rwkv2rknn's compiler modules); at exit, any of them found in sys.modules
(imported before the finder, e.g. by a sitecustomize) fails the run too. Exit status 3 names the module.
"""

from __future__ import annotations

import importlib.abc
import runpy
import sys

BLOCKED_TOP = ("onnx", "onnx_graphsurgeon", "rknn", "torch", "jsonschema", "passes", "onnxsim",
               "onnxconverter_common", "rich", "tqdm")
BLOCKED_OURS = ("rwkv2rknn.split", "rwkv2rknn.build", "rwkv2rknn.cost", "rwkv2rknn.model", "rwkv2rknn.manifest",
                "rwkv2rknn.compile_worker", "rwkv2rknn.planner", "rwkv2rknn.families",
                "rwkv2rknn.deep", "rwkv2rknn.prefill", "rwkv2rknn.simulate",
                "rwkv2rknn.check", "rwkv2rknn.model_loop", "rwkv2rknn.cli", "rwkv2rknn.report",
                "rwkv2rknn.compiler_table", "rwkv2rknn.numerics")


def blocked(name: str) -> bool:
    top = name.split(".")[0]
    return top in BLOCKED_TOP or any(name == b or name.startswith(b + ".") for b in BLOCKED_OURS)


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if blocked(name):
            raise ImportError(f"runtime_only: {name} is the compiler's, not the runtime's", name=name)
        return None


def _check(when: str) -> None:
    bad = sorted(m for m in sys.modules if blocked(m))
    if bad:
        print(f"runtime_only: {when}: compiler modules imported: {', '.join(bad)}", file=sys.stderr)
        sys.exit(3)


def main() -> None:
    _check("before the run")
    sys.meta_path.insert(0, Refuse())
    module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    status = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    _check("after the run")
    sys.exit(status)


if __name__ == "__main__":
    main()
