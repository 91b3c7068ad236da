"""The report's picture of the predicted time per token: stacked bars by cost category, per graph and per policy."""

from __future__ import annotations

import html

from rwkv2rknn.cost.estimate import CATEGORIES, Estimate
from rwkv2rknn.cost.estimate import verdict as versus_cpu

CATEGORY_COLORS = {"npu_stream": "#2e7d32", "npu_compute": "#66bb6a", "npu_call": "#f9a825", "io_copy": "#8d6e63",
                   "conversion": "#ef6c00", "hops": "#c62828", "cpu_compute": "#1565c0", "cpu_call": "#90caf9",
                   "overlap": "#bdbdbd"}
CATEGORY_LABELS = {"npu_stream": "NPU weight streaming", "npu_compute": "NPU compute", "npu_call": "NPU call cost",
                   "io_copy": "NPU input/output copies", "conversion": "fp32<->fp16 conversion",
                   "hops": "CPU hops inside NPU models", "cpu_compute": "CPU (onnxruntime) compute",
                   "cpu_call": "CPU call cost", "overlap": "saved by overlapping CPU and NPU steps (negative)"}
BAR_W, BAR_H, LABEL_W = 760, 18, 170


def _bar(y: float, label: str, breakdown: dict, scale: float, total: float, note: str = "") -> list[str]:
    esc = html.escape
    parts = [f'<text x="{LABEL_W - 6}" y="{y + 13}" text-anchor="end">{esc(label)}</text>']
    x = float(LABEL_W)
    for k in CATEGORIES:
        w = breakdown.get(k, 0.0) * scale
        if w <= 0:
            continue
        parts.append(f'<g><title>{esc(CATEGORY_LABELS[k])}: {breakdown[k]:.3f} ms</title>'
                     f'<rect x="{x:.1f}" y="{y}" width="{w:.2f}" height="{BAR_H}" fill="{CATEGORY_COLORS[k]}"/></g>')
        x += w
    parts.append(f'<text x="{x + 5:.1f}" y="{y + 13}">{total:.2f} ms{esc(note)}</text>')
    return parts


def stacked_bars(rows: list[tuple[str, dict, float, str]]) -> str:
    """An SVG: one horizontal bar per (label, breakdown ms, total ms, note), scaled to the longest."""
    longest = max((t for _, _, t, _ in rows), default=0.0) or 1.0
    scale = BAR_W / longest
    height = len(rows) * (BAR_H + 6) + 4
    parts = [f'<svg width="{LABEL_W + BAR_W + 260}" height="{height}" font-family="system-ui,Arial,sans-serif" '
             f'font-size="11">']
    for i, (label, b, total, note) in enumerate(rows):
        parts += _bar(2 + i * (BAR_H + 6), label, b, scale, total, note)
    parts.append("</svg>")
    return "".join(parts)


def legend() -> str:
    return "<p class='legend'>" + "".join(
        f"<span style='background:{CATEGORY_COLORS[k]}'>{html.escape(CATEGORY_LABELS[k])}</span>"
        for k in CATEGORIES) + "</p>"


def cost_section(data: dict, est: Estimate, cpu: Estimate, profile_name: str, profile_path: str) -> str:
    """The report's section: where a token's time goes (predicted), per graph, and per policy for `auto` splits."""
    esc = html.escape
    out = [f"<h2>predicted time per token on board profile {esc(profile_name)}</h2>",
           "<p class='muted'>A PREDICTION from the board profile's constants (each with its source in "
           f"<code>{esc(profile_path)}</code>), not a board measurement. Where <code>build</code> recorded the "
           "compiler's own table, its cycles and CPU-placed ops are used.</p>", legend()]
    rows = [("this plan (decode)", est.breakdown, est.decode_ms_per_token,
             f", {est.npu_calls_per_token:g} NPU calls"),
            ("CPU-only plan", cpu.breakdown, cpu.decode_ms_per_token, "")]
    if est.prefill is not None:
        rows.insert(1, ("prefill plan", est.prefill.breakdown, est.prefill_ms_per_token, " per prompt token"))
    out.append(stacked_bars(rows))
    verdict = versus_cpu(est.decode_ms_per_token, cpu.decode_ms_per_token)
    if verdict == "LOSES to":
        verdict = "<b class='warn'>loses to</b>"
    out.append(f"<p>Predicted decode {est.decode_ms_per_token:.2f} ms/token: the plan {verdict} the CPU-only plan "
               f"({cpu.decode_ms_per_token:.2f} ms/token).</p>")
    out.append("<h2>per graph (predicted ms per token)</h2>")
    out.append(stacked_bars([(g.name, g.breakdown, g.ms_per_token,
                              f" ({g.npu_calls} NPU / {g.cpu_calls} CPU calls)") for g in est.decode.graphs]))
    autos = [g for g in data["graphs"] if isinstance(g.get("auto"), dict)]
    if autos:
        policies = sorted({p for g in autos for p in g["auto"].get("candidates", {})})
        out.append("<h2>policy per graph (auto): predicted ms per token of every candidate</h2><table><tr>"
                   "<th>graph</th><th>chosen</th>" + "".join(f"<th>{esc(p)}</th>" for p in policies)
                   + "<th>reason</th></tr>")
        for g in autos:
            a = g["auto"]
            cells = "".join(
                f"<td class='num'>{'<b>' if p == a['chosen'] else ''}{a['candidates'].get(p, float('nan')):.3f}"
                f"{'</b>' if p == a['chosen'] else ''}</td>" for p in policies)
            out.append(f"<tr><td>{esc(g['name'])}</td><td>{esc(a['chosen'])}</td>{cells}"
                       f"<td>{esc(a.get('reason', ''))}</td></tr>")
        out.append("</table>")
    return "\n".join(out)
