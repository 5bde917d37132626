"""Typed configuration of a comparison of two audits, registered with Hydra like the audit's schema.

`python -m jobs.compare baseline=<output.url> candidate=<output.url> [compare.<key>=<value> ...]`: the two
runs are top-level keys (so the command line reads as the question), every option sits under `compare.`.
As in `ssim_ray.config`, the dataclasses are the schema and are not frozen (Hydra must merge into them);
`__post_init__` checks what a type alone cannot. Per-metric options are mappings keyed by metric name whose
keys exist from the start (`compare.max_mean_drop.ssim=0.01` needs no `+`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ssim_ray.compare.metrics import METRIC_NAMES, METRICS
from ssim_ray.secrets import reject_credentials

JOIN_MODES = ("auto", "partitioned")
MISSING = "???"


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _at_least(name: str, value: Any, low: float, *, integer: bool = False) -> None:
    # NaN compares false with everything, so `value < low` alone would let it through.
    if not _number(value) or value < low or (integer and int(value) != value):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind} >= {low:g}, got {value!r}")


def _per_metric(name: str, values: Dict[str, Any], *, high: Optional[float] = None, optional: bool = True) -> None:
    unknown = sorted(set(values) - set(METRIC_NAMES))
    if unknown:
        raise ValueError(f"{name} must be keyed by metric names {list(METRIC_NAMES)}, got {unknown}")
    for metric, value in values.items():
        if value is None and optional:
            continue
        _at_least(f"{name}.{metric}", value, 0.0)
        if high is not None and value > high:
            raise ValueError(f"{name}.{metric} must be in [0, {high:g}], got {value!r}")


def _no_gates() -> Dict[str, Optional[float]]:
    return {name: None for name in METRIC_NAMES}


@dataclass
class CompareConfig:
    """How two audits are compared, and the gates a candidate must pass.

    output_url: where compare.parquet, compare.json and compare.html go (any fsspec URL); the job's default
        is Hydra's run folder.
    baseline_storage_options, candidate_storage_options, output_storage_options: fsspec options (endpoint,
        region…) of each location; never credentials (they come from the environment).
    metrics: the score columns to compare; None: every one of `ssim`, `psnr`, `ms_ssim` both runs computed.
    group_by: a column of either run to break deltas down by; None: the runs' `summary.group_by`
        (the baseline's, else the candidate's); the baseline's value of a pair wins.
    epsilon: per metric, a pair is worse when its delta (candidate − baseline) is below −ε.
    allow_different_metric: compare runs whose metric settings differ (the report says so at the top).
    max_mean_drop, max_fraction_worse: per metric, gates on the whole comparison: the mean delta must not be
        below −max_mean_drop; the fraction of paired pairs worse by more than ε must not exceed
        max_fraction_worse. group_max_mean_drop, group_max_fraction_worse: the same for every group.
    max_newly_failed: pairs ok in the baseline and not ok (or absent) in the candidate, at most.
    max_unmatched: pairs present in one run only, at most.
    bootstrap_resamples, bootstrap_max_sample, confidence, seed: the mean delta's bootstrap interval: that
        many resamples of min(n, bootstrap_max_sample) deltas each (m-out-of-n above the cap, rescaled),
        seeded per metric and group.
    worst_k: worst regressions and best improvements listed per metric and group.
    examples_k: pairs listed per pairing outcome (unmatched, newly failed, fixed…; all are in compare.parquet).
    report: write compare.html; report_worst_k: worst SSIM regressions shown with images and maps.
    join: `auto` (a single pass when both runs share a plan, else partitioned) or `partitioned`.
    partition_rows, spill_dir: rows per on-disk partition of the partitioned join, and the local folder
        where partitions and the kept deltas (12 bytes per paired pair and metric) are written (None: the
        system's temporary folder); they are removed at the end.
    batch_rows: rows read per batch. max_groups: more groups than this is refused (a per-pair column).
    scatter_points: pairs drawn in each baseline-vs-candidate scatter (chosen by a hash of pair_id).
    """

    output_url: Optional[str] = None
    baseline_storage_options: Dict[str, Any] = field(default_factory=dict)
    candidate_storage_options: Dict[str, Any] = field(default_factory=dict)
    output_storage_options: Dict[str, Any] = field(default_factory=dict)
    metrics: Optional[List[str]] = None
    group_by: Optional[str] = None
    epsilon: Dict[str, float] = field(default_factory=lambda: {m.name: m.epsilon for m in METRICS.values()})
    allow_different_metric: bool = False
    max_mean_drop: Dict[str, Optional[float]] = field(default_factory=_no_gates)
    max_fraction_worse: Dict[str, Optional[float]] = field(default_factory=_no_gates)
    group_max_mean_drop: Dict[str, Optional[float]] = field(default_factory=_no_gates)
    group_max_fraction_worse: Dict[str, Optional[float]] = field(default_factory=_no_gates)
    max_newly_failed: Optional[int] = None
    max_unmatched: Optional[int] = None
    bootstrap_resamples: int = 1000
    bootstrap_max_sample: int = 50_000
    confidence: float = 0.95
    seed: int = 0
    worst_k: int = 10
    examples_k: int = 20
    report: bool = True
    report_worst_k: int = 6
    join: str = "auto"
    partition_rows: int = 500_000
    spill_dir: Optional[str] = None
    batch_rows: int = 65_536
    max_groups: int = 1000
    scatter_points: int = 20_000

    def __post_init__(self) -> None:
        for name in ("baseline_storage_options", "candidate_storage_options", "output_storage_options"):
            reject_credentials(f"compare.{name}", getattr(self, name))
        if self.metrics is not None:
            unknown = [m for m in self.metrics if m not in METRIC_NAMES]
            if unknown or not self.metrics:
                raise ValueError(f"compare.metrics must list some of {list(METRIC_NAMES)} (or be null: every "
                                 f"metric both runs hold), got {self.metrics!r}")
        _per_metric("compare.epsilon", self.epsilon, optional=False)
        missing = [m for m in METRIC_NAMES if m not in self.epsilon]
        if missing:
            raise ValueError(f"compare.epsilon must give every metric a value, got none for {missing}")
        for name in ("max_mean_drop", "group_max_mean_drop"):
            _per_metric(f"compare.{name}", getattr(self, name))
        for name in ("max_fraction_worse", "group_max_fraction_worse"):
            _per_metric(f"compare.{name}", getattr(self, name), high=1.0)
        for name in ("max_newly_failed", "max_unmatched"):
            if getattr(self, name) is not None:
                _at_least(f"compare.{name}", getattr(self, name), 0, integer=True)
        _at_least("compare.bootstrap_resamples", self.bootstrap_resamples, 1, integer=True)
        _at_least("compare.bootstrap_max_sample", self.bootstrap_max_sample, 2, integer=True)
        if not (_number(self.confidence) and 0 < self.confidence < 1):
            raise ValueError(f"compare.confidence must be in (0, 1), got {self.confidence!r}")
        _at_least("compare.seed", self.seed, 0, integer=True)
        for name in ("worst_k", "examples_k", "report_worst_k", "scatter_points"):
            _at_least(f"compare.{name}", getattr(self, name), 0, integer=True)
        for name in ("partition_rows", "batch_rows", "max_groups"):
            _at_least(f"compare.{name}", getattr(self, name), 1, integer=True)
        if self.join not in JOIN_MODES:
            raise ValueError(f"compare.join must be one of {list(JOIN_MODES)}, got {self.join!r}")

    def group_gates_set(self) -> bool:
        """Whether any per-group gate is set (they need a group column).

        Example:
            >>> CompareConfig(group_max_mean_drop={"ssim": 0.01}).group_gates_set()
            True
        """
        return any(v is not None for gates in (self.group_max_mean_drop, self.group_max_fraction_worse)
                   for v in gates.values())


@dataclass
class CompareJobConfig:
    """The whole comparison: the two audits' output folders (any fsspec URL) and the options.

    Example:
        >>> CompareJobConfig(baseline="/audits/a", candidate="/audits/b").compare.join
        'auto'
    """

    baseline: str = MISSING
    candidate: str = MISSING
    compare: CompareConfig = field(default_factory=CompareConfig)

    def __post_init__(self) -> None:
        for name in ("baseline", "candidate"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or value == MISSING:
                raise ValueError(f"{name} must be an audit's output.url (the folder holding ssim.parquet), "
                                 f"got {value!r}")


SCHEMA_NAME = "compare_schema"


def register_compare_configs() -> None:
    """Register the comparison's schema with Hydra's ConfigStore (conf/compare.yaml extends it)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=CompareJobConfig)
