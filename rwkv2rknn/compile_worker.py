"""The only code that calls the RKNN compiler: load one segment ONNX, build it, export or simulate it.

`build` runs it in a child process (see rwkv2rknn/build.py) so a compiler crash cannot kill the
build; the rknn-sim runner calls `compile_segment` in-process because the simulator can only run
a model built in the same RKNN object.
"""

from __future__ import annotations

import contextlib
import os
import sys

PRECISIONS = ("fp16", "w8a8")


def toolkit_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("rknn-toolkit2")
    except Exception:  # noqa: BLE001
        return None


@contextlib.contextmanager
def quiet_fds(enabled: bool = True, fds: tuple[int, ...] = (1,)):
    """The toolkit prints banners and per-step logs on the raw file descriptors; hide them.

    Builds hide stdout only (their errors on stderr land in the worker's log); the simulator runner
    hides both, since its first-inference banners go to either.
    """
    if not enabled:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, keep in zip(fds, saved):
            os.dup2(keep, fd)
        for fd in saved + [devnull]:
            os.close(fd)


class CompileError(RuntimeError):
    """The toolkit returned a failure code for one step."""


def compile_segment(onnx_path, target: str = "rk3588", precision: str = "fp16", dataset: str | None = None,
                    rknn_out: str | None = None, for_simulator: bool = False, verbose: bool = False,
                    quiet: bool = True):
    """Build one ONNX segment with rknn-toolkit2.

    Returns the live RKNN object when `for_simulator` (runtime initialised on the x86 simulator;
    the caller releases it), otherwise releases it and returns None. Raises CompileError on a
    failure return code.
    """
    from rknn.api import RKNN  # imported late: heavy, and absent on machines that only run models

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    if precision == "w8a8":  # the quantizer wants fp32 boundaries (passes.fp16_io.fp32_boundary says why)
        onnx_path = _fp32_boundary_copy(onnx_path)
    with quiet_fds(quiet and not verbose):
        rknn = RKNN(verbose=verbose)
    ok = False
    try:
        with quiet_fds(quiet and not verbose):
            if rknn.config(target_platform=target) != 0:
                raise CompileError(f"config(target_platform={target!r}) failed")
            if rknn.load_onnx(model=str(onnx_path)) != 0:
                raise CompileError(f"load_onnx({onnx_path}) failed")
            quant = precision == "w8a8"
            if quant and not dataset:
                raise CompileError("w8a8 needs a calibration dataset")
            ret = rknn.build(do_quantization=quant, dataset=dataset if quant else None)
            if ret != 0:
                raise CompileError(f"build failed (return {ret})")
            if rknn_out is not None and rknn.export_rknn(str(rknn_out)) != 0:
                raise CompileError(f"export_rknn({rknn_out}) failed")
            if for_simulator and rknn.init_runtime() != 0:
                raise CompileError("init_runtime() on the simulator failed")
        ok = True
        return rknn if for_simulator else None
    finally:
        if not (ok and for_simulator):
            with quiet_fds(quiet and not verbose):
                rknn.release()


def _fp32_boundary_copy(onnx_path):
    """The segment with fp32 boundaries, beside it (a temporary file the toolkit reads), when it has fp16 ones."""
    import tempfile
    from pathlib import Path

    import onnx

    from passes.fp16_io import fp32_boundary

    model = onnx.load(str(onnx_path))
    fp16 = onnx.TensorProto.FLOAT16
    if not any(v.type.tensor_type.elem_type == fp16 for v in list(model.graph.input) + list(model.graph.output)):
        return onnx_path
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(onnx_path).stem}.", suffix=".fp32io.onnx")
    os.close(fd)
    onnx.save(fp32_boundary(model), tmp)
    return tmp


def as_model_dtypes(arrays: list, precision: str) -> list:
    """Inputs for a model compiled at `precision`: a w8a8 model takes fp32 where the segment declares fp16."""
    import numpy as np

    if precision != "w8a8":
        return list(arrays)
    return [np.asarray(a, np.float32) if np.asarray(a).dtype == np.float16 else a for a in arrays]


# -- the child-process side of `rwkv2rknn build` --------------------------------------------------
# `python -m rwkv2rknn.compile_worker JOB.json`: compile one segment, optionally verify it in the
# simulator against onnxruntime fp32, and write RESULT.json. The parent reads the exit status: a
# negative one (a signal) or a timeout means the compiler died, and the parent bisects.

INJECT_CRASH_ENV = "RWKV2RKNN_INJECT_CRASH"


def _die_with_parent(parent_pid: int | None) -> None:
    """A build killed with SIGKILL must not leave compilers running: ask the kernel to kill us too."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, 9)
    except Exception:  # noqa: BLE001 (not Linux: the orphan finishes its compile and exits)
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(3)  # the parent died before prctl took effect


def load_samples(path) -> list[dict]:
    """Samples stored by `save_samples`: a list of {input name: array}."""
    import numpy as np

    samples: dict[int, dict] = {}
    with np.load(path) as z:
        for key in z.files:
            i, _, name = key.partition(":")
            samples.setdefault(int(i), {})[name] = z[key]
    return [samples[i] for i in sorted(samples)]


def save_samples(path, samples: list[dict]) -> None:
    import numpy as np

    flat = {f"{i}:{name}": np.asarray(arr) for i, feed in enumerate(samples) for name, arr in feed.items()}
    with open(path, "wb") as f:
        np.savez(f, **flat)


def write_dataset(directory, samples: list[dict], order: list[str]):
    """rknn-toolkit2's dataset.txt: one sample per line, its inputs' .npy paths space-separated."""
    import numpy as np
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, feed in enumerate(samples):
        paths = []
        for k, n in enumerate(order):
            p = directory / f"{i}_{k}.npy"
            a = np.asarray(feed[n])  # the quantizer reads fp32 (the model it quantizes has fp32 boundaries)
            np.save(p, np.ascontiguousarray(a.astype(np.float32) if a.dtype == np.float16 else a))
            paths.append(str(p.resolve()))
        lines.append(" ".join(paths))
    ds = directory / "dataset.txt"
    ds.write_text("\n".join(lines) + "\n")
    return ds.resolve()


def verify_segment(rknn, onnx_path, samples: list[dict], precision: str = "fp16") -> dict:
    """Run the simulator and onnxruntime fp32 on the same inputs; the manifest's `verify` entry.

    Per output the worst cosine, max abs difference and rel_l2 (see rwkv2rknn/numerics.py); the
    segment's figure is its worst output, named with its scale.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    from rwkv2rknn.numerics import compare_outputs, summarize

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    in_names = [v.name for v in model.graph.input if v.name not in inits]
    out_names = [v.name for v in model.graph.output]
    out_shapes = []
    for v in model.graph.output:
        dims = v.type.tensor_type.shape.dim
        out_shapes.append([d.dim_value for d in dims] if all(d.HasField("dim_value") for d in dims) else None)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    stats: dict = {}
    for feed in samples:
        feed = {n: np.ascontiguousarray(feed[n]) for n in in_names}
        ref = sess.run(None, feed)
        # "nchw" for every input: the ONNX layout as is, so the toolkit transposes nothing.
        got = rknn.inference(inputs=as_model_dtypes([feed[n] for n in in_names], precision),
                             data_format=["nchw"] * len(in_names))
        if got is None or len(got) != len(ref):
            raise CompileError("simulator inference returned no outputs")
        shaped = []
        for r, g, shape in zip(ref, got, out_shapes):
            g = np.asarray(g, dtype=np.float32)
            if g.size != r.size:
                raise CompileError(f"simulator output has {g.size} values, onnxruntime {r.size}")
            shaped.append(g.reshape(shape if shape is not None else r.shape))
        compare_outputs(shaped, ref, out_names, [feed[n] for n in in_names], precision, stats)
    return summarize(stats)


# Written to the log before each compile: the compiler table of the last build follows the last marker.
BUILD_MARKER = "rwkv2rknn: building precision="


def _build_and_verify(job: dict, precision: str) -> dict:
    print(f"{BUILD_MARKER}{precision}", flush=True)
    verify = job.get("verify_inputs")
    rknn = compile_segment(job["onnx"], target=job["target"], precision=precision,
                           dataset=job.get("dataset"), rknn_out=job["rknn_out"],
                           for_simulator=bool(verify), verbose=bool(job.get("verbose")), quiet=False)
    if not verify:
        return {"precision": precision, "verify": None}
    try:
        return {"precision": precision, "verify": verify_segment(rknn, job["onnx"], load_samples(verify), precision)}
    finally:
        rknn.release()


def run_job(job: dict) -> dict:
    """Compile (and verify) the segment a job file describes; the result dict for the parent.

    With `max_rel_l2` and a quantized precision, a segment that loses more than that in the simulator
    is built again in fp16 (mixed precision per segment), and the result says why.
    """
    import time

    t0 = time.perf_counter()
    result = {"ok": True, **_build_and_verify(job, job["precision"])}
    limit = job.get("max_rel_l2")
    v = result["verify"]
    if job["precision"] != "fp16" and limit is not None and v is not None and not v["rel_l2"] <= limit:
        why = (f"{job['precision']} rel_l2 {v['rel_l2']:.3g} > {limit:g} on output {v.get('worst_output')} "
               "in the simulator; built fp16 instead")
        print(f"rwkv2rknn: {why}", flush=True)
        result = {"ok": True, **_build_and_verify(job, "fp16"), "precision_reason": why,
                  "rejected": {"precision": job["precision"], "verify": v}}
    result["seconds"] = time.perf_counter() - t0
    return result


def _write_result(path, result: dict) -> None:
    import json

    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    import json
    import signal
    import traceback

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m rwkv2rknn.compile_worker JOB.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        job = json.load(f)
    _die_with_parent(job.get("parent_pid"))
    crash = os.environ.get(INJECT_CRASH_ENV)
    if crash and crash in job["id"]:
        # Test hook: behave like the 2023 compiler on this segment.
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGSEGV)
    try:
        result = run_job(job)
    except Exception as exc:  # noqa: BLE001 (a failure return code or a toolkit exception: the parent bisects)
        traceback.print_exc()
        _write_result(job["result"], {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    _write_result(job["result"], result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
