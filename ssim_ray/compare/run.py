"""The comparison end to end: two audits in, compare.parquet + compare.json + compare.html out, an exit code.

Order: read both runs' facts → choose metrics and group column → refuse differing metric settings (unless
allowed) → join (aligned or partitioned, `join`) while writing compare.parquet and accumulating → statistics
→ gates → compare.json → compare.html. Each file is published whole (`output.publish`): a failed or killed
comparison leaves the previous file or none, never a truncated one.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from ssim_ray.compare.accumulate import Accumulator
from ssim_ray.compare.config import CompareConfig, CompareJobConfig
from ssim_ray.compare.gates import evaluate_compare_gates
from ssim_ray.compare.join import (
    ALIGNED,
    PARTITIONED,
    JoinSpec,
    NotAlignedError,
    choose_mode,
    joined_tables,
    partition_count,
)
from ssim_ray.compare.rows import OUTCOME_NAMES, OUTCOMES, compare_batch, compare_schema
from ssim_ray.compare.runs import AuditRun, check_metric_settings, chosen_group_by, chosen_metrics, open_run
from ssim_ray.compare.statistics import metric_statistics
from ssim_ray.output.gates import GateViolation, exit_code
from ssim_ray.output.layout import output_filesystem
from ssim_ray.output.provenance import library_versions, utc_now
from ssim_ray.output.publish import StagedFile, publish_bytes
from ssim_ray.secrets import redact_text, scrub

COMPARE_PARQUET = "compare.parquet"
COMPARE_JSON = "compare.json"
COMPARE_HTML = "compare.html"
FORMAT = "ssim_ray.compare/1"
ROW_GROUP_ROWS = 65_536
PROGRESS_INTERVAL_S = 10.0  # a line on stderr this often while the join runs (minutes at 10^7 rows)


@dataclass
class CompareOutcome:
    """What a comparison wrote and decided."""

    output_url: str
    summary: Dict[str, Any]
    violations: List[GateViolation] = field(default_factory=list)
    exit_code: int = 0
    html_path: Optional[str] = None


def _stream(baseline: AuditRun, candidate: AuditRun, spec: JoinSpec, mode: str, cfg: CompareConfig,
            staged: StagedFile, info: Dict[str, Any], scratch: str) -> Accumulator:
    acc = Accumulator(spec.metrics, group_by=spec.group_by, epsilon=cfg.epsilon, folder=scratch,
                      worst_k=cfg.worst_k, examples_k=cfg.examples_k, max_groups=cfg.max_groups,
                      scatter_points=cfg.scatter_points, bootstrap_sample=cfg.bootstrap_max_sample)
    try:
        _write_rows(baseline, candidate, spec, mode, staged, acc, info)
    except BaseException:
        acc.close()
        raise
    return acc


def _write_rows(baseline: AuditRun, candidate: AuditRun, spec: JoinSpec, mode: str, staged: StagedFile,
                acc: Accumulator, info: Dict[str, Any]) -> None:
    pending: List[pa.Table] = []
    pending_rows = done = 0
    said = time.monotonic()
    expected = max(baseline.num_rows, candidate.num_rows)
    with pq.ParquetWriter(staged.handle, compare_schema(spec.metrics), compression="zstd") as writer:
        for joined in joined_tables(baseline, candidate, spec, mode, info):
            batch = compare_batch(joined, spec.metrics, grouped=spec.group_by is not None)
            acc.add(batch)
            pending.append(batch.table)
            pending_rows += batch.table.num_rows
            done += batch.table.num_rows
            if time.monotonic() - said > PROGRESS_INTERVAL_S:
                said = time.monotonic()
                print(f"[ssim_ray compare] {mode}: {done:,} of ~{expected:,} pair_ids compared", file=sys.stderr)
            if pending_rows >= ROW_GROUP_ROWS:  # aligned slices can be short: gather them into full row groups
                writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
                pending, pending_rows = [], 0
        if pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)


def _join(baseline: AuditRun, candidate: AuditRun, spec: JoinSpec, cfg: CompareConfig, fs: Any,
          root: str, scratch: str) -> tuple:
    mode, why = choose_mode(baseline, candidate, cfg.join)
    while True:
        staged = StagedFile(fs, f"{root}/{COMPARE_PARQUET}")
        info: Dict[str, Any] = {}
        try:
            acc = _stream(baseline, candidate, spec, mode, cfg, staged, info, scratch)
        except NotAlignedError as error:
            staged.discard()
            why = f"the runs share a plan, but their rows differ ({error}): joined partitioned instead"
            print(f"[ssim_ray compare] {why}", file=sys.stderr)
            mode = PARTITIONED
            continue
        except BaseException:
            staged.discard()
            raise
        staged.commit()
        return acc, mode, why, info


def _pairs(acc: Accumulator, baseline: AuditRun, candidate: AuditRun) -> Dict[str, Any]:
    counts = {name: int(acc.outcomes.total(name)) for name in OUTCOME_NAMES}
    pairs: Dict[str, Any] = {"baseline_rows": baseline.num_rows, "candidate_rows": candidate.num_rows,
                             "pair_ids": sum(counts.values()), **counts,
                             "status_changed": counts["newly_failed"] + counts["fixed"]}
    if acc.group_by:
        codes = {name: code for code, name in enumerate(acc.groups.names)}
        pairs["groups"] = {name: {o: int(acc.outcomes.of(o, codes[name])) for o in OUTCOME_NAMES}
                           for name in sorted(codes)}
    return pairs


def _warnings(baseline: AuditRun, candidate: AuditRun, differences: List[str], group_by: Optional[str]) -> List[str]:
    found = []
    if differences:
        found.append("the runs' metric settings differ (compare.allow_different_metric=true): score changes may come "
                     "from the settings, not the images; " + "; ".join(differences))
    for run in (baseline, candidate):
        if not run.complete:
            missing = run.summary.get("shards", {}).get("missing")
            found.append(f"the {run.role} is incomplete (its summary says {missing} planned shards are missing): "
                         "their pairs count as present in one run only")
        if not run.summary:
            found.append(f"the {run.role} has no summary.json (a merge was interrupted?): facts come from _run.json")
    if group_by and baseline.group_by and candidate.group_by and baseline.group_by != candidate.group_by:
        found.append(f"the runs were summarised by different columns ({baseline.group_by!r}, {candidate.group_by!r}); "
                     f"compared by {group_by!r}")
    return found


def _violation_record(violation: GateViolation) -> Dict[str, Any]:
    # A gate on a metric or group without paired pairs has nothing to observe: null, not NaN, in JSON.
    record = asdict(violation)
    record["observed"] = None if record["observed"] != record["observed"] else record["observed"]
    return record


def _config_record(cfg: CompareConfig, output_url: str) -> Dict[str, Any]:
    return scrub({**asdict(cfg), "output_url": redact_text(output_url)})


def compare_runs(job: CompareJobConfig, *, output_url: Optional[str] = None) -> CompareOutcome:
    """Compare two audits pair by pair; write compare.parquet, compare.json and compare.html.

    Args:
        job: the two runs' output folders and the options (`CompareConfig`).
        output_url: where to write; default `job.compare.output_url`.

    Returns:
        The CompareOutcome: the summary written to compare.json, the violated gates, the exit code
        (0, or `gates.EXIT_COMPARE_GATE`).

    Raises:
        CompareRefusedError: a run is not an audit's output, metric settings differ (not allowed), a metric
            or group column asked for is missing, or a pair_id occurs twice in a run.

    Example:
        >>> compare_runs(CompareJobConfig(baseline="/audits/a", candidate="/audits/b"),
        ...              output_url="/audits/a-vs-b")  # doctest: +SKIP
    """
    started = time.perf_counter()
    cfg = job.compare
    target = output_url or cfg.output_url
    if not target:
        raise ValueError("compare.output_url must name where compare.parquet, compare.json and compare.html go, "
                         "got None")
    baseline = open_run("baseline", job.baseline, cfg.baseline_storage_options)
    candidate = open_run("candidate", job.candidate, cfg.candidate_storage_options)
    metrics = chosen_metrics(cfg, baseline, candidate)
    differences = check_metric_settings(cfg, baseline, candidate, metrics)
    group_by = chosen_group_by(cfg, baseline, candidate)
    spec = JoinSpec(tuple(metrics), group_by, cfg.batch_rows, cfg.partition_rows, cfg.spill_dir)
    # The kept deltas go to local disk, never to memory (`accumulate`); removed when the comparison ends.
    scratch = tempfile.mkdtemp(prefix="ssim-compare-deltas-", dir=cfg.spill_dir)
    try:
        return _compare_and_write(baseline, candidate, spec, cfg, differences, target=target, scratch=scratch,
                                  started=started)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _compare_and_write(baseline: AuditRun, candidate: AuditRun, spec: JoinSpec, cfg: CompareConfig,
                       differences: List[str], *, target: str, scratch: str, started: float) -> CompareOutcome:
    metrics, group_by = list(spec.metrics), spec.group_by
    fs, root = output_filesystem(target, cfg.output_storage_options)
    acc, mode, why, info = _join(baseline, candidate, spec, cfg, fs, root, scratch)
    joined_at = time.perf_counter()
    results = {m: metric_statistics(acc.metrics[m], acc.groups.names if group_by else [], seed=cfg.seed,
                                    resamples=cfg.bootstrap_resamples, max_sample=cfg.bootstrap_max_sample,
                                    confidence=cfg.confidence) for m in metrics}
    pairs = _pairs(acc, baseline, candidate)
    violations = evaluate_compare_gates(results, pairs, cfg)
    summary = {
        "format": FORMAT, "created": utc_now(),
        "baseline": baseline.facts(), "candidate": candidate.facts(),
        "metrics": metrics, "group_by": group_by, "groups": sorted(acc.groups.names) if group_by else [],
        "metric_settings": {"same": not differences, "differences": differences,
                            "allow_different_metric": cfg.allow_different_metric},
        "warnings": _warnings(baseline, candidate, differences, group_by),
        "join": {"mode": mode, "why": why,
                 "partitions": partition_count(baseline, candidate, cfg.partition_rows) if mode != ALIGNED else None,
                 "spilled_bytes": info.get("spilled_bytes")},
        "epsilon": {m: cfg.epsilon[m] for m in metrics},
        "bootstrap": {"resamples": cfg.bootstrap_resamples, "max_sample": cfg.bootstrap_max_sample,
                      "confidence": cfg.confidence, "seed": cfg.seed,
                      "method": "percentile bootstrap of the mean; above max_sample, m-out-of-n from the max_sample "
                                "pairs with the smallest pair_id hashes, rescaled by sqrt(m/n)"},
        "pairs": pairs, "outcomes": dict(OUTCOMES), "examples": acc.examples.listed(),
        "results": results,
        "gates": {"violations": [_violation_record(v) for v in violations], "exit_code": exit_code(violations)},
        "config": _config_record(cfg, target), "versions": library_versions(),
        "files": {"rows": COMPARE_PARQUET, "summary": COMPARE_JSON, "report": COMPARE_HTML if cfg.report else None},
        "seconds": {"join": round(joined_at - started, 3), "statistics": round(time.perf_counter() - joined_at, 3)},
    }
    html_path = None
    if cfg.report:
        from ssim_ray.compare.report import compare_report  # matplotlib and torch only when a report is made

        report_started = time.perf_counter()
        page = compare_report(summary, acc, baseline, candidate, cfg, output_url=redact_text(target))
        html_path = f"{root}/{COMPARE_HTML}"
        publish_bytes(fs, html_path, page.encode("utf-8"))
        summary["seconds"]["report"] = round(time.perf_counter() - report_started, 3)
    acc.close()  # the spilled deltas are read: statistics and histogram done
    summary["seconds"]["total"] = round(time.perf_counter() - started, 3)
    publish_bytes(fs, f"{root}/{COMPARE_JSON}", json.dumps(summary, indent=1, allow_nan=False).encode("utf-8"))
    return CompareOutcome(target, summary, violations, exit_code(violations), html_path)
