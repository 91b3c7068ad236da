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
            np.save(p, np.ascontiguousarray(feed[n]))
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
        got = rknn.inference(inputs=[feed[n] for n in in_names], data_format=["nchw"] * len(in_names))
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


HEAVY_SHARE = 4  # hybrid: a Conv keeps int8 weights when they are at least 1/4 of the largest Conv's


def compile_hybrid(onnx_path, target: str, dataset: str, rknn_out: str | None = None, for_simulator: bool = False,
                   verbose: bool = False, quiet: bool = True):
    """w8a8 where it pays, fp16 elsewhere: the heavy MatMuls (Convs) keep int8 weights and activations, every
    other layer (LoRA MatMuls, norms, the elementwise ops) is built float16, through rknn-toolkit2's
    hybrid_quantization_step1/2 (its `custom_quantize_layers`, which take float16 only).

    Returns (the RKNN object if for_simulator else None, {"int8_weight_share": fraction of the weight bytes
    kept int8, "fp16_layers": how many layers went fp16}). Writes its step files into the working directory.
    """
    import glob

    import numpy as np
    import onnx
    from rknn.api import RKNN

    with quiet_fds(quiet and not verbose):
        first = RKNN(verbose=verbose)
        try:
            if first.config(target_platform=target) != 0 or first.load_onnx(model=str(onnx_path)) != 0:
                raise CompileError(f"hybrid: could not load {onnx_path}")
            if first.hybrid_quantization_step1(dataset=dataset, proposal=False) != 0:
                raise CompileError("hybrid_quantization_step1 failed")
        finally:
            first.release()
    stem = os.path.splitext(os.path.basename(str(onnx_path)))[0]
    cfgs = sorted(glob.glob(f"{stem}.quantization.cfg"), key=os.path.getmtime)
    if not cfgs:
        raise CompileError(f"hybrid_quantization_step1 wrote no {stem}.quantization.cfg")
    cfg = cfgs[-1]
    model = onnx.load(f"{stem}.model", load_external_data=False)
    inits = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    convs = [(n, inits.get(n.input[1], 0)) for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1]
    largest = max((w for _, w in convs), default=0)
    heavy = {id(n) for n, w in convs if largest and w * HEAVY_SHARE >= largest}
    keep16 = [n.output[0] for n in model.graph.node if n.op_type != "exDataConvert" and id(n) not in heavy]
    int8_bytes = sum(w for n, w in convs if id(n) in heavy)
    all_bytes = sum(inits.values()) or 1
    text = open(cfg).read()
    layers = "custom_quantize_layers:\n" + "".join(f"    {name}: float16\n" for name in keep16)
    if "custom_quantize_layers: {}" not in text:
        raise CompileError(f"{cfg}: no empty custom_quantize_layers to fill")
    with open(cfg, "w") as f:
        f.write(text.replace("custom_quantize_layers: {}\n", layers, 1))
    with quiet_fds(quiet and not verbose):
        rknn = RKNN(verbose=verbose)
    ok = False
    try:
        with quiet_fds(quiet and not verbose):
            if rknn.hybrid_quantization_step2(model_input=f"{stem}.model", data_input=f"{stem}.data",
                                              model_quantization_cfg=cfg) != 0:
                raise CompileError("hybrid_quantization_step2 failed")
            if rknn_out is not None and rknn.export_rknn(str(rknn_out)) != 0:
                raise CompileError(f"export_rknn({rknn_out}) failed")
            if for_simulator and rknn.init_runtime() != 0:
                raise CompileError("init_runtime() on the simulator failed")
        ok = True
        info = {"int8_weight_share": round(int8_bytes / all_bytes, 6), "fp16_layers": len(keep16)}
        return (rknn if for_simulator else None), info
    finally:
        if not (ok and for_simulator):
            with quiet_fds(quiet and not verbose):
                rknn.release()


def _build_and_verify(job: dict, precision: str, hybrid: bool = False) -> dict:
    print(f"{BUILD_MARKER}{precision}{' hybrid' if hybrid else ''}", flush=True)
    verify = job.get("verify_inputs")
    info = {}
    if hybrid:
        rknn, info = compile_hybrid(job["onnx"], job["target"], job["dataset"], rknn_out=job["rknn_out"],
                                    for_simulator=bool(verify), verbose=bool(job.get("verbose")), quiet=False)
    else:
        rknn = compile_segment(job["onnx"], target=job["target"], precision=precision,
                               dataset=job.get("dataset"), rknn_out=job["rknn_out"],
                               for_simulator=bool(verify), verbose=bool(job.get("verbose")), quiet=False)
    out = {"precision": precision, **({"hybrid": info} if hybrid else {})}
    if not verify:
        return {**out, "verify": None}
    try:
        return {**out, "verify": verify_segment(rknn, job["onnx"], load_samples(verify), precision)}
    finally:
        rknn.release()


def run_job(job: dict) -> dict:
    """Compile (and verify) the segment a job file describes; the result dict for the parent.

    w8a8 is built hybrid (compile_hybrid): the heavy MatMuls int8, every other layer fp16. A whole-segment w8a8
    model also quantizes the segment's outputs to int8 (the toolkit changes their dtype "for performance"): the
    residual stream and the logits came back in 256 levels, and the trained RWKV-7 fixture's argmax agreement
    fell to 96% with w8a8 heads against 98.5% hybrid. `job["w8a8_plain"]` asks for the whole-segment model
    first (hybrid next if it loses too much). With `max_rel_l2`, a segment that still loses more than that in the
    simulator is built fp16 (mixed precision per segment); the result says why.
    """
    import time

    t0 = time.perf_counter()
    quantized = job["precision"] != "fp16"
    ladder = ([False, True] if job.get("w8a8_plain") else [True]) if quantized else [False]
    limit = job.get("max_rel_l2")
    result, rejected = None, []
    for hybrid in ladder:
        try:
            got = {"ok": True, **_build_and_verify(job, job["precision"], hybrid=hybrid)}
        except CompileError as exc:
            if not hybrid:
                raise
            print(f"rwkv2rknn: hybrid build failed ({exc})", flush=True)
            rejected.append(f"hybrid failed ({exc})")
            continue
        v = got["verify"]
        if limit is None or v is None or v["rel_l2"] <= limit:
            result = got
            break
        what = "hybrid" if hybrid else job["precision"]
        rejected.append(f"{what} rel_l2 {v['rel_l2']:.3g} > {limit:g} on output {v.get('worst_output')}")
        result = None
    if result is None:  # every quantized variant lost too much (or the toolkit refused it): fp16
        why = "; ".join(rejected) + " in the simulator; built fp16 instead"
        print(f"rwkv2rknn: {why}", flush=True)
        result = {"ok": True, **_build_and_verify(job, "fp16"), "precision_reason": why}
    elif rejected:
        h = result.get("hybrid") or {}
        why = "; ".join(rejected) + (f"; built hybrid: heavy MatMuls int8 ({100 * h.get('int8_weight_share', 0):.0f}% "
                                     f"of the weights), {h.get('fp16_layers')} layers fp16" if h else "")
        result["precision_reason"] = why
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
