"""The report's sections after the key findings, in page order: the distribution, the groups, the worst
pairs with their maps, the failures, and the run's facts (source, metric settings, versions, throughput,
batch sizes, shards) at the end.

Each section is a function of summary.json (and of the plots and worst-pair panels already made) that
returns HTML; numbers are `markup.number` spans, nested values readable tables.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ssim_ray import statuses
from ssim_ray.report.charts import Plot, plotted_groups
from ssim_ray.report.markup import (
    esc,
    format_number,
    header_rows,
    image_figure,
    lookup,
    number,
    number_cell,
    records_table,
    settings_table,
)
from ssim_ray.report.worst import WorstPanel

OVERALL_PLOTS = ("ssim_histogram.png", "ssim_cdf.png")


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def distribution_section(summary: Mapping[str, Any], plots: Sequence[Plot]) -> str:
    """Statistics of all ok pairs in one row, then their histogram and CDF.

    Example:
        >>> s = {"ssim": {"count": 0, "mean": None, "std": None, "min": None, "max": None, "percentiles": {}}}
        >>> distribution_section(s, []).startswith('<section id="distribution">')
        True
    """
    keys = [(name, ["ssim", name]) for name in ("count", "mean", "std", "min")]
    keys += [(name, ["ssim", "percentiles", name]) for name in summary["ssim"]["percentiles"]]
    keys += [("max", ["ssim", "max"])]
    head = "".join(f"<th>{esc(label)}</th>" for label, _ in keys)
    cells = "".join(number_cell(lookup(summary, path), path) for _, path in keys)
    images = "".join(image_figure(p, file_note=True) for p in plots if p.name in OVERALL_PLOTS)
    return _section("distribution", "SSIM distribution (ok pairs)",
                    f'<table class="overall"><tr>{head}</tr><tr>{cells}</tr></table><div class="plots">{images}</div>')


def groups_section(summary: Mapping[str, Any], plots: Sequence[Plot]) -> str:
    """A sortable table of every group, then the group plots.

    Example:
        >>> "No summary.group_by column" in groups_section({"groups": {}}, [])
        True
    """
    groups, by = summary.get("groups") or {}, summary.get("group_by")
    if not by:
        return _section("groups", "Groups", "<p>No summary.group_by column: statistics are not broken down.</p>")
    columns = [("pairs", ["rows"]), ("ok", ["ssim", "count"]), ("mean", ["ssim", "mean"]),
               ("p5", ["ssim", "percentiles", "p5"]), ("p50", ["ssim", "percentiles", "p50"]),
               ("min", ["ssim", "min"]), ("failures", ["failures"])]
    head = f'<th data-type="text">{esc(by)}</th>' + "".join(f'<th data-type="number">{c}</th>' for c, _ in columns)
    body = "".join(
        f'<tr><td data-sort="{esc(name)}">{esc(name)}</td>'
        + "".join(number_cell(lookup(group, path), ["groups", name, *path]) for _, path in columns) + "</tr>"
        for name, group in groups.items()
    )
    shown = plotted_groups(summary)
    note = (f"<p>Plots show the {len(shown)} groups with the most ok pairs of {len(groups)}.</p>"
            if len(shown) < len(groups) else "")
    images = "".join(image_figure(p, file_note=True) for p in plots if p.name.startswith("group"))
    return _section("groups", f"By {by}",
                    f'<p>Click a column to sort.</p><table class="sortable groups"><thead><tr>{head}</tr></thead>'
                    f'<tbody>{body}</tbody></table>{note}<div class="plots">{images}</div>')


def _panel_html(rank: int, panel: WorstPanel) -> str:
    entry = panel.entry
    facts = [
        ("ssim (summary)", number(entry["ssim"], ["worst", rank, "ssim"], digits=6)),
        ("ssim (recomputed now)", esc(format_number(panel.recomputed, digits=6))),
        ("group", esc(entry.get("group"))),
        ("reference", f"<code>{esc(entry.get('reference'))}</code>"),
        ("distorted", f"<code>{esc(entry.get('distorted'))}</code>"),
        ("shard", f"<code>{esc(entry.get('shard_id'))}</code>"),
    ]
    if panel.images:
        full = "".join(image_figure(p) for p in panel.images if not p.name.startswith("zoom_"))
        zoom = "".join(image_figure(p) for p in panel.images if p.name.startswith("zoom_"))
        visual = f'<div class="images">{full}</div><div class="images">{zoom}</div>'
    else:
        visual = f'<p class="note">No images: {esc(panel.note)}</p>'
    return (f'<div class="pair" id="worst-{rank + 1}"><h3>#{rank + 1} <code>{esc(entry["pair_id"])}</code></h3>'
            f"<table>{header_rows(facts)}</table>{visual}</div>")


def worst_section(panels: Sequence[WorstPanel], *, win_size: int) -> str:
    """The worst pairs, lowest SSIM first, each with its pictures or the reason it has none.

    Example:
        >>> worst_section([], win_size=11)
        '<section id="worst"><h2>Worst pairs</h2><p>No ok pairs.</p></section>'
    """
    if not panels:
        return _section("worst", "Worst pairs", "<p>No ok pairs.</p>")
    intro = (f"<p>Maps recomputed for these pairs only. A map covers the region the {win_size}×{win_size} window "
             "saw (gray frame: the border it cannot see); bright means structure lost. The cyan box marks the "
             "window of lowest mean SSIM, shown enlarged below each pair.</p>")
    return _section("worst", f"The {len(panels)} worst pairs",
                    intro + "".join(_panel_html(rank, panel) for rank, panel in enumerate(panels)))


def failures_section(summary: Mapping[str, Any]) -> str:
    """Failed pairs by status, what the status means, and the summary's examples with their errors.

    Example:
        >>> failures_section({"status_counts": {"ok": 3}})
        '<section id="failures"><h2>Failures</h2><p class="good">None: every pair was scored.</p></section>'
    """
    counts = {s: n for s, n in summary["status_counts"].items() if not statuses.is_ok(s)}
    if not counts:
        return _section("failures", "Failures", '<p class="good">None: every pair was scored.</p>')
    parts = []
    for status, count in counts.items():
        examples = summary.get("failure_examples", {}).get(status, [])
        rows = "".join(
            f"<tr><td><code>{esc(e['pair_id'])}</code></td><td><code>{esc(e.get('reference'))}</code></td>"
            f"<td><code>{esc(e.get('distorted'))}</code></td><td>{esc(e.get('error'))}</td></tr>"
            for e in examples
        )
        meaning = statuses.DESCRIPTIONS.get(status, "")
        plural = "" if count == 1 else "s"
        parts.append(f'<h3>{esc(status)}: {number(count, ["status_counts", status])} pair{plural}</h3>'
                     f'<p class="meaning">{esc(meaning)}</p><table class="failures"><tr><th>pair_id</th>'
                     f"<th>reference</th><th>distorted</th><th>error</th></tr>{rows}</table>")
    return _section("failures", "Failures by status", "".join(parts))


def _run_table(summary: Mapping[str, Any], output_url: str) -> str:
    pairs, throughput = summary["pairs"], summary.get("throughput") or {}
    complete = summary.get("complete", True)
    runtime = summary.get("runtime") or {}
    rows = [
        ("output", f"<code>{esc(output_url)}</code>"),
        ("summary created", esc(summary.get("created"))),
        ("complete", '<span class="good">yes</span>' if complete else '<span class="bad">NO: shards missing</span>'),
        *[(f"pairs {k}", number(pairs[k], ["pairs", k])) for k in ("planned", "merged", "ok", "failures")],
        ("pairs/s", number(throughput.get("pairs_per_second"), ["throughput", "pairs_per_second"], digits=2)),
        ("pairs computed", number(throughput.get("pairs_computed"), ["throughput", "pairs_computed"])),
        ("processing s", number(throughput.get("processing_seconds"), ["throughput", "processing_seconds"], digits=2)),
        ("wall s", number(summary.get("wall_seconds"), ["wall_seconds"], digits=2)),
        ("device", esc(runtime.get("device"))),
        ("workers", number(runtime.get("num_workers"), ["runtime", "num_workers"])),
        ("kernels used", esc(", ".join(runtime.get("kernels_used") or []) or "none (nothing computed)")),
        ("compile policy", esc(runtime.get("compile"))),
        ("plan", f"<code>{esc(summary.get('plan_fingerprint'))}</code>"),
    ]
    return f'<table class="kv"><caption>Run</caption>{header_rows(rows)}</table>'


def _shards_table(summary: Mapping[str, Any]) -> str:
    shards = summary.get("shards") or {}
    rows = [(key, number(value, ["shards", key])) for key, value in shards.items() if isinstance(value, int)]
    if shards.get("missing_ids"):
        rows.append(("missing ids", ", ".join(f"<code>{esc(i)}</code>" for i in shards["missing_ids"])))
    for reason, ids in (shards.get("rejected_markers") or {}).items():
        rows.append((f"rejected markers: {reason}", esc(", ".join(map(str, ids)) if isinstance(ids, list) else ids)))
    return f'<table class="kv"><caption>Shards</caption>{header_rows(rows)}</table>'


def facts_section(summary: Mapping[str, Any], output_url: str) -> str:
    """The run's facts: run and throughput, pairs by status, shards, metric settings (every key of the
    summary's `metric`), source, batch sizes per shape bucket, versions.

    Example:
        >>> s = {"pairs": {"planned": 0, "merged": 0, "ok": 0, "failures": 0}, "status_counts": {}}
        >>> facts_section(s, "out").startswith('<section id="facts">')
        True
    """
    status = [(name, number(count, ["status_counts", name])) for name, count in summary["status_counts"].items()]
    tables = [_run_table(summary, output_url),
              f'<table class="kv"><caption>Pairs by status</caption>{header_rows(status)}</table>',
              _shards_table(summary),
              settings_table(summary.get("metric") or {}, caption="Metric settings"),
              settings_table(summary.get("source") or {}, caption="Source"),
              records_table(summary.get("batch_sizes") or {}, ["batch_sizes"], key_label="shape bucket",
                            value_label="batch size", caption="Batch sizes by shape bucket"),
              settings_table(summary.get("versions") or {}, caption="Versions")]
    return _section("facts", "Run facts", f'<div class="facts">{"".join(tables)}</div>')
