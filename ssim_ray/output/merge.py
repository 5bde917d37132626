"""The merge: every committed part of the plan into ssim.parquet, and the run's summary into summary.json.

Parts are read in plan order, MERGE_READ_AHEAD at a time on threads (on an object store each part is one
GET), each checked against its marker's size and sha256, appended to one Parquet writer, and their
statistics summed. Memory stays at MERGE_READ_AHEAD parts plus a row group and 12 bytes per ok row (exact
percentiles), whatever the number of shards.

Publication is atomic (`publish`): the new ssim.parquet is written under a temporary name (local disk) or
as an upload that publishes on close (object stores), while the previous ssim.parquet and summary.json stay
readable; then summary.json is deleted, ssim.parquet published, and the new summary.json published. A kill
at any point leaves a whole ssim.parquet (the previous one or the new one), and a summary.json only beside
the ssim.parquet it describes. A failed merge leaves the previous outputs as they were.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from ssim_ray.config import AuditConfig, SummaryConfig
from ssim_ray.output.commit import ShardCommit, ShardScan, scan_shards
from ssim_ray.output.layout import (
    MARKER_SUFFIX,
    MERGED_FILE,
    SHARDS_DIR,
    SUMMARY_FILE,
    output_filesystem,
    part_path,
)
from ssim_ray.output.provenance import library_versions, utc_now
from ssim_ray.output.publish import StagedFile, publish_bytes
from ssim_ray.output.resume import check_commits
from ssim_ray.output.stamps import CommitStamp
from ssim_ray.output.schema import RESULT_COLUMNS, RESULT_SCHEMA
from ssim_ray.output.stats import ShardStats, empty_stats, merge_stats
from ssim_ray.output.summary_stats import ScoreCollector, summary_statistics
from ssim_ray.output.table_stats import shard_stats
from ssim_ray.secrets import scrub

ROW_GROUP_ROWS = 65536  # part files are small; gather them so ssim.parquet has reader-friendly row groups
# Part files read ahead of the one being merged, on threads: on an object store each part is one GET, and
# reading them one at a time makes the merge wait one round trip per shard. Bounds memory to this many parts.
# Read when a merge starts, so a benchmark can set it (scripts/bench_merge_io.py compares 1 with 8).
MERGE_READ_AHEAD = 8
_LISTED_IDS = 20  # how many missing or rejected shard ids a summary or an error names


class IncompleteMergeError(RuntimeError):
    """Some planned shards are not committed, so a merge would silently miss rows."""


class CorruptShardError(RuntimeError):
    """A committed part file does not match its marker, or a merge's row count does not match the plan."""


@dataclass(frozen=True)
class RunInfo:
    """What the driver knows about a run that the shards do not; written into summary.json.

    Attributes:
        metric: every setting that changes a score (`SSIMConfig.describe()`, as in _run.json);
            scrubbed of credentials here again.
        plan_fingerprint: `Plan.fingerprint`.
        total_pairs: `Plan.total_pairs`; a complete merge must have exactly this many rows.
        source: a description of the source, e.g. `dataclasses.asdict(cfg.source)` (scrubbed here again).
        wall_seconds: the driver's wall time up to the merge (None for `output.merge_only`).
        processing_seconds: from the first shard an actor started to the last one an actor finished in this
            run (None when no actor computed a shard).
        pairs_computed: pairs in the shards actors computed in this run (resumed shards and the driver's
            `worker_failed` shards excluded).
        shards_computed: shards committed by this run, by actors or by the driver (`worker_failed`).
        shards_resumed: planned shards already committed when the run started.
        batch_sizes: per shape bucket, the batch sizes the actors chose and the most OOM back-offs, e.g.
            {"3x512x512:uint8": {"batch_sizes": [64], "ooms": 0}}; written to the summary as given.
        device: where the metric ran, e.g. "cpu" or "cuda" (the actors' devices, joined by ", "); None when
            the run had no shard to compute (all resumed, or `output.merge_only`).
        num_workers: the actors the placement allowed (a run with fewer shards to compute starts fewer);
            None when the run had no shard to compute.
        kernels: the kernels that scored this run's shards (`ssim_ray.metric.kernel_in_use`: 'torch-compiled',
            'torch-eager', 'triton'); empty when the run computed nothing.
        compile: the configured compile policy of the CPU kernel (`ssim.compile`).
        run_id: the run that merges (`stamps.new_run_id`); None outside a job.
        input_check: `inputs.summarize_checks(...)`: the committed shards whose inputs were verified, and
            those recomputed because their inputs changed; None when nothing was verified.
    """

    metric: Mapping[str, Any]
    plan_fingerprint: str
    total_pairs: int
    source: Mapping[str, Any] = field(default_factory=dict)
    wall_seconds: Optional[float] = None
    processing_seconds: Optional[float] = None
    pairs_computed: int = 0
    shards_computed: int = 0
    shards_resumed: int = 0
    batch_sizes: Mapping[str, Any] = field(default_factory=dict)
    device: Optional[str] = None
    num_workers: Optional[int] = None
    kernels: Tuple[str, ...] = ()
    compile: Optional[str] = None
    run_id: Optional[str] = None
    input_check: Optional[Mapping[str, Any]] = None

    def pairs_per_second(self) -> Optional[float]:
        """Pairs computed by this run per second of processing; None when nothing was computed."""
        if not self.processing_seconds or not self.pairs_computed:
            return None
        return self.pairs_computed / self.processing_seconds


def _unified_schema(schemas: Sequence[pa.Schema]) -> pa.Schema:
    """The schema of ssim.parquet: RESULT_SCHEMA, then every part's pass-through columns, types promoted."""
    if not schemas:
        return RESULT_SCHEMA
    try:
        unified = pa.unify_schemas(list(schemas), promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise ValueError(f"pass-through columns must have compatible types across shards, got: {error}") from error
    if not pa.schema(list(unified)[: len(RESULT_COLUMNS)]).equals(RESULT_SCHEMA):
        raise ValueError(f"part files must start with {RESULT_SCHEMA}, got {unified}")
    return unified


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns in its order: types promoted, absent columns all null."""
    arrays = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def _read_part(fs: Any, root: str, commit: ShardCommit) -> pa.Table:
    """The part's table, after checking its size, sha256 and row count against its marker."""
    data = fs.cat_file(part_path(root, commit.shard_id))
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != commit.bytes or digest != commit.sha256:
        raise CorruptShardError(
            f"part file of shard {commit.shard_id!r} must match its marker (bytes {commit.bytes}, sha256 "
            f"{commit.sha256}), got bytes {len(data)}, sha256 {digest}; delete "
            f"{SHARDS_DIR}/{commit.shard_id}{MARKER_SUFFIX} and rerun (resume) to recompute that shard"
        )
    table = pq.read_table(pa.BufferReader(data), use_threads=False)  # parts are small: threads only cost
    if table.num_rows != commit.rows:
        raise CorruptShardError(f"shard {commit.shard_id!r} must have {commit.rows} rows, got {table.num_rows}")
    return table


def _planned_commits(scan: ShardScan, plan_shard_ids: Sequence[str], *,
                     allow_incomplete: bool) -> Tuple[List[ShardCommit], List[str]]:
    """The commits of the planned shards in plan order, and the planned shards not committed."""
    planned = list(plan_shard_ids)
    if len(set(planned)) != len(planned):
        raise ValueError(f"plan_shard_ids must be unique, got {len(planned) - len(set(planned))} duplicates")
    missing = [s for s in planned if s not in scan.commits]
    if missing and not allow_incomplete:
        rejected = {s: scan.rejected[s] for s in missing if s in scan.rejected}
        raise IncompleteMergeError(
            f"{len(missing)} of {len(planned)} planned shards are not committed (e.g. {missing[:_LISTED_IDS]}"
            + (f"; rejected markers: {dict(list(rejected.items())[:_LISTED_IDS])}" if rejected else "")
            + "). Rerun the job with the same output.url to compute them, or merge with allow_incomplete=True "
            "for a summary flagged incomplete."
        )
    return [scan.commits[s] for s in planned if s in scan.commits], missing


def _parts_in_order(fs: Any, root: str, commits: Sequence[ShardCommit], read_ahead: int) -> Iterator[pa.Table]:
    """Each commit's verified part table, in the commits' order, with up to `read_ahead` reads in flight."""
    if read_ahead <= 1 or len(commits) <= 1:
        for commit in commits:
            yield _read_part(fs, root, commit)
        return
    upcoming = iter(commits)
    with ThreadPoolExecutor(max_workers=read_ahead, thread_name_prefix="merge-read") as pool:
        in_flight = deque(pool.submit(_read_part, fs, root, c) for c in itertools.islice(upcoming, read_ahead))
        try:
            while in_flight:
                table = in_flight.popleft().result()  # raises the part's own error (CorruptShardError ...)
                in_flight.extend(pool.submit(_read_part, fs, root, c) for c in itertools.islice(upcoming, 1))
                yield table
        finally:
            for future in in_flight:
                future.cancel()


def _stream_parts(staged: StagedFile, fs: Any, root: str, commits: Sequence[ShardCommit],
                  summary_cfg: SummaryConfig) -> Tuple[ShardStats, ScoreCollector]:
    """Append every part to the staged ssim.parquet in plan order; return the merged statistics and scores."""
    schema = _unified_schema([c.arrow_schema for c in commits])
    merged = empty_stats(group_by=summary_cfg.group_by, worst_k=summary_cfg.worst_k,
                         examples_per_status=summary_cfg.examples_per_status)
    collector = ScoreCollector(capacity=sum(c.rows for c in commits), group_by=summary_cfg.group_by)
    pending: List[pa.Table] = []
    pending_rows = 0
    # The writer leaves a file object it was given open: publishing the staged file is the caller's decision.
    with pq.ParquetWriter(staged.handle, schema, compression="zstd") as writer:
        for part in _parts_in_order(fs, root, commits, MERGE_READ_AHEAD):
            table = _conform(part, schema)
            # From the verified part itself (~1 ms per 1,000 rows): the summary describes exactly the
            # rows merged, with this merge's settings, and no shard's statistics outlive its turn.
            merged = merge_stats(merged, shard_stats(table, summary_cfg))
            collector.add(table)
            pending.append(table)
            pending_rows += table.num_rows
            if pending_rows >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
                pending, pending_rows = [], 0
        if pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
    return merged, collector


def _too_many_groups(stats: ShardStats, summary_cfg: SummaryConfig) -> Optional[str]:
    if len(stats.groups) <= summary_cfg.max_groups:
        return None
    return (f"summary.group_by={summary_cfg.group_by!r} must have at most summary.max_groups="
            f"{summary_cfg.max_groups} distinct values, got {len(stats.groups)}; ssim.parquet is written: "
            "rerun with output.merge_only=true and a coarser summary.group_by (or a larger max_groups)")


def merge(
    output_url: str,
    *,
    plan_shard_ids: Sequence[str],
    run_info: RunInfo,
    summary_cfg: SummaryConfig,
    storage_options: Optional[Mapping[str, Any]] = None,
    allow_incomplete: bool = False,
    audit_cfg: Optional[AuditConfig] = None,
    expect: Optional[CommitStamp] = None,
) -> Dict[str, Any]:
    """Build ssim.parquet and summary.json from the committed shards of the plan; idempotent.

    Part files are streamed in plan order into one Parquet writer (memory: up to MERGE_READ_AHEAD part
    files plus up to ROW_GROUP_ROWS rows, and 12 bytes per ok row for exact percentiles: the score and its
    group code; per shard only its small commit facts). Each part's statistics are computed from the part
    as it streams, after its sha256 is checked, and summed into the run's.
    Pass-through columns whose types differ between shards (all-null in one, say) are unified by
    pyarrow's permissive promotion. Both files are published atomically (see the module's docstring): a
    kill or a failure never leaves a partial file, and a summary.json always describes the ssim.parquet
    beside it.

    Args:
        output_url: the run's output folder.
        plan_shard_ids: every shard id of the plan, in plan order.
        run_info: the driver's facts about the run (see RunInfo).
        summary_cfg: group_by, worst_k, examples_per_status, max_groups.
        storage_options: fsspec options for `output_url`.
        allow_incomplete: merge what is committed and flag the summary `"complete": false` instead of
            raising when planned shards are missing (for a look at a partial run; gates still apply).
        audit_cfg: the quality gates; their thresholds get exact below-threshold counts in the summary
            (`below`), which `gates.evaluate_gates` reads.
        expect: the run's stamp: every committed shard of the plan must carry its plan fingerprint and
            metric digest (`resume.check_commits`); None merges whatever is committed (outside a job).

    Returns:
        The summary, as written to summary.json.

    Raises:
        IncompleteMergeError: planned shards are not committed and allow_incomplete is False.
        ForeignShardsError: with `expect`, a committed shard of another plan or other metric settings.
        CorruptShardError: a part file differs from its marker, or a complete merge's row count differs
            from run_info.total_pairs.
        ValueError: incompatible pass-through types, or too many groups.

    Example:
        >>> from ssim_ray.output.commit import write_shard
        >>> from ssim_ray.output.schema import rows_to_table
        >>> _ = write_shard("memory://doc-merge", "s0", rows_to_table([], []))
        >>> info = RunInfo(metric={"name": "wang2004"}, plan_fingerprint="f", total_pairs=0)
        >>> merge("memory://doc-merge", plan_shard_ids=["s0"], run_info=info,
        ...       summary_cfg=SummaryConfig())["complete"]
        True
    """
    if not isinstance(run_info, RunInfo):
        raise TypeError(f"run_info must be an output.merge.RunInfo (fields {[f.name for f in fields(RunInfo)]}), "
                        f"got {type(run_info).__name__}")
    started = time.perf_counter()
    fs, root = output_filesystem(output_url, storage_options)
    scan = scan_shards(output_url, storage_options=storage_options)
    if expect is not None:
        check_commits(scan.commits, plan_shard_ids, expect, output_url=output_url)
    commits, missing = _planned_commits(scan, plan_shard_ids, allow_incomplete=allow_incomplete)
    staged = StagedFile(fs, f"{root}/{MERGED_FILE}")
    try:
        stats, collector = _stream_parts(staged, fs, root, commits, summary_cfg)
        rows = stats.overall.rows
        if not missing and rows != run_info.total_pairs:
            raise CorruptShardError(f"a complete merge must have run_info.total_pairs={run_info.total_pairs} "
                                    f"rows, got {rows} from {len(commits)} shards")
    except BaseException:
        staged.discard()  # the previous ssim.parquet and summary.json stay as they were
        raise
    too_many = _too_many_groups(stats, summary_cfg)
    if too_many is None:
        thresholds = [t for t in (audit_cfg.min_ssim, audit_cfg.group_min_ssim) if t is not None] if audit_cfg else []
        summary = _summary(stats, collector, run_info, scan, plan_shard_ids, missing, thresholds)
        summary["audit"] = asdict(audit_cfg) if audit_cfg else None
    # The previous summary.json goes just before the new table is published, so that no summary.json ever
    # stands beside an ssim.parquet it does not describe (a kill in between leaves no summary.json).
    if fs.exists(f"{root}/{SUMMARY_FILE}"):
        fs.rm(f"{root}/{SUMMARY_FILE}")
    staged.commit()
    if too_many is not None:
        raise ValueError(too_many)
    summary["merge_seconds"] = round(time.perf_counter() - started, 3)
    publish_bytes(fs, f"{root}/{SUMMARY_FILE}", json.dumps(summary, indent=1).encode("utf-8"))
    return summary


def _summary(stats: ShardStats, collector: ScoreCollector, run_info: RunInfo, scan: ShardScan,
             plan_shard_ids: Sequence[str], missing: Sequence[str], thresholds: Sequence[float]) -> Dict[str, Any]:
    planned = set(plan_shard_ids)
    rate = run_info.pairs_per_second()
    by_run: Dict[str, int] = {}
    for shard_id in planned & set(scan.commits):
        stamp = scan.commits[shard_id].stamp
        writer = stamp.run_id if stamp is not None else "unrecorded"
        by_run[writer] = by_run.get(writer, 0) + 1
    summary = {
        "format": "ssim_ray.summary/1",
        "created": utc_now(),
        "run_id": run_info.run_id,
        "complete": not missing,
        "metric": scrub(dict(run_info.metric)),
        "plan_fingerprint": run_info.plan_fingerprint,
        "pairs": {"planned": run_info.total_pairs, "merged": stats.overall.rows,
                  "ok": stats.overall.moments.count, "failures": stats.overall.failures},
        **summary_statistics(stats, collector, thresholds=thresholds),
        "shards": {
            "total": len(planned), "committed": len(planned) - len(missing), "missing": len(missing),
            "missing_ids": list(missing[:_LISTED_IDS]), "computed": run_info.shards_computed,
            "resumed": run_info.shards_resumed, "unplanned": len(set(scan.commits) - planned),
            "rejected_markers": dict(list(scan.rejected.items())[:_LISTED_IDS]),
            "by_run": dict(sorted(by_run.items())),
        },
        "input_check": dict(run_info.input_check) if run_info.input_check is not None else None,
        "wall_seconds": run_info.wall_seconds,
        "throughput": {"pairs_per_second": rate, "pairs_computed": run_info.pairs_computed,
                       "processing_seconds": run_info.processing_seconds},
        "batch_sizes": dict(run_info.batch_sizes),
        "runtime": {"device": run_info.device, "num_workers": run_info.num_workers,
                    "kernels_used": list(run_info.kernels), "compile": run_info.compile},
        "source": scrub(dict(run_info.source)),
        "versions": library_versions(),
        "files": {"results": MERGED_FILE, "summary": SUMMARY_FILE},
    }
    # Only the configuration parts are scrubbed: group names and statuses are data, not credentials.
    return summary
