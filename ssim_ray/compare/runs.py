"""The two audits being compared: what each output folder holds, and whether they may be compared at all.

Owns reading an audit's facts (`summary.json`, `_run.json`, the schema and row count of `ssim.parquet`),
the choice of metrics and of the group column, and the refusal of runs whose metric settings differ: the
two "metric" blocks (`SSIMConfig.describe()`: every setting that changes a score) are compared key by key,
leaving out the settings of a metric that is not compared (an older run without PSNR is compared on SSIM).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ssim_ray.compare.config import CompareConfig
from ssim_ray.compare.metrics import COMPUTED_KEY, METRIC_NAMES, NOT_SETTINGS, metric_of_setting
from ssim_ray.output.layout import MERGED_FILE, RUN_MANIFEST, SUMMARY_FILE, output_filesystem
from ssim_ray.secrets import redact_text

# Columns a comparison reads from each run (besides the metrics and the group column).
ROW_COLUMNS = ("pair_id", "status", "error", "reference", "distorted", "shard_id")


class CompareRefusedError(ValueError):
    """The two runs cannot be compared as asked (the message names why and what would allow it)."""


@dataclass(frozen=True)
class AuditRun:
    """One audit's output folder, as a comparison sees it.

    Attributes:
        role: "baseline" or "candidate".
        url: the output folder as given; `shown` is the same with credentials masked.
        storage_options: fsspec options for it.
        schema: ssim.parquet's Arrow schema; num_rows its row count.
        summary: summary.json ({} when absent: a merge killed between its two files).
        manifest: _run.json, or None when absent.
    """

    role: str
    url: str
    storage_options: Mapping[str, Any]
    schema: pa.Schema
    num_rows: int
    summary: Mapping[str, Any]
    manifest: Optional[Mapping[str, Any]]

    @property
    def shown(self) -> str:
        """The URL with any credential masked, for messages and the report."""
        return redact_text(self.url)

    @property
    def metric(self) -> Optional[Mapping[str, Any]]:
        """The run's metric block: summary.json's, else _run.json's (the same function writes both)."""
        return self.summary.get("metric") or (self.manifest or {}).get("metric")

    @property
    def plan_fingerprint(self) -> Optional[str]:
        """The plan the rows came from: runs that share it list the same pairs in the same order."""
        return self.summary.get("plan_fingerprint") or (self.manifest or {}).get("plan_fingerprint")

    @property
    def group_by(self) -> Optional[str]:
        return self.summary.get("group_by")

    @property
    def complete(self) -> bool:
        """False when the merge left planned shards out (their pairs are then absent from this run)."""
        return self.summary.get("complete", True) is not False

    def results_path(self) -> str:
        return f"{output_filesystem(self.url, self.storage_options)[1]}/{MERGED_FILE}"

    def open_results(self) -> "ResultFiles":
        """ssim.parquet (one file, or the folder of part files a large merge writes), opened for streaming.

        pre_buffer=False: with pyarrow's default (True) `iter_batches` keeps every row group it has read
        (measured: +2.5 MB per 65,536-row batch, 0.5 GB over 10^7 rows), so memory would grow with the file.
        """
        fs, root = output_filesystem(self.url, self.storage_options)
        return ResultFiles(fs, result_files(fs, f"{root}/{MERGED_FILE}"))

    def facts(self) -> Dict[str, Any]:
        """What compare.json records of the run.

        Example:
            >>> run = AuditRun("baseline", "/a", {}, pa.schema([]), 3, {"run_id": "r1"}, None)
            >>> run.facts()["rows"], run.facts()["run_id"]
            (3, 'r1')
        """
        return {"url": self.shown, "rows": self.num_rows, "plan_fingerprint": self.plan_fingerprint,
                "run_id": self.summary.get("run_id") or (self.manifest or {}).get("run_id"),
                "created": self.summary.get("created"), "complete": self.complete, "group_by": self.group_by,
                "metric": self.metric}


def result_files(fs: Any, path: str) -> List[str]:
    """The Parquet files of ssim.parquet in plan order: the file itself, or a folder's part files by name.

    Above `output.merge.SINGLE_FILE_MAX_ROWS` rows the merge writes ssim.parquet as a folder of
    `part-NNNNNN.parquet` files whose name order is plan order.
    """
    if not fs.isdir(path):
        return [path]
    return sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet")
                  and not posixpath.basename(p).startswith("."))


class ResultFiles:
    """ssim.parquet's files read one after another as one stream of record batches (plan order)."""

    def __init__(self, fs: Any, paths: Sequence[str]) -> None:
        self.fs, self.paths = fs, list(paths)

    def iter_batches(self, *, batch_size: int, columns: Optional[Sequence[str]] = None) -> Iterator[pa.RecordBatch]:
        """Batches of every file in turn; pre_buffer=False, so memory does not grow with the file (see above)."""
        for path in self.paths:
            with self.fs.open(path, "rb") as handle:
                yield from pq.ParquetFile(handle, pre_buffer=False).iter_batches(batch_size=batch_size,
                                                                                 columns=columns)

    def close(self) -> None:
        """Nothing stays open between batches of different files."""


def _json(fs: Any, path: str) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as error:
        raise CompareRefusedError(f"{path} must be JSON, got unreadable content ({error})") from error


def open_run(role: str, url: str, storage_options: Optional[Mapping[str, Any]] = None) -> AuditRun:
    """Read an audit's facts: ssim.parquet's schema and row count, summary.json, _run.json.

    Args:
        role: "baseline" or "candidate" (named in messages).
        url: the audit's output folder (any fsspec URL).
        storage_options: fsspec options for it.

    Returns:
        The AuditRun.

    Raises:
        CompareRefusedError: no ssim.parquet (or not a results table) under `url`.

    Example:
        >>> open_run("baseline", "memory://doc-compare-nothing")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ssim_ray.compare.runs.CompareRefusedError: baseline must be an audit's output folder holding ...
    """
    options = dict(storage_options or {})
    fs, root = output_filesystem(url, options)
    path = f"{root}/{MERGED_FILE}"
    if not fs.exists(path):
        raise CompareRefusedError(
            f"{role} must be an audit's output folder holding {MERGED_FILE}; {redact_text(url.rstrip('/'))}/"
            f"{MERGED_FILE} does not exist (run the audit, or output.merge_only=true, first)")
    schema, rows = None, 0
    for file in result_files(fs, path):
        with fs.open(file, "rb") as handle:
            metadata = pq.ParquetFile(handle)
            schema, rows = schema or metadata.schema_arrow, rows + metadata.metadata.num_rows
    schema = schema if schema is not None else pa.schema([])
    missing = [c for c in ROW_COLUMNS + ("ssim",) if c not in schema.names]
    if missing:
        raise CompareRefusedError(f"{role}'s {MERGED_FILE} must hold the result columns {list(ROW_COLUMNS)} and "
                                  f"ssim, got {schema.names} (missing {missing})")
    return AuditRun(role, url, options, schema, rows, _json(fs, f"{root}/{SUMMARY_FILE}") or {},
                    _json(fs, f"{root}/{RUN_MANIFEST}"))


def computed_metrics(run: AuditRun) -> List[str]:
    """The metrics `run` scored: its score columns, less those its metric block says it did not compute.

    An audit writes every metric's column and leaves a metric it did not compute null, listing the computed
    ones in the metric block (`COMPUTED_KEY`); older audits hold only the columns they computed.

    Example:
        >>> schema = pa.schema([("ssim", pa.float64()), ("psnr", pa.float64()), ("ms_ssim", pa.float64())])
        >>> computed_metrics(AuditRun("baseline", "/a", {}, schema, 0, {"metric": {"metrics": ["ssim", "psnr"]}}, None))
        ['ssim', 'psnr']
        >>> computed_metrics(AuditRun("baseline", "/a", {}, schema, 0, {"metric": {"k1": 0.01}}, None))
        ['ssim', 'psnr', 'ms_ssim']
    """
    listed = (run.metric or {}).get(COMPUTED_KEY)
    return [m for m in METRIC_NAMES if m in run.schema.names and (listed is None or m in listed)]


def chosen_metrics(cfg: CompareConfig, baseline: AuditRun, candidate: AuditRun) -> List[str]:
    """The score columns to compare: `compare.metrics`, or every known one both runs computed (ssim first).

    Raises:
        CompareRefusedError: a metric asked for was not computed by a run.

    Example:
        >>> a = AuditRun("baseline", "/a", {}, pa.schema([("ssim", pa.float64()), ("psnr", pa.float64())]), 0, {}, None)
        >>> b = AuditRun("candidate", "/b", {}, pa.schema([("ssim", pa.float64())]), 0, {}, None)
        >>> chosen_metrics(CompareConfig(), a, b)
        ['ssim']
    """
    computed = {run.role: computed_metrics(run) for run in (baseline, candidate)}
    both = [m for m in computed["baseline"] if m in computed["candidate"]]
    if cfg.metrics is None:
        return both
    absent = [m for m in cfg.metrics if m not in both]
    if absent:
        raise CompareRefusedError(
            f"compare.metrics={list(cfg.metrics)} must name metrics both runs computed; {absent} missing from "
            + ", ".join(f"{role} ({[m for m in absent if m not in found]})"
                        for role, found in computed.items() if any(m not in found for m in absent))
            + f"; both computed {both}")
    return [m for m in METRIC_NAMES if m in cfg.metrics]


def chosen_group_by(cfg: CompareConfig, baseline: AuditRun, candidate: AuditRun) -> Optional[str]:
    """The group column: `compare.group_by`, else the baseline's `summary.group_by`, else the candidate's.

    Raises:
        CompareRefusedError: the column is in neither run, or group gates are set without a group column.

    Example:
        >>> a = AuditRun("baseline", "/a", {}, pa.schema([("codec", pa.string())]), 0, {"group_by": "codec"}, None)
        >>> chosen_group_by(CompareConfig(), a, a)
        'codec'
    """
    column = cfg.group_by or baseline.group_by or candidate.group_by
    if column is None:
        if cfg.group_gates_set():
            raise CompareRefusedError("compare.group_max_mean_drop / group_max_fraction_worse need a group column: "
                                      "set compare.group_by (neither run's summary has a group_by)")
        return None
    if column not in baseline.schema.names and column not in candidate.schema.names:
        raise CompareRefusedError(f"compare.group_by must name a column of either run, got {column!r}; the baseline "
                                  f"has {baseline.schema.names}, the candidate {candidate.schema.names}")
    return column


def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, Mapping):
        flat: Dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


_ABSENT = "(not recorded)"


def metric_differences(baseline: Optional[Mapping[str, Any]], candidate: Optional[Mapping[str, Any]],
                       metrics: Sequence[str]) -> List[str]:
    """The settings that differ between two metric blocks, for the metrics compared, one line each.

    A setting recorded by one run only counts as a difference, unless it belongs to a metric that is not
    compared. Which metrics a run computed (`NOT_SETTINGS`) is no setting. A run that recorded no metric
    block at all differs in "metric".

    Example:
        >>> metric_differences({"k1": 0.01, "psnr": {"precision": "fp32"}}, {"k1": 0.02}, ["ssim"])
        ['k1: baseline 0.01, candidate 0.02']
    """
    if not baseline or not candidate:
        return [f"metric: baseline {'recorded' if baseline else _ABSENT}, candidate "
                f"{'recorded' if candidate else _ABSENT}"]
    old, new = _flatten(baseline), _flatten(candidate)
    keys = sorted(k for k in set(old) | set(new)
                  if metric_of_setting(k) in metrics and k.split(".", 1)[0] not in NOT_SETTINGS)
    return [f"{key}: baseline {old.get(key, _ABSENT)!r}, candidate {new.get(key, _ABSENT)!r}".replace(
        f"'{_ABSENT}'", _ABSENT) for key in keys if old.get(key, _ABSENT) != new.get(key, _ABSENT)]


def check_metric_settings(cfg: CompareConfig, baseline: AuditRun, candidate: AuditRun,
                          metrics: Sequence[str]) -> List[str]:
    """The metric-setting differences, refused unless `compare.allow_different_metric`.

    Returns:
        The differences (empty when the settings agree); the report states them at the top when allowed.

    Raises:
        CompareRefusedError: they differ and differences are not allowed; the message names each one.

    Example:
        >>> run = AuditRun("baseline", "/a", {}, pa.schema([]), 0, {"metric": {"k1": 0.01}}, None)
        >>> check_metric_settings(CompareConfig(), run, run, ["ssim"])
        []
    """
    differences = metric_differences(baseline.metric, candidate.metric, metrics)
    if differences and not cfg.allow_different_metric:
        raise CompareRefusedError(
            f"the two runs' metric settings must agree for their scores to be compared; they differ in "
            f"{len(differences)} setting(s): " + "; ".join(differences)
            + ". Set compare.allow_different_metric=true to compare them anyway (the report says so at the top)")
    return differences
