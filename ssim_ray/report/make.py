"""make_report: read a run's summary.json, make the plots and the worst-pair panels, write report.html and
plots/*.png beside the results.

Owns the report's files (names, replacing the plots of an earlier report) and where the configs to re-read
the worst pairs come from (given, or the run's `_run.json`). The cost does not grow with the number of
rows: every number and plot comes from summary.json; only the k worst pairs are fetched and decoded again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ssim_ray.config import ReportConfig, SourceConfig, SSIMConfig
from ssim_ray.output.layout import PLOTS_DIR, REPORT_FILE, RUN_MANIFEST, SUMMARY_FILE, output_filesystem
from ssim_ray.output.publish import publish_bytes
from ssim_ray.report.charts import summary_plots
from ssim_ray.report.page import render_html
from ssim_ray.report.worst import WorstPanel, configs_from_manifest, noted, worst_panels
from ssim_ray.secrets import scrub


@dataclass(frozen=True)
class ReportResult:
    """Where the report went, and what it took."""

    html_path: str
    plot_paths: Tuple[str, ...]
    worst_shown: int
    worst_with_images: int
    seconds: float
    worst_seconds: float  # of `seconds`: re-reading, re-scoring and drawing the worst pairs


def _read_json(fs: Any, path: str, *, what: str) -> Dict[str, Any]:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{what} must exist at {path}; run the job (or output.merge_only=true) first") from error


def make_report(
    output_url: str,
    *,
    report_cfg: ReportConfig,
    storage_options: Optional[Mapping[str, Any]] = None,
    source_cfg: Optional[SourceConfig] = None,
    ssim_cfg: Optional[SSIMConfig] = None,
) -> ReportResult:
    """Write report.html and plots/*.png under `output_url` from its summary.json.

    Cost does not grow with the number of rows: every number and plot comes from summary.json; only the
    `report_cfg.worst_k` worst pairs (at most the summary's `worst_k`) are fetched and decoded again.

    Args:
        output_url: a run's output folder holding summary.json (and _run.json).
        report_cfg: `worst_k`: how many worst pairs to show with images.
        storage_options: fsspec options for `output_url`.
        source_cfg: the run's source config, to re-read the worst pairs; None: from _run.json.
        ssim_cfg: the run's metric config, to re-score them; None: from _run.json.

    Returns:
        A ReportResult with the paths written.

    Raises:
        FileNotFoundError: no summary.json under `output_url`.

    Example:
        >>> make_report("/data/audit", report_cfg=ReportConfig())  # doctest: +SKIP
    """
    started = time.perf_counter()
    fs, root = output_filesystem(output_url, storage_options)
    summary = _read_json(fs, f"{root}/{SUMMARY_FILE}", what="summary.json")
    plots = summary_plots(summary)
    worst = summary.get("worst", [])[: report_cfg.worst_k]
    worst_started = time.perf_counter()
    panels = _panels(fs, root, worst, source_cfg=source_cfg, ssim_cfg=ssim_cfg)
    worst_seconds = time.perf_counter() - worst_started
    page = render_html(summary, plots=plots, panels=panels, output_url=scrub(output_url))
    # Each file is published whole (a kill never leaves a truncated one where a good one was): the plots,
    # then the page; plots of an earlier report (other groups) are removed only once the new page is there.
    plot_paths = [f"{root}/{PLOTS_DIR}/{plot.name}" for plot in plots]
    for plot, path in zip(plots, plot_paths):
        publish_bytes(fs, path, plot.png)
    html_path = f"{root}/{REPORT_FILE}"
    publish_bytes(fs, html_path, page.encode("utf-8"))
    _remove_other_plots(fs, f"{root}/{PLOTS_DIR}", keep=plot_paths)
    return ReportResult(html_path, tuple(plot_paths), len(panels), sum(1 for p in panels if p.images),
                        time.perf_counter() - started, worst_seconds)


def _remove_other_plots(fs: Any, folder: str, *, keep: Sequence[str]) -> None:
    fs.invalidate_cache(folder)
    try:
        present = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return
    kept = {fs._strip_protocol(path) for path in keep}
    stale = [path for path in present if fs._strip_protocol(path) not in kept]
    if stale:
        fs.rm(stale)


def _panels(fs: Any, root: str, worst: Sequence[Mapping[str, Any]], *, source_cfg: Optional[SourceConfig],
            ssim_cfg: Optional[SSIMConfig]) -> List[WorstPanel]:
    if not worst:
        return []
    if source_cfg is None or ssim_cfg is None:
        try:
            recorded = configs_from_manifest(_read_json(fs, f"{root}/{RUN_MANIFEST}", what=RUN_MANIFEST))
        except (FileNotFoundError, ValueError) as error:
            return noted([WorstPanel(entry) for entry in worst], f"the run's configuration is unknown: {error}")
        source_cfg, ssim_cfg = source_cfg or recorded[0], ssim_cfg or recorded[1]
    return worst_panels(worst, source_cfg=source_cfg, ssim_cfg=ssim_cfg)
