"""`make bench`: every benchmark in one run, then a chart and the README's benchmark table.

Each benchmark runs in its own process (thread pools of torch and onnxruntime must not meet) and writes
benchmarks/results/<name>.json; this script draws benchmarks/results/summary.png and rewrites the
README section between the bench markers from those files, so the README always shows this run.

    .venv/bin/python -m benchmarks.run [--only partition,runtime,build] [--no-readme]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BENCHES = ("partition", "estimate", "runtime", "build", "serve")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def tables() -> str:
    lines = ["Measured by `make bench` on this project's CI-class machine (2 cores, no NPU); "
             "raw numbers in `benchmarks/results/`.", ""]
    part = _load("partition")
    if part:
        lines += ["**Partition per policy** (generated fp16 models; per token)", "",
                  "| shape | policy | NPU calls | vs matmul | NPU<->CPU KB | MatMul FLOPs on NPU | split s |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for shape, rows in part.items():
            for r in rows:
                lines.append(f"| {shape} | {r['policy']} | {r['npu_calls_per_token']} | {r['calls_vs_matmul']:.2f}x | "
                             f"{r['crossing_bytes_per_token'] / 1024:.0f} | {100 * r['npu_matmul_flop_share']:.1f}% | "
                             f"{r['split_seconds']:.1f} |")
        lines.append("")
    est = _load("estimate")
    if est:
        lines += estimate_table(est)
    rt = _load("runtime")
    if rt:
        res = rt["results"]
        shape = rt["shape"]
        lines += [f"**Decode, onnxruntime on the host** ({shape['layers']}x{shape['embd']}, vocab {shape['vocab']}, "
                  f"fp32, {rt.get('decode_tokens', '?')} greedy tokens)", "",
                  "| runner | ms/token | vs rwkv2rknn |", "|---|---:|---:|"]
        base = res["rwkv2rknn"]["ms_per_token"]
        for name, r in res.items():
            if isinstance(r, dict) and "ms_per_token" in r:
                lines.append(f"| {name} | {r['ms_per_token']:.1f} | {r['ms_per_token'] / base:.2f}x |")
        lines += ["", "rwkv2rknn = `python -m rwkv2rknn.run --backend ort` machinery over the split segments; "
                  "ideal = the exported fp32 source graphs, one tuned onnxruntime session each (their "
                  "weight-first 1-D MatMuls hit a slow onnxruntime path); ideal_normalized = the same graphs "
                  "after `passes.pipeline.normalize`, one tuned session each (the no-overhead baseline); "
                  "naive = the source graphs with default SessionOptions (spinning thread pools); "
                  "rwkv_pip = the `rwkv` package, strategy `cpu fp32`, same weights.", ""]
    b = _load("build")
    if b:
        lines += ["**Build** (`rwkv2rknn build --jobs 2` of the `fused` split with its default prefill plan, so NPU "
                  "segments count both plans; simulator verify on; warm = rebuild with nothing changed)", "",
                  "| shape | NPU segments | cold s | warm s | warm/cold | warm compiles | worst segment rel_l2 | "
                  "whole-model logits cosine min |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in b.items():
            vm = r.get("verify_model") or {}
            rel = r.get("verify_rel_l2_max")
            rel_txt = "-" if rel is None else f"{rel:.2e}"
            cos_txt = f"{vm['logits_cosine_min']:.6f}" if "logits_cosine_min" in vm else "-"
            lines.append(f"| {name} | {r['npu_segments']} | {r['cold_seconds']:.1f} | {r['warm_seconds']:.2f} | "
                         f"{100 * r['warm_vs_cold']:.1f}% | {r['warm_compiles']} | {rel_txt} | {cos_txt} |")
        lines.append("")
    sv = _load("serve")
    if sv:
        lat = sv["latency_ms"]
        lines += [f"**Serving** (`python -m rwkv2rknn.serve`, {sv['model']}, backend {sv['backend']}; "
                  f"{sv['clients']} concurrent `openai`-style clients x {sv['requests_per_client']} requests, "
                  f"{sv['max_tokens']} greedy tokens each, clients and server on the same 2 cores)", "",
                  "| requests | failures | cross-talk | requests/s | tokens/s | p50 ms | p95 ms |",
                  "|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {sv['requests']} | {sv['failures']} | {sv['crosstalk']} | {sv['requests_per_s']:.1f} | "
                  f"{sv['completion_tokens_per_s']:.0f} | {lat['p50']:.0f} | {lat['p95']:.0f} |", ""]
    return "\n".join(lines)


def estimate_table(est: dict) -> list[str]:
    rows = est["rows"]
    boards = list(dict.fromkeys(r["board"] for r in rows))
    pols = list(dict.fromkeys(r["policy"] for r in rows))
    by = {(r["board"], r["policy"]): r for r in rows}
    out = [f"**PREDICTED board time per token, {est['shape']} shape** (`rwkv2rknn estimate`: board profiles built "
           "from published figures and judgement, each constant with its source in `rwkv2rknn/cost/profiles/`; "
           "predictions, not board measurements)", "",
           "| policy | " + " | ".join(f"{b} decode ms | {b} prefill ms | NPU calls" for b in boards) + " |",
           "|---|" + "---:|---:|---:|" * len(boards)]
    for p in pols:
        cells = []
        for b in boards:
            r = by[(b, p)]
            cells.append(f"{r['decode_ms_per_token']:.1f} | {r['prefill_ms_per_token']:.1f} | "
                         f"{r['npu_calls_per_token']:g}")
        out.append(f"| {p} | " + " | ".join(cells) + " |")
    out += ["", "Backtests against published board figures (the only ground truth there is):", "",
            "| what | board profile | policy | published ms/token | predicted ms/token | within |",
            "|---|---|---|---:|---:|---|"]
    for t in est["backtests"]:
        out.append(f"| {t['what']} | {t['board']} | {t['policy']} | {t['published_ms']:.0f} | "
                   f"{t['predicted_ms']:.1f} | {'yes' if t['within'] else 'NO'} ({t['tolerance']:g}x) |")
    if est.get("rwkv7"):
        rk = est.get("rkllm") or {}
        out += ["", "**PREDICTED RWKV-7 board time per token** (random fp16 weights of the shapes; predictions from "
                "the board profiles rk3588 = Python RKNNLite and rk3588-c = librknnrt's C API with bound buffers, not "
                "measurements), beside Rockchip's own RKLLM (a published board measurement)", "",
                "| shape | plan | board profile | decode ms/token | prefill ms/token | conversion ms/token | "
                "NPU calls/token |", "|---|---|---|---:|---:|---:|---:|"]
        for r in est["rwkv7"]:
            out.append(f"| {r['shape']} | rwkv2rknn {r['policy']} fp16 (predicted) | {r.get('board', 'rk3588')} | "
                       f"{r['decode_ms_per_token']:.1f} | {r['prefill_ms_per_token']:.1f} | "
                       f"{r['breakdown'].get('conversion', 0.0):.1f} | {r['npu_calls_per_token']:g} |")
        if rk:
            out.append(f"| {rk['shape']} | RKLLM 1.3.0 w8a8 (published) | board | {rk['decode_ms_per_token']:.0f} | "
                       f"{rk['prefill_ms_per_token']:.1f} | - | - |")
    out.append("")
    return out


def chart(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part, rt, b = _load("partition"), _load("runtime"), _load("build")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    if part:
        ax = axes[0]
        shapes = list(part)
        width = 0.8 / max(1, len(shapes))
        for i, shape in enumerate(shapes):
            rows = part[shape]
            ax.bar([j + i * width for j in range(len(rows))], [r["npu_calls_per_token"] for r in rows], width,
                   label=shape)
            ax.set_xticks([j + width * (len(shapes) - 1) / 2 for j in range(len(rows))],
                          [r["policy"] for r in rows])
        ax.set_title("NPU calls per token (fewer is better)")
        ax.legend()
    if rt:
        ax = axes[1]
        items = [(k, v["ms_per_token"]) for k, v in rt["results"].items() if isinstance(v, dict) and "ms_per_token" in v]
        from matplotlib.ticker import NullFormatter

        ax.barh([k for k, _ in items], [v for _, v in items], color="#2e7d32")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        for i, (_, v) in enumerate(items):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=9)
        ax.set_xlim(right=max(v for _, v in items) * 3)
        ax.set_title("decode ms/token on the host (log; shorter is better)")
    if b:
        ax = axes[2]
        names = list(b)
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [b[n]["cold_seconds"] for n in names], 0.4, label="cold", color="#1565c0")
        ax.bar([x + 0.2 for x in xs], [b[n]["warm_seconds"] for n in names], 0.4, label="warm", color="#90caf9")
        ax.set_xticks(list(xs), [f"{n} ({b[n]['npu_segments']} NPU segs)" for n in names])
        ax.set_title("build seconds, --jobs 2")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def update_readme(text: str) -> None:
    readme = ROOT / "README.md"
    s = readme.read_text()
    if START in s and END in s:
        head, rest = s.split(START, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(BENCHES))
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="redraw chart and README from existing results")
    args = ap.parse_args(argv)
    failed = []
    for name in [] if args.report_only else args.only.split(","):
        print(f"== benchmarks.{name}", flush=True)
        if subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], cwd=ROOT).returncode != 0:
            failed.append(name)
    RESULTS.mkdir(parents=True, exist_ok=True)
    chart(RESULTS / "summary.png")
    text = tables()
    print(text)
    if not args.no_readme:
        update_readme(text)
    print(f"wrote {(RESULTS / 'summary.png').relative_to(ROOT)}" + ("" if args.no_readme else " and README.md"))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
