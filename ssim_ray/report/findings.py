"""The report's opening section, what a reader needs first: how many pairs, how many scored and failed, how
many fall below each quality gate and whether the gates pass, and which groups are worst.

Every number is a `markup.number` span read from summary.json; gate verdicts and their wording come from
`ssim_ray.output.gates`, the one home of the gates' semantics.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

from ssim_ray import statuses
from ssim_ray.config import METRIC_LABELS, METRIC_UNITS, SCORE_GATES, AuditConfig
from ssim_ray.output.gates import GateViolation, evaluate_gates, exit_code
from ssim_ray.report.charts import ordered_by_mean, other_metrics
from ssim_ray.report.markup import esc, number, number_cell, setting_text

WORST_GROUPS = 5  # the groups with the 5 lowest means, and any other among the 5 lowest p5


def _tile(label: str, value_html: str, detail: str = "", *, css: str = "") -> str:
    return (f'<div class="tile {css}"><div class="label">{esc(label)}</div><div class="big">{value_html}</div>'
            f'<div class="detail">{detail}</div></div>')


def _share(part: Any, whole: Any) -> str:
    """A derived percentage (not a summary value, so plain text, not a number span)."""
    return f"{100 * part / whole:.1f}%" if part is not None and whole else "–"


def _evaluated(summary: Mapping[str, Any]) -> Tuple[Optional[List[GateViolation]], Optional[str]]:
    """(violations, None), or (None, why they cannot be evaluated); (None, None) when no gate is set."""
    audit = summary.get("audit") or {}
    # A flag (audit.allow_no_ok_pairs) is not a gate; a run with no ok pair fails without any gate set.
    gates_set = any(v is not None and not isinstance(v, bool) for v in audit.values())
    if not gates_set and (summary.get("pairs") or {}).get("ok") != 0:
        return None, None
    try:
        return evaluate_gates(summary, AuditConfig(**audit)), None
    except ValueError as error:
        return None, str(error)


def _below_label(entry: Mapping[str, Any]) -> str:
    metric = entry.get("metric", "ssim")  # entries written before other metrics had gates are SSIM's
    return f"{METRIC_LABELS[metric]} {setting_text(entry['threshold'])}{METRIC_UNITS[metric]}"


def _below_tile(summary: Mapping[str, Any], index: int, violations: Optional[List[GateViolation]]) -> str:
    entry, audit = summary["below"][index], summary.get("audit") or {}
    metric = entry.get("metric", "ssim")
    gates = [g.name for g in SCORE_GATES if g.metric == metric and audit.get(g.name) == entry["threshold"]]
    css = "" if violations is None or not gates else "bad" if any(v.gate in gates for v in violations) else "good"
    gate_note = "; gate " + ", ".join(f"audit.{g}" for g in gates) if gates else ""
    judged = "ok pairs judged by MS-SSIM" if metric == "ms_ssim" else "ok pairs"
    return _tile(f"below {_below_label(entry)}", number(entry["count"], ["below", index, "count"]),
                 f"{number(entry['fraction'], ['below', index, 'fraction'], digits=2, percent=True)} of "
                 f"{number(entry['ok'], ['below', index, 'ok'])} {judged}{esc(gate_note)}", css=css)


def _metric_tile(summary: Mapping[str, Any], metric: str) -> str:
    """Mean and p5 of a metric besides SSIM, with what its mean leaves out (+inf, undefined pairs)."""
    block, label, digits = summary[metric], METRIC_LABELS[metric], 2 if metric == "psnr" else 4
    apart = []
    if block.get("infinite"):
        apart.append(f"{number(block['infinite'], [metric, 'infinite'], digits=digits)} +inf (identical)")
    for reason, count in (block.get("undefined") or {}).items():
        apart.append(f"{number(count, [metric, 'undefined', reason], digits=digits)} undefined ({esc(reason)})")
    detail = (f"p5 {number(block['percentiles'].get('p5'), [metric, 'percentiles', 'p5'], digits=digits)} · "
              f"min {number(block['min'], [metric, 'min'], digits=digits)}" + "".join(f"<br>{a}" for a in apart))
    return _tile(f"mean {label}{METRIC_UNITS[metric]}", number(block["mean"], [metric, "mean"], digits=digits), detail)


def _tiles(summary: Mapping[str, Any], violations: Optional[List[GateViolation]]) -> str:
    pairs, ssim = summary["pairs"], summary["ssim"]
    failed_by = [f"{number(n, ['status_counts', s])} {esc(s)}" for s, n in summary["status_counts"].items()
                 if not statuses.is_ok(s) and n]
    tiles = [
        _tile("pairs", number(pairs["planned"], ["pairs", "planned"]),
              f"planned; {number(pairs['merged'], ['pairs', 'merged'])} merged"),
        _tile("scored ok", number(pairs["ok"], ["pairs", "ok"]), f"{_share(pairs['ok'], pairs['merged'])} of merged",
              css="good" if pairs["ok"] else "bad"),
        _tile("failed", number(pairs["failures"], ["pairs", "failures"]), "<br>".join(failed_by) or "none",
              css="bad" if pairs["failures"] else "good"),
        _tile("mean SSIM", number(ssim["mean"], ["ssim", "mean"]),
              f"p5 {number(ssim['percentiles'].get('p5'), ['ssim', 'percentiles', 'p5'])} · "
              f"min {number(ssim['min'], ['ssim', 'min'])}"),
    ]
    tiles += [_metric_tile(summary, metric) for metric in other_metrics(summary)]
    tiles += [_below_tile(summary, index, violations) for index in range(len(summary.get("below") or []))]
    if summary.get("complete") is False:
        missing = (summary.get("shards") or {}).get("missing")
        tiles.append(_tile("incomplete", number(missing, ["shards", "missing"]), "planned shards not merged",
                           css="bad"))
    return f'<div class="tiles">{"".join(tiles)}</div>'


def gates_verdict(summary: Mapping[str, Any]) -> str:
    """The quality gates' verdict: which are set, and pass or the violations with the exit code.

    Args:
        summary: summary.json (its `audit` holds the gates it was merged with).

    Returns:
        HTML paragraphs (and a list of violations).

    Example:
        >>> gates_verdict({"audit": {"min_ssim": None}})
        '<p>No quality gate configured (audit.*).</p>'
    """
    violations, error = _evaluated(summary)
    settings = esc(", ".join(f"audit.{k}={setting_text(v)}" for k, v in (summary.get("audit") or {}).items()
                             if v is not None and v is not False))
    if error is not None:
        return f'<p class="verdict bad">Quality gates ({settings}) cannot be evaluated: {esc(error)}</p>'
    if violations is None:
        return "<p>No quality gate configured (audit.*).</p>"
    if not violations:
        return f'<p class="verdict good">All quality gates pass ({settings}).</p>'
    items = "".join(f"<li>{esc(v.message)} (exit code {v.exit_code})</li>" for v in violations)
    return (f'<p class="verdict bad">Quality gates violated: exit code {exit_code(violations)} ({settings}).</p>'
            f'<ul class="violations">{items}</ul>')


def worst_group_names(groups: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """The groups with the WORST_GROUPS lowest mean SSIM or lowest p5, lowest mean first.

    Args:
        groups: the summary's `groups`.

    Returns:
        Names of groups with ok pairs (at most 2 * WORST_GROUPS).

    Example:
        >>> rows = (("a", 0.9, 0.1), ("b", 0.5, 0.4), ("c", 0.7, 0.6), ("d", 0.8, 0.7), ("e", 0.85, 0.8),
        ...         ("f", 0.88, 0.9))
        >>> g = {n: {"ssim": {"count": 1, "mean": m, "percentiles": {"p5": p}}} for n, m, p in rows}
        >>> worst_group_names(g)
        ['b', 'c', 'd', 'e', 'f', 'a']
    """
    scored = [name for name, group in groups.items() if group["ssim"]["count"]]
    by_mean = ordered_by_mean(groups, scored)[:WORST_GROUPS]
    by_p5 = sorted(scored, key=lambda name: (groups[name]["ssim"]["percentiles"]["p5"], name))[:WORST_GROUPS]
    return ordered_by_mean(groups, list(dict.fromkeys(by_mean + by_p5)))


def _worst_groups(summary: Mapping[str, Any]) -> str:
    groups, by = summary.get("groups") or {}, summary.get("group_by")
    if not by:
        return "<p>No summary.group_by column: no groups to rank.</p>"
    names = worst_group_names(groups)
    below = [(i, e) for i, e in enumerate(summary.get("below") or []) if e.get("groups")]
    head = (f"<tr><th>{esc(by)}</th><th>ok pairs</th><th>mean</th><th>p5</th><th>min</th>"
            + "".join(f"<th>below {esc(_below_label(e))}</th>" for _, e in below) + "</tr>")
    body = "".join(_worst_group_row(summary, name, below) for name in names)
    empty = [name for name, group in groups.items() if not group["ssim"]["count"]]
    note = (f'<p class="bad">No ok pair at all in {len(empty)} {esc(by)} group(s): '
            f"{esc(', '.join(empty))}.</p>" if empty else "")
    caption = (f"Worst groups by {esc(by)} (lowest mean or p5), lowest mean first: {len(names)} of {len(groups)}"
               if len(names) < len(groups) - len(empty) else f"Groups by {esc(by)}, lowest mean first")
    table = f'<table class="worst-groups"><caption>{caption}</caption>{head}{body}</table>' if names else ""
    return table + note


def _worst_group_row(summary: Mapping[str, Any], name: str, below: Sequence[Any]) -> str:
    group = summary["groups"][name]["ssim"]
    where = ["groups", name, "ssim"]
    cells = [number_cell(group["count"], [*where, "count"]), number_cell(group["mean"], [*where, "mean"]),
             number_cell(group["percentiles"]["p5"], [*where, "percentiles", "p5"]),
             number_cell(group["min"], [*where, "min"])]
    for index, entry in below:
        counts, where = entry["groups"].get(name), ["below", index, "groups", name]
        cells.append('<td class="n">–</td>' if counts is None else
                     f'<td class="n">{number(counts["count"], [*where, "count"])} '
                     f'({number(counts["fraction"], [*where, "fraction"], digits=1, percent=True)})</td>')
    return f"<tr><th>{esc(name)}</th>{''.join(cells)}</tr>"


def findings_section(summary: Mapping[str, Any]) -> str:
    """The opening section: counts, gates, worst groups.

    Args:
        summary: summary.json.

    Returns:
        `<section id="findings">`.

    Example:
        >>> s = {"pairs": {"planned": 1, "merged": 1, "ok": 1, "failures": 0}, "status_counts": {"ok": 1},
        ...      "ssim": {"mean": 0.9, "min": 0.9, "percentiles": {"p5": 0.9}}}
        >>> findings_section(s).startswith('<section id="findings">')
        True
    """
    violations, _ = _evaluated(summary)
    return (f'<section id="findings"><h2>Key findings</h2>{_tiles(summary, violations)}{gates_verdict(summary)}'
            f"{_worst_groups(summary)}</section>")
