"""The comparison page's sections, in page order: verdict, pairing, deltas, groups, regressions, settings.

Each is a function of compare.json (and of the charts and panels already drawn) returning HTML. Numbers are
`report.markup.number` spans carrying their compare.json path, as in the audit report, so a test can check
every number shown against the file.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from ssim_ray.compare.metrics import METRICS
from ssim_ray.compare.panels import RegressionPanel
from ssim_ray.compare.rows import OUTCOME_NAMES
from ssim_ray.compare.statistics import IMPROVED, REGRESSED
from ssim_ray.report.charts import Plot
from ssim_ray.report.markup import esc, header_rows, image_figure, number, number_cell, setting_text, settings_table

VERDICT_CSS = {REGRESSED: "bad", IMPROVED: "good"}


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def _verdict(text: str) -> str:
    return f'<span class="verdict-word {VERDICT_CSS.get(text, "")}">{esc(text)}</span>'


def _delta(stats: Mapping[str, Any], path: List[Any], metric: str) -> str:
    """Mean delta with its interval, e.g. "−0.0123 [−0.0150, −0.0098]"."""
    digits = METRICS[metric].digits + 2
    if stats["mean"] is None:
        return "–"
    return (f"{number(stats['mean'], [*path, 'mean'], digits=digits)} "
            f"[{number(stats['ci_low'], [*path, 'ci_low'], digits=digits)}, "
            f"{number(stats['ci_high'], [*path, 'ci_high'], digits=digits)}]")


def _tile(label: str, big: str, detail: str, css: str = "") -> str:
    return (f'<div class="tile {css}"><div class="label">{esc(label)}</div><div class="big">{big}</div>'
            f'<div class="detail">{detail}</div></div>')


def _metric_tile(summary: Mapping[str, Any], metric: str) -> str:
    stats, spec = summary["results"][metric]["overall"], METRICS[metric]
    path = ["results", metric, "overall"]
    confidence = f"{100 * summary['bootstrap']['confidence']:g}%"
    detail = (f"mean Δ {_delta(stats, path, metric)}{esc(spec.unit)} ({confidence} CI) over "
              f"{number(stats['paired'], [*path, 'paired'])} pairs; "
              f"{number(stats['worse']['fraction'], [*path, 'worse', 'fraction'], digits=1, percent=True)} worse by "
              f"more than ε = {esc(setting_text(summary['epsilon'][metric]))}{esc(spec.unit)}")
    return _tile(spec.label, esc(stats["verdict"]), detail, VERDICT_CSS.get(stats["verdict"], ""))


def _headline(summary: Mapping[str, Any], metric: str) -> str:
    groups = summary["results"][metric]["groups"]
    verdict = summary["results"][metric]["overall"]["verdict"]
    parts = [f"<b>{esc(METRICS[metric].label)}</b>: {_verdict(verdict)} overall"]
    for kind in (REGRESSED, IMPROVED):
        names = [name for name, stats in groups.items() if stats["verdict"] == kind]
        if names:
            shown = ", ".join(esc(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            parts.append(f"{_verdict(kind)} in {len(names)} of {len(groups)} groups ({shown})")
    if groups and not any(s["verdict"] in (REGRESSED, IMPROVED) for s in groups.values()):
        parts.append(f"no significant change in any of {len(groups)} groups")
    return "<li>" + "; ".join(parts) + "</li>"


def _gates(summary: Mapping[str, Any]) -> str:
    violations = summary["gates"]["violations"]
    if violations:
        items = "".join(f"<li>{esc(v['message'])}</li>" for v in violations)
        return (f'<p class="bad">{len(violations)} gate(s) failed (exit code '
                f'{number(summary["gates"]["exit_code"], ["gates", "exit_code"])}):</p><ul>{items}</ul>')
    config = summary["config"]
    gates_set = any(v is not None for key in ("max_mean_drop", "max_fraction_worse", "group_max_mean_drop",
                                               "group_max_fraction_worse") for v in config[key].values())
    gates_set = gates_set or config["max_newly_failed"] is not None or config["max_unmatched"] is not None
    return '<p class="good">Every gate passed.</p>' if gates_set else "<p>No gate set (compare.max_mean_drop, …).</p>"


def _group_verdicts(summary: Mapping[str, Any]) -> str:
    metrics, groups = summary["metrics"], summary["groups"]
    if not groups:
        return ""
    first = summary["results"][metrics[0]]["groups"]
    head = f'<th data-type="text">{esc(summary["group_by"])}</th>' + "".join(
        f'<th data-type="text">{esc(METRICS[m].label)}</th><th data-type="number">mean Δ</th>' for m in metrics)
    rows = []
    for name in first:  # ordered by the first metric's mean delta, lowest first
        cells = []
        for metric in metrics:
            stats = summary["results"][metric]["groups"][name]
            cells.append(f'<td>{_verdict(stats["verdict"])}</td>' + number_cell(
                stats["mean"], ["results", metric, "groups", name, "mean"], digits=METRICS[metric].digits + 2))
        rows.append(f'<tr><td data-sort="{esc(name)}">{esc(name)}</td>{"".join(cells)}</tr>')
    return (f'<h3>By {esc(summary["group_by"])}, lowest mean {esc(METRICS[metrics[0]].label)} delta first</h3>'
            f'<table class="sortable verdicts"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def verdict_section(summary: Mapping[str, Any]) -> str:
    """The answer first: per metric a verdict overall and per group, the pairing changes, the gates.

    Example:
        >>> s = {"metrics": [], "results": {}, "pairs": {n: 0 for n in OUTCOME_NAMES}, "groups": [],
        ...      "gates": {"violations": [], "exit_code": 0}, "config": {"max_mean_drop": {}, "max_fraction_worse": {},
        ...      "group_max_mean_drop": {}, "group_max_fraction_worse": {}, "max_newly_failed": None,
        ...      "max_unmatched": None}, "bootstrap": {"confidence": 0.95}, "epsilon": {}}
        >>> verdict_section(s).startswith('<section id="verdict">')
        True
    """
    metrics, pairs = summary["metrics"], summary["pairs"]
    tiles = [_metric_tile(summary, m) for m in metrics]
    for name, label, css in (("newly_failed", "newly failed", "bad"), ("fixed", "fixed", "good"),
                             ("baseline_only", "baseline only", "bad"), ("candidate_only", "candidate only", "")):
        tiles.append(_tile(label, number(pairs[name], ["pairs", name]), esc(_OUTCOME_SHORT[name]),
                           css if pairs[name] else ""))
    headline = "".join(_headline(summary, m) for m in metrics)
    return section("verdict", "Verdict", f'<ul class="verdict">{headline}</ul><div class="tiles">{"".join(tiles)}</div>'
                   + _gates(summary) + _group_verdicts(summary))


_OUTCOME_SHORT = {"newly_failed": "ok before, not ok now", "fixed": "not ok before, ok now",
                  "baseline_only": "absent from the candidate", "candidate_only": "absent from the baseline"}


def _examples_table(name: str, rows: Sequence[Mapping[str, Any]], total: int) -> str:
    head = "<tr><th>pair_id</th><th>group</th><th>baseline status</th><th>candidate status</th><th>error</th></tr>"
    body = "".join(
        f"<tr><td><code>{esc(r['pair_id'])}</code></td><td>{esc(r['group'] or '')}</td>"
        f"<td>{esc(r['baseline_status'] or '–')}</td><td>{esc(r['candidate_status'] or '–')}</td>"
        f"<td>{esc(r['candidate_error'] or r['baseline_error'] or '')}</td></tr>" for r in rows)
    more = (f" (the first {len(rows)} by pair_id; all {total:,} in compare.parquet, column outcome)"
            if total > len(rows) else "")
    return f'<table class="examples"><caption>{esc(name.replace("_", " "))}{esc(more)}</caption>{head}{body}</table>'


def pairing_section(summary: Mapping[str, Any]) -> str:
    """How the pair_ids of the two runs paired: counts per outcome (and per group), and examples of each.

    Example:
        >>> s = {"pairs": {"baseline_rows": 0, "candidate_rows": 0, "pair_ids": 0, **{n: 0 for n in OUTCOME_NAMES}},
        ...      "outcomes": {n: n for n in OUTCOME_NAMES}, "examples": {}}
        >>> "pairing" in pairing_section(s)
        True
    """
    pairs = summary["pairs"]
    rows = "".join(f'<tr><th>{esc(name.replace("_", " "))}</th>{number_cell(pairs[name], ["pairs", name])}'
                   f'<td>{esc(summary["outcomes"][name])}</td></tr>' for name in OUTCOME_NAMES)
    intro = (f"<p>{number(pairs['pair_ids'], ['pairs', 'pair_ids'])} pair_ids in either run: "
             f"{number(pairs['baseline_rows'], ['pairs', 'baseline_rows'])} rows in the baseline, "
             f"{number(pairs['candidate_rows'], ['pairs', 'candidate_rows'])} in the candidate. Every one is a row of "
             "compare.parquet; none is dropped.</p>")
    table = f'<table class="outcomes"><tr><th>outcome</th><th>pairs</th><th>meaning</th></tr>{rows}</table>'
    per_group = ""
    if pairs.get("groups"):
        head = "<tr><th>group</th>" + "".join(f"<th>{esc(n.replace('_', ' '))}</th>" for n in OUTCOME_NAMES) + "</tr>"
        body = "".join(f"<tr><th>{esc(g)}</th>"
                       + "".join(number_cell(c[n], ["pairs", "groups", g, n]) for n in OUTCOME_NAMES) + "</tr>"
                       for g, c in pairs["groups"].items())
        per_group = f'<table class="outcome-groups"><caption>By group</caption>{head}{body}</table>'
    examples = "".join(_examples_table(name, rows, pairs[name]) for name, rows in summary["examples"].items()
                       if name != "both_ok" and rows)
    return section("pairing", "Pairing", intro + table + per_group + examples)


STAT_COLUMNS = (("paired", ["paired"], 0, False), ("mean Δ", ["mean"], 2, False), ("CI low", ["ci_low"], 2, False),
                ("CI high", ["ci_high"], 2, False), ("median Δ", ["median"], 2, False),
                ("p1 Δ", ["percentiles", "p1"], 2, False), ("p5 Δ", ["percentiles", "p5"], 2, False),
                ("worse", ["worse", "fraction"], 1, True), ("better", ["better", "fraction"], 1, True),
                ("baseline mean", ["baseline_mean"], 0, False), ("candidate mean", ["candidate_mean"], 0, False))


def _stat_cells(stats: Mapping[str, Any], path: List[Any], metric: str) -> str:
    cells = []
    for _, key, extra, percent in STAT_COLUMNS:
        value: Any = stats
        for k in key:
            value = value[k]
        digits = extra if percent else METRICS[metric].digits + extra
        cells.append(number_cell(value, [*path, *key], digits=digits, percent=percent))
    return "".join(cells)


def _stat_head(first: str) -> str:
    return (f'<th data-type="text">{esc(first)}</th><th data-type="text">verdict</th>'
            + "".join(f'<th data-type="number">{esc(label)}</th>' for label, *_ in STAT_COLUMNS))


def deltas_section(summary: Mapping[str, Any], charts: Mapping[str, Sequence[Plot]]) -> str:
    """Per metric: the overall statistics in one row, then the delta histogram and the scatter."""
    parts = []
    for metric in summary["metrics"]:
        stats, path = summary["results"][metric]["overall"], ["results", metric, "overall"]
        infinite = ""
        if stats["became_infinite"] or stats["became_finite"]:
            infinite = (f"<p>{number(stats['became_finite'], [*path, 'became_finite'])} pairs stopped being "
                        "identical (+inf → finite: counted worse) and "
                        f"{number(stats['became_infinite'], [*path, 'became_infinite'])} became identical (finite → "
                        "+inf: counted better); the mean and percentiles leave them out.</p>")
        row = f'<tr><td>all</td><td>{_verdict(stats["verdict"])}</td>{_stat_cells(stats, path, metric)}</tr>'
        images = "".join(image_figure(p) for p in charts.get(metric, ()))
        parts.append(f"<h3>{esc(METRICS[metric].label)}</h3><table class=\"overall\"><tr>{_stat_head('')}</tr>"
                     f"{row}</table>{infinite}<div class=\"plots\">{images}</div>")
    boot = summary["bootstrap"]
    intro = ("<p>Δ = candidate − baseline over the pairs both runs scored; worse/better: by more than ε. "
             f"Intervals: {esc(boot['method'])}, {number(boot['resamples'], ['bootstrap', 'resamples'])} "
             f"resamples (seed {number(boot['seed'], ['bootstrap', 'seed'])}).</p>")
    return section("deltas", "Deltas", intro + "".join(parts))


def groups_section(summary: Mapping[str, Any]) -> str:
    """Per metric, a sortable table of every group, lowest mean delta first."""
    if not summary["group_by"]:
        return section("groups", "Groups", "<p>No group column (compare.group_by, or the runs' summary.group_by).</p>")
    parts = []
    for metric in summary["metrics"]:
        groups = summary["results"][metric]["groups"]
        body = "".join(f'<tr><td data-sort="{esc(name)}">{esc(name)}</td><td>{_verdict(stats["verdict"])}</td>'
                       f'{_stat_cells(stats, ["results", metric, "groups", name], metric)}</tr>'
                       for name, stats in groups.items())
        parts.append(f'<h3>{esc(METRICS[metric].label)}</h3><table class="sortable groups"><thead><tr>'
                     f'{_stat_head(summary["group_by"])}</tr></thead><tbody>{body}</tbody></table>')
    return section("groups", f"By {summary['group_by']}", "<p>Lowest mean delta first; click a column to sort.</p>"
                   + "".join(parts))


# (run, picture, caption) in page order: two rows of three, the colour scale under the reference; "either":
# the baseline's picture, or the candidate's when the baseline could not re-read the pair.
_PANEL_CELLS = (("either", "reference", "reference"), ("baseline", "distorted", "baseline distorted"),
                ("candidate", "distorted", "candidate distorted"), ("either", "scale", "SSIM colour scale"),
                ("baseline", "map", "baseline SSIM map"), ("candidate", "map", "candidate SSIM map"))


def _pair_panel(rank: int, panel: RegressionPanel, path: List[Any]) -> str:
    entry = panel.entry
    facts = header_rows([
        ("SSIM baseline → candidate", f"{number(entry['baseline'], [*path, 'baseline'], digits=6)} → "
                                      f"{number(entry['candidate'], [*path, 'candidate'], digits=6)} "
                                      f"(Δ {number(entry['delta'], [*path, 'delta'], digits=6)})"),
        ("recomputed now", " → ".join(esc("–" if p.recomputed is None else f"{p.recomputed:.6f}")
                                      for p in (panel.baseline, panel.candidate))),
        ("group", esc(entry.get("group") or "")),
        ("reference", f"<code>{esc(entry.get('baseline_reference') or entry.get('candidate_reference'))}</code>"),
        ("baseline distorted", f"<code>{esc(entry.get('baseline_distorted'))}</code>"),
        ("candidate distorted", f"<code>{esc(entry.get('candidate_distorted'))}</code>"),
    ])
    cells = []
    for side, name, caption in _PANEL_CELLS:
        picture = (panel.picture("baseline", name) or panel.picture("candidate", name) if side == "either"
                   else panel.picture(side, name))
        cells.append(image_figure(Plot(picture.name, caption, picture.png, picture.width, picture.height))
                     if picture is not None else "<div></div>")
    notes = "".join(f'<p class="note">{esc(side)}: no images: {esc(getattr(panel, side).note)}</p>'
                    for side in ("baseline", "candidate") if getattr(panel, side).note)
    return (f'<div class="pair" id="regression-{rank + 1}"><h3>#{rank + 1} <code>{esc(entry["pair_id"])}</code></h3>'
            f'<table>{facts}</table><div class="side-by-side">{"".join(cells)}</div>{notes}</div>')


def _extremes_table(rows: Sequence[Mapping[str, Any]], path: List[Any], metric: str, caption: str) -> str:
    digits = METRICS[metric].digits + 2
    head = "<tr><th>pair_id</th><th>group</th><th>baseline</th><th>candidate</th><th>Δ</th></tr>"
    body = "".join(f"<tr><td><code>{esc(r['pair_id'])}</code></td><td>{esc(r['group'] or '')}</td>"
                   + "".join(number_cell(r[k], [*path, i, k], digits=digits)
                             for k in ("baseline", "candidate", "delta"))
                   + "</tr>" for i, r in enumerate(rows))
    return f'<table class="extremes"><caption>{esc(caption)}</caption>{head}{body}</table>'


def regressions_section(summary: Mapping[str, Any], panels: Sequence[RegressionPanel]) -> str:
    """The worst SSIM regressions side by side in both runs, then each metric's worst and best as tables."""
    path = ["results", "ssim", "overall", "worst"]
    shown = "".join(_pair_panel(rank, panel, [*path, rank]) for rank, panel in enumerate(panels))
    if panels:
        intro = ("<p>Each pair re-read from both runs with each run's own configuration and its SSIM map "
                 "recomputed: bright means structure lost; the cyan box marks each map's window of lowest mean "
                 "SSIM.</p>")
    elif "ssim" not in summary["metrics"]:
        intro = "<p>SSIM is not among the compared metrics (compare.metrics): no pair is drawn.</p>"
    else:
        intro = "<p>No SSIM regression shown (none, or compare.report_worst_k=0).</p>"
    tables = []
    for metric in summary["metrics"]:
        overall = summary["results"][metric]["overall"]
        where = ["results", metric, "overall"]
        label = METRICS[metric].label
        if overall["worst"]:
            tables.append(_extremes_table(overall["worst"], [*where, "worst"], metric, f"{label}: worst regressions"))
        if overall["best"]:
            tables.append(_extremes_table(overall["best"], [*where, "best"], metric, f"{label}: best improvements"))
    note = "<p>Per group lists are in compare.json (results.&lt;metric&gt;.groups.&lt;group&gt;.worst / best).</p>"
    return section("regressions", "Worst regressions", intro + shown + '<div class="facts">' + "".join(tables)
                   + "</div>" + note)


def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, Mapping) and value:
        found: Dict[str, Any] = {}
        for key, item in value.items():
            found.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return found
    return {prefix: value}


def _side_by_side(baseline: Mapping[str, Any], candidate: Mapping[str, Any], caption: str) -> str:
    """One row per setting of either side, both values, the rows that differ marked."""
    old, new = _flatten(baseline), _flatten(candidate)
    rows = []
    for key in dict.fromkeys([*old, *new]):
        a, b = (setting_text(v.get(key)) if key in v else "(not recorded)" for v in (old, new))
        css = ' class="differs"' if a != b else ""
        rows.append(f"<tr{css}><th>{esc(key)}</th><td>{esc(a)}</td><td>{esc(b)}</td></tr>")
    return (f'<table class="kv sides"><caption>{esc(caption)}</caption><tr><th></th><th>baseline</th>'
            f'<th>candidate</th></tr>{"".join(rows)}</table>')


def settings_section(summary: Mapping[str, Any]) -> str:
    """The two runs' facts and metric settings side by side (differences marked), the join, the options."""
    facts = {role: {k: v for k, v in summary[role].items() if k != "metric"} for role in ("baseline", "candidate")}
    join = summary["join"]
    joined = header_rows([("mode", esc(join["mode"])), ("why", esc(join["why"])),
                          ("partitions", esc(join["partitions"] if join["partitions"] is not None else "–")),
                          ("partitions on disk", number(join.get("spilled_bytes"), ["join", "spilled_bytes"]))])
    return section("settings", "Runs and settings",
                   _side_by_side(facts["baseline"], facts["candidate"], "runs")
                   + _side_by_side(summary["baseline"]["metric"] or {}, summary["candidate"]["metric"] or {},
                                   "metric settings (differences marked)")
                   + f'<table class="kv"><caption>join</caption>{joined}</table>'
                   + settings_table(summary["config"], caption="comparison settings (compare.*)"))


def differences_banner(summary: Mapping[str, Any]) -> str:
    """The warning at the top of the page: metric settings that differ (allowed), incomplete runs…

    Example:
        >>> differences_banner({"warnings": []})
        ''
    """
    if not summary["warnings"]:
        return ""
    items = "".join(f"<li>{esc(w)}</li>" for w in summary["warnings"])
    return f'<div class="banner" id="warnings"><b>Read this first</b><ul>{items}</ul></div>'


def charts_by_metric(plots: Sequence[Plot], metrics: Sequence[str]) -> Dict[str, List[Plot]]:
    """The plots of each metric (named delta_<m>.png, scatter_<m>.png).

    Example:
        >>> charts_by_metric([Plot("delta_ssim.png", "", b"", 1, 1)], ["ssim"])["ssim"][0].name
        'delta_ssim.png'
    """
    found: Dict[str, List[Plot]] = {m: [] for m in metrics}
    for plot in plots:
        metric: Optional[str] = plot.name.split("_", 1)[1].rsplit(".", 1)[0]
        if metric in found:
            found[metric].append(plot)
    return found
