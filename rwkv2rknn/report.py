"""The partition report: one self-contained HTML page with an inline-SVG drawing of every graph."""

from __future__ import annotations

import html
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from rwkv2rknn import __version__
from rwkv2rknn.fsio import write_bytes_atomic
from rwkv2rknn.manifest import Manifest

COLORS = {"npu": "#2e7d32", "cpu": "#1565c0", "fallback": "#c62828"}
MATMUL_COLORS = {"npu": "#1b4d1e", "cpu": "#0b3a80", "fallback": "#8e1515"}
LANE_FILL = {"npu": "#e8f5e9", "cpu": "#e3f2fd", "fallback": "#ffebee"}
BOUNDARY = "#ef6c00"
LABELS = {"npu": "NPU", "cpu": "CPU", "fallback": "NPU build failed, runs on CPU"}
# Drawing geometry (px): each segment is one horizontal lane; its label sits left of its nodes.
BOX_W, BOX_H, GAP_X, GAP_Y = 80, 20, 18, 6
LABEL_W, LANE_PAD, LANE_GAP, LANE_MIN_H = 190, 8, 16, 74
# A lane deeper than this many columns wraps onto another band, so a drawing fits a 1400 px window.
WRAP_COLS = 11
BAND_GAP = 14
MATMUL_OPS = ("MatMul", "Gemm", "Conv")

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:24px;color:#222;
 max-width:1600px}
h1{margin:0 0 6px 0;font-size:24px} h2{font-size:17px;margin:18px 0 6px 0}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #cfd4d9;padding:3px 8px;font-size:13px;text-align:left;vertical-align:top}
th{background:#f3f5f7} td.num{text-align:right;font-variant-numeric:tabular-nums}
.npu{color:#2e7d32;font-weight:bold}.cpu{color:#1565c0;font-weight:bold}.fallback{color:#c62828;font-weight:bold}
.warn{color:#c62828}
.totals td{font-size:18px;font-weight:bold;padding:6px 14px}.totals th{font-size:12px}
details.graph{margin:10px 0;border:1px solid #d5d9de;border-radius:6px;padding:6px 10px}
details.graph>summary{cursor:pointer;font-weight:bold;font-size:15px}
details.why>summary{cursor:pointer;margin:6px 0}
.svgbox{overflow-x:auto;border:1px solid #eceff1;margin:6px 0}
.svgbox svg{display:block}
.legend span{display:inline-block;padding:2px 8px;margin:0 6px 4px 0;color:white;border-radius:3px;font-size:13px}
.muted{color:#666;font-size:13px} button{margin-right:6px} .t{white-space:nowrap}
"""

# Opening a closed section when its link is followed, and the expand/collapse buttons. Inline: the
# page must work from a file with no network.
SCRIPT = """
function openHash(){var e=document.getElementById(location.hash.slice(1));if(e&&e.tagName=='DETAILS')e.open=true;}
window.addEventListener('hashchange',openHash);window.addEventListener('load',openHash);
function setAll(v){document.querySelectorAll('details.graph').forEach(function(d){d.open=v;});}
"""


@dataclass
class _Node:
    key: str
    name: str
    op: str
    inputs: list[str]
    outputs: list[str]


@dataclass
class _Lane:
    seg: dict
    kind: str  # "npu" | "cpu" | "fallback"
    nodes: list[_Node] = field(default_factory=list)
    missing: str | None = None  # why the nodes could not be read


def _nbytes(t: dict) -> int:
    return int(np.prod(t["shape"], dtype=np.int64)) * np.dtype(t["dtype"]).itemsize


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _kind(seg: dict) -> str:
    return "fallback" if seg.get("fallback_reason") else seg["backend"]


def _file_size(manifest: Manifest, rel: str | None) -> int | None:
    if not rel:
        return None
    try:
        return manifest.resolve(rel).stat().st_size
    except OSError:
        return None


def _lanes(manifest: Manifest, graph: dict) -> list[_Lane]:
    lanes = []
    for seg in graph["segments"]:
        lane = _Lane(seg, _kind(seg))
        try:
            # Only the node list is needed; external weight files, if any, stay unread.
            model = onnx.load(str(manifest.resolve(seg["onnx"])), load_external_data=False)
        except Exception as exc:  # noqa: BLE001  (a report of a damaged directory should still render)
            lane.missing = f"cannot read {seg['onnx']} ({type(exc).__name__})"
        else:
            for i, node in enumerate(model.graph.node):
                lane.nodes.append(_Node(f"{seg['id']}/{i}", node.name or f"#{i}", node.op_type,
                                        [n for n in node.input if n], list(node.output)))
        lanes.append(lane)
    return lanes


def _local_layout(nodes: list[_Node]) -> dict[str, tuple[int, int]]:
    """Column = longest path from the lane's inputs (nodes come in topological order); row = order in column."""
    producer, depth, pos, rows = {}, {}, {}, defaultdict(int)
    for node in nodes:
        d = 0
        for name in node.inputs:
            if name in producer:
                d = max(d, depth[producer[name]] + 1)
        depth[node.key] = d
        for name in node.outputs:
            producer[name] = node.key
        pos[node.key] = (d, rows[d])
        rows[d] += 1
    return pos


def _svg(graph: dict, lanes: list[_Lane], reasons: dict[str, str]) -> str:
    """Segments as stacked lanes in execution order; edges inside a lane grey, across lanes orange."""
    esc = html.escape
    layouts = [_local_layout(lane.nodes) for lane in lanes]
    max_cols = min(WRAP_COLS, max((c + 1 for lay in layouts for c, _ in lay.values()), default=1))
    width = LABEL_W + 12 + max_cols * (BOX_W + GAP_X) + 10
    xy, lane_y, lane_h, y = {}, [], [], 8
    for lay in layouts:
        # Columns past WRAP_COLS continue on a band below (band = column // WRAP_COLS).
        band_rows = defaultdict(int)
        for c, r in lay.values():
            band_rows[c // WRAP_COLS] = max(band_rows[c // WRAP_COLS], r + 1)
        bands = max(band_rows, default=-1) + 1
        band_top, used = {}, 0.0
        for b in range(bands):
            band_top[b] = used
            used += band_rows[b] * (BOX_H + GAP_Y) - GAP_Y + BAND_GAP
        used = max(0.0, used - BAND_GAP)
        h = max(LANE_MIN_H, used + 2 * LANE_PAD)
        top = y + (h - used) / 2
        for key, (c, r) in lay.items():
            b = c // WRAP_COLS
            xy[key] = (LABEL_W + 12 + (c % WRAP_COLS) * (BOX_W + GAP_X), top + band_top[b] + r * (BOX_H + GAP_Y))
        lane_y.append(y)
        lane_h.append(h)
        y += h + LANE_GAP
    height = y - LANE_GAP + 8

    # No xmlns: inline SVG in HTML needs none, and the page carries no URL at all.
    parts = [(f'<svg width="{width}" height="{height:.0f}" '
             f'viewBox="0 0 {width} {height:.0f}" font-family="system-ui,Arial,sans-serif" font-size="10">')]
    # Lanes: a tinted band per segment with its id, backend, size and verify result.
    for lane, ly, lh in zip(lanes, lane_y, lane_h):
        seg, kind = lane.seg, lane.kind
        tip = "; ".join(x for x in (seg.get("fallback_reason"), lane.missing) if x) or seg["id"]
        parts.append(f'<g><title>{esc(tip)}</title><rect x="2" y="{ly}" width="{width - 4}" height="{lh}" rx="6" '
                     f'fill="{LANE_FILL[kind]}" stroke="{COLORS[kind]}" stroke-width="1.5"/></g>')
        parts.append(f'<rect x="2" y="{ly}" width="6" height="{lh}" rx="3" fill="{COLORS[kind]}"/>')
        v = seg.get("verify")
        lines = [(f"{seg['id']}", "bold", 12, "#111"),
                 ((f"{LABELS[kind] if kind != 'fallback' else 'CPU (NPU build failed)'} · "
                  f"{seg.get('nodes', len(lane.nodes))} nodes"), "bold", 10, COLORS[kind]),
                 ((f"MatMul {int(seg.get('matmul_flops', 0)) / 1e6:.3g} MFLOP · "
                  f"in {_human_bytes(sum(_nbytes(t) for t in seg['inputs']))}"), "normal", 10, "#333")]
        if v:
            lines.append((f"verify {verify_text(v)}", "normal", 10, "#333"))
        if seg.get("fallback_reason"):
            lines.append((f"fallback: {seg['fallback_reason'][:26]}…", "normal", 10, COLORS["fallback"]))
        if lane.missing:
            lines.append(("segment file unreadable", "normal", 10, COLORS["fallback"]))
        ty = ly + 17
        for text, weight, size, color in lines:
            parts.append(f'<text x="14" y="{ty}" font-size="{size}" font-weight="{weight}" fill="{color}">'
                         f'{esc(text)}</text>')
            ty += 14
    # Edges: intra-segment grey, segment-crossing orange (these tensors are the segment boundaries).
    producer, lane_of = {}, {}
    for li, lane in enumerate(lanes):
        for node in lane.nodes:
            lane_of[node.key] = li
            for name in node.outputs:
                producer[name] = node
    inner, cross = [], []
    for lane in lanes:
        for node in lane.nodes:
            x2, y2 = xy[node.key]
            for name in dict.fromkeys(node.inputs):
                src = producer.get(name)
                if src is None or src.key == node.key:
                    continue
                x1, y1 = xy[src.key]
                if lane_of[src.key] == lane_of[node.key] and x1 >= x2:  # into a wrapped band below
                    sx, sy, ex, ey = x1 + BOX_W / 2, y1 + BOX_H, x2 + BOX_W / 2, y2
                    dy = max(12.0, (ey - sy) / 2)
                    inner.append(f'<path d="M{sx},{sy} C{sx},{sy + dy} {ex},{ey - dy} {ex},{ey}" fill="none" '
                                 f'stroke="#78909c" stroke-width="0.9" stroke-dasharray="3,2"/>')
                elif lane_of[src.key] == lane_of[node.key]:
                    sx, sy, ex, ey = x1 + BOX_W, y1 + BOX_H / 2, x2, y2 + BOX_H / 2
                    mx = (sx + ex) / 2
                    inner.append(f'<path d="M{sx},{sy} C{mx},{sy} {mx},{ey} {ex},{ey}" fill="none" '
                                 f'stroke="#78909c" stroke-width="0.9"/>')
                else:
                    sx, sy, ex, ey = x1 + BOX_W / 2, y1 + BOX_H, x2 + BOX_W / 2, y2
                    dy = max(20.0, (ey - sy) / 2)
                    cross.append(f'<path d="M{sx},{sy} C{sx},{sy + dy} {ex},{ey - dy} {ex},{ey}" fill="none" '
                                 f'stroke="{BOUNDARY}" stroke-width="1.2" opacity="0.55">'
                                 f'<title>{esc(name)}: {esc(src.name)} -&gt; {esc(node.name)}</title></path>')
    parts += inner + cross
    # Nodes last, on top of the edges.
    for lane in lanes:
        seg_inputs = {t["name"] for t in lane.seg["inputs"]}
        seg_outputs = {t["name"] for t in lane.seg["outputs"]}
        for node in lane.nodes:
            x, y0 = xy[node.key]
            is_mm = node.op in MATMUL_OPS
            fill = (MATMUL_COLORS if is_mm else COLORS)[lane.kind]
            why = reasons.get(node.name, "")
            title = f"{node.name} ({node.op}) in {lane.seg['id']}" + (f"\n{why}" if why else "")
            bold = ' font-weight="bold"' if is_mm else ""
            parts.append(f'<g><title>{esc(title)}</title><rect x="{x}" y="{y0}" width="{BOX_W}" '
                         f'height="{BOX_H}" rx="4" fill="{fill}"/>'
                         f'<text x="{x + BOX_W / 2}" y="{y0 + 14}" fill="white" text-anchor="middle"'
                         f'{bold}>{esc(node.op[:14])}</text>')
            if any(n in seg_inputs for n in node.inputs):  # reads a boundary tensor
                parts.append(f'<path d="M{x - 6},{y0 + 4} L{x},{y0 + BOX_H / 2} L{x - 6},{y0 + BOX_H - 4}z" '
                             f'fill="{BOUNDARY}"/>')
            if any(n in seg_outputs for n in node.outputs):  # writes a boundary tensor
                parts.append(f'<path d="M{x + BOX_W},{y0 + 4} L{x + BOX_W + 6},{y0 + BOX_H / 2} '
                             f'L{x + BOX_W},{y0 + BOX_H - 4}z" fill="{BOUNDARY}"/>')
            parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def totals(manifest: Manifest) -> dict:
    """Per-token totals: NPU calls, MatMul FLOPs (all / on the NPU), bytes into and out of NPU calls."""
    calls = flops = npu_flops = crossing = 0
    for _, seg in manifest.segments():
        f = int(seg.get("matmul_flops", 0))
        flops += f
        if seg["backend"] == "npu":
            calls += 1
            npu_flops += f
            crossing += sum(_nbytes(t) for t in seg["inputs"] + seg["outputs"])
    return {"npu_calls": calls, "npu_share": npu_flops / flops if flops else 0.0, "crossing": crossing,
            "flops": flops, "npu_flops": npu_flops}


def _badness(v: dict) -> float:
    return v["rel_l2"] if "rel_l2" in v else 1.0 - v.get("cosine", 1.0)


def verify_text(v: dict) -> str:
    """rel_l2 first (cosine is noise on near-zero outputs); manifests from older builds carry cosine only."""
    if "rel_l2" in v:
        return f"rel_l2 {v['rel_l2']:.2e} (cos {v['cosine']:.6f})"
    return f"cos {v['cosine']:.6f}"


def _graph_row(graph: dict) -> dict:
    segs = graph["segments"]
    flops = sum(int(s.get("matmul_flops", 0)) for s in segs)
    npu = [s for s in segs if s["backend"] == "npu"]
    npu_flops = sum(int(s.get("matmul_flops", 0)) for s in npu)
    verified = [s["verify"] for s in npu if s.get("verify")]
    return {"npu": len(npu), "cpu": len(segs) - len(npu), "flops": flops,
            "share": npu_flops / flops if flops else None,
            "crossing": sum(_nbytes(t) for s in npu for t in s["inputs"] + s["outputs"]),
            "worst": max(verified, key=_badness) if verified else None,
            "fallbacks": sum(1 for s in segs if s.get("fallback_reason"))}


def _anchor(name: str) -> str:
    return "g-" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)


def _open_by_default(names: list[str], i: int) -> bool:
    """Few graphs: all open. Many: embed, the first mixing graph and head; the rest collapse."""
    if len(names) <= 4:
        return True
    first_mixing = next((k for k, n in enumerate(names) if n.startswith("mixing")), 0)
    return i in (0, first_mixing, len(names) - 1)


def _cost_html(manifest: Manifest, board: str | None) -> tuple[str, dict]:
    """The predicted-time section (or a note why there is none: features missing, a bad profile), and the
    predicted time of every segment: id -> (breakdown ms per call, ms per call)."""
    from rwkv2rknn.cost.estimate import estimate, with_features
    from rwkv2rknn.cost.profile import load_profile
    from rwkv2rknn.errors import UserError
    from rwkv2rknn.report_cost import cost_section

    try:
        profile = load_profile(board or manifest.data.get("board") or "rk3588")
        data, _ = with_features(manifest.data, lambda g, s: onnx.load(str(manifest.resolve(s["onnx"]))))
        est, cpu = estimate(data, profile), estimate(data, profile, all_cpu=True)
    except (UserError, OSError, ValueError) as exc:
        return f"<p class='muted'>no time prediction: {html.escape(str(exc))}</p>", {}
    per_segment = {s.id: (s.breakdown, s.ms) for plan in (est.decode, est.prefill) if plan is not None
                   for g in plan.graphs for s in g.segments}
    return cost_section(data, est, cpu, profile.name, str(profile.path)), per_segment


def render_report(manifest_path: str | Path, board: str | None = None) -> str:
    manifest = Manifest.load(manifest_path, check_files=False)
    t = totals(manifest)
    esc = html.escape
    build = manifest.data.get("build") or {}
    names = [g["name"] for g in manifest.all_graphs()]
    n_npu_built = sum(1 for _, s in manifest.segments() if s.get("rknn"))
    if build:
        built = (f"built with rknn-toolkit2 {esc(str(build.get('toolkit')))}, precision "
                 f"<b>{esc(str(build.get('precision')))}</b> ({n_npu_built} .rknn files)")
    else:
        built = "<span class='warn'>not built yet</span> (run <code>rwkv2rknn build</code> for verify metrics)"
    model = manifest.model or {}
    from rwkv2rknn import families

    label = families.get(model["family"]).label if model.get("family") else ""
    model_txt = (f"{label}, {model['n_layer']} layers, n_embd {model['n_embd']}, vocab {model['vocab_size']}; "
                 if model else "")
    out = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
           "<meta name='viewport' content='width=device-width,initial-scale=1'>",
           f"<title>rwkv2rknn partition report: {esc(str(manifest.path))}</title><style>{CSS}</style>",
           f"<script>{SCRIPT}</script></head><body>",
           "<h1>rwkv2rknn partition report</h1>",
           (f"<p class='muted'>{model_txt}manifest <code>{esc(str(manifest.path))}</code>, target "
           f"<b>{esc(manifest.target)}</b>, policy <b>{esc(str(manifest.data.get('policy')))}</b>"
           f"{', --npu-all' if manifest.data.get('npu_all') else ''}, {len(names)} graphs, "
           f"{sum(len(g['segments']) for g in manifest.all_graphs())} segments"
           + (f" (with a prefill plan of {manifest.prefill['chunk']} tokens per call)" if manifest.prefill else "")
           + f"; {built}. "
           f"Written by rwkv2rknn {esc(__version__)}.</p>"),
           ("<table class='totals'><tr><th>NPU calls per token</th><th>MatMul FLOPs on the NPU</th>"
           "<th>bytes crossing NPU&harr;CPU per token</th><th>MatMul FLOP per token</th></tr>"),
           (f"<tr><td>{t['npu_calls']}</td><td>{100 * t['npu_share']:.1f}%</td>"
           f"<td title='{t['crossing']:,} bytes: inputs and outputs of every NPU call'>"
           f"{_human_bytes(t['crossing'])}</td><td>{t['flops'] / 1e6:,.2f} M</td></tr></table>"),
           "<p class='legend'>"
           + "".join(f"<span style='background:{COLORS[k]}'>{LABELS[k]}</span>" for k in ("npu", "cpu", "fallback"))
           + f"<span style='background:{MATMUL_COLORS['npu']}'><b>MatMul</b> (darker)</span>"
           f"<span style='background:{BOUNDARY}'>&#9654; tensor crossing a segment boundary</span></p>",
           ("<p class='muted'>Each graph below is drawn as one lane per segment, in execution order; a node's "
           "column is its depth inside its segment. Hover a node for its name and placement reason. "
           "Bytes crossing are the inputs plus outputs of every NPU call.</p>")]

    cost_html, seg_cost = _cost_html(manifest, board)
    out.append(cost_html)
    # Overview: one row per graph, linking to its section.
    out.append("<h2>graphs</h2><p><button onclick='setAll(true)'>expand all</button>"
               "<button onclick='setAll(false)'>collapse all</button></p>")
    out.append("<table><tr><th>graph</th><th>NPU segs</th><th>CPU segs</th><th>MatMul MFLOP</th>"
               "<th>on NPU</th><th>NPU&harr;CPU bytes</th><th>verify (worst segment)</th><th>fallbacks</th></tr>")
    for g in manifest.all_graphs():
        r = _graph_row(g)
        share = f"{100 * r['share']:.1f}%" if r["share"] is not None else "-"
        cos = verify_text(r["worst"]) if r["worst"] is not None else "-"
        fb = f"<span class='warn'>{r['fallbacks']}</span>" if r["fallbacks"] else "0"
        out.append(f"<tr><td><a href='#{_anchor(g['name'])}'>{esc(g['name'])}</a></td>"
                   f"<td class='num'>{r['npu']}</td><td class='num'>{r['cpu']}</td>"
                   f"<td class='num'>{r['flops'] / 1e6:.3f}</td><td class='num'>{share}</td>"
                   f"<td class='num'>{r['crossing']:,}</td><td class='num'>{cos}</td><td class='num'>{fb}</td></tr>")
    out.append("</table>")

    for gi, graph in enumerate(manifest.all_graphs()):
        segs = graph["segments"]
        r = _graph_row(graph)
        open_attr = " open" if _open_by_default(names, gi) else ""
        fell_back = f", {r['fallbacks']} fell back" if r["fallbacks"] else ""
        if r["worst"] is not None:
            fell_back += f"; worst verify {verify_text(r['worst'])}"
        out.append(f"<details class='graph' id='{_anchor(graph['name'])}'{open_attr}><summary>"
                   f"{esc(graph['name'])}: {r['npu']} NPU / {r['cpu']} CPU segments"
                   f"{fell_back}</summary>")
        priced = [(s["id"], *seg_cost[s["id"]]) for s in segs if s["id"] in seg_cost]
        if priced:  # where each call's predicted time goes, segment by segment
            from rwkv2rknn.report_cost import stacked_bars

            out.append("<p class='muted'>predicted ms per call of each segment (board profile; a prediction):</p>"
                       + stacked_bars([(sid, b, ms, "") for sid, b, ms in priced]))
        out.append("<table><tr><th>segment</th><th>backend</th><th>nodes</th><th>MatMul MFLOP</th>"
                   "<th>files</th><th>inputs</th><th>outputs</th><th>verify rel_l2 (cosine) / max abs</th>"
                   "<th>fallback reason</th></tr>")
        for s in segs:
            v = s.get("verify")
            ver = f"{verify_text(v)} / {v['max_abs']:.3g}" if v else "-"
            kind = _kind(s)
            io = ["<br>".join(f"<span class='t'><code>{esc(t['name'])}</code> {t['shape']}</span>" for t in s[k])
                  for k in ("inputs", "outputs")]
            files = []
            for key in ("onnx", "rknn"):
                size = _file_size(manifest, s.get(key))
                if s.get(key):
                    files.append(f"{key} {_human_bytes(size)}" if size is not None else f"{key} missing")
            note = esc(s.get("fallback_reason", ""))
            if s.get("bisected_from"):
                note = (note + "<br>" if note else "") + f"piece of {esc(s['bisected_from'])}" + (
                    f": {esc(s['bisect_reason'])}" if s.get("bisect_reason") else "")
            out.append(f"<tr><td><code>{esc(s['id'])}</code></td><td class='{kind}'>{s['backend']}"
                       f"{' (fallback)' if kind == 'fallback' else ''}</td>"
                       f"<td class='num'>{s.get('nodes', '')}</td>"
                       f"<td class='num'>{int(s.get('matmul_flops', 0)) / 1e6:.3f}</td>"
                       f"<td>{'<br>'.join(files)}</td><td>{io[0]}</td><td>{io[1]}</td><td>{ver}</td>"
                       f"<td class='warn'>{note}</td></tr>")
        out.append("</table>")
        placement = graph.get("placement", [])
        reasons = {p["node"]: f"{p['backend']}: {p['reason']}" for p in placement}
        out.append(f"<div class='svgbox'>{_svg(graph, _lanes(manifest, graph), reasons)}</div>")
        cpu_rows = [p for p in placement if p["backend"] == "cpu"]
        if cpu_rows:
            out.append(f"<details class='why'><summary>why {len(cpu_rows)} nodes run on the CPU</summary><table>"
                       "<tr><th>node</th><th>op</th><th>segment</th><th>reason</th></tr>")
            out += [f"<tr><td><code>{esc(p['node'])}</code></td><td>{esc(p['op'])}</td>"
                    f"<td><code>{esc(p['segment'])}</code></td><td>{esc(p['reason'])}</td></tr>"
                    for p in cpu_rows]
            out.append("</table></details>")
        out.append("</details>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(manifest_path: str | Path, out_html: str | Path, board: str | None = None) -> Path:
    text = render_report(manifest_path, board)
    write_bytes_atomic(out_html, text.encode())
    return Path(out_html)
