"""The report's section for each metric besides SSIM that the run computed (PSNR, MS-SSIM): its statistics,
the values it does not average (PSNR's +inf, MS-SSIM's undefined pairs by reason), its histogram and CDF,
and a sortable table of the groups. MS-SSIM is also shown in dB, as codec papers print it (`ms_ssim_db`).

Numbers read from summary.json are `markup.number` spans with their paths; values in dB are derived (plain
text), as every derived figure of the report is.
"""

from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from ssim_ray.config import METRIC_LABELS, METRIC_UNITS
from ssim_ray.metric import ms_ssim_db
from ssim_ray.report.charts import Plot, other_metrics
from ssim_ray.report.markup import esc, image_figure, lookup, number, number_cell

DIGITS = {"psnr": 2, "ms_ssim": 4}  # decimals: PSNR tables print 0.01 dB, SSIM-like scores 4 decimals
# What a pair without a value means, for the reader.
UNDEFINED_MEANING = {
    "too_small": "an image too small for five scales (not measured)",
    "nonpositive_term": "a scale's contrast-structure term <= 0 (no real power: the images share no structure there)",
}


def metric_nav(summary: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """(anchor, label) of each metric section the page has, for its navigation.

    Example:
        >>> metric_nav({"metric": {"metrics": ["ssim", "psnr"]}, "psnr": {}})
        [('psnr', 'PSNR')]
    """
    return [(metric, METRIC_LABELS[metric]) for metric in other_metrics(summary)]


def _db(value: Optional[float]) -> str:
    if value is None:
        return "–"
    db = ms_ssim_db(min(max(float(value), 0.0), 1.0))
    return "∞" if math.isinf(db) else f"{db:.2f}"


def _statistics(summary: Mapping[str, Any], metric: str) -> str:
    block, digits = summary[metric], DIGITS[metric]
    keys = [(name, [metric, name]) for name in ("count", "mean", "std", "min")]
    keys += [(name, [metric, "percentiles", name]) for name in block["percentiles"]]
    keys += [("max", [metric, "max"])]
    head = "".join(f"<th>{esc(label)}</th>" for label, _ in keys)
    cells = "".join(number_cell(lookup(summary, path), path, digits=digits) for _, path in keys)
    rows = f"<tr><th></th>{head}</tr><tr><th>{esc(METRIC_LABELS[metric] + METRIC_UNITS[metric])}</th>{cells}</tr>"
    if metric == "ms_ssim":  # derived values: plain text; the mean is not converted (see `_apart`)
        derived = ['<td class="n"></td>' if name in ("count", "std") else '<td class="n">–</td>' if name == "mean"
                   else f'<td class="n">{esc(_db(lookup(summary, path)))}</td>' for name, path in keys]
        rows += f"<tr><th>MS-SSIM in dB</th>{''.join(derived)}</tr>"
    return f'<table class="overall {esc(metric)}">{rows}</table>'


def _apart(summary: Mapping[str, Any], metric: str) -> str:
    """What the statistics leave out: +inf values and pairs without a value, by reason."""
    block, parts = summary[metric], []
    if metric == "psnr":
        parts.append(f"{number(block['infinite'], [metric, 'infinite'], digits=DIGITS[metric])} pair(s) with identical images have PSNR "
                     "+inf: counted here, never in the mean, the percentiles or the histogram.")
    for reason, count in block["undefined"].items():
        meaning = UNDEFINED_MEANING.get(reason, "")
        parts.append(f"{number(count, [metric, 'undefined', reason], digits=DIGITS[metric])} ok pair(s) have no {METRIC_LABELS[metric]}: "
                     f"<code>{esc(reason)}</code>, {esc(meaning)}.")
    if metric == "ms_ssim":
        parts.append("In dB: −10·log10(1 − MS-SSIM) of each value shown (the mean is not converted: the dB of a "
                     "mean is not the mean of the dB).")
    return "".join(f"<p>{part}</p>" for part in parts)


def _groups_table(summary: Mapping[str, Any], metric: str) -> str:
    groups, by = summary.get("groups") or {}, summary.get("group_by")
    if not by:
        return ""
    digits = DIGITS[metric]
    apart = ("infinite", [metric, "infinite"]) if metric == "psnr" else None
    columns = [("values", [metric, "count"])] + ([apart] if apart else []) + [
        ("mean", [metric, "mean"]), ("p5", [metric, "percentiles", "p5"]),
        ("p50", [metric, "percentiles", "p50"]), ("min", [metric, "min"])]
    head = (f'<th data-type="text">{esc(by)}</th>' + "".join(f'<th data-type="number">{c}</th>' for c, _ in columns)
            + ('<th data-type="number">undefined</th><th data-type="number">p50 dB</th>' if metric == "ms_ssim" else ""))
    body = []
    for name, group in groups.items():
        cells = "".join(number_cell(lookup(group, path), ["groups", name, *path], digits=digits)
                        for _, path in columns)
        if metric == "ms_ssim":
            undefined = group[metric]["undefined"]
            cells += (f'<td class="n" data-sort="{sum(undefined.values())}">'
                      + (", ".join(f"{number(n, ['groups', name, metric, 'undefined', r], digits=digits)} {esc(r)}"
                                   for r, n in undefined.items()) or "0") + "</td>")
            p50 = group[metric]["percentiles"]["p50"]
            cells += f'<td class="n">{esc(_db(p50))}</td>'
        body.append(f'<tr><td data-sort="{esc(name)}">{esc(name)}</td>{cells}</tr>')
    return (f'<table class="sortable metric-groups {esc(metric)}"><caption>{esc(METRIC_LABELS[metric])} by {esc(by)} '
            f"(click a column to sort)</caption><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def metric_section(summary: Mapping[str, Any], plots: Sequence[Plot], metric: str) -> str:
    """One metric's section: statistics (MS-SSIM also in dB), what they leave out, its plots, its groups.

    Example:
        >>> s = {"psnr": {"count": 0, "mean": None, "std": None, "min": None, "max": None, "percentiles": {},
        ...      "infinite": 0, "undefined": {}}}
        >>> metric_section(s, [], "psnr").startswith('<section id="psnr">')
        True
    """
    label = METRIC_LABELS[metric]
    images = "".join(image_figure(p, file_note=True) for p in plots if p.name.startswith(f"{metric}_"))
    body = (_statistics(summary, metric) + _apart(summary, metric) + f'<div class="plots">{images}</div>'
            + _groups_table(summary, metric))
    return f'<section id="{esc(metric)}"><h2>{esc(label)} distribution (ok pairs)</h2>{body}</section>'


def metric_sections(summary: Mapping[str, Any], plots: Sequence[Plot]) -> str:
    """The sections of every metric besides SSIM the run computed, in METRIC_NAMES order.

    Example:
        >>> metric_sections({"metric": {"metrics": ["ssim"]}}, [])
        ''
    """
    return "".join(metric_section(summary, plots, metric) for metric in other_metrics(summary))
