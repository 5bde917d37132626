"""evaluate(cfg): plan → skip committed shards → actors pull shards → merge → report → gates.

The driver holds the plan (small: shards, not pairs), hands shards to actors as they free up (a fast
actor takes more), and commits nothing itself except `worker_failed` rows for a shard that failed on
every attempt. Everything it merges comes from commit markers, so a crash of the driver loses nothing
that an actor committed: rerunning with the same `output.url` resumes.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Dict, List, Optional, Tuple

import ray
import ray.exceptions

from ssim_ray import sources
from ssim_ray.config import AuditJobConfig
from ssim_ray.dispatch import ShardDispatcher
from ssim_ray.output import gates
from ssim_ray.output.commit import committed_shard_ids
from ssim_ray.output.merge import RunInfo, merge
from ssim_ray.output.resume import check_resume_compatible, run_manifest
from ssim_ray.output.schema import RESULT_COLUMNS
from ssim_ray.placement import Placement, connect_ray, plan_placement
from ssim_ray.progress import Progress
from ssim_ray.report import make_report
from ssim_ray.worker import ShardResult, ShardWorker, WorkerSpec


@dataclasses.dataclass
class RunOutcome:
    """The merged summary, the exit code (0 or a quality-gate code), and the failed attempts per shard."""

    summary: dict
    exit_code: int
    output_url: str
    failed_attempts: Dict[str, int] = dataclasses.field(default_factory=dict)
    actor_peak_rss_bytes: Dict[str, int] = dataclasses.field(default_factory=dict)
    actor_cpu_seconds: Dict[str, float] = dataclasses.field(default_factory=dict)


def _worker_spec(cfg: AuditJobConfig, output_url: str, placement: Placement, *, expected_pairs: int = 0) -> WorkerSpec:
    return WorkerSpec(
        source=cfg.source,
        ssim=cfg.ssim,
        batch=cfg.batch,
        summary=cfg.summary,
        output_url=output_url,
        output_storage_options=dict(cfg.output.storage_options),
        device=placement.device,
        torch_threads=placement.torch_threads,
        decode_threads=cfg.runtime.decode_threads,
        memory_share=placement.memory_share,
        expected_pairs=expected_pairs,
    )


def _peak_rss(shard_results: List[ShardResult]) -> Dict[str, int]:
    peaks: Dict[str, int] = {}
    for result in shard_results:
        if result.worker != "driver":
            peaks[result.worker] = max(peaks.get(result.worker, 0), result.peak_rss_bytes)
    return peaks


def _cpu_seconds(shard_results: List[ShardResult]) -> Dict[str, float]:
    """CPU seconds each actor process spent from its first shard's start to its last shard's end."""
    spans: Dict[str, Tuple[float, float]] = {}
    for result in shard_results:
        if result.worker != "driver":
            first, last = spans.get(result.worker, (result.cpu_started, result.cpu_finished))
            spans[result.worker] = (min(first, result.cpu_started), max(last, result.cpu_finished))
    return {worker: last - first for worker, (first, last) in spans.items()}


def _batch_sizes(shard_results: List[ShardResult]) -> Dict[str, dict]:
    merged: Dict[str, dict] = {}
    for result in shard_results:
        for bucket, record in result.batch_sizes.items():
            sizes = merged.setdefault(bucket, {"batch_sizes": set(), "ooms": 0})
            sizes["batch_sizes"].add(record["batch_size"])
            sizes["ooms"] = max(sizes["ooms"], record.get("ooms", 0))
    return {k: {"batch_sizes": sorted(v["batch_sizes"]), "ooms": v["ooms"]} for k, v in merged.items()}


def _run_info(cfg, plan, computed: List[ShardResult], resumed: int, wall: Optional[float], placement) -> RunInfo:
    by_actors = [r for r in computed if r.worker != "driver"]
    span = (max(r.finished for r in by_actors) - min(r.started for r in by_actors)) if by_actors else None
    device = None
    if placement is not None:
        device = placement.device
        devices = sorted({r.device for r in by_actors})
        if devices:
            device = ", ".join(devices)
    return RunInfo(
        metric=cfg.ssim.describe(),
        plan_fingerprint=plan.fingerprint,
        total_pairs=plan.total_pairs,
        source=dataclasses.asdict(cfg.source),
        wall_seconds=wall,
        processing_seconds=span,
        pairs_computed=sum(r.rows for r in by_actors),
        shards_computed=len(computed),
        shards_resumed=resumed,
        batch_sizes=_batch_sizes(computed),
        device=device,
        num_workers=placement.num_workers if placement else None,
        kernels=tuple(sorted({r.kernel for r in by_actors if r.kernel})),
        compile=cfg.ssim.compile,
    )


def _check_passthrough(plan: sources.Plan) -> None:
    clashes = sorted(set(plan.passthrough_columns) & set(RESULT_COLUMNS))
    if clashes:
        raise sources.ManifestError(
            f"manifest columns {clashes} would be copied to the results, but the results have columns of those "
            f"names; list the columns to keep in source.passthrough_columns (without {clashes}) or rename them"
        )


def evaluate(cfg: AuditJobConfig, *, output_url: str) -> RunOutcome:
    """Run the whole audit and return its summary and exit code (0, or a quality-gate code)."""
    started = time.time()
    plan = sources.plan_shards(cfg.source)
    _check_passthrough(plan)
    manifest = run_manifest(plan=plan, cfg=cfg)
    check_resume_compatible(
        output_url, manifest, mode=cfg.output.mode, storage_options=dict(cfg.output.storage_options)
    )
    committed = committed_shard_ids(output_url, storage_options=dict(cfg.output.storage_options))
    todo = [shard for shard in plan.shards if shard.shard_id not in committed]
    resumed = len(plan.shards) - len(todo)
    resumed_pairs = sum(s.num_pairs for s in plan.shards if s.shard_id in committed)
    print(
        f"[ssim_ray] plan: {plan.total_pairs} pairs in {len(plan.shards)} shards; "
        f"{resumed} already committed, {len(todo)} to compute",
        file=sys.stderr,
    )
    placement = None
    computed: List[ShardResult] = []
    attempts: Dict[str, int] = {}
    if todo:
        started_ray = connect_ray(cfg.runtime.address)
        try:
            placement = plan_placement(cfg)
            dispatcher = _compute(cfg, plan, todo, output_url, placement, resumed_pairs)
            computed, attempts = dispatcher.results, dispatcher.attempts
        finally:
            if started_ray:
                ray.shutdown()
    info = _run_info(cfg, plan, computed, resumed, time.time() - started, placement)
    outcome = finish(cfg, output_url=output_url, plan_shard_ids=[s.shard_id for s in plan.shards], run_info=info)
    outcome.failed_attempts = attempts
    outcome.actor_peak_rss_bytes = _peak_rss(computed)
    outcome.actor_cpu_seconds = _cpu_seconds(computed)
    return outcome


def _compute(cfg, plan, todo, output_url, placement: Placement, resumed_pairs: int) -> "ShardDispatcher":
    num_actors = min(placement.num_workers, len(todo))
    expected = sum(shard.num_pairs for shard in todo) // num_actors
    spec = _worker_spec(cfg, output_url, placement, expected_pairs=expected)
    actor_class = ray.remote(ShardWorker).options(max_restarts=-1, max_task_retries=0, **placement.actor_options)
    actors = [actor_class.remote(spec) for _ in range(num_actors)]
    print(
        f"[ssim_ray] {len(actors)} {placement.device} actor(s) {placement.actor_options}",
        file=sys.stderr,
    )
    progress = Progress(
        total_pairs=plan.total_pairs, already_done=resumed_pairs, interval_s=cfg.runtime.progress_interval_s
    )
    dispatcher = ShardDispatcher(actors, plan, cfg, output_url)
    try:
        dispatcher.run(todo, progress)
    finally:
        progress.close()
        for actor in actors:
            ray.kill(actor)
    return dispatcher


def finish(cfg: AuditJobConfig, *, output_url: str, plan_shard_ids: List[str], run_info) -> RunOutcome:
    """Merge committed shards into ssim.parquet + summary.json (idempotent), report, and apply the gates."""
    storage_options = dict(cfg.output.storage_options)
    summary = merge(
        output_url,
        plan_shard_ids=plan_shard_ids,
        run_info=run_info,
        summary_cfg=cfg.summary,
        storage_options=storage_options,
        audit_cfg=cfg.audit,
    )
    if cfg.report.enabled:
        made = make_report(
            output_url, report_cfg=cfg.report, storage_options=storage_options,
            source_cfg=cfg.source, ssim_cfg=cfg.ssim,
        )
        print(f"[ssim_ray] report: {made.html_path} ({made.seconds:.1f} s)", file=sys.stderr)
    violations = gates.evaluate_gates(summary, cfg.audit)
    for violation in violations:
        print(f"[ssim_ray] GATE FAILED ({violation.exit_code}): {violation.message}", file=sys.stderr)
    return RunOutcome(summary=summary, exit_code=gates.exit_code(violations), output_url=output_url)


def merge_only(cfg: AuditJobConfig, *, output_url: str) -> RunOutcome:
    """Rebuild ssim.parquet and summary.json from the committed shards, computing nothing."""
    plan = sources.plan_shards(cfg.source)
    committed = committed_shard_ids(output_url, storage_options=dict(cfg.output.storage_options))
    resumed = sum(1 for shard in plan.shards if shard.shard_id in committed)
    info = _run_info(cfg, plan, [], resumed, None, None)
    return finish(cfg, output_url=output_url, plan_shard_ids=[s.shard_id for s in plan.shards], run_info=info)


def print_summary(outcome: RunOutcome, stream=None) -> None:
    """A short human summary on stdout: counts, the SSIM distribution, the worst pairs, where results are."""
    stream = stream or sys.stdout
    summary = outcome.summary
    write = lambda text="": print(text, file=stream)  # noqa: E731
    write(f"\nSSIM audit ({summary.get('metric', {}).get('name', 'wang2004')}) — {outcome.output_url}")
    counts = summary.get("status_counts", {})
    write("  pairs by status: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    overall = summary.get("ssim", {})
    if overall.get("count"):
        pct = overall.get("percentiles", {})
        write(
            f"  ssim: mean {overall['mean']:.4f}  std {overall['std']:.4f}  min {overall['min']:.4f}  "
            f"p5 {pct['p5']:.4f}  p50 {pct['p50']:.4f}  max {overall['max']:.4f}"
        )
    for worst in summary.get("worst", [])[:5]:
        write(f"  worst: {worst['ssim']:.4f}  {worst['pair_id']}  {worst.get('distorted', '')}")
    throughput = summary.get("throughput", {}).get("pairs_per_second")
    shards = summary.get("shards", {})
    write(
        f"  shards: {shards.get('total')} total, {shards.get('computed')} computed, "
        f"{shards.get('resumed')} resumed; "
        + (f"{throughput:.1f} pairs/s" if throughput else "no pairs computed in this run")
    )
    write(f"  results: {outcome.output_url}/ssim.parquet, summary.json, report.html")
