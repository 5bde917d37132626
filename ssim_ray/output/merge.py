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

The same steps as units for a parallel merge (`ssim_ray.merge_tasks` runs them as Ray tasks): `plan_merge`
cuts the committed parts, in plan order, into blocks of contiguous parts (`block_bounds`, from the plan's row
counts only); `summarise_block` reads, checks and summarises one block (and, when the results are a folder,
writes the block's file); `MergeAccumulator` combines the blocks' summaries in plan order; `publish_results`
publishes. Up to SINGLE_FILE_MAX_ROWS rows the results are one file, `ssim.parquet`, written by the process
that combines; above it `ssim.parquet` is a folder of one Parquet file per block (`part-000000.parquet`, ...:
one schema, plan order in the files' name order), which pyarrow, DuckDB and Ray Data read as one dataset.

The statistics are combined as a tree (parts into blocks, blocks into the run: counts, histograms, min and
max, worst pairs and failure examples are exact under any grouping), and come out with the same bits as this
one-process merge: the floating moments (mean, M2) depend on the order of Chan's updates, so each block also
returns every part's moments (its "trail": five numbers per part and Moments), which the combiner folds in
plan order exactly as `merge` does. Exact percentiles stay exact: every ok score reaches one ScoreCollector.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ssim_ray.config import AuditConfig, SummaryConfig
from ssim_ray.output.commit import ShardCommit, ShardScan, scan_shards
from ssim_ray.output.layout import (
    MARKER_SUFFIX,
    MERGED_FILE,
    SHARDS_DIR,
    SUMMARY_FILE,
    is_local,
    output_filesystem,
    part_path,
)
from ssim_ray.output.provenance import library_versions, utc_now
from ssim_ray.output.publish import StagedFile, publish_bytes
from ssim_ray.output.results_folder import swap_in
from ssim_ray.output.resume import check_commits
from ssim_ray.output.stamps import CommitStamp
from ssim_ray.output.schema import RESULT_COLUMNS, RESULT_SCHEMA
from ssim_ray.output.stats import Moments, ShardStats, empty_stats, merge_moments, merge_stats
from ssim_ray.output.summary_stats import ScoreCollector, summary_statistics
from ssim_ray.output.table_stats import shard_stats
from ssim_ray.secrets import scrub

ROW_GROUP_ROWS = 65536  # part files are small; gather them so ssim.parquet has reader-friendly row groups
# Part files read ahead of the one being merged, on threads: on an object store each part is one GET, and
# reading them one at a time makes the merge wait one round trip per shard. Bounds memory to this many parts.
# Read when a merge starts, so a benchmark can set it (scripts/bench_merge_io.py compares 1 with 8).
MERGE_READ_AHEAD = 8
_LISTED_IDS = 20  # how many missing or rejected shard ids a summary or an error names
# Up to this many rows ssim.parquet is one file; above it, a folder of one file per block. One file is what
# most tools open most easily, but one process must write it (~1.25 us per row here, see docs/BENCHMARKS.md),
# which would bound a parallel merge; 10M rows are a few hundred MB of Parquet. Read when a merge starts.
SINGLE_FILE_MAX_ROWS = 10_000_000
LAYOUT_FILE, LAYOUT_FOLDER = "file", "folder"
FOLDER_PART = "part-{index:06d}.parquet"  # the files of a folder ssim.parquet: name order is plan order
# Blocks (the parallel merge's unit: contiguous parts) hold about total rows / TARGET_BLOCKS rows, within
# [MIN_BLOCK_ROWS, MAX_BLOCK_ROWS]: enough blocks to keep a cluster busy, few enough that the per-block cost
# (a task, a file of the folder) stays small. They depend on the plan's row counts only, never on the cluster,
# so a folder's files are the same whoever merges.
TARGET_BLOCKS = 64
MIN_BLOCK_ROWS = 16_384
MAX_BLOCK_ROWS = 2_000_000
# Columns ScoreCollector never reads: a block sends the combiner every other result column of its rows.
_NOT_SCORED = ("reference", "distorted", "error", "decoder", "reference_version", "distorted_version", "shard_id")
_NO_HIST = np.zeros(0, dtype=np.int64)  # the moments of a trail carry no histogram (blocks sum those)


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
    types = dict(zip(table.schema.names, table.schema.types))
    arrays = [
        (table[f.name] if types[f.name] == f.type else table[f.name].cast(f.type)) if f.name in types
        else pa.nulls(table.num_rows, f.type)
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


class RowGroupWriter:
    """A Parquet writer fed part tables in plan order, which it gathers into ROW_GROUP_ROWS row groups.

    Fed the same tables, it writes the same file, whichever process feeds it. The file object it is given is
    left open: publishing it is the caller's decision. Used as a context manager, it closes (writes the
    footer) when the block ends, raising or not.
    """

    def __init__(self, sink: Any, schema: pa.Schema) -> None:
        self._writer = pq.ParquetWriter(sink, schema, compression="zstd")
        self._pending: List[pa.Table] = []
        self._rows = 0

    def add(self, table: pa.Table) -> None:
        """Append a table (conformed to the writer's schema)."""
        self._pending.append(table)
        self._rows += table.num_rows
        if self._rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        self._writer.write_table(pa.concat_tables(self._pending), row_group_size=ROW_GROUP_ROWS)
        self._pending, self._rows = [], 0

    def close(self) -> None:
        """Write what is pending and the footer."""
        if self._pending:
            self._flush()
        self._writer.close()

    def __enter__(self) -> "RowGroupWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def _stream_parts(staged: StagedFile, fs: Any, root: str, commits: Sequence[ShardCommit],
                  summary_cfg: SummaryConfig) -> Tuple[ShardStats, ScoreCollector]:
    """Append every part to the staged ssim.parquet in plan order; return the merged statistics and scores."""
    schema = _unified_schema([c.arrow_schema for c in commits])
    merged = _empty(summary_cfg)
    collector = ScoreCollector(capacity=sum(c.rows for c in commits), group_by=summary_cfg.group_by)
    with RowGroupWriter(staged.handle, schema) as writer:
        for part in _parts_in_order(fs, root, commits, MERGE_READ_AHEAD):
            table = _conform(part, schema)
            # From the verified part itself (~1 ms per 1,000 rows): the summary describes exactly the
            # rows merged, with this merge's settings, and no shard's statistics outlive its turn.
            merged = merge_stats(merged, shard_stats(table, summary_cfg))
            collector.add(table)
            writer.add(table)
    return merged, collector


def _empty(summary_cfg: SummaryConfig) -> ShardStats:
    return empty_stats(group_by=summary_cfg.group_by, worst_k=summary_cfg.worst_k,
                       examples_per_status=summary_cfg.examples_per_status)


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
    before_publish: Optional[Callable[[], None]] = None,
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
        before_publish: called before the previous outputs are touched (a job checks its claim there).

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
    facts = SummaryFacts(run_info, scan, tuple(plan_shard_ids), tuple(missing), summary_cfg, audit_cfg)
    merged = {"by": "driver", "workers": 1, "blocks": 1, "layout": LAYOUT_FILE, "files": 1}
    try:
        return publish_results(fs, root, stats, collector, facts, publish_table=lambda: publish_file(fs, root, staged),
                               started=started, merge_facts=merged, before_publish=before_publish)
    finally:
        staged.discard()  # nothing when it was published; else the previous outputs stay


@dataclass(frozen=True)
class SummaryFacts:
    """What summary.json says besides the statistics: the run, the scan, the plan, the settings."""

    run_info: RunInfo
    scan: ShardScan
    plan_shard_ids: Tuple[str, ...]
    missing: Tuple[str, ...]
    summary_cfg: SummaryConfig
    audit_cfg: Optional[AuditConfig]


def publish_results(fs: Any, root: str, stats: ShardStats, collector: ScoreCollector, facts: SummaryFacts, *,
                    publish_table: Callable[[], None], started: float, merge_facts: Mapping[str, Any],
                    before_publish: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """Delete the previous summary.json, publish the new results (`publish_table`), then the new summary.json.

    Args:
        fs, root: the output's filesystem and root.
        stats, collector: the run's merged statistics and ok scores.
        facts: the rest of the summary.
        publish_table: makes the new ssim.parquet (file or folder) visible, whole.
        started: `time.perf_counter()` when the merge started (for `merge_seconds`).
        merge_facts: how the merge ran (summary.json's `merge`: by, workers, blocks, layout, files).
        before_publish: called before anything is deleted or published (the job checks its claim there).

    Returns:
        The summary, as written.

    Raises:
        ValueError: too many groups (the results are published, the summary is not).
    """
    too_many = _too_many_groups(stats, facts.summary_cfg)
    if too_many is None:
        audit_cfg = facts.audit_cfg
        thresholds = audit_cfg.thresholds() if audit_cfg else {}
        summary = _summary(stats, collector, facts.run_info, facts.scan, facts.plan_shard_ids, facts.missing,
                           thresholds)
        summary["audit"] = asdict(audit_cfg) if audit_cfg else None
    if before_publish is not None:
        before_publish()
    # The previous summary.json goes just before the new table is published, so that no summary.json ever
    # stands beside an ssim.parquet it does not describe (a kill in between leaves no summary.json).
    if fs.exists(f"{root}/{SUMMARY_FILE}"):
        fs.rm(f"{root}/{SUMMARY_FILE}")
    publish_table()
    if too_many is not None:
        raise ValueError(too_many)
    summary["merge_seconds"] = round(time.perf_counter() - started, 3)
    summary["merge"] = dict(merge_facts)
    publish_bytes(fs, f"{root}/{SUMMARY_FILE}", json.dumps(summary, indent=1).encode("utf-8"))
    return summary


def publish_file(fs: Any, root: str, staged: StagedFile) -> None:
    """Publish a staged single-file ssim.parquet, first moving a folder ssim.parquet out of its way."""
    target = f"{root}/{MERGED_FILE}"
    if is_local(fs) and os.path.isdir(target):
        swap_in(fs, root, None)
    elif not is_local(fs) and fs.isdir(target):
        fs.rm(target, recursive=True)
    staged.commit()


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


# ---------------------------------------------------------------------------------------------------------
# The merge's units for a parallel merge (ssim_ray.merge_tasks runs them as Ray tasks).


def block_rows_for(total_rows: int) -> int:
    """The rows a block gathers for a merge of `total_rows` rows (TARGET_BLOCKS blocks, within the bounds).

    Example:
        >>> block_rows_for(1_000), block_rows_for(10_000_000), block_rows_for(10**9)
        (16384, 156250, 2000000)
    """
    return max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, -(-total_rows // TARGET_BLOCKS)))


def block_bounds(part_rows: Sequence[int], block_rows: int) -> List[Tuple[int, int]]:
    """Contiguous ranges [start, end) of parts, each closed once it holds at least `block_rows` rows.

    Example:
        >>> block_bounds([5, 5, 5, 5, 5], 10)
        [(0, 2), (2, 4), (4, 5)]
    """
    bounds, start, rows = [], 0, 0
    for index, count in enumerate(part_rows):
        rows += count
        if rows >= block_rows:
            bounds.append((start, index + 1))
            start, rows = index + 1, 0
    if start < len(part_rows):
        bounds.append((start, len(part_rows)))
    return bounds


@dataclass(frozen=True)
class MergePlan:
    """What a parallel merge merges: the planned commits in plan order, their schema, layout and blocks."""

    commits: Tuple[ShardCommit, ...]
    missing: Tuple[str, ...]
    schema: pa.Schema
    layout: str
    blocks: Tuple[Tuple[int, int], ...]

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.commits)

    def block(self, index: int) -> Tuple[ShardCommit, ...]:
        """The commits of block `index`, in plan order."""
        start, end = self.blocks[index]
        return self.commits[start:end]


def plan_merge(scan: ShardScan, plan_shard_ids: Sequence[str], *, allow_incomplete: bool = False,
               single_file_max_rows: Optional[int] = None, block_rows: Optional[int] = None) -> MergePlan:
    """The commits to merge, in plan order, cut into blocks; the results' layout from their row count.

    Args:
        scan: the output's commits (`commit.scan_shards`).
        plan_shard_ids: every shard id of the plan, in plan order.
        allow_incomplete: as `merge`.
        single_file_max_rows: above this many rows the results are a folder (None: SINGLE_FILE_MAX_ROWS).
        block_rows: rows per block (None: `block_rows_for` the total).

    Raises:
        IncompleteMergeError: as `merge`.
        ValueError: incompatible pass-through types.

    Example:
        >>> plan_merge(scan_shards("memory://doc-plan-merge"), []).layout
        'file'
    """
    commits, missing = _planned_commits(scan, plan_shard_ids, allow_incomplete=allow_incomplete)
    rows = sum(c.rows for c in commits)
    limit = SINGLE_FILE_MAX_ROWS if single_file_max_rows is None else single_file_max_rows
    bounds = block_bounds([c.rows for c in commits], block_rows or block_rows_for(rows))
    return MergePlan(tuple(commits), tuple(missing), _unified_schema([c.arrow_schema for c in commits]),
                     LAYOUT_FILE if rows <= limit else LAYOUT_FOLDER, tuple(bounds))


def moments_paths(stats: Any, path: Tuple[str, ...] = ()) -> Iterator[Tuple[Tuple[str, ...], Moments]]:
    """Every Moments inside `stats` (overall, per group, per metric...) with its path of field names and keys.

    Found by walking the dataclasses and dicts, so moments that `stats` gains later are found too.

    Example:
        >>> [p for p, _ in moments_paths(empty_stats(group_by=None, worst_k=1, examples_per_status=1))][0]
        ('overall', 'moments')
    """
    if isinstance(stats, Moments):
        yield path, stats
        return
    if isinstance(stats, dict):
        items: Any = stats.items()
    elif _is_record(stats):
        items = ((name, getattr(stats, name)) for name in type(stats).__dataclass_fields__)
    else:
        return
    for key, value in items:
        if isinstance(value, (Moments, dict)) or _is_record(value):  # lists hold worst pairs and examples
            yield from moments_paths(value, path + (str(key),))


def _is_record(value: Any) -> bool:
    """A dataclass instance (not a class)."""
    return is_dataclass(value) and not isinstance(value, type)


@dataclass
class BlockSummary:
    """What a block of parts sends to the combiner.

    Attributes:
        index: the block's position in the plan.
        rows: its rows.
        stats: its statistics (its parts' summed in plan order).
        trail: per Moments path (`moments_paths`), one row per part that has it, in plan order: count, mean,
            M2, min, max (float64; counts are exact below 2**53).
        scores: its rows' columns that ScoreCollector reads.
        tables: with the file layout, its parts conformed to the merge's schema (the combiner writes them);
            empty with the folder layout.
        file: with the folder layout, the file it wrote: {"name", "rows", "bytes"}.
        seconds: the wall time the block took where it ran.
        cpu_seconds: the CPU time of the process that ran it, meanwhile (its read-ahead threads included).
    """

    index: int
    rows: int
    stats: ShardStats
    trail: Dict[Tuple[str, ...], np.ndarray]
    scores: pa.Table
    tables: List[pa.Table] = field(default_factory=list)
    file: Optional[Dict[str, Any]] = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def _score_columns(table: pa.Table, group_by: Optional[str]) -> pa.Table:
    """The columns of `table` that ScoreCollector may read: the result columns but files, texts and lists,
    and the group_by column."""
    keep = [f.name for f in table.schema
            if f.name == group_by or (f.name in RESULT_COLUMNS and f.name not in _NOT_SCORED
                                      and not pa.types.is_list(f.type))]
    return table.select(keep)


def summarise_block(output_url: str, commits: Sequence[ShardCommit], *, index: int, schema: pa.Schema,
                    summary_cfg: SummaryConfig, storage_options: Optional[Mapping[str, Any]] = None,
                    folder: Optional[str] = None) -> BlockSummary:
    """Read, check (size, sha256, rows) and summarise a block's parts in plan order; write its file if asked.

    Args:
        output_url: the run's output folder.
        commits: the block's commits, in plan order.
        index: the block's position (names its file: FOLDER_PART).
        schema: the merge's schema (`MergePlan.schema`).
        summary_cfg: the run's summary settings.
        storage_options: fsspec options for `output_url`.
        folder: the folder to write the block's file into (folder layout); None keeps the conformed parts in
            the summary for the combiner to write.

    Returns:
        The block's BlockSummary.

    Raises:
        CorruptShardError: a part differs from its marker (nothing of the block's file is left).

    Example:
        >>> from ssim_ray.output.commit import write_shard
        >>> from ssim_ray.output.schema import rows_to_table
        >>> _ = write_shard("memory://doc-block", "s0", rows_to_table([], []))
        >>> plan = plan_merge(scan_shards("memory://doc-block"), ["s0"])
        >>> summarise_block("memory://doc-block", plan.block(0), index=0, schema=plan.schema,
        ...                 summary_cfg=SummaryConfig()).rows
        0
    """
    started, cpu = time.perf_counter(), time.process_time()
    fs, root = output_filesystem(output_url, storage_options)
    stats, trail = _empty(summary_cfg), {}
    block = BlockSummary(index, 0, stats, {}, pa.table({}))
    scores: List[pa.Table] = []
    staged = StagedFile(fs, f"{folder}/{FOLDER_PART.format(index=index)}") if folder is not None else None
    try:
        with RowGroupWriter(staged.handle, schema) if staged else _NoWriter() as writer:
            for part in _parts_in_order(fs, root, commits, MERGE_READ_AHEAD):
                table = _conform(part, schema)
                part_stats = shard_stats(table, summary_cfg)
                stats = merge_stats(stats, part_stats)
                for path, moments in moments_paths(part_stats):
                    trail.setdefault(path, []).append((moments.count, moments.mean, moments.m2, moments.min,
                                                       moments.max))
                scores.append(_score_columns(table, summary_cfg.group_by))
                block.rows += table.num_rows
                if staged:
                    writer.add(table)
                else:
                    block.tables.append(table)
    except BaseException:
        if staged:
            staged.discard()
        raise
    if staged:
        staged.commit()
        block.file = {"name": FOLDER_PART.format(index=index), "rows": block.rows,
                      "bytes": fs.size(f"{folder}/{FOLDER_PART.format(index=index)}")}
    block.stats = stats
    block.trail = {path: np.array(rows, dtype=np.float64) for path, rows in trail.items()}
    score_schema = _score_columns(pa.table([pa.nulls(0, f.type) for f in schema], schema=schema),
                                  summary_cfg.group_by).schema
    block.scores = pa.concat_tables(scores) if scores else score_schema.empty_table()
    block.seconds, block.cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    return block


class _NoWriter:
    """The writer of a block whose parts the combiner writes: nothing to close."""

    def __enter__(self) -> "_NoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        return None


class MergeAccumulator:
    """Combines block summaries, fed in plan order, into the run's statistics and collected scores.

    The statistics are summed block by block (`merge_stats`); each Moments' mean and M2 are then replaced by
    the fold of its parts' trail in plan order, which is what the one-process `merge` computes, bit for bit.

    Example:
        >>> acc = MergeAccumulator(SummaryConfig(), capacity=0)
        >>> acc.result()[0].overall.rows
        0
    """

    def __init__(self, summary_cfg: SummaryConfig, *, capacity: int) -> None:
        self.stats = _empty(summary_cfg)
        self.collector = ScoreCollector(capacity=capacity, group_by=summary_cfg.group_by)
        self.files: List[Dict[str, Any]] = []
        self.block_seconds = self.block_cpu_seconds = 0.0  # the blocks' own wall and CPU times, summed
        self._folded: Dict[Tuple[str, ...], Moments] = {}

    def add(self, block: BlockSummary) -> None:
        """Add the next block (blocks must come in plan order)."""
        self.stats = merge_stats(self.stats, block.stats)
        self.collector.add(block.scores)
        for path, rows in block.trail.items():
            moments = self._folded.get(path, Moments(hist=_NO_HIST))
            for count, mean, m2, low, high in rows.tolist():
                moments = merge_moments(moments, Moments(int(count), mean, m2, low, high, _NO_HIST))
            self._folded[path] = moments
        if block.file is not None:
            self.files.append(block.file)
        self.block_seconds += block.seconds
        self.block_cpu_seconds += block.cpu_seconds

    def result(self) -> Tuple[ShardStats, ScoreCollector]:
        """The run's statistics (moments folded in plan order) and its collected scores.

        Raises:
            RuntimeError: a trail does not count what the statistics count (a bug, never data).
        """
        for path, moments in moments_paths(self.stats):
            folded = self._folded.get(path, Moments(hist=_NO_HIST))
            if folded.count != moments.count:
                raise RuntimeError(f"the trail of {'.'.join(path)} must count {moments.count} values, "
                                   f"got {folded.count}")
            moments.mean, moments.m2, moments.min, moments.max = folded.mean, folded.m2, folded.min, folded.max
        return self.stats, self.collector


def check_rows(plan: MergePlan, rows: int, total_pairs: int) -> None:
    """A complete merge must have exactly the plan's pairs.

    Raises:
        CorruptShardError: it has not.
    """
    if not plan.missing and rows != total_pairs:
        raise CorruptShardError(f"a complete merge must have run_info.total_pairs={total_pairs} rows, got {rows} "
                                f"from {len(plan.commits)} shards")
