"""The build driver: every NPU segment of a manifest -> .rknn, each compile isolated, cached and verified."""

from __future__ import annotations

import contextlib
import fcntl
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
from dataclasses import dataclass, field
from pathlib import Path

from passes.placement import TARGETS
from rwkv2rknn.compile_worker import PRECISIONS, save_samples, toolkit_version
from rwkv2rknn.errors import UserError
from rwkv2rknn.fsio import sha256_file
from rwkv2rknn.manifest import DEFAULT_OUT, MANIFEST_NAME, Manifest

RKNN_TARGETS = TARGETS  # rknn-toolkit2 2.5.0's target_platform values: one list for split and build
# Below these, a segment's simulator output is reported as a warning naming it.
WARN_COSINE = {"fp16": 0.999, "w8a8": 0.99}
DEFAULT_TIMEOUT = 600.0
VERIFY_TOKENS = 4
# Built-in calibration text for w8a8, tokenized by the manifest's tokenizer.
DEFAULT_CALIB_TEXT = ("The quick brown fox jumps over the lazy dog. In a hole in the ground there lived "
                      "a hobbit. 1, 2, 3: def f(x): return x * 2\n")
MAX_CALIB_TOKENS = 64
_MATMUL_OPS = ("MatMul", "Gemm", "Conv")
# Entry keys a build writes; a rebuild clears them first so no entry names a file being replaced.
_BUILD_KEYS = ("rknn", "rknn_sha256", "toolkit", "precision", "verify", "build_key", "fallback_reason")
INSTALL_HINT = ("rknn-toolkit2 is not installed (it compiles the NPU segments); run `make setup`, or "
                "`pip install rknn-toolkit2` on x86_64/aarch64 Linux (see README)")


@dataclass
class SegmentResult:
    id: str
    status: str  # "built" | "cached" | "fallback" | "bisected"
    cosine: float | None = None
    max_abs: float | None = None
    reason: str | None = None
    seconds: float = 0.0


@dataclass
class BuildReport:
    target: str
    precision: str
    toolkit: str
    results: list = field(default_factory=list)
    compiles: int = 0  # child compiler processes started
    warnings: list = field(default_factory=list)
    wall: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def cosine_min(self) -> float | None:
        vals = [r.cosine for r in self.results if r.cosine is not None and r.status in ("built", "cached")]
        return min(vals) if vals else None


@dataclass
class _Task:
    graph: dict
    entry: dict
    samples: list | None  # verify inputs: [{name: array}]
    calib: list | None  # calibration inputs for w8a8


def _say(msg: str) -> None:
    print(f"rwkv2rknn build: {msg}", file=sys.stderr)


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


def build_key(onnx_sha: str, toolkit: str, target: str, precision: str, calib_sha: str | None) -> str:
    parts = [onnx_sha, toolkit, target, precision] + ([calib_sha or ""] if precision == "w8a8" else [])
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _matmuls(model) -> int:
    return sum(n.op_type in _MATMUL_OPS for n in model.graph.node)


# -- inputs for verification and calibration ------------------------------------------------------

def _random_samples(entry: dict, n: int, seed: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        feed = {}
        for t in entry["inputs"]:
            dt = np.dtype(t["dtype"])
            if dt.kind == "f":
                feed[t["name"]] = rng.standard_normal(t["shape"]).astype(dt)
            else:
                feed[t["name"]] = np.zeros(t["shape"], dtype=dt)
        out.append(feed)
    return out


def _trace(manifest: Manifest, ids: list[int] | None, n_tokens: int, seed: int) -> dict | None:
    """Real activations of every segment from an onnxruntime run of the chain; None if unavailable.

    With `ids` (calibration), whole models are fed those tokens; otherwise random ones.
    """
    try:
        from rwkv2rknn.run.chain import Chain, runner_factory, trace_segment_inputs
    except ImportError:
        return None
    try:
        if ids is not None and manifest.model is not None:
            seen = {s["id"]: [] for _, s in manifest.segments()}
            with Chain(manifest, runner_factory(manifest, "ort"),
                       record=lambda sid, feed: seen[sid].append(feed)) as chain:
                chain.feed(ids)
            return seen
        return trace_segment_inputs(manifest, n_tokens=n_tokens, seed=seed)
    except Exception as exc:  # noqa: BLE001 (verification still runs, on random inputs; say so)
        _say(f"warning: tracing the chain on onnxruntime failed ({type(exc).__name__}: {exc}); "
             "using random inputs")
        return None


def _calib_tokens(manifest: Manifest, calib: str | None) -> list[int]:
    """Token ids for w8a8 calibration: a file of integers, or text tokenized by the manifest's tokenizer."""
    model = manifest.model or {}
    vocab = int(model.get("vocab_size") or 256)
    if calib is not None:
        path = Path(calib)
        if not path.is_file():
            raise UserError(f"--calib {calib}: no such file; give a text file or a file of token ids")
        text = path.read_text(errors="replace")
        words = text.replace(",", " ").split()
        if words and all(w.lstrip("-").isdigit() for w in words):
            ids = [int(w) for w in words]
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise UserError(f"{path}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
            return ids[:MAX_CALIB_TOKENS] or [0]
    else:
        text = DEFAULT_CALIB_TEXT
    hint = model.get("tokenizer")
    if hint is None and vocab == 256:
        hint = "bytes"
    if hint is not None:
        from rwkv2rknn.run.tokenizers import load_tokenizer

        try:
            ids = load_tokenizer(hint, manifest.root, vocab).encode(text)
        except UserError as exc:
            raise UserError(f"{exc} (w8a8 calibration text); or pass --calib FILE of token ids") from None
    elif calib is not None:
        raise UserError(f"--calib {calib}: {manifest.path} names no tokenizer to read text with; "
                        "give a file of whitespace-separated token ids")
    else:  # no tokenizer at hand: a fixed spread of ids over the vocabulary
        ids = [(i * 7919 + 13) % vocab for i in range(32)]
    ids = [i % vocab for i in ids]
    return ids[:MAX_CALIB_TOKENS] or [0]


def _derive_samples(models: list, samples: list[dict]) -> list[list[dict]]:
    """Inputs of each piece of a bisected segment: run the pieces in order on onnxruntime."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                for m in models]
    per_piece = [[] for _ in models]
    for feed in samples:
        env = dict(feed)
        for k, sess in enumerate(sessions):
            names = [i.name for i in sess.get_inputs()]
            per_piece[k].append({n: env[n] for n in names})
            outs = sess.run(None, {n: env[n] for n in names})
            env.update(zip([o.name for o in sess.get_outputs()], outs))
    return per_piece


# -- bisection -------------------------------------------------------------------------------------

def bisect_segment(onnx_path: Path):
    """Split a segment in two at a topological cut holding about half its MatMuls; None if it has <= 1."""
    import onnx
    import onnx_graphsurgeon as gs

    from passes.cut import extract_segments
    from passes.partition import Segment

    graph = gs.import_onnx(onnx.load(str(onnx_path)))
    graph.toposort()
    nodes = list(graph.nodes)
    mm = [k for k, n in enumerate(nodes) if n.op in _MATMUL_OPS]
    if len(mm) < 2:
        return None
    cut = mm[len(mm) // 2]  # the prefix keeps len(mm)//2 MatMuls and the elementwise work between them
    halves = [Segment("npu", nodes[:cut], "bisected after a compile failure"),
              Segment("npu", nodes[cut:], "bisected after a compile failure")]
    return extract_segments(graph, halves)


# -- the driver ------------------------------------------------------------------------------------

class _Builder:
    def __init__(self, save, manifest: Manifest, target: str, precision: str, toolkit: str, calib_sha: str | None,
                 verify: bool, timeout: float, jobs: int, progress: bool, report: BuildReport):
        self.save = save
        self.m = manifest
        self.target, self.precision, self.toolkit = target, precision, toolkit
        self.calib_sha, self.verify, self.timeout, self.jobs = calib_sha, verify, timeout, jobs
        self.progress, self.report = progress, report
        self.rknn_dir = manifest.root / "rknn"
        self.log_dir = self.rknn_dir / ".logs"
        self.work = Path(tempfile.mkdtemp(prefix=".work-", dir=self.rknn_dir))
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.serial = 0

    def key(self, entry: dict) -> str:
        return build_key(sha256_file(self.m.resolve(entry["onnx"])), self.toolkit, self.target,
                         self.precision, self.calib_sha)

    # child processes --------------------------------------------------------------------------
    def _spawn_env(self) -> dict:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _write_dataset(self, sid: str, name: str, samples: list[dict], order: list[str]) -> str:
        import numpy as np

        d = self.work / f"{sid}.{name}"
        d.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, feed in enumerate(samples):
            paths = []
            for k, n in enumerate(order):
                p = d / f"{i}_{k}.npy"
                np.save(p, np.ascontiguousarray(feed[n]))
                paths.append(str(p.resolve()))
            lines.append(" ".join(paths))
        ds = d / "dataset.txt"
        ds.write_text("\n".join(lines) + "\n")
        return str(ds.resolve())

    def compile(self, task: _Task) -> dict:
        """Run one compile in a child process (thread-pool side); a result dict, never an exception."""
        entry = task.entry
        sid = entry["id"]
        with self.lock:
            self.serial += 1
            serial = self.serial
        t0 = time.perf_counter()
        tag = f"{sid}.{serial}"
        tmp_rknn = self.rknn_dir / f".{sid}.{os.getpid()}.{serial}.rknn.tmp"
        job = {"id": sid, "onnx": str(self.m.resolve(entry["onnx"]).resolve()), "target": self.target,
               "precision": self.precision, "rknn_out": str(tmp_rknn), "result": str(self.work / f"{tag}.result.json"),
               "parent_pid": os.getpid()}
        try:
            import onnx

            model = onnx.load(job["onnx"], load_external_data=False)
            inits = {i.name for i in model.graph.initializer}
            order = [v.name for v in model.graph.input if v.name not in inits]
            if self.verify and task.samples:
                job["verify_inputs"] = str(self.work / f"{tag}.verify.npz")
                save_samples(job["verify_inputs"], task.samples)
            if self.precision == "w8a8":
                job["dataset"] = self._write_dataset(tag, "calib", task.calib, order)
        except Exception as exc:  # noqa: BLE001
            return {"ok": False, "reason": f"could not prepare inputs: {exc}", "seconds": 0.0}
        job_path = self.work / f"{tag}.job.json"
        job_path.write_text(json.dumps(job))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{sid}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "rwkv2rknn.compile_worker", str(job_path)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=self._spawn_env(), start_new_session=True)
        with self.lock:
            self.procs.add(proc)
            self.report.compiles += 1
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
        with contextlib.suppress(OSError):
            log_path.unlink()
        return {"ok": True, "verify": result.get("verify"), "seconds": seconds, "tmp": tmp_rknn}

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
    def finish_ok(self, task: _Task, res: dict, key: str) -> SegmentResult:
        entry = task.entry
        final = self.rknn_dir / f"{entry['id']}.rknn"
        with open(res["tmp"], "rb+") as f:
            os.fsync(f.fileno())
        os.replace(res["tmp"], final)
        entry.update({"rknn": self.m.relative(final), "rknn_sha256": sha256_file(final),
                      "toolkit": self.toolkit, "precision": self.precision, "build_key": key})
        v = res.get("verify")
        if v is not None:
            entry["verify"] = {"cosine": float(v["cosine"]), "max_abs": float(v["max_abs"])}
        self.save()
        return SegmentResult(entry["id"], "built", v and v["cosine"], v and v["max_abs"], seconds=res["seconds"])

    def fall_back(self, task: _Task, reason: str, key: str) -> SegmentResult:
        entry = task.entry
        for k in _BUILD_KEYS:
            entry.pop(k, None)
        entry.update({"backend": "cpu", "fallback_reason": reason, "build_key": key,
                      "toolkit": self.toolkit, "precision": self.precision})
        for row in task.graph.get("placement", []):
            if row.get("segment") == entry["id"]:
                row["backend"] = "cpu"
                row["reason"] = f"fell back: {reason}"
        self.save()
        return SegmentResult(entry["id"], "fallback", reason=reason)

    def split(self, task: _Task, reason: str) -> list[_Task] | None:
        """Replace a failed segment by its two halves in the manifest; None when it cannot be split."""
        import onnx

        entry = task.entry
        try:
            cuts = bisect_segment(self.m.resolve(entry["onnx"]))
        except Exception as exc:  # noqa: BLE001
            _say(f"warning: cannot bisect {entry['id']} ({type(exc).__name__}: {exc})")
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
            new = {k: v for k, v in entry.items() if k not in _BUILD_KEYS}
            new.update({"id": pid, "backend": "npu", "onnx": self.m.relative(path), "sha256": sha256_file(path),
                        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in cut.inputs],
                        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in cut.outputs],
                        "nodes": cut.nodes, "matmul_flops": int(cut.matmul_flops),
                        "bisected_from": entry.get("bisected_from", entry["id"]),
                        "bisect_reason": reason})
            pieces.append((new, cut))
        models = [c.model for _, c in pieces]
        samples = _derive_samples(models, task.samples) if task.samples else [None, None]
        calib = _derive_samples(models, task.calib) if task.calib else [None, None]
        segs = task.graph["segments"]
        at = next(i for i, s in enumerate(segs) if s is entry)
        segs[at:at + 1] = [p for p, _ in pieces]
        for row in task.graph.get("placement", []):
            if row.get("segment") == entry["id"]:
                for new, cut in pieces:
                    if row["node"] in {n.name for n in cut.model.graph.node}:
                        row["segment"] = new["id"]
        self.save()
        return [_Task(task.graph, new, s, c) for (new, _), s, c in zip(pieces, samples, calib)]

    def run(self, tasks: list[_Task]) -> None:
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
                        self.report.results.append(self.finish_ok(task, res, key))
                        bar.set_postfix_str(sid)
                    else:
                        if res.get("tmp") is not None:
                            with contextlib.suppress(OSError):
                                Path(res["tmp"]).unlink()
                        pieces = self.split(task, res["reason"])
                        if pieces:
                            tqdm.write(f"rwkv2rknn build: {sid}: {res['reason']}; bisecting into "
                                       f"{', '.join(p.entry['id'] for p in pieces)}", file=sys.stderr)
                            self.report.results.append(SegmentResult(sid, "bisected", reason=res["reason"]))
                            bar.total += len(pieces)
                            bar.refresh()
                            for p in pieces:
                                pending[pool.submit(self.compile, p)] = p
                        else:
                            self.report.results.append(self.fall_back(task, res["reason"], key))
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


def build_manifest(out_dir: str | Path = DEFAULT_OUT, target: str = "rk3588", precision: str = "fp16",
                   calib: str | None = None, jobs: int | None = None, verify: bool = True,
                   timeout: float = DEFAULT_TIMEOUT, progress: bool = True) -> BuildReport:
    """Compile every NPU segment of OUT/manifest.json into OUT/rknn/<id>.rknn and record it in the manifest."""
    t0 = time.perf_counter()
    if target not in RKNN_TARGETS:
        raise UserError(f"--target {target!r}: unknown; choose one of {', '.join(RKNN_TARGETS)}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if calib is not None and precision != "w8a8":
        raise UserError("--calib: calibration data is only used with --precision w8a8")
    if timeout <= 0:
        raise UserError(f"--timeout {timeout:g}: must be positive")
    out = Path(out_dir)
    path = out / MANIFEST_NAME if not out.name.endswith(".json") else out
    if not path.exists():
        raise UserError(f"{path}: no manifest here; run `rwkv2rknn split MODEL -o {path.parent}` first")
    m = Manifest.load(path, check_files=False)
    snapshot = json.dumps(m.data, sort_keys=True)
    for _, seg in m.segments():
        f = m.resolve(seg["onnx"])
        if not f.exists():
            raise UserError(f"{path}: segment {seg['id']} names {seg['onnx']}, which is missing; "
                            "run `rwkv2rknn split` again")
        if "sha256" in seg and sha256_file(f) != seg["sha256"]:  # never compile something else
            raise UserError(f"{f}: sha256 differs from {path.name} (file altered or partly copied); "
                            "copy it again, or run `rwkv2rknn split` again")
    toolkit = check_toolkit()
    if m.target != target:
        _say(f"warning: the manifest was split for {m.target}; building for {target}")
    report = BuildReport(target, precision, toolkit)
    rknn_dir = m.root / "rknn"
    with _exclusive(rknn_dir, out):
        for stale in rknn_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        for stale in rknn_dir.glob(".work-*"):
            shutil.rmtree(stale, ignore_errors=True)

        calib_ids = _calib_tokens(m, calib) if precision == "w8a8" else None
        calib_sha = (hashlib.sha256(json.dumps(calib_ids).encode()).hexdigest() if calib_ids is not None else None)

        todo: list[tuple[dict, dict]] = []
        for g, seg in m.segments():
            key = build_key(sha256_file(m.resolve(seg["onnx"])), toolkit, target, precision, calib_sha)
            if seg["backend"] == "cpu":
                if "fallback_reason" not in seg:
                    continue
                if seg.get("build_key") == key:  # failed with this very compiler and input: don't retry
                    report.results.append(SegmentResult(seg["id"], "fallback", reason=seg["fallback_reason"]))
                    continue
                seg["backend"] = "npu"  # something changed since it fell back: try again
            if _is_current(m, seg, key, verify):
                v = seg.get("verify") or {}
                report.results.append(SegmentResult(seg["id"], "cached", v.get("cosine"), v.get("max_abs")))
                continue
            for k in _BUILD_KEYS:
                seg.pop(k, None)
            todo.append((g, seg))
        m.data["build"] = {"target": target, "precision": precision, "toolkit": toolkit,
                           **({"calib_sha256": calib_sha} if calib_sha else {})}
        saved = _Saver(m, snapshot)
        saved()  # from here no entry names an .rknn this build will replace

        tasks = []
        if todo:
            trace = _trace(m, None, VERIFY_TOKENS, 0) if verify else None
            ctrace = _trace(m, calib_ids, len(calib_ids), 1) if calib_ids is not None else None
            if verify and trace is None:
                _say("note: no onnxruntime trace of the chain (rwkv2rknn.run.chain); verifying on random inputs")
            for i, (g, seg) in enumerate(todo):
                samples = None
                if verify:
                    samples = (trace or {}).get(seg["id"]) or _random_samples(seg, VERIFY_TOKENS, i)
                cal = None
                if calib_ids is not None:
                    cal = (ctrace or {}).get(seg["id"]) or _random_samples(seg, 16, 1000 + i)
                tasks.append(_Task(g, seg, samples, cal))
            builder = _Builder(saved, m, target, precision, toolkit, calib_sha, verify, timeout,
                               jobs or os.cpu_count() or 1, progress, report)
            builder.run(tasks)
        threshold = WARN_COSINE[precision]
        for r in report.results:
            if r.status in ("built", "cached") and r.cosine is not None and not r.cosine >= threshold:
                report.warnings.append(f"{r.id}: simulator cosine {r.cosine:.6f} < {threshold} against "
                                       f"onnxruntime fp32 (max abs {r.max_abs:.3g})")
        saved()
    report.wall = time.perf_counter() - t0
    return report


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
    f = m.resolve(seg["rknn"])
    return f.exists() and sha256_file(f) == seg["rknn_sha256"]
