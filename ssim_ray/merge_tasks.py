"""The merge as Ray tasks: part files checked and summarised in parallel, combined in plan order on the driver.

`output.merge` owns the merge's units (pure functions, no Ray): `plan_merge` cuts the planned commits into
blocks of contiguous parts; `summarise_block` reads a block's parts, checks each against its marker (size,
sha256, rows), computes their statistics and, when the results are a folder, writes the block's file;
`MergeAccumulator` combines the blocks' summaries; `publish_results` publishes. Here each block is one Ray
task (one CPU), at most BLOCKS_IN_FLIGHT_PER_CPU per CPU of the cluster submitted ahead of the block the
driver is combining, so the object store holds a bounded number of finished blocks.

The driver combines in plan order: statistics (a sum per block, then the moments re-folded from the parts'
trails: the same bits as the one-process merge), every ok score into one ScoreCollector (exact percentiles;
12 bytes per ok row and metric, as before), and, when ssim.parquet is one file, the blocks' rows into its
writer. Above `output.merge.SINGLE_FILE_MAX_ROWS` rows ssim.parquet is a folder whose files the tasks write
themselves, and the driver only combines statistics and scores.

`merge_output` is what the job calls (`run.finish`), under the output's claim: below RAY_MERGE_MIN_ROWS rows
it runs the one-process merge (`output.merge.merge`) in the driver, because starting Ray costs more than it
saves; above, the Ray merge, on the cluster of `runtime.address` (a local Ray when unset).
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import deque
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import ray

from ssim_ray.config import AuditConfig, AuditJobConfig, SummaryConfig
from ssim_ray.output import merge as merging
from ssim_ray.output.claim import OutputClaim
from ssim_ray.output.commit import scan_shards
from ssim_ray.output.layout import output_filesystem
from ssim_ray.output.publish import StagedFile
from ssim_ray.output.results_folder import ResultsFolder, remove_stale_staging
from ssim_ray.output.resume import check_commits
from ssim_ray.output.stamps import CommitStamp
from ssim_ray.placement import connect_ray

# Below this many rows the job merges in the driver: a local Ray takes seconds to start (more on a loaded
# machine), the one-process merge ~2 ms per part + ~1 us per row (docs/BENCHMARKS.md). Read at each merge.
RAY_MERGE_MIN_ROWS = 1_000_000
# Blocks submitted per CPU of the cluster ahead of the one being combined: enough to keep every CPU busy
# while the driver combines, few enough to bound the finished blocks waiting in the object store.
BLOCKS_IN_FLIGHT_PER_CPU = 2
# After a failure, how long to wait for blocks already running to end before their folder is removed.
CANCEL_WAIT_S = 120.0


@ray.remote(num_cpus=1, max_retries=3)
def _summarise_block(output_url: str, commits: tuple, index: int, schema: Any, summary_cfg: SummaryConfig,
                     storage_options: Optional[dict], folder: Optional[str]) -> merging.BlockSummary:
    """One block, as a Ray task. Retried when its worker dies (it rewrites the same file); an exception it
    raises (a corrupt part) is not retried."""
    return merging.summarise_block(output_url, commits, index=index, schema=schema, summary_cfg=summary_cfg,
                                   storage_options=storage_options, folder=folder)


def _cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _blocks_in_order(submit: Callable[[int], Any], count: int, window: int) -> Iterator[merging.BlockSummary]:
    """The blocks' summaries in plan order, with up to `window` tasks submitted ahead.

    When it stops early (a block failed, or the caller closes it), the blocks not yet combined are cancelled
    and waited for, so that none writes into a folder after the caller has removed it.
    """
    upcoming = iter(range(count))
    pending = deque(submit(index) for index in itertools.islice(upcoming, window))
    try:
        while pending:
            block = ray.get(pending.popleft())  # raises the block's own error (CorruptShardError, ...)
            pending.extend(submit(index) for index in itertools.islice(upcoming, 1))
            yield block
    finally:
        for ref in pending:
            ray.cancel(ref)
        if pending:
            ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)


def merge_parallel(
    output_url: str,
    *,
    plan_shard_ids: Sequence[str],
    run_info: merging.RunInfo,
    summary_cfg: SummaryConfig,
    storage_options: Optional[Mapping[str, Any]] = None,
    allow_incomplete: bool = False,
    audit_cfg: Optional[AuditConfig] = None,
    expect: Optional[CommitStamp] = None,
    before_publish: Optional[Callable[[], None]] = None,
    single_file_max_rows: Optional[int] = None,
    block_rows: Optional[int] = None,
) -> Dict[str, Any]:
    """`output.merge.merge` with the parts read, checked and summarised by Ray tasks; Ray must be connected.

    Same outputs as `merge` for the same parts: rows, order and summary statistics (the summary's `merge`
    block says how it ran); above `single_file_max_rows` rows ssim.parquet is a folder of Parquet files.

    Args:
        output_url, plan_shard_ids, run_info, summary_cfg, storage_options, allow_incomplete, audit_cfg,
            expect: as `output.merge.merge`.
        before_publish: called before the previous outputs are touched (the job: its claim's `ensure_held`).
        single_file_max_rows: None: `output.merge.SINGLE_FILE_MAX_ROWS`.
        block_rows: rows per task; None: `output.merge.block_rows_for` the total (from the plan only).

    Returns:
        The summary, as written to summary.json.

    Raises:
        As `output.merge.merge`.

    Example (with Ray connected; tests/test_merge_parallel.py runs it)::

        summary = merge_parallel("/data/audit", plan_shard_ids=ids, run_info=info, summary_cfg=SummaryConfig())
    """
    started = time.perf_counter()
    options = dict(storage_options or {})
    fs, root = output_filesystem(output_url, options)
    scan = scan_shards(output_url, storage_options=options)
    if expect is not None:
        check_commits(scan.commits, plan_shard_ids, expect, output_url=output_url)
    plan = merging.plan_merge(scan, plan_shard_ids, allow_incomplete=allow_incomplete,
                              single_file_max_rows=single_file_max_rows, block_rows=block_rows)
    remove_stale_staging(fs, root)
    window = BLOCKS_IN_FLIGHT_PER_CPU * _cluster_cpus()
    target, folder = _open_target(fs, root, plan)
    commits_ref = [ray.put(plan.block(index)) for index in range(len(plan.blocks))]
    schema_ref = ray.put(plan.schema)

    def submit(index: int) -> Any:
        return _summarise_block.remote(output_url, commits_ref[index], index, schema_ref, summary_cfg, options,
                                       folder)

    accumulator = merging.MergeAccumulator(summary_cfg, capacity=plan.rows)
    waited = [0.0]
    blocks = _blocks_in_order(submit, len(plan.blocks), window)
    try:
        combined = _combine(plan, accumulator, _timed(blocks, waited), target)
        stats, collector = accumulator.result()
        merging.check_rows(plan, stats.overall.rows, run_info.total_pairs)
    except BaseException:
        blocks.close()  # cancels and waits for the blocks still running
        target.discard()
        raise
    facts = merging.SummaryFacts(run_info, scan, tuple(plan_shard_ids), plan.missing, summary_cfg, audit_cfg)
    if plan.layout == merging.LAYOUT_FILE:
        publish = lambda: merging.publish_file(fs, root, target)  # noqa: E731
    else:
        publish = lambda: target.commit([f["name"] for f in accumulator.files])  # noqa: E731
    try:
        return merging.publish_results(fs, root, stats, collector, facts, publish_table=publish, started=started,
                                       merge_facts=_how(plan, accumulator, waited[0], combined),
                                       before_publish=before_publish)
    except BaseException:
        target.discard()
        raise


def _open_target(fs: Any, root: str, plan: merging.MergePlan) -> Tuple[Any, Optional[str]]:
    """Where the results are written: a staged ssim.parquet, or a folder made ready (and its path, for the tasks)."""
    if plan.layout == merging.LAYOUT_FILE:
        return StagedFile(fs, f"{root}/{merging.MERGED_FILE}"), None
    folder = ResultsFolder(fs, root)
    folder.prepare()
    return folder, folder.path


def _how(plan: merging.MergePlan, accumulator: merging.MergeAccumulator, waited: float,
         combined: float) -> Dict[str, Any]:
    """summary.json's `merge` block: how the merge ran, and where its time went."""
    return {"by": "ray tasks", "workers": _cluster_cpus(), "blocks": len(plan.blocks), "layout": plan.layout,
            "files": len(accumulator.files) if plan.layout == merging.LAYOUT_FOLDER else 1,
            "task_seconds": round(accumulator.block_seconds, 3),
            "task_cpu_seconds": round(accumulator.block_cpu_seconds, 3), "driver_wait_seconds": round(waited, 3),
            "driver_combine_seconds": round(combined - waited, 3)}


def _timed(blocks: Iterator[merging.BlockSummary], waited: list) -> Iterator[merging.BlockSummary]:
    """`blocks`, adding to waited[0] the seconds spent waiting for each."""
    while True:
        began = time.perf_counter()
        block = next(blocks, None)
        waited[0] += time.perf_counter() - began
        if block is None:
            return
        yield block


def _combine(plan: merging.MergePlan, accumulator: merging.MergeAccumulator,
             blocks: Iterator[merging.BlockSummary], target: Any) -> float:
    """Add each block to the accumulator; with one file, write its rows into the staged ssim.parquet.

    Returns:
        The seconds it took, waits for the blocks included.
    """
    began = time.perf_counter()
    if plan.layout == merging.LAYOUT_FOLDER:
        for block in blocks:
            accumulator.add(block)
        return time.perf_counter() - began
    with merging.RowGroupWriter(target.handle, plan.schema) as writer:
        for block in blocks:
            accumulator.add(block)
            for table in block.tables:
                writer.add(table)
    return time.perf_counter() - began


def merge_output(cfg: AuditJobConfig, *, output_url: str, plan_shard_ids: Sequence[str], run_info: merging.RunInfo,
                 expect: Optional[CommitStamp] = None, claim: Optional[OutputClaim] = None) -> Dict[str, Any]:
    """The job's merge (under the output's claim): in the driver below RAY_MERGE_MIN_ROWS rows, else as Ray tasks.

    Args:
        cfg: the job's configuration (summary, audit, output, runtime.address).
        output_url, plan_shard_ids, run_info, expect: as `output.merge.merge`.
        claim: the output's claim; checked (`ensure_held`) before the previous outputs are touched.

    Returns:
        The summary, as written to summary.json.
    """
    arguments = dict(plan_shard_ids=plan_shard_ids, run_info=run_info, summary_cfg=cfg.summary,
                     storage_options=dict(cfg.output.storage_options), audit_cfg=cfg.audit, expect=expect,
                     before_publish=claim.ensure_held if claim is not None else None)
    if run_info.total_pairs < RAY_MERGE_MIN_ROWS:
        remove_stale_staging(*output_filesystem(output_url, cfg.output.storage_options))
        return merging.merge(output_url, **arguments)
    started_ray = connect_ray(cfg.runtime.address)
    try:
        print(f"[ssim_ray] merge: {run_info.total_pairs} rows as Ray tasks on {_cluster_cpus()} CPU(s)",
              file=sys.stderr)
        return merge_parallel(output_url, **arguments)
    finally:
        if started_ray:
            ray.shutdown()
