"""The drift report as a self-contained HTML page: per-feature histograms of reference and current as
inline SVG (no scripts, nothing fetched from anywhere)."""

from __future__ import annotations

from html import escape
from typing import Any

BAR_W, CHART_H, PAD = 22, 90, 4


def _svg(histogram: dict[str, Any] | None) -> str:
    if not histogram or not histogram.get("labels"):
        return "<p class='muted'>no histogram</p>"
    labels, ref, cur = histogram["labels"], histogram["reference"], histogram["current"]
    top = max([*ref, *cur, 1e-9])
    width = len(labels) * (2 * BAR_W + PAD) + PAD
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{CHART_H + 4}' role='img' "
        f"aria-label='reference (grey) and current (blue) shares per bin'>"
    ]
    for i, label in enumerate(labels):
        x = PAD + i * (2 * BAR_W + PAD)
        for j, (value, colour) in enumerate(((ref[i], "#9aa0a6"), (cur[i], "#1a73e8"))):
            h = CHART_H * value / top
            parts.append(
                f"<rect x='{x + j * BAR_W}' y='{CHART_H - h:.1f}' width='{BAR_W - 2}' height='{h:.1f}' "
                f"fill='{colour}'><title>{escape(str(label))}: {'reference' if j == 0 else 'current'} "
                f"{value:.3%}</title></rect>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _row(item: dict[str, Any]) -> str:
    p = item.get("p_value")
    draws = item.get("p_value_draws")
    shown_p = "" if p is None else f"{p:.3g}" + (f" (Monte Carlo, {draws:,} tables)" if draws else "")
    verdict = "drifted" if item.get("drifted") else "ok"
    untested = item.get("untested")
    statistic = f"not tested: {escape(untested)}" if untested else f"{item['statistic']:.4g}"
    if untested:
        verdict = "untested"
    return (
        f"<tr class='{verdict}'><td>{escape(item['feature'])}</td><td>{escape(item['feature_type'])}</td>"
        f"<td>{escape(item['test'])}</td><td>{statistic}</td>"
        f"<td>{shown_p}</td><td>{item['threshold']:.3g}</td>"
        f"<td>{verdict}</td><td>{item.get('consecutive_windows', 0)}</td>"
        f"<td>{item['n_current']}</td><td>{item['n_reference']}</td><td>{item['n_missing']}</td>"
        f"<td>{_svg(item.get('histogram'))}</td></tr>"
    )


def render(model: str, reports: list[dict[str, Any]], *, older: str | None = None, first: bool = True) -> str:
    """The page's first (latest) window's report in full, and a list of earlier windows; ``older``: the URL
    of the next page, the windows judged before these (None on the last page); ``first``: the first page,
    not one reached by a cursor."""
    head = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>driftloop drift report: {escape(model)}</title><style>"
        "body{font:14px system-ui,sans-serif;margin:24px;color:#202124}table{border-collapse:collapse}"
        "td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:middle}"
        "tr.drifted td{background:#fce8e6}.muted{color:#5f6368}.legend span{display:inline-block;width:12px;"
        "height:12px;margin:0 4px 0 12px}</style></head><body>"
    )
    if not reports:
        # The empty page after a full last one is not a model without windows.
        empty = "No window judged yet." if first else "No window judged before the previous page's."
        return head + f"<h1>{escape(model)}</h1><p>{empty}</p></body></html>"
    latest = reports[0]
    w = latest["window"]
    body = [
        f"<h1>Drift report: {escape(model)} v{latest['model_version']}</h1>",
        f"<p>Window <b>{escape(w['id'])}</b>: {w['size']} rows from {escape(w['start'])} to "
        f"{escape(w['end'])}."
        f" Correction: {escape(latest['correction'])} at alpha {latest['alpha']}. Drift share "
        f"{latest['drift_share']:.1%} (debounced {latest['debounced_share']:.1%}); alert: "
        f"{'yes' if latest['alerted'] else 'no'}.</p>",
        "<p class='legend'>Histograms:<span style='background:#9aa0a6'></span>reference"
        "<span style='background:#1a73e8'></span>current</p>",
        "<table><tr><th>feature</th><th>type</th><th>test</th><th>statistic</th><th>p (corrected)</th>"
        "<th>threshold</th><th>verdict</th><th>windows in a row</th><th>n current</th><th>n reference</th>"
        "<th>missing</th><th>histogram</th></tr>",
        *(_row(item) for item in latest["features"]),
    ]
    if latest.get("prediction"):
        body.append(_row(latest["prediction"]))
    body.append("</table>")
    if latest.get("quality"):
        body.append("<h2>Data quality</h2><ul>")
        body += [f"<li>{escape(q['message'])}</li>" for q in latest["quality"]]
        body.append("</ul>")
    if len(reports) > 1:
        body.append(
            "<h2>Earlier windows</h2><table><tr><th>window</th><th>rows</th><th>drift share</th>"
            "<th>drifted</th><th>alert</th></tr>"
        )
        for r in reports[1:]:
            body.append(
                f"<tr><td>{escape(r['window']['id'])}</td><td>{r['window']['size']}</td>"
                f"<td>{r['drift_share']:.1%}</td><td>{escape(', '.join(r['drifted_features']))}</td>"
                f"<td>{'yes' if r['alerted'] else ''}</td></tr>"
            )
        body.append("</table>")
    if older is not None:
        body.append(f"<p><a href='{escape(older)}' rel='next'>Older windows</a></p>")
    return head + "".join(body) + "</body></html>"
