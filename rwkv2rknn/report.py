"""The partition report: one self-contained HTML page with an inline-SVG drawing of every graph."""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

from rwkv2rknn.fsio import write_bytes_atomic
from rwkv2rknn.manifest import Manifest

COLORS = {"npu": "#2e7d32", "cpu": "#1565c0", "fallback": "#c62828"}
BOX_W, BOX_H, GAP_X, GAP_Y = 92, 22, 26, 8


def _nbytes(t: dict) -> int:
    return int(np.prod(t["shape"], dtype=np.int64)) * np.dtype(t["dtype"]).itemsize


def _segment_nodes(manifest: Manifest, seg: dict) -> list[onnx.NodeProto]:
    model = onnx.load(str(manifest.resolve(seg["onnx"])), load_external_data=False)
    return list(model.graph.node)


def _layout(nodes: list[tuple[str, onnx.NodeProto]]) -> dict[str, tuple[int, int]]:
    """Column = longest path from the graph inputs (nodes come in topological order); row = order in column."""
    producer, depth, pos, rows = {}, {}, {}, defaultdict(int)
    for key, node in nodes:
        d = 0
        for name in node.input:
            if name in producer:
                d = max(d, depth[producer[name]] + 1)
        depth[key] = d
        for name in node.output:
            producer[name] = key
        pos[key] = (d, rows[d])
        rows[d] += 1
    return pos


def _svg(manifest: Manifest, graph: dict) -> str:
    nodes, seg_of, backend_of = [], {}, {}
    for seg in graph["segments"]:
        kind = "fallback" if seg.get("fallback_reason") else seg["backend"]
        for i, node in enumerate(_segment_nodes(manifest, seg)):
            key = f"{seg['id']}/{node.name or i}"
            nodes.append((key, node))
            seg_of[key], backend_of[key] = seg["id"], kind
    pos = _layout(nodes)
    width = (max((c for c, _ in pos.values()), default=0) + 1) * (BOX_W + GAP_X) + 20
    height = (max((r for _, r in pos.values()), default=0) + 1) * (BOX_H + GAP_Y) + 20

    def xy(key):
        c, r = pos[key]
        return 10 + c * (BOX_W + GAP_X), 10 + r * (BOX_H + GAP_Y)

    producer = {}
    for key, node in nodes:
        for name in node.output:
            producer[name] = key
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="10">']
    for key, node in nodes:
        x2, y2 = xy(key)
        for name in node.input:
            if name in producer:
                src = producer[name]
                x1, y1 = xy(src)
                crossing = seg_of[src] != seg_of[key]
                parts.append(f'<line x1="{x1 + BOX_W}" y1="{y1 + BOX_H / 2}" x2="{x2}" y2="{y2 + BOX_H / 2}" '
                             f'stroke="{"#f9a825" if crossing else "#9e9e9e"}" '
                             f'stroke-width="{2 if crossing else 0.7}"/>')
    for key, node in nodes:
        x, y = xy(key)
        title = html.escape(f"{node.name} ({node.op_type}) in {seg_of[key]}")
        parts.append(f'<g><title>{title}</title><rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="4" '
                     f'fill="{COLORS[backend_of[key]]}" opacity="0.9"/>'
                     f'<text x="{x + 4}" y="{y + 14}" fill="white">{html.escape(node.op_type[:14])}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _totals(manifest: Manifest) -> dict:
    calls = flops = npu_flops = crossing = 0
    for _, seg in manifest.segments():
        f = int(seg.get("matmul_flops", 0))
        flops += f
        if seg["backend"] == "npu":
            calls += 1
            npu_flops += f
            crossing += sum(_nbytes(t) for t in seg["inputs"] + seg["outputs"])
    return {"npu_calls": calls, "npu_share": npu_flops / flops if flops else 0.0, "crossing": crossing,
            "flops": flops}


def render_report(manifest_path: str | Path) -> str:
    manifest = Manifest.load(manifest_path, check_files=False)
    t = _totals(manifest)
    esc = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>rwkv2rknn partition report</title><style>",
           "body{font-family:sans-serif;margin:24px;color:#222} table{border-collapse:collapse;margin:8px 0}"
           "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}"
           ".npu{color:#2e7d32;font-weight:bold}.cpu{color:#1565c0;font-weight:bold}.fallback{color:#c62828}"
           "details{margin:10px 0;border:1px solid #ddd;border-radius:6px;padding:6px 10px}"
           "summary{cursor:pointer;font-weight:bold}.svgbox{overflow:auto;max-height:520px;border:1px solid #eee}"
           ".legend span{display:inline-block;padding:2px 8px;margin-right:6px;color:white;border-radius:3px}",
           "</style></head><body>",
           "<h1>rwkv2rknn partition report</h1>",
           f"<p>manifest <code>{esc(str(manifest.path))}</code>, target <b>{esc(manifest.target)}</b>, "
           f"policy <b>{esc(str(manifest.data.get('policy')))}</b>, "
           f"{len(manifest.graphs)} graphs.</p>",
           "<table><tr><th>NPU calls per token</th><th>MatMul FLOPs on the NPU</th>"
           "<th>bytes crossing NPU&harr;CPU per token</th><th>MatMul GFLOP per token</th></tr>",
           f"<tr><td>{t['npu_calls']}</td><td>{100 * t['npu_share']:.1f}%</td><td>{t['crossing']:,}</td>"
           f"<td>{t['flops'] / 1e9:.4f}</td></tr></table>",
           "<p class='legend'><span style='background:#2e7d32'>NPU</span><span style='background:#1565c0'>CPU"
           "</span><span style='background:#c62828'>NPU build failed &rarr; CPU</span>"
           "<span style='background:#f9a825'>edge crossing a segment boundary</span></p>"]
    for gi, graph in enumerate(manifest.graphs):
        segs = graph["segments"]
        n_npu = sum(s["backend"] == "npu" for s in segs)
        open_attr = " open" if gi < 3 or len(manifest.graphs) <= 4 else ""
        out.append(f"<details{open_attr}><summary>{esc(graph['name'])}: {n_npu} NPU / {len(segs) - n_npu} CPU "
                   "segments</summary>")
        out.append("<table><tr><th>segment</th><th>backend</th><th>nodes</th><th>MatMul MFLOP</th>"
                   "<th>inputs</th><th>outputs</th><th>verify (cosine / max abs)</th><th>fallback reason</th></tr>")
        for s in segs:
            v = s.get("verify")
            ver = f"{v['cosine']:.6f} / {v['max_abs']:.3g}" if v else "-"
            kind = "fallback" if s.get("fallback_reason") else s["backend"]
            io = [", ".join(f"{esc(t['name'])}{t['shape']}" for t in s[k]) for k in ("inputs", "outputs")]
            out.append(f"<tr><td>{esc(s['id'])}</td><td class='{kind}'>{s['backend']}</td>"
                       f"<td>{s.get('nodes', '')}</td><td>{int(s.get('matmul_flops', 0)) / 1e6:.3f}</td>"
                       f"<td>{io[0]}</td><td>{io[1]}</td><td>{ver}</td>"
                       f"<td>{esc(s.get('fallback_reason', ''))}</td></tr>")
        out.append("</table>")
        out.append(f"<div class='svgbox'>{_svg(manifest, graph)}</div>")
        cpu_rows = [p for p in graph.get("placement", []) if p["backend"] == "cpu"]
        if cpu_rows:
            out.append(f"<details><summary>why {len(cpu_rows)} nodes run on the CPU</summary><table>"
                       "<tr><th>node</th><th>op</th><th>segment</th><th>reason</th></tr>")
            out += [f"<tr><td>{esc(p['node'])}</td><td>{esc(p['op'])}</td><td>{esc(p['segment'])}</td>"
                    f"<td>{esc(p['reason'])}</td></tr>" for p in cpu_rows]
            out.append("</table></details>")
        out.append("</details>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(manifest_path: str | Path, out_html: str | Path) -> Path:
    text = render_report(manifest_path)
    write_bytes_atomic(out_html, text.encode())
    return Path(out_html)
