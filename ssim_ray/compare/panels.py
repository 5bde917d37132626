"""The worst SSIM regressions shown: the reference, both runs' distorted images and both SSIM maps.

Each pair is re-read through `ssim_ray.sources` twice, with each run's own source and metric configs from
its `_run.json` (`report.worst.configs_from_manifest`), and drawn by the audit report's
`report.worst.worst_panels` (maps at bounded memory, thumbnails that line up pixel for pixel). A pair one
run can no longer read gets that run's note instead of its images; the other run's images still show.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence

from ssim_ray.compare.runs import AuditRun
from ssim_ray.report.charts import Plot
from ssim_ray.report.worst import WorstPanel, configs_from_manifest, noted, worst_panels


@dataclass
class RegressionPanel:
    """One regression as shown: its compare row, and each run's re-read pictures (or why there are none)."""

    entry: Mapping[str, Any]
    baseline: WorstPanel
    candidate: WorstPanel

    def picture(self, side: str, name: str) -> Optional[Plot]:
        """A picture of one run's panel by name (reference, distorted, map, scale, zoom_*), if drawn."""
        images = getattr(self, side).images or []
        return next((p for p in images if p.name == name), None)


def _run_panels(run: AuditRun, entries: Sequence[Mapping[str, Any]]) -> List[WorstPanel]:
    side = run.role
    wanted = [{"pair_id": e["pair_id"], "shard_id": e[f"{side}_shard_id"], "ssim": e[side]} for e in entries]
    try:
        source_cfg, ssim_cfg = configs_from_manifest(run.manifest or {})
    except ValueError as error:
        return noted([WorstPanel(entry) for entry in wanted], f"the {side}'s configuration is unknown: {error}")
    return worst_panels(wanted, source_cfg=source_cfg, ssim_cfg=ssim_cfg)


def regression_panels(entries: Sequence[Mapping[str, Any]], baseline: AuditRun,
                      candidate: AuditRun) -> List[RegressionPanel]:
    """Re-read and draw each regression in both runs.

    Args:
        entries: the worst SSIM regressions (compare.json rows: pair_id, baseline, candidate, shard ids…).
        baseline: the baseline run (its _run.json gives the configs).
        candidate: the candidate run.

    Returns:
        One RegressionPanel per entry, in order.

    Example:
        >>> regression_panels([], None, None)
        []
    """
    if not entries:
        return []
    return [RegressionPanel(entry, b, c) for entry, b, c in
            zip(entries, _run_panels(baseline, entries), _run_panels(candidate, entries))]
