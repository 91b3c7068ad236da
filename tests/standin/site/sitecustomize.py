"""Test-only: make the stand-in librknnrt compute models with onnxruntime inside a subprocess.

When RKNN_STANDIN_MAP names a JSON file {rknn path: onnx path, ...}, this loads the library that
LIBRKNNRT_PATH names and registers onnxruntime-backed hooks for those models. dlopen hands the
runtime the same library handle later, so the hooks registered here are the ones its calls see.
A test enables it by putting tests/standin/site on PYTHONPATH.
"""

import os

if os.environ.get("RKNN_STANDIN_MAP"):
    import importlib.util
    import json
    import sys

    _hooks_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hooks.py")
    _spec = importlib.util.spec_from_file_location("rknn_standin_hooks", _hooks_py)
    _hooks = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _hooks
    _spec.loader.exec_module(_hooks)
    _lib = _hooks.standin(os.environ["LIBRKNNRT_PATH"])
    with open(os.environ["RKNN_STANDIN_MAP"]) as _f:
        _hooks.register_onnx_map(_lib, json.load(_f))
    if os.environ.get("RKNN_STANDIN_FAIL"):  # "function:code": every call of it fails with that code
        _fn, _code = os.environ["RKNN_STANDIN_FAIL"].rsplit(":", 1)
        _lib.set_fail(_fn, int(_code), -1)
