"""Compile jobs: each NPU segment compiled in a child process, failures bisected, the manifest updated."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from rwkv2rknn.artifacts import SEGMENT_KEYS
from rwkv2rknn.build.inputs import derive_samples, say
from rwkv2rknn.compile_worker import BUILD_MARKER, save_samples, write_dataset
from rwkv2rknn.fsio import sha256_file
from rwkv2rknn.manifest import Manifest
from rwkv2rknn.numerics import WARN_REL_L2
from rwkv2rknn.options import BuildOptions

_MATMUL_OPS = ("MatMul", "Gemm", "Conv")
# Entry keys a build writes (into build.json, rwkv2rknn/artifacts.py); a rebuild clears them first so no entry
# names a file being replaced.
BUILD_KEYS = SEGMENT_KEYS


def build_key(onnx_sha: str, toolkit: str, target: str, precision: str, calib_sha: str | None,
              max_rel_l2: float | None = None) -> str:
    """The cache key of one compile: what went in (ONNX, toolkit, target, precision, calibration, fp16 bound)."""
    parts = [onnx_sha, toolkit, target, precision]
    if precision == "w8a8":
        parts += [calib_sha or "", repr(max_rel_l2), "hybrid-first"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


KEPT_FP16 = "kept fp16 by --w8a8-keep-fp16"


def segment_precision(sid: str, precision: str, keep_fp16: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """(the precision segment `sid` is built at, the reason when it differs from the build's): a w8a8 build
    keeps the segments matching a `--w8a8-keep-fp16` pattern (fnmatch on the id) in fp16."""
    if precision == "w8a8":
        for pattern in keep_fp16:
            if fnmatch.fnmatchcase(sid, pattern):
                return "fp16", f"{KEPT_FP16} {pattern}"
    return precision, None


@dataclass
class SegmentResult:
    id: str
    status: str  # "built" | "cached" | "fallback" | "bisected"
    verify: dict | None = None
    reason: str | None = None  # why it fell back, or why it was built at another precision
    seconds: float = 0.0
    precision: str | None = None


@dataclass
class Task:
    graph: dict
    entry: dict
    samples: list | None  # verify inputs: [{name: array}]
    calib: list | None  # calibration inputs for w8a8


# -- bisection -------------------------------------------------------------------------------------

def bisect_segment(onnx_path: Path):
    """Split a segment in two at a topological cut holding about half its MatMuls; None if it has <= 1."""
    import onnx
    import onnx_graphsurgeon as gs

    from passes.cut import extract_segments
    from passes.normalize import infer_shapes
    from passes.partition import Segment

    # a stored segment keeps the shapes of its boundary, not of every tensor inside: the cut needs them
    graph = infer_shapes(gs.import_onnx(onnx.load(str(onnx_path)))).graph
    graph.toposort()
    nodes = list(graph.nodes)
    mm = [k for k, n in enumerate(nodes) if n.op in _MATMUL_OPS]
    if len(mm) < 2:
        return None
    cut = mm[len(mm) // 2]  # the prefix keeps len(mm)//2 MatMuls and the elementwise work between them
    halves = [Segment("npu", nodes[:cut], "bisected after a compile failure"),
              Segment("npu", nodes[cut:], "bisected after a compile failure")]
    return extract_segments(graph, halves)


# -- compiling ------------------------------------------------------------------------------------

class Builder:
    """Runs compile tasks on a thread pool, each in its own child process, and records their results."""

    def __init__(self, save, manifest: Manifest, options: BuildOptions, toolkit: str, calib_sha: str | None,
                 results: list):
        """save(): saves the manifest; options: what to build and how (jobs None: the CPU count; max_rel_l2 None:
        the precision's warning bound); results: where each segment's SegmentResult goes."""
        self.save = save
        self.keep_fp16 = tuple(options.keep_fp16)
        self.m = manifest
        self.target, self.precision, self.toolkit = options.target, options.precision, toolkit
        self.calib_sha, self.verify, self.timeout = calib_sha, options.verify, options.timeout
        self.jobs = options.jobs or os.cpu_count() or 1
        self.progress, self.results = options.progress, results
        self.max_rel_l2 = WARN_REL_L2.get(self.precision) if options.max_rel_l2 is None else options.max_rel_l2
        self.compiles = 0  # child compiler processes started
        self.rknn_dir = (manifest.root / "rknn").resolve()
        self.log_dir = self.rknn_dir / ".logs"
        self.work = Path(tempfile.mkdtemp(prefix=".work-", dir=self.rknn_dir))
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.serial = 0

    def key(self, entry: dict) -> str:
        precision, _ = segment_precision(entry["id"], self.precision, self.keep_fp16)
        return build_key(sha256_file(self.m.resolve(entry["onnx"])), self.toolkit, self.target,
                         precision, self.calib_sha, self.max_rel_l2)

    # child processes --------------------------------------------------------------------------
    def _spawn_env(self) -> dict:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def compile(self, task: Task) -> dict:
        """Run one compile in a child process (thread-pool side); a result dict, never an exception."""
        entry = task.entry
        sid = entry["id"]
        with self.lock:
            self.serial += 1
            serial = self.serial
        t0 = time.perf_counter()
        tag = f"{sid}.{serial}"
        tmp_rknn = self.rknn_dir / f".{sid}.{os.getpid()}.{serial}.rknn.tmp"
        precision, forced = segment_precision(sid, self.precision, self.keep_fp16)
        job = {"id": sid, "onnx": str(self.m.resolve(entry["onnx"]).resolve()), "target": self.target,
               "precision": precision, "rknn_out": str(tmp_rknn), "result": str(self.work / f"{tag}.result.json"),
               "parent_pid": os.getpid(), "verbose": True}  # verbose: the compiler's per-op table
        try:
            import onnx

            model = onnx.load(job["onnx"], load_external_data=False)
            inits = {i.name for i in model.graph.initializer}
            order = [v.name for v in model.graph.input if v.name not in inits]
            if self.verify and task.samples:
                job["verify_inputs"] = str(self.work / f"{tag}.verify.npz")
                save_samples(job["verify_inputs"], task.samples)
            if precision == "w8a8":
                job["dataset"] = str(write_dataset(self.work / f"{tag}.calib", task.calib, order))
                job["max_rel_l2"] = self.max_rel_l2
        except Exception as exc:  # noqa: BLE001
            return {"ok": False, "reason": f"could not prepare inputs: {exc}", "seconds": 0.0}
        job_path = self.work / f"{tag}.job.json"
        job_path.write_text(json.dumps(job))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{sid}.log"
        with open(log_path, "wb") as log:
            # cwd: the verbose compiler writes check*.onnx files into the working directory
            proc = subprocess.Popen([sys.executable, "-m", "rwkv2rknn.compile_worker", str(job_path)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=self._spawn_env(), start_new_session=True, cwd=self.work)
        with self.lock:
            self.procs.add(proc)
            self.compiles += 1
        try:
            try:
                rc = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self._kill(proc)
                return {"ok": False, "reason": f"compiler timed out after {self.timeout:g} s",
                        "seconds": time.perf_counter() - t0, "tmp": tmp_rknn}
        finally:
            with self.lock:
                self.procs.discard(proc)
        seconds = time.perf_counter() - t0
        result = {}
        with contextlib.suppress(OSError, ValueError):
            result = json.loads(Path(job["result"]).read_text())
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            return {"ok": False, "reason": f"compiler crashed: {name}", "seconds": seconds, "tmp": tmp_rknn}
        if rc != 0 or not result.get("ok") or not tmp_rknn.exists():
            reason = result.get("error") or _last_error(log_path) or f"compiler exited with status {rc}"
            return {"ok": False, "reason": f"compile failed: {reason}", "seconds": seconds, "tmp": tmp_rknn}
        table = _compiler_table(log_path)
        with contextlib.suppress(OSError):
            log_path.unlink()
        return {"ok": True, "seconds": seconds, "tmp": tmp_rknn, "compiler": table,
                **{k: result.get(k) for k in ("verify", "precision", "precision_reason", "hybrid")},
                **({"precision": precision, "precision_reason": forced} if forced else {})}

    def _kill(self, proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)

    def kill_all(self) -> None:
        with self.lock:
            procs = list(self.procs)
        for p in procs:
            self._kill(p)

    # manifest updates (main thread only) ------------------------------------------------------
    def finish_ok(self, task: Task, res: dict, key: str) -> SegmentResult:
        entry = task.entry
        final = self.rknn_dir / f"{entry['id']}.rknn"
        with open(res["tmp"], "rb+") as f:
            os.fsync(f.fileno())
        os.replace(res["tmp"], final)
        precision = res.get("precision") or self.precision
        entry.update({"rknn": self.m.relative(final), "rknn_sha256": sha256_file(final),
                      "toolkit": self.toolkit, "precision": precision, "build_key": key})
        if res.get("precision_reason"):
            entry["precision_reason"] = res["precision_reason"]
        if res.get("hybrid"):
            entry["hybrid"] = res["hybrid"]
        if precision == "w8a8" and task.calib:  # the simulator rebuilds from ONNX: it needs the same data
            entry.update(self._save_calib(entry["id"], task.calib))
        if res.get("compiler"):
            entry["compiler"] = res["compiler"]
        v = res.get("verify")
        if v is not None:
            entry["verify"] = {k: (float(x) if isinstance(x, (int, float)) else x) for k, x in v.items()}
        self.save()
        return SegmentResult(entry["id"], "built", entry.get("verify"), reason=entry.get("precision_reason"),
                             seconds=res["seconds"], precision=precision)

    def _save_calib(self, sid: str, samples: list[dict]) -> dict:
        path = self.rknn_dir / "calib" / f"{sid}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_samples(tmp, samples)
        os.replace(tmp, path)
        return {"calib": self.m.relative(path), "calib_sha256": sha256_file(path)}

    def fall_back(self, task: Task, reason: str, key: str) -> SegmentResult:
        entry = task.entry
        for k in BUILD_KEYS:
            entry.pop(k, None)
        entry.update({"backend": "cpu", "fallback_reason": reason, "build_key": key,
                      "toolkit": self.toolkit, "precision": self.precision})
        for row in task.graph.get("placement", []):
            if row.get("segment") == entry["id"]:
                row["backend"] = "cpu"
                row["reason"] = f"fell back: {reason}"
        self.save()
        return SegmentResult(entry["id"], "fallback", reason=reason)

    def split(self, task: Task, reason: str) -> list[Task] | None:
        """Replace a failed segment by its two halves in the manifest; None when it cannot be split."""
        import onnx

        entry = task.entry
        try:
            cuts = bisect_segment(self.m.resolve(entry["onnx"]))
        except Exception as exc:  # noqa: BLE001
            say(f"warning: cannot bisect {entry['id']} ({type(exc).__name__}: {exc})")
            return None
        if not cuts:
            return None
        seg_dir = self.m.resolve(entry["onnx"]).parent
        pieces = []
        for suffix, cut in zip("ab", cuts):
            pid = f"{entry['id']}.{suffix}"
            path = seg_dir / f"{pid}.onnx"
            tmp = seg_dir / f".{pid}.onnx.{os.getpid()}.tmp"
            onnx.save(cut.model, str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            new = {k: v for k, v in entry.items() if k not in BUILD_KEYS}
            new.update({"id": pid, "backend": "npu", "onnx": self.m.relative(path), "sha256": sha256_file(path),
                        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in cut.inputs],
                        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in cut.outputs],
                        "nodes": cut.nodes, "matmul_flops": int(cut.matmul_flops),
                        "node_names": [n.name for n in cut.model.graph.node],
                        "bisected_from": entry.get("bisected_from", entry["id"]),
                        "bisect_reason": reason})
            pieces.append((new, cut))
        models = [c.model for _, c in pieces]
        samples = derive_samples(models, task.samples) if task.samples else [None, None]
        calib = derive_samples(models, task.calib) if task.calib else [None, None]
        segs = task.graph["segments"]
        at = next(i for i, s in enumerate(segs) if s is entry)
        segs[at:at + 1] = [p for p, _ in pieces]
        for row in task.graph.get("placement", []):
            if row.get("segment") == entry["id"]:
                for new, cut in pieces:
                    if row["node"] in {n.name for n in cut.model.graph.node}:
                        row["segment"] = new["id"]
        self.save()
        return [Task(task.graph, new, s, c) for (new, _), s, c in zip(pieces, samples, calib)]

    def run(self, tasks: list[Task]) -> None:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="build", unit="seg", file=sys.stderr, disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        pool = ThreadPoolExecutor(max_workers=max(1, self.jobs), thread_name_prefix="rknn-compile")
        pending = {}
        try:
            for t in tasks:
                pending[pool.submit(self.compile, t)] = t
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    task = pending.pop(fut)
                    res = fut.result()
                    key = self.key(task.entry)
                    sid = task.entry["id"]
                    if res["ok"]:
                        self.results.append(self.finish_ok(task, res, key))
                        bar.set_postfix_str(sid)
                    else:
                        if res.get("tmp") is not None:
                            with contextlib.suppress(OSError):
                                Path(res["tmp"]).unlink()
                        pieces = self.split(task, res["reason"])
                        if pieces:
                            tqdm.write(f"rwkv2rknn build: {sid}: {res['reason']}; bisecting into "
                                       f"{', '.join(p.entry['id'] for p in pieces)}", file=sys.stderr)
                            self.results.append(SegmentResult(sid, "bisected", reason=res["reason"]))
                            bar.total += len(pieces)
                            bar.refresh()
                            for p in pieces:
                                pending[pool.submit(self.compile, p)] = p
                        else:
                            self.results.append(self.fall_back(task, res["reason"], key))
                            tqdm.write(f"rwkv2rknn build: {sid}: {res['reason']}; runs on the CPU",
                                       file=sys.stderr)
                    bar.update(1)
        except BaseException:
            for fut in pending:
                fut.cancel()
            self.kill_all()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
            shutil.rmtree(self.work, ignore_errors=True)


def _compiler_table(log_path: Path) -> dict | None:
    """The compiler's per-op table of the last build in a worker's log, as the manifest stores it."""
    try:
        from rwkv2rknn.compiler_table import parse_compiler_table
    except ImportError:
        return None
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    table = parse_compiler_table(text.rsplit(BUILD_MARKER, 1)[-1])
    return table.to_json() if table is not None else None


def _last_error(log_path: Path) -> str | None:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        s = line.strip()
        # toolkit error lines look like "E build: ..." (maybe with colour codes)
        plain = s.replace("\x1b[1;31m", "").replace("\x1b[0m", "")
        if plain.startswith("E ") or "Error" in plain.split(":")[0]:
            return plain[:300]
    return None


