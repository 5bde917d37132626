"""evaluate(cfg): plan → claim the output → resume check → verify inputs → actors pull shards → merge →
report → gates.

The driver holds the plan (small: shards, not pairs), claims the output for this run (`output.claim`: one
run at a time), checks that what is committed there belongs to this plan and these metric settings
(`output.resume`), has the actors look up the inputs of committed shards and recompute those whose inputs
changed (`output.inputs`), hands shards to actors as they free up (a fast actor takes more), and commits
nothing itself except `worker_failed` rows for a shard that failed on every attempt. Everything it merges
comes from commit markers, so a crash of the driver loses nothing that an actor committed: rerunning with
the same `output.url` resumes (taking over the dead run's claim).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections import deque
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import ray
import ray.exceptions

from ssim_ray import preflight, sources
from ssim_ray.config import AuditJobConfig
from ssim_ray.dispatch import ShardDispatcher, describe_error
from ssim_ray.merge_tasks import merge_output
from ssim_ray.output import gates
from ssim_ray.output.claim import OutputClaim
from ssim_ray.output.commit import ShardCommit, scan_shards
from ssim_ray.output.inputs import LISTED_PAIRS, InputCheck, summarize_checks
from ssim_ray.output.merge import RunInfo
from ssim_ray.output.resume import check_commits, check_manifest, check_resume_compatible, run_manifest
from ssim_ray.output.schema import RESULT_COLUMNS
from ssim_ray.output.stamps import CommitStamp, metric_digest, new_run_id
from ssim_ray.placement import Placement, connect_ray, plan_placement
from ssim_ray.progress import Progress
from ssim_ray.report import make_report
from ssim_ray.secrets import redact_text
from ssim_ray.worker import ShardResult, ShardWorker, WorkerSpec


# Verification calls queued per actor: each is a few stat/HEAD calls per pair, so a short queue hides the
# round trips between the driver and the actor.
VERIFY_IN_FLIGHT_PER_ACTOR = 4
# When a resume only verifies, one actor per this many pairs: starting an actor costs seconds (~13 s for two
# CPU actors on 2 cores, torch's import), a local stat ~0.1-0.2 ms, an S3 HEAD tens of ms per input.
VERIFY_PAIRS_PER_ACTOR = 4096


@dataclasses.dataclass
class RunOutcome:
    """The merged summary, the exit code (0 or a quality-gate code), and the failed attempts per shard."""

    summary: dict
    exit_code: int
    output_url: str
    failed_attempts: Dict[str, int] = dataclasses.field(default_factory=dict)
    actor_peak_rss_bytes: Dict[str, int] = dataclasses.field(default_factory=dict)
    actor_cpu_seconds: Dict[str, float] = dataclasses.field(default_factory=dict)
    report_written: bool = False


def _worker_spec(cfg: AuditJobConfig, output_url: str, placement: Placement, *, expected_pairs: int = 0,
                 stamp: Optional[CommitStamp] = None) -> WorkerSpec:
    return WorkerSpec(
        source=cfg.source,
        ssim=cfg.ssim,
        batch=cfg.batch,
        summary=cfg.summary,
        output_url=output_url,
        output_storage_options=dict(cfg.output.storage_options),
        device=placement.device,
        torch_threads=placement.torch_threads,
        decode_threads=placement.decode_threads,
        memory_share=placement.memory_share,
        expected_pairs=expected_pairs,
        stamp=stamp,
        metrics=cfg.chosen_metrics(),
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


def _run_info(cfg, plan, computed: List[ShardResult], resumed: int, wall: Optional[float], placement, *,
              run_id: str, input_check: Optional[Mapping] = None) -> RunInfo:
    by_actors = [r for r in computed if r.worker != "driver"]
    span = (max(r.finished for r in by_actors) - min(r.started for r in by_actors)) if by_actors else None
    device = None
    if placement is not None:
        device = placement.device
        devices = sorted({r.device for r in by_actors})
        if devices:
            device = ", ".join(devices)
    return RunInfo(
        metric=cfg.describe_metric(),
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
        run_id=run_id,
        input_check=input_check,
    )


def _check_passthrough(plan: sources.Plan) -> None:
    clashes = sorted(set(plan.passthrough_columns) & set(RESULT_COLUMNS))
    if clashes:
        raise sources.ManifestError(
            f"manifest columns {clashes} would be copied to the results, but the results have columns of those "
            f"names; list the columns to keep in source.passthrough_columns (without {clashes}) or rename them"
        )


@contextlib.contextmanager
def _claimed(cfg: AuditJobConfig, output_url: str, run_id: str, purpose: str) -> Iterator[OutputClaim]:
    """Hold the output's claim for the block: refused (ClaimHeldError) while another live run holds it."""
    claim = OutputClaim(output_url, run_id=run_id, ttl_s=cfg.output.claim_ttl_s,
                        storage_options=dict(cfg.output.storage_options), purpose=purpose)
    with claim:
        print(f"[ssim_ray] run {run_id}: claimed {redact_text(output_url)} ({purpose})", file=sys.stderr)
        if claim.taken_over:
            print(f"[ssim_ray] {claim.taken_over}", file=sys.stderr)
        yield claim


def _stamp(cfg: AuditJobConfig, plan: sources.Plan, run_id: str) -> CommitStamp:
    return CommitStamp(plan.fingerprint, metric_digest(cfg.describe_metric()), run_id)


@dataclasses.dataclass
class _Work:
    """What the actors do in one run: shards to compute, committed shards to verify, and what they did."""

    todo: List[sources.Shard]
    verify: List[sources.Shard]
    commits: Dict[str, ShardCommit]
    checks: List[InputCheck] = dataclasses.field(default_factory=list)
    computed: List[ShardResult] = dataclasses.field(default_factory=list)
    attempts: Dict[str, int] = dataclasses.field(default_factory=dict)
    placement: Optional[Placement] = None

    @property
    def redo(self) -> List[str]:
        return [check.shard_id for check in self.checks if check.stale]


def evaluate(cfg: AuditJobConfig, *, output_url: str) -> RunOutcome:
    """Run the whole audit under the output's claim; return its summary and exit code (0, or a gate's code).

    Raises:
        ClaimHeldError: another live run holds the output (nothing was touched).
        ResumeConflictError: the output holds another plan or metric settings (ForeignShardsError: committed
            shards that are not this plan's, named).
        ClaimLostError: another run took the claim over while this one ran (nothing was merged).
    """
    started = time.time()
    run_id = new_run_id()
    plan = sources.plan_shards(cfg.source)
    _check_passthrough(plan)
    preflight.check_plan(cfg, plan)  # before the claim, _run.json or any shard
    options = dict(cfg.output.storage_options)
    plan_ids = [s.shard_id for s in plan.shards]
    with _claimed(cfg, output_url, run_id, "audit") as claim:
        stamp = _stamp(cfg, plan, run_id)
        check_resume_compatible(output_url, run_manifest(plan=plan, cfg=cfg, run_id=run_id), mode=cfg.output.mode,
                                storage_options=options)
        commits = scan_shards(output_url, storage_options=options).commits
        check_commits(commits, plan_ids, stamp, output_url=output_url)
        work = _Work(todo=[s for s in plan.shards if s.shard_id not in commits],
                     verify=[s for s in plan.shards if s.shard_id in commits and cfg.output.verify_inputs
                             and commits[s.shard_id].inputs_sha256 is not None],
                     commits=commits)
        print(f"[ssim_ray] plan: {plan.total_pairs} pairs in {len(plan.shards)} shards; "
              f"{len(plan.shards) - len(work.todo)} already committed ({len(work.verify)} to verify), "
              f"{len(work.todo)} to compute", file=sys.stderr)
        if work.todo or work.verify:
            _run_actors(cfg, plan, work, output_url, stamp)
        claim.ensure_held()
        input_check = summarize_checks(work.checks, enabled=cfg.output.verify_inputs) if work.verify else None
        resumed = len(plan.shards) - len(work.todo) - len(work.redo)
        info = _run_info(cfg, plan, work.computed, resumed, time.time() - started, work.placement, run_id=run_id,
                         input_check=input_check)
        outcome = finish(cfg, output_url=output_url, plan_shard_ids=plan_ids, run_info=info, expect=stamp,
                         claim=claim)
    outcome.failed_attempts = work.attempts
    outcome.actor_peak_rss_bytes = _peak_rss(work.computed)
    outcome.actor_cpu_seconds = _cpu_seconds(work.computed)
    return outcome


def _run_actors(cfg: AuditJobConfig, plan: sources.Plan, work: _Work, output_url: str, stamp: CommitStamp) -> None:
    """Start the actors; verify the committed shards' inputs; compute what is to do and what changed."""
    started_ray = connect_ray(cfg.runtime.address)
    actors: list = []
    try:
        work.placement = placement = plan_placement(cfg)
        verify_pairs = sum(shard.num_pairs for shard in work.verify)
        num_actors = min(placement.num_workers, max(len(work.todo), -(-verify_pairs // VERIFY_PAIRS_PER_ACTOR)))
        expected = sum(shard.num_pairs for shard in work.todo) // num_actors
        spec = _worker_spec(cfg, output_url, placement, expected_pairs=expected, stamp=stamp)
        actor_class = ray.remote(ShardWorker).options(max_restarts=-1, max_task_retries=0, **placement.actor_options)
        actors = [actor_class.remote(spec) for _ in range(num_actors)]
        print(f"[ssim_ray] {len(actors)} {placement.device} actor(s) {placement.actor_options}, "
              f"{placement.decode_threads} decode threads each", file=sys.stderr)
        if work.verify:
            work.checks = _verify_inputs(actors, work.verify, work.commits, cfg.runtime.stall_timeout_s)
            _report_changes(work.checks)
        redo = set(work.redo) | {s.shard_id for s in work.todo}
        todo = [s for s in plan.shards if s.shard_id in redo]
        if todo:
            done = sum(s.num_pairs for s in plan.shards if s.shard_id not in redo)
            progress = Progress(total_pairs=plan.total_pairs, already_done=done,
                                interval_s=cfg.runtime.progress_interval_s)
            dispatcher = ShardDispatcher(actors, plan, cfg, output_url, stamp=stamp)
            try:
                dispatcher.run(todo, progress)
            finally:
                progress.close()
            work.computed, work.attempts = dispatcher.results, dispatcher.attempts
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_ray:
            ray.shutdown()


def _verify_inputs(actors: list, shards: Sequence[sources.Shard], commits: Mapping[str, ShardCommit],
                   stall_timeout_s: float) -> List[InputCheck]:
    """Each committed shard's InputCheck, from the actors; a shard an actor could not check is stale."""
    queue, inflight, load = deque(shards), {}, [0] * len(actors)
    checks: List[InputCheck] = []
    while queue or inflight:
        for index, actor in enumerate(actors):
            while queue and load[index] < VERIFY_IN_FLIGHT_PER_ACTOR:
                shard = queue.popleft()
                inflight[actor.verify_inputs.remote(shard, commits[shard.shard_id].inputs_sha256)] = (index, shard)
                load[index] += 1
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=stall_timeout_s)
        if not ready:
            raise RuntimeError(f"no input check finished in {stall_timeout_s:.0f} s (runtime.stall_timeout_s), "
                               f"{len(inflight) + len(queue)} committed shards left to check; nothing was computed")
        for ref in ready:
            index, shard = inflight.pop(ref)
            load[index] -= 1
            try:
                checks.append(ray.get(ref))
            except ray.exceptions.RayError as exc:  # checked or not, the shard is then recomputed
                checks.append(InputCheck(shard.shard_id, shard.num_pairs, error=describe_error(exc)))
    return checks


def _report_changes(checks: Sequence[InputCheck]) -> None:
    stale = [c for c in checks if c.stale]
    pairs = [pair_id for c in stale for pair_id in c.changed]
    seconds = sum(c.seconds for c in checks)
    line = (f"[ssim_ray] inputs: verified {len(checks)} committed shards ({sum(c.pairs for c in checks)} pairs, "
            f"{seconds:.1f} s in actors)")
    if not stale:
        print(line + "; none changed", file=sys.stderr)
        return
    listed = ", ".join(pairs[:LISTED_PAIRS]) + (f", … ({len(pairs) - LISTED_PAIRS} more)" if len(pairs) > LISTED_PAIRS
                                                  else "")
    print(f"{line}; {len(pairs)} pair(s) changed since they were scored, {len(stale)} shard(s) recomputed"
          + (f": {listed}" if pairs else ""), file=sys.stderr)
    for check in stale:
        if check.error is not None:
            print(f"[ssim_ray] inputs: shard {check.shard_id} could not be checked ({check.error}); recomputed",
                  file=sys.stderr)


def finish(cfg: AuditJobConfig, *, output_url: str, plan_shard_ids: List[str], run_info,
           expect: Optional[CommitStamp] = None, claim: Optional[OutputClaim] = None) -> RunOutcome:
    """Merge committed shards into ssim.parquet + summary.json (idempotent), report, and apply the gates.

    The merge (`merge_tasks.merge_output`: Ray tasks for large outputs) checks `claim` before it publishes.
    """
    storage_options = dict(cfg.output.storage_options)
    summary = merge_output(cfg, output_url=output_url, plan_shard_ids=plan_shard_ids, run_info=run_info,
                           expect=expect, claim=claim)
    if cfg.report.enabled:
        made = make_report(
            output_url, report_cfg=cfg.report, storage_options=storage_options,
            source_cfg=cfg.source, ssim_cfg=cfg.ssim,
        )
        print(f"[ssim_ray] report: {made.html_path} ({made.seconds:.1f} s)", file=sys.stderr)
    violations = gates.evaluate_gates(summary, cfg.audit)
    for violation in violations:
        print(f"[ssim_ray] GATE FAILED ({violation.exit_code}): {violation.message}", file=sys.stderr)
    return RunOutcome(summary=summary, exit_code=gates.exit_code(violations), output_url=output_url,
                      report_written=cfg.report.enabled)


def merge_only(cfg: AuditJobConfig, *, output_url: str) -> RunOutcome:
    """Rebuild ssim.parquet and summary.json from the committed shards, computing nothing, under the claim.

    Every committed shard of the plan must carry this plan's fingerprint and these metric settings (and
    `_run.json`, when there is one, must agree): another manifest with the same file name and row count, or
    other `ssim.*` settings, are refused naming the shards. Inputs are not looked up (nothing would be
    recomputed): a run with the same output.url does that.

    Raises:
        ClaimHeldError, ResumeConflictError (ForeignShardsError), ClaimLostError: as `evaluate`.
    """
    run_id = new_run_id()
    plan = sources.plan_shards(cfg.source)
    preflight.check_plan(cfg, plan)  # before the claim or anything is written
    options = dict(cfg.output.storage_options)
    plan_ids = [s.shard_id for s in plan.shards]
    with _claimed(cfg, output_url, run_id, "merge_only") as claim:
        stamp = _stamp(cfg, plan, run_id)
        commits = scan_shards(output_url, storage_options=options).commits
        # The markers first: they name the shards that would be merged.
        check_commits(commits, plan_ids, stamp, output_url=output_url)
        check_manifest(output_url, run_manifest(plan=plan, cfg=cfg, run_id=run_id), storage_options=options)
        resumed = sum(1 for shard_id in plan_ids if shard_id in commits)
        info = _run_info(cfg, plan, [], resumed, None, None, run_id=run_id)
        claim.ensure_held()
        return finish(cfg, output_url=output_url, plan_shard_ids=plan_ids, run_info=info, expect=stamp,
                      claim=claim)


def _other_metric_lines(summary: Dict[str, Any]) -> List[str]:
    """PSNR's and MS-SSIM's closing lines: their distribution, and the pairs that have no finite value."""
    lines, computed = [], summary.get("metric", {}).get("metrics")
    for metric, unit, digits in (("psnr", " dB", 2), ("ms_ssim", "", 4)):
        block = summary.get(metric)
        if not block or (computed is not None and metric not in computed):
            continue  # summary.json has a block per metric; one the run did not compute stays out
        apart = []
        if block.get("infinite"):
            apart.append(f"{block['infinite']} identical (+inf)")
        apart += [f"{count} {reason}" for reason, count in sorted((block.get("undefined") or {}).items())]
        if block.get("count"):
            pct = block.get("percentiles", {})
            text = (f"  {metric}: mean {block['mean']:.{digits}f}{unit}  min {block['min']:.{digits}f}  "
                    f"p5 {pct['p5']:.{digits}f}  p50 {pct['p50']:.{digits}f}  max {block['max']:.{digits}f}")
        else:
            text = f"  {metric}: no finite value"
        lines.append(text + (f"  ({', '.join(apart)} not in these)" if apart else ""))
    return lines


def print_summary(outcome: RunOutcome, stream=None) -> None:
    """A short human summary on stdout: counts, the SSIM (PSNR, MS-SSIM) distribution, the worst pairs, where
    results are."""
    stream = stream or sys.stdout
    summary = outcome.summary
    write = lambda text="": print(text, file=stream)  # noqa: E731
    write(f"\nSSIM audit ({summary.get('metric', {}).get('name', 'wang2004')}) — {outcome.output_url}")
    write(f"  run: {summary.get('run_id')}")
    counts = summary.get("status_counts", {})
    write("  pairs by status: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    overall = summary.get("ssim", {})
    if overall.get("count"):
        pct = overall.get("percentiles", {})
        write(
            f"  ssim: mean {overall['mean']:.4f}  std {overall['std']:.4f}  min {overall['min']:.4f}  "
            f"p5 {pct['p5']:.4f}  p50 {pct['p50']:.4f}  max {overall['max']:.4f}"
        )
    for line in _other_metric_lines(summary):
        write(line)
    for worst in summary.get("worst", [])[:5]:
        write(f"  worst: {worst['ssim']:.4f}  {worst['pair_id']}  {worst.get('distorted', '')}")
    throughput = summary.get("throughput", {}).get("pairs_per_second")
    shards = summary.get("shards", {})
    write(
        f"  shards: {shards.get('total')} total, {shards.get('computed')} computed, "
        f"{shards.get('resumed')} resumed; "
        + (f"{throughput:.1f} pairs/s" if throughput else "no pairs computed in this run")
    )
    inputs = summary.get("input_check") or {}
    if inputs.get("shards_recomputed"):
        write(f"  inputs changed since scored: {inputs['pairs_changed']} pair(s), {inputs['shards_recomputed']} "
              f"shard(s) recomputed: {', '.join(inputs['changed_pair_ids'][:5])}")
    written = "ssim.parquet, summary.json" + (", report.html" if outcome.report_written else "")
    write(f"  results: {outcome.output_url}/{written}")
