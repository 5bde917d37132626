"""The scores a comparison judges: their names, how they print, the change that counts, their settings.

Owns what comparing needs to know of each score column of `ssim.parquet` (`output.schema` owns the columns
themselves): higher is better for all three; how many decimals a delta shows; the default ε below which a
pair's change does not count as worse; and which entries of the metric block (`SSIMConfig.describe()`)
belong to that metric alone, so that two runs are refused only for settings of metrics both of them scored;
and which entry lists the metrics a run computed (`COMPUTED_KEY`: every run since PSNR and MS-SSIM became
columns of ssim.parquet, whose columns of a metric not computed are null).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class MetricSpec:
    """One comparable score column.

    Attributes:
        name: the result column (`ssim`, `psnr`, `ms_ssim`).
        label: how the report names it.
        unit: appended to deltas in the report ("" or " dB").
        digits: decimals of a score or delta in the report.
        epsilon: the default ε of `compare.epsilon`: a pair is worse when its delta is below −ε.
        own_settings: entries of the metric block that only this metric uses (ignored when it is not compared).
    """

    name: str
    label: str
    unit: str
    digits: int
    epsilon: float
    own_settings: Tuple[str, ...]


# SSIM's settings are the block's top level, which also holds what every metric shares (colour, alpha, data
# range, crop): it is always compared. ε: 0.001 SSIM is below what a viewer tells apart; 0.1 dB is the
# smallest PSNR step codec tables print.
METRICS: Dict[str, MetricSpec] = {
    "ssim": MetricSpec("ssim", "SSIM", "", 4, 1e-3, ()),
    "psnr": MetricSpec("psnr", "PSNR", " dB", 2, 0.1, ("psnr",)),
    "ms_ssim": MetricSpec("ms_ssim", "MS-SSIM", "", 4, 1e-3, ("ms_ssim", "ms_ssim_weights")),
}
METRIC_NAMES = tuple(METRICS)
# Entries of the metric block that say which metrics a run computed, not how any score is computed: they
# choose what is compared (`runs.computed_metrics`) and are never a difference of settings.
COMPUTED_KEY = "metrics"
NOT_SETTINGS = (COMPUTED_KEY,)


def metric_of_setting(key: str) -> str:
    """The metric a flattened metric-block key belongs to (`psnr.precision` → psnr; `k1` → ssim).

    Example:
        >>> metric_of_setting("psnr.crop_border"), metric_of_setting("ms_ssim_weights"), metric_of_setting("k1")
        ('psnr', 'ms_ssim', 'ssim')
    """
    head = key.split(".", 1)[0]
    for spec in METRICS.values():
        if head in spec.own_settings:
            return spec.name
    return "ssim"
