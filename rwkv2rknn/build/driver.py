"""`build_manifest`: compile what changed, verify each segment and the whole model, record it all in the manifest."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from passes.placement import TARGETS
from rwkv2rknn.build.inputs import (
    MIN_CHECK_TOKENS,
    calib_tokens,
    random_samples,
    Runtime,
    say,
    trace,
)
from rwkv2rknn.build.jobs import BUILD_KEYS, KEPT_FP16, Builder, SegmentResult, Task, build_key, segment_precision
from rwkv2rknn.compile_worker import PRECISIONS, toolkit_version
from rwkv2rknn.errors import UserError
from rwkv2rknn.fsio import sha256_file
from rwkv2rknn.manifest import DEFAULT_OUT, MANIFEST_NAME, Manifest
from rwkv2rknn.numerics import WARN_LOGITS_COSINE, WARN_REL_L2
from rwkv2rknn.options import BuildOptions

RKNN_TARGETS = TARGETS  # rknn-toolkit2 2.5.0's target_platform values: one list for split and build
# Segments are verified on the activations of this many tokens of real text (whole models; the
# calibration text) or on this many random input sets (single graphs).
VERIFY_TOKENS = 8
INSTALL_HINT = ("rknn-toolkit2 is not installed (it compiles the NPU segments); run `make setup`, or "
                "`pip install rknn-toolkit2` on x86_64/aarch64 Linux (see README)")


@dataclass
class BuildReport:
    target: str
    precision: str
    toolkit: str
    results: list = field(default_factory=list)
    compiles: int = 0  # child compiler processes started
    warnings: list = field(default_factory=list)
    wall: float = 0.0
    verify_model: dict | None = None
    probe_results: list = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    def _verified(self):
        return [r.verify for r in self.results if r.verify and r.status in ("built", "cached")]

    @property
    def cosine_min(self) -> float | None:
        vals = [v["cosine"] for v in self._verified() if "cosine" in v]
        return min(vals) if vals else None

    @property
    def worst(self) -> tuple[str, dict] | None:
        """(segment id, verify entry) of the segment with the largest rel_l2."""
        rows = [(r.id, r.verify) for r in self.results
                if r.verify and r.status in ("built", "cached") and "rel_l2" in r.verify]
        return max(rows, key=lambda x: x[1]["rel_l2"]) if rows else None

    @property
    def kept_fp16(self) -> int:
        """Segments a w8a8 build kept fp16 because the user asked (--w8a8-keep-fp16)."""
        return sum(1 for r in self.results if r.status in ("built", "cached") and (r.reason or "").startswith(KEPT_FP16))

    @property
    def precisions(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            if r.status in ("built", "cached") and r.precision:
                out[r.precision] = out.get(r.precision, 0) + 1
        return out


def check_toolkit() -> str:
    """The installed rknn-toolkit2 version, or a UserError saying how to install it."""
    import importlib.util

    version = toolkit_version()
    try:
        found = importlib.util.find_spec("rknn") is not None
    except (ImportError, ValueError):
        found = False
    if not found or version is None:
        raise UserError(INSTALL_HINT)
    return version


@contextlib.contextmanager
def _exclusive(rknn_dir: Path, out: Path):
    rknn_dir.mkdir(parents=True, exist_ok=True)
    with open(rknn_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{out}: another `rwkv2rknn build` is running on this directory; "
                            "wait for it to finish") from None
        yield


class _Saver:
    """Save the manifest atomically when it changed since the last save (validation costs ~0.1 s)."""

    def __init__(self, m: Manifest, snapshot: str):
        self.m, self.last = m, snapshot

    def __call__(self) -> None:
        now = json.dumps(self.m.data, sort_keys=True)
        if now != self.last:
            self.m.save()
            self.last = now


def _is_current(m: Manifest, seg: dict, key: str, verify: bool) -> bool:
    if seg.get("build_key") != key or "rknn" not in seg or "rknn_sha256" not in seg:
        return False
    if verify and "verify" not in seg:
        return False  # never ship a segment whose numbers were not checked
    if verify and "rel_l2" not in seg["verify"]:
        return False  # verified by an older rwkv2rknn without the well-conditioned metric
    f = m.resolve(seg["rknn"])
    return f.exists() and sha256_file(f) == seg["rknn_sha256"]


def _write_probes(m: Manifest) -> list[dict]:
    """The board-calibration probe models as segment-like entries (files under rknn/probes/)."""
    import onnx

    from rwkv2rknn.cost.calibrate import probe_models

    d = m.root / "rknn" / "probes"
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for name, model in probe_models().items():
        path = d / f"probe.{name}.onnx"
        onnx.save(model, str(path))

        def spec(v):
            return {"name": v.name, "dtype": "float32", "shape": [x.dim_value for x in v.type.tensor_type.shape.dim]}

        out.append({"id": f"probe.{name}", "backend": "npu", "onnx": m.relative(path), "sha256": sha256_file(path),
                    "inputs": [spec(v) for v in model.graph.input], "outputs": [spec(v) for v in model.graph.output]})
    return out


def _predict_core_masks(m: Manifest) -> None:
    """The board runner's default core mask per NPU segment: the faster one predicted with the compiler's table."""
    from rwkv2rknn.cost.estimate import price_segment
    from rwkv2rknn.cost.profile import load_profile

    try:
        profile = load_profile(m.data.get("board") or "rk3588")
    except UserError:
        profile = load_profile("rk3588")
    for _, seg in m.segments():
        if seg.get("parallel"):
            continue  # an N-split piece is pinned to its own core
        if seg["backend"] == "npu" and isinstance(seg.get("cost"), dict) and seg.get("compiler"):
            try:
                mask = price_segment(seg["cost"], profile, "npu", 1, seg["compiler"], seg.get("precision", "fp16")).core_mask
            except (KeyError, TypeError, ValueError):
                continue  # features of another rwkv2rknn version: keep what split predicted
            if mask is not None:
                seg["core_mask"] = mask


def _check_inputs(path: Path, m: Manifest) -> None:
    for _, seg in m.segments():
        f = m.resolve(seg["onnx"])
        if not f.exists():
            raise UserError(f"{path}: segment {seg['id']} names {seg['onnx']}, which is missing; "
                            "run `rwkv2rknn split` again")
        if "sha256" in seg and sha256_file(f) != seg["sha256"]:  # never compile something else
            raise UserError(f"{f}: sha256 differs from {path.name} (file altered or partly copied); "
                            "copy it again, or run `rwkv2rknn split` again")


def build_manifest(out_dir: str | Path = DEFAULT_OUT, options: BuildOptions | None = None, *,
                   runtime: Runtime | None, **overrides) -> BuildReport:
    """Compile every NPU segment of OUT/manifest.json into OUT/rknn/<id>.rknn and record it in the manifest.

    `options` (rwkv2rknn/options.py; default BuildOptions()); keyword `overrides` replace its fields.
    `runtime`: what the build needs of the runtime (rwkv2rknn.verify.RUNTIME: segment-input traces, the whole-model
    check, tokenizers), given by the caller since build/ never imports the runtime; None: segments are verified on
    random inputs, text needs token ids, and there is no whole-model check.
    Each built segment is verified in the simulator on real activations; a whole model is then run
    on a text through the simulator chain and onnxruntime fp32 (`build.verify_model`). With w8a8, a
    segment whose simulator rel_l2 exceeds `max_rel_l2` (default: the w8a8 warning bound) is built fp16, and
    so is every segment whose id matches a `keep_fp16` pattern (fnmatch, e.g. "head.*").
    `probes`: for a whole model, also build the small models `python -m rwkv2rknn.run --calibrate` times on
    the board (rknn/probe.*.rknn, listed in build.probes).
    """
    t0 = time.perf_counter()
    opts = replace(options or BuildOptions(), **overrides)
    target, precision, calib, verify, timeout = opts.target, opts.precision, opts.calib, opts.verify, opts.timeout
    if target not in RKNN_TARGETS:
        raise UserError(f"--target {target!r}: unknown; choose one of {', '.join(RKNN_TARGETS)}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if timeout <= 0:
        raise UserError(f"--timeout {timeout:g}: must be positive")
    out = Path(out_dir)
    path = out / MANIFEST_NAME if not out.name.endswith(".json") else out
    if not path.exists():
        raise UserError(f"{path}: no manifest here; run `rwkv2rknn split MODEL -o {path.parent}` first")
    m = Manifest.load(path, check_files=False)
    snapshot = json.dumps(m.data, sort_keys=True)
    _check_inputs(path, m)
    toolkit = check_toolkit()
    if m.target != target:
        say(f"warning: the manifest was split for {m.target}; building for {target}")
    report = BuildReport(target, precision, toolkit)
    rknn_dir = m.root / "rknn"
    with _exclusive(rknn_dir, out):
        for stale in rknn_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        for stale in rknn_dir.glob(".work-*"):
            shutil.rmtree(stale, ignore_errors=True)

        text_ids = (calib_tokens(m, calib, MIN_CHECK_TOKENS, runtime) if (precision == "w8a8" or verify or calib)
                    else None)
        calib_ids = text_ids if precision == "w8a8" else None
        calib_sha = hashlib.sha256(json.dumps(calib_ids).encode()).hexdigest() if calib_ids is not None else None

        if opts.max_rel_l2 is None:
            opts = replace(opts, max_rel_l2=WARN_REL_L2.get(precision))
        todo: list[tuple[dict, dict]] = []
        for g, seg in m.segments():
            seg_precision, _ = segment_precision(seg["id"], precision, opts.keep_fp16)
            key = build_key(sha256_file(m.resolve(seg["onnx"])), toolkit, target, seg_precision, calib_sha,
                            opts.max_rel_l2)
            if seg["backend"] == "cpu":
                if "fallback_reason" not in seg:
                    continue
                if seg.get("build_key") == key:  # failed with this very compiler and input: don't retry
                    report.results.append(SegmentResult(seg["id"], "fallback", reason=seg["fallback_reason"]))
                    continue
                seg["backend"] = "npu"  # something changed since it fell back: try again
            if _is_current(m, seg, key, verify):
                report.results.append(SegmentResult(seg["id"], "cached", seg.get("verify"), seg.get("precision_reason"),
                                                    precision=seg.get("precision")))
                continue
            for k in BUILD_KEYS:
                seg.pop(k, None)
            todo.append((g, seg))
        previous = m.data.get("build") or {}
        previous_check = previous.get("verify_model")
        m.data["build"] = {"target": target, "precision": precision, "toolkit": toolkit,
                           **({"calib_sha256": calib_sha} if calib_sha else {})}
        probe_todo = []
        if opts.probes and m.model is not None:
            m.data["build"]["probes"] = previous.get("probes") or _write_probes(m)
            for seg in m.data["build"]["probes"]:
                key = build_key(sha256_file(m.resolve(seg["onnx"])), toolkit, target, "fp16", None)
                if not _is_current(m, seg, key, False):
                    for k in BUILD_KEYS:
                        seg.pop(k, None)
                    probe_todo.append(seg)
        saved = _Saver(m, snapshot)
        saved()  # from here no entry names an .rknn this build will replace

        if todo:
            tasks = _tasks(m, todo, verify, calib_ids, text_ids, runtime)
            builder = Builder(saved, m, opts, toolkit, calib_sha, report.results)
            try:
                builder.run(tasks)
            finally:
                report.compiles = builder.compiles
        if probe_todo:  # board calibration models: fp16, unverified, not part of the plan
            holder = {"segments": m.data["build"]["probes"], "placement": []}
            probe_opts = replace(opts, precision="fp16", verify=False, max_rel_l2=None, keep_fp16=())
            builder = Builder(saved, m, probe_opts, toolkit, None, report.probe_results)
            try:
                builder.run([Task(holder, seg, None, None) for seg in probe_todo])
            finally:
                report.compiles += builder.compiles
        _predict_core_masks(m)
        report.warnings += _segment_warnings(report, precision)
        if verify and opts.verify_model and m.model is not None and text_ids is not None and runtime is not None:
            report.verify_model = _check_whole_model(m, saved, text_ids, previous_check, precision, timeout,
                                                     runtime.check_module)
            report.warnings += _model_warnings(report.verify_model, precision)
        saved()
    report.wall = time.perf_counter() - t0
    return report


def _tasks(m: Manifest, todo: list, verify: bool, calib_ids: list[int] | None, text_ids: list[int] | None,
           runtime: Runtime | None) -> list[Task]:
    # real text, not random ids: a trained model's activations on tokens it never saw are not what it runs on
    ids = text_ids[:VERIFY_TOKENS] if text_ids and m.model is not None else None
    samples_by_id = trace(runtime, m, ids, VERIFY_TOKENS, 0) if verify else None
    calib_by_id = trace(runtime, m, calib_ids, len(calib_ids), 1) if calib_ids is not None else None
    if verify and samples_by_id is None:
        say("note: no onnxruntime trace of the chain (rwkv2rknn.run.chain); verifying on random inputs")
    tasks = []
    for i, (g, seg) in enumerate(todo):
        samples = None
        if verify:
            samples = (samples_by_id or {}).get(seg["id"]) or random_samples(seg, VERIFY_TOKENS, i)
        cal = None
        if calib_ids is not None:
            cal = (calib_by_id or {}).get(seg["id"]) or random_samples(seg, 16, 1000 + i)
        tasks.append(Task(g, seg, samples, cal))
    return tasks


def _segment_warnings(report: BuildReport, precision: str) -> list[str]:
    out = []
    for r in report.results:
        v = r.verify
        if r.status not in ("built", "cached") or not v or "rel_l2" not in v:
            continue
        limit = WARN_REL_L2.get(r.precision or precision, WARN_REL_L2["fp16"])
        if not v["rel_l2"] <= limit:
            out.append(f"{r.id}: simulator rel_l2 {v['rel_l2']:.3g} > {limit:g} against onnxruntime fp32 on output "
                       f"{v.get('worst_output')} (scale {v.get('scale', 0):.3g}, max abs {v['max_abs']:.3g})")
    return out


def _model_warnings(check: dict | None, precision: str) -> list[str]:
    if not check:
        return []
    if "error" in check:
        return [f"whole-model check did not run: {check['error']}"]
    limit = WARN_LOGITS_COSINE[precision]
    out = []
    if not check["logits_cosine_min"] >= limit:
        out.append(f"whole model: logits cosine {check['logits_cosine_min']:.6f} < {limit} against onnxruntime fp32 "
                   f"at token {check.get('worst_step')} of {check['tokens']} (argmax agrees on "
                   f"{100 * check['argmax_agree']:.1f}%)")
    pre = check.get("prefill")
    if pre and not pre["logits_cosine_min"] >= limit:
        out.append(f"prefill plan: logits cosine {pre['logits_cosine_min']:.6f} < {limit} against onnxruntime fp32 "
                   f"over {pre['chunks']} chunk(s) of {pre['chunk']} tokens")
    ver = check.get("verify")
    if ver and not ver["logits_cosine_min"] >= limit:
        out.append(f"verify plan: logits cosine {ver['logits_cosine_min']:.6f} < {limit} against onnxruntime fp32 "
                   f"over {ver['passes']} pass(es) of {ver['rows']} rows")
    return out


def _check_key(m: Manifest, tokens: list[int]) -> str:
    parts = [json.dumps(tokens)] + [f"{s['id']}:{s.get('build_key', '')}:{s['backend']}" for _, s in m.segments()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _check_whole_model(m: Manifest, save, tokens: list[int], previous: dict | None, precision: str,
                       timeout: float, check_module: str) -> dict | None:
    """build.verify_model: the text through the simulator chain and onnxruntime fp32 (in a child process)."""
    npu = [s for _, s in m.segments() if s["backend"] == "npu" and "rknn" in s]
    if not npu:
        return None
    key = _check_key(m, tokens)
    if previous and previous.get("key") == key:
        m.data["build"]["verify_model"] = previous
        return previous
    say(f"checking the whole model: {len(tokens)} tokens through the simulator chain "
        f"({len(npu)} NPU segments rebuilt in-process) and onnxruntime fp32")
    save()
    work = Path(tempfile.mkdtemp(prefix=".check-", dir=m.root / "rknn")).resolve()
    try:
        job = {"manifest": str(m.path.resolve()), "tokens": tokens, "result": str(work / "result.json"),
               "parent_pid": os.getpid()}
        (work / "job.json").write_text(json.dumps(job))
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        limit = max(timeout, 60.0 * len(npu))
        try:
            proc = subprocess.run([sys.executable, "-m", check_module, str(work / "job.json")],
                                  stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=limit, cwd=work)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {limit:g} s"}
        try:
            result = json.loads((work / "result.json").read_text())
        except (OSError, ValueError):
            tail = (proc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or [f"status {proc.returncode}"]
            return {"error": f"the simulator chain failed ({tail[0][:200]})"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["precision"] = precision
    result["key"] = key
    m.data["build"]["verify_model"] = result
    save()
    return result
