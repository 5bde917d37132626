"""The report page: one self-contained HTML document, its style, its table-sorting script and the
Content-Security-Policy that lets nothing load from anywhere (only data: images, and our own style and
script, allowed by hash).

Owns the order of the sections: key findings first, then the SSIM distribution, groups, one section per
other metric the run computed (PSNR, MS-SSIM), worst pairs, failures, and the run's facts at the end.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Mapping, Sequence

from ssim_ray.report.charts import Plot
from ssim_ray.report.findings import findings_section
from ssim_ray.report.markup import esc
from ssim_ray.report.metric_sections import metric_nav, metric_sections
from ssim_ray.report.sections import (
    distribution_section,
    facts_section,
    failures_section,
    groups_section,
    worst_section,
)
from ssim_ray.report.worst import WorstPanel

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1180px;padding:16px 24px;
color:#222}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:14px 0 6px}
nav{font-size:13px;color:#555;margin:4px 0 8px}nav a{color:#1f5ea8;margin-right:12px;text-decoration:none}
table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
caption{text-align:left;font-weight:600;padding:2px 0 4px;white-space:nowrap}
table.kv table.kv{margin:0}table.kv table.kv th{background:#fafafa;font-weight:500}
table.sortable th{cursor:pointer}table.sortable th[aria-sort=ascending]::after{content:' \\25B2'}
table.sortable th[aria-sort=descending]::after{content:' \\25BC'}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px;margin:12px 0}
.tile{border:1px solid #ddd;border-left:4px solid #9aa7b8;border-radius:4px;padding:8px 12px}
.tile.good{border-left-color:#1b7f3b}.tile.bad{border-left-color:#b00020}
.tile .label{font-size:12px;color:#555;text-transform:uppercase;letter-spacing:.04em}
.tile .big{font-size:26px;font-weight:600;font-variant-numeric:tabular-nums}.tile .detail{font-size:12px;color:#555}
.verdict{font-size:15px}
.facts,.plots{display:flex;flex-wrap:wrap;gap:16px 24px;align-items:flex-start}.plots figure{margin:0}
.bad{color:#b00020;font-weight:600}.good{color:#1b7f3b;font-weight:600}.tile.bad,.tile.good{color:inherit;font-weight:inherit}
img{max-width:100%;height:auto}.plots img,.pair img{border:1px solid #eee}
.pair{border:1px solid #ddd;padding:8px 12px;margin:12px 0}.pair h3{margin-top:4px}
.images{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start;margin-top:8px}.images figure{margin:0}
figcaption{font-size:12px;color:#555}.meaning{color:#555;margin:0}
code{font-size:12px;word-break:break-all}.note{color:#8a5a00}
"""

SCRIPT = """
(function () {
  function key(cell, numeric) {
    var value = cell.getAttribute('data-sort');
    if (value === null) { value = cell.textContent; }
    if (!numeric) { return value.toLowerCase(); }
    var number = parseFloat(value);
    return isNaN(number) ? -Infinity : number;
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    table.querySelectorAll('th').forEach(function (th) {
      th.addEventListener('click', function () {
        var numeric = th.getAttribute('data-type') === 'number';
        var ascending = th.getAttribute('aria-sort') !== 'ascending';
        table.querySelectorAll('th').forEach(function (other) { other.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[th.cellIndex], numeric), y = key(b.cells[th.cellIndex], numeric);
          return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1);
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });
})();
"""

NAV = (("findings", "Key findings"), ("distribution", "Distribution"), ("groups", "Groups"), ("worst", "Worst pairs"),
       ("failures", "Failures"), ("facts", "Run facts"))


def csp() -> str:
    """The page's Content-Security-Policy: nothing loads from anywhere; only our own style and script (by
    hash) and data: images.

    Example:
        >>> csp().startswith("default-src 'none'; img-src data:;")
        True
    """
    def digest(text: str) -> str:
        return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()

    return (f"default-src 'none'; img-src data:; style-src 'sha256-{digest(STYLE)}'; "
            f"script-src 'sha256-{digest(SCRIPT)}'; base-uri 'none'; form-action 'none'")


def render_html(summary: Mapping[str, Any], *, plots: Sequence[Plot], panels: Sequence[WorstPanel],
                output_url: str) -> str:
    """The whole report page as one string (everything inline).

    Args:
        summary: summary.json.
        plots: the summary's plots (`charts.summary_plots`).
        panels: the worst pairs to show (`worst.worst_panels`).
        output_url: the output folder as shown (already scrubbed of secrets).

    Returns:
        The HTML document.

    Example:
        >>> s = {"ssim": {"count": 0, "mean": None, "std": None, "min": None, "max": None, "percentiles": {}},
        ...      "histogram": {"counts": []}, "groups": {}, "pairs": {"planned": 0, "merged": 0, "ok": 0,
        ...      "failures": 0}, "status_counts": {}}
        >>> render_html(s, plots=[], panels=[], output_url="out").startswith("<!DOCTYPE html>")
        True
    """
    title = f"SSIM audit: {output_url}"
    metric = summary.get("metric") or {}
    sections = [findings_section(summary), distribution_section(summary, plots), groups_section(summary, plots),
                metric_sections(summary, plots), worst_section(panels, win_size=metric.get("win_size", 11)),
                failures_section(summary), facts_section(summary, output_url)]
    entries = list(NAV[:3]) + metric_nav(summary) + list(NAV[3:])
    nav = "".join(f'<a href="#{anchor}">{esc(label)}</a>' for anchor, label in entries)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{esc(csp())}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>"
        f"<p>Metric <b>{esc(metric.get('name'))}</b>; summary created {esc(summary.get('created'))}.</p>"
        f"<nav>{nav}</nav>" + "".join(sections) + f"<script>{SCRIPT}</script></body></html>\n"
    )
