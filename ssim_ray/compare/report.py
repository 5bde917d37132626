"""compare.html: one self-contained page, verdict first, from compare.json, the kept deltas and the panels.

The page looks like the audit report (its style and table-sorting script, `report.page`) and is as closed:
its Content-Security-Policy lets nothing load from anywhere (data: images; our style and script by hash).
Only the worst SSIM regressions (`compare.report_worst_k`) are read and scored again, in both runs; every
other number and chart comes from the statistics already computed.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Mapping, Sequence

from ssim_ray.compare.accumulate import Accumulator
from ssim_ray.compare.charts import count_deltas, metric_charts
from ssim_ray.compare.config import CompareConfig
from ssim_ray.compare.panels import RegressionPanel, regression_panels
from ssim_ray.compare.runs import AuditRun
from ssim_ray.compare.sections import (
    charts_by_metric,
    deltas_section,
    differences_banner,
    groups_section,
    pairing_section,
    regressions_section,
    settings_section,
    verdict_section,
)
from ssim_ray.report.charts import Plot, render
from ssim_ray.report.markup import esc
from ssim_ray.report.page import SCRIPT
from ssim_ray.report.page import STYLE as AUDIT_STYLE

STYLE = AUDIT_STYLE + """
.banner{border:1px solid #b00020;background:#fff4f4;border-radius:4px;padding:8px 14px;margin:10px 0}
.banner ul{margin:4px 0 0 18px;padding:0}
.verdict-word.bad{color:#b00020;font-weight:600}.verdict-word.good{color:#1b7f3b;font-weight:600}
.plots figure{width:min-content}.plots figure img{max-width:none}
.side-by-side{display:grid;grid-template-columns:repeat(3,max-content);gap:8px;align-items:start;margin-top:8px}
.side-by-side figure{margin:0}tr.differs td,tr.differs th{background:#fff0c2}
ul.verdict{font-size:15px;padding-left:18px}table.examples,table.extremes{font-size:13px}
.tile .big{font-size:22px}
"""
NAV = (("verdict", "Verdict"), ("pairing", "Pairing"), ("deltas", "Deltas"), ("groups", "Groups"),
       ("regressions", "Worst regressions"), ("settings", "Runs and settings"))


def _digest(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()


def csp() -> str:
    """The page's Content-Security-Policy: nothing loads; only this style and script (by hash), data: images.

    Example:
        >>> csp().startswith("default-src 'none'; img-src data:;")
        True
    """
    return (f"default-src 'none'; img-src data:; style-src 'sha256-{_digest(STYLE)}'; "
            f"script-src 'sha256-{_digest(SCRIPT)}'; base-uri 'none'; form-action 'none'")


def render_page(summary: Mapping[str, Any], *, plots: Sequence[Plot], panels: Sequence[RegressionPanel],
                output_url: str) -> str:
    """The whole page as one string.

    Args:
        summary: compare.json.
        plots: the metrics' charts (`charts.metric_charts`, rendered).
        panels: the worst SSIM regressions drawn in both runs.
        output_url: where the comparison is written, as shown (credentials masked).

    Returns:
        The HTML document.
    """
    title = f"Compare: {summary['baseline']['url']} → {summary['candidate']['url']}"
    sections = [verdict_section(summary), pairing_section(summary),
                deltas_section(summary, charts_by_metric(plots, summary["metrics"])), groups_section(summary),
                regressions_section(summary, panels), settings_section(summary)]
    nav = "".join(f'<a href="#{anchor}">{esc(label)}</a>' for anchor, label in NAV)
    facts = (f"<p>Baseline <code>{esc(summary['baseline']['url'])}</code>, candidate "
             f"<code>{esc(summary['candidate']['url'])}</code>; metrics {esc(', '.join(summary['metrics']))}; "
             f"written to <code>{esc(output_url)}</code> on {esc(summary['created'])}.</p>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{esc(csp())}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>{differences_banner(summary)}{facts}"
        f"<nav>{nav}</nav>" + "".join(sections) + f"<script>{SCRIPT}</script></body></html>\n"
    )


def compare_report(summary: Mapping[str, Any], acc: Accumulator, baseline: AuditRun, candidate: AuditRun,
                   cfg: CompareConfig, *, output_url: str) -> str:
    """Draw the charts and the regression panels, and render compare.html.

    Args:
        summary: compare.json as it will be written.
        acc: the comparison's accumulator (kept deltas, scatter samples).
        baseline: the baseline run (re-read for the panels).
        candidate: the candidate run.
        cfg: the comparison's settings (`report_worst_k`, ε).
        output_url: the comparison's folder as shown.

    Returns:
        The page.
    """
    plots = []
    for metric in summary["metrics"]:
        overall = summary["results"][metric]["overall"]
        kept = acc.metrics[metric]
        counted = count_deltas(kept.finite_deltas(), low=kept.low, high=kept.high, total=kept.size)
        plots += [render(chart) for chart in metric_charts(metric, counted, kept.sample.ordered(),
                                                           overall["worst"], epsilon=cfg.epsilon[metric],
                                                           paired=overall["paired"])]
    worst = summary["results"]["ssim"]["overall"]["worst"][: cfg.report_worst_k] if "ssim" in summary["metrics"] else []
    panels = regression_panels(worst, baseline, candidate)
    return render_page(summary, plots=plots, panels=panels, output_url=output_url)
