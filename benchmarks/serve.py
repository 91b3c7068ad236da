"""Load on the OpenAI-compatible server: requests/s and latency with 16 concurrent clients, no cross-talk.

The trained RWKV-4 fixture (tests/fixtures/rwkv4-tiny-trained.pth, 4 x 128, bytes) is exported and split, and
`python -m rwkv2rknn.serve OUT --backend ort` started on 127.0.0.1 on a free port. Every request (a mix of chat
and completions, streaming and not, greedy with the default penalties) is first served alone, one after
another: its reference text. Then, on a fresh server (nothing cached: every prompt is computed under load), 16
clients, each with its own official `openai` client, send 8 requests each at once (128 in all, each with a
time limit, the whole run bounded). A request fails on an error or a time-out; it is cross-talk when its text
differs from its reference. Writes benchmarks/results/serve.json.

    .venv/bin/python -m benchmarks.serve [--clients 16 --requests 8 --max-tokens 32]

tests/test_serve.py runs the same load, smaller, in the default test run (and this one in full, marked slow).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "rwkv4-tiny-trained.pth"
RUNTIME_ONLY = ROOT / "tests" / "runtime_only.py"
SNIPPETS = ("def ", "class ", "import ", "for item in ", "if __name__ == ", "return ", "    with open(", "try:\n    ")
WORDS = ("parse", "value", "result", "buffer", "encode", "path", "names", "token", "header", "stream", "count",
         "index", "data", "node", "entry", "module")


class ServerProcess:
    """`python -m rwkv2rknn.serve OUT --port 0 ...` in a child process (under tests/runtime_only.py by default,
    so the server provably imports no compiler module); `url` once it listens."""

    def __init__(self, out, *args, runtime_only: bool = True, timeout: float = 120.0, cwd=None, env=None):
        head = [sys.executable, str(RUNTIME_ONLY)] if runtime_only else [sys.executable, "-m"]
        self.cmd = [*head, "rwkv2rknn.serve", str(out), "--port", "0", *map(str, args)]
        if "--backend" not in args:
            self.cmd += ["--backend", "ort"]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=cwd, env=env)
        self.out_lines: list[str] = []
        self.err_lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        self._threads = [threading.Thread(target=self._drain, args=(self.proc.stdout, self.out_lines), daemon=True),
                         threading.Thread(target=self._drain, args=(self.proc.stderr, self.err_lines), daemon=True)]
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start (status {self.proc.returncode}):\n{self.stderr}")

    def _drain(self, stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m and self.url is None:
                self.url = m.group(1)
                self._ready.set()

    @property
    def stderr(self) -> str:
        return "".join(self.err_lines)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in self._threads:
            t.join(5)
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def request_specs(n: int, max_tokens: int, seed: int = 0) -> list[dict]:
    """n distinct greedy requests: chat and completions, streaming and not, with the default penalties."""
    specs = []
    for i in range(n):
        word = WORDS[(i * 7 + seed) % len(WORDS)]
        text = f"{SNIPPETS[i % len(SNIPPETS)]}{word}_{i}"
        spec = {"id": i, "chat": i % 2 == 0, "stream": (i // 2) % 2 == 0, "max_tokens": max_tokens}
        if spec["chat"]:
            spec["messages"] = [{"role": "user", "content": f"Write {text}"}]
        else:
            spec["prompt"] = text
        specs.append(spec)
    return specs


def call(client, model: str, spec: dict) -> dict:
    """One request through the openai client: its text, finish reason, usage and latency."""
    kw = {"model": model, "max_tokens": spec["max_tokens"], "temperature": 0}
    t0 = time.perf_counter()
    text, finish, usage = "", None, None
    if spec["chat"]:
        if spec["stream"]:
            for ch in client.chat.completions.create(messages=spec["messages"], stream=True,
                                                     stream_options={"include_usage": True}, **kw):
                if ch.usage is not None:
                    usage = ch.usage
                for c in ch.choices:
                    text += c.delta.content or ""
                    finish = c.finish_reason or finish
        else:
            r = client.chat.completions.create(messages=spec["messages"], **kw)
            text, finish, usage = r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    else:
        if spec["stream"]:
            for ch in client.completions.create(prompt=spec["prompt"], stream=True,
                                                stream_options={"include_usage": True}, **kw):
                if ch.usage is not None:
                    usage = ch.usage
                for c in ch.choices:
                    text += c.text or ""
                    finish = c.finish_reason or finish
        else:
            r = client.completions.create(prompt=spec["prompt"], **kw)
            text, finish, usage = r.choices[0].text, r.choices[0].finish_reason, r.usage
    return {"id": spec["id"], "text": text, "finish": finish, "usage": usage, "seconds": time.perf_counter() - t0}


def make_client(url: str, api_key: str = "none", timeout: float = 60.0):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=api_key, timeout=timeout, max_retries=0)


def references(url: str, model: str, specs: list[dict]) -> dict[int, str]:
    """Each request served alone, one after another."""
    client = make_client(url)
    return {s["id"]: call(client, model, s)["text"] for s in specs}


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def run_load(url: str, model: str, specs: list[dict], clients: int, per_client: int, refs: dict[int, str],
             request_timeout: float = 60.0, deadline: float = 300.0) -> dict:
    """`clients` threads, each with its own openai client, each sending `per_client` requests one after another
    (client c sends specs c, c + clients, ...). Bounded: each request by request_timeout, the run by deadline."""
    start = time.perf_counter()
    stop_at = start + deadline

    def client_loop(c: int) -> list[dict]:
        client = make_client(url, timeout=request_timeout)
        out = []
        for k in range(per_client):
            spec = specs[(c + k * clients) % len(specs)]
            if time.perf_counter() > stop_at:
                out.append({"id": spec["id"], "error": "deadline"})
                continue
            try:
                out.append(call(client, model, spec))
            except Exception as exc:  # counted as a failure, never raised out of the load
                out.append({"id": spec["id"], "error": f"{type(exc).__name__}: {exc}"})
        return out

    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client_loop, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    failures = [r for r in results if "error" in r]
    crosstalk = [r for r in ok if r["text"] != refs[r["id"]]]
    lat = [1e3 * r["seconds"] for r in ok]
    tokens = sum(r["usage"].completion_tokens for r in ok if r["usage"] is not None)
    return {"clients": clients, "requests_per_client": per_client, "requests": len(results), "ok": len(ok),
            "failures": len(failures), "failure_examples": [r["error"] for r in failures[:3]],
            "crosstalk": len(crosstalk), "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 2),
            "completion_tokens_per_s": round(tokens / wall, 1),
            "latency_ms": {"p50": round(percentile(lat, 0.5), 1), "p95": round(percentile(lat, 0.95), 1),
                           "max": round(max(lat, default=float("nan")), 1)}}


def prepare(work: Path) -> Path:
    """The trained fixture exported and split (once per work dir); returns the split directory."""
    out = work / "out"
    if not (out / "program.json").exists():
        from rwkv2rknn.families.rwkv4 import load_pth
        from rwkv2rknn.families.rwkv4 import export_model
        from rwkv2rknn.split import split_model

        export_model(load_pth(FIXTURE), work / "model", dtype="float16", force=True, progress=False)
        split_model([work / "model"], out, force=True, progress=False)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / ".work" / "serve"))
    args = ap.parse_args(argv)
    from benchmarks.common import save_results

    work = Path(args.work)
    out = prepare(work)
    specs = request_specs(args.clients * args.requests, args.max_tokens)
    opts = ("--model-name", "tiny", "--state-dir", work / "states")
    with ServerProcess(out, *opts, runtime_only=False) as server:  # every request alone, one after another
        refs = references(server.url, "tiny", specs)
    with ServerProcess(out, *opts, runtime_only=False) as server:  # a fresh server: nothing cached, all at once
        load = run_load(server.url, "tiny", specs, args.clients, args.requests, refs)
        alive = server.alive()
    result = {"model": "rwkv4-tiny-trained (4 x 128, bytes vocab), split, default policy", "backend": "ort",
              "max_tokens": args.max_tokens, "greedy": True, "server_alive_after": alive, **load,
              "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": platform.processor() or platform.machine(),
                          "loadavg_at_end": list(os.getloadavg())},
              "note": "client and server share this machine's cores; loopback only"}
    print(f"serve: {load['requests']} requests from {args.clients} clients in {load['wall_s']:.2f} s: "
          f"{load['requests_per_s']:.1f} requests/s, {load['completion_tokens_per_s']:.0f} tokens/s, latency p50 "
          f"{load['latency_ms']['p50']:.0f} ms, p95 {load['latency_ms']['p95']:.0f} ms; {load['failures']} failed, "
          f"{load['crosstalk']} cross-talk")
    save_results("serve", result)
    return result


if __name__ == "__main__":
    main()
