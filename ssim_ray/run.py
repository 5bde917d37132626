"""evaluate(cfg): plan → skip committed shards → actors pull shards → merge → report → gates.

The driver holds the plan (small: shards, not pairs), hands shards to actors as they free up (a fast
actor takes more), and commits nothing itself except `worker_failed` rows for a shard that failed on
every attempt. Everything it merges comes from commit markers, so a crash of the driver loses nothing
that an actor committed: rerunning with the same `output.url` resumes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

import ray
import ray.exceptions

from ssim_ray import statuses
from ssim_ray.config import AuditJobConfig
from ssim_ray.metric.structural import metric_settings
from ssim_ray.output import gates, results
from ssim_ray.progress import Progress
from ssim_ray.report import html as report
from ssim_ray.sources import planning as sources
from ssim_ray.worker import ShardResult, ShardWorker, WorkerSpec

# Shards queued per actor: one running and one waiting, so an actor never idles between shards.
SHARDS_IN_FLIGHT_PER_ACTOR = 2


@dataclasses.dataclass
class RunOutcome:
    """The merged summary, the exit code (0 or a quality-gate code), and the failed attempts per shard."""

    summary: dict
    exit_code: int
    output_url: str
    failed_attempts: Dict[str, int] = dataclasses.field(default_factory=dict)
    actor_peak_rss_bytes: Dict[str, int] = dataclasses.field(default_factory=dict)
    actor_cpu_seconds: Dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where actors run and how many."""

    device: str
    num_workers: int
    actor_options: Dict[str, Any]
    torch_threads: int
    memory_share: float


def connect_ray(address: Optional[str]) -> bool:
    """Join Ray as `runtime.address` says. Returns True if this call connected (and so must disconnect).

    None: the cluster in RAY_ADDRESS when set (a job started by `ray job submit`), else a new local Ray,
    never some other cluster that happens to run on this machine. `auto` or host:port: join that cluster.
    """
    if ray.is_initialized():
        return False
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(address="local", include_dashboard=False, configure_logging=False)
    else:
        ray.init(address=address)
    return True


def plan_placement(cfg: AuditJobConfig) -> Placement:
    """Device, actor count and resources: one actor per GPU (or `gpus_per_worker`), else CPU actors.

    CPU actors, unless `runtime.num_workers` is set: `cpu_actors` per node, spread over the nodes. Each runs
    `cpus_per_worker` torch threads and `decode_threads` decode threads.
    """
    runtime = cfg.runtime
    torch_threads = max(1, int(runtime.cpus_per_worker))
    gpus = ray.cluster_resources().get("GPU", 0.0)
    device = runtime.device
    if device == "auto":
        device = "cuda" if gpus > 0 and runtime.gpus_per_worker > 0 else "cpu"
    if device == "cuda":
        if gpus <= 0:
            raise RuntimeError("runtime.device=cuda, but the Ray cluster reports no GPU")
        num_workers = runtime.num_workers or max(1, int(gpus // runtime.gpus_per_worker))
        options = {"num_gpus": runtime.gpus_per_worker, "num_cpus": runtime.cpus_per_worker}
        share = min(1.0, runtime.gpus_per_worker)
    else:
        node_cpus = [node["Resources"]["CPU"] for node in ray.nodes() if node.get("Alive") and node["Resources"].get("CPU")]
        num_workers = runtime.num_workers or cpu_actors(node_cpus, torch_threads=torch_threads,
                                                        decode_threads=runtime.decode_threads)
        # Spread over the nodes: Ray's default packs actors onto one node until half its CPUs are taken.
        options = {"num_cpus": runtime.cpus_per_worker, "scheduling_strategy": "SPREAD"}
        share = 1.0 / max(1, math.ceil(num_workers / max(1, len(node_cpus))))
    return Placement(device, num_workers, options, torch_threads, share)


def cpu_actors(node_cpus: List[float], *, torch_threads: int, decode_threads: int) -> int:
    """CPU actors for a cluster: on each node, one per (torch threads + decode threads) CPUs, rounded up.

    Each actor keeps torch_threads computing and decode_threads decoding; decoding a pair costs about twice
    its SSIM on one core (measured: 10 vs 4.9 ms for a 512² RGB pair), so with the default 1 + 2 threads
    every thread of an actor is busy and an actor fills about three cores. Fewer, fuller actors also pay
    fewer fixed costs (start-up, the kernel's compilation): on 2 cores one actor scored 2,048 pairs with
    15.4 ms of CPU per pair, two actors (one per core, the earlier rule) with 18.5.

    Example:
        >>> cpu_actors([2.0], torch_threads=1, decode_threads=2), cpu_actors([32.0, 32.0], torch_threads=1, decode_threads=2)
        (1, 22)
    """
    threads = max(1, torch_threads + decode_threads)
    return max(1, sum(math.ceil(cpus / threads) for cpus in node_cpus))


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


def describe_error(exc: BaseException) -> str:
    """One line for an error row: the user's exception inside a RayTaskError, else Ray's own error."""
    cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else None
    shown = cause if isinstance(cause, BaseException) else exc
    text = f"{type(shown).__name__}: {shown}".strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(shown).__name__)[:500]


class ShardDispatcher:
    """Hands shards to actors as they free up; retries shards of dead actors; types hopeless shards.

    Each actor has at most SHARDS_IN_FLIGHT_PER_ACTOR calls queued, so a fast actor takes more shards.
    When an actor dies, its calls fail: the one that was running counts as an attempt of its shard, the
    ones queued behind it do not. The actor is not given work again until a ping shows that Ray has
    restarted it (an actor whose node is gone may never come back; the others take its share).
    """

    def __init__(self, actors: list, plan: sources.Plan, cfg: AuditJobConfig, output_url: str) -> None:
        self.actors = actors
        self.plan = plan
        self.cfg = cfg
        self.output_url = output_url
        self.attempts: Dict[str, int] = {}
        self.last_error: Dict[str, str] = {}
        self.results: List[ShardResult] = []
        self.queue: Deque[sources.Shard] = deque()
        self.inflight: Dict[ray.ObjectRef, Tuple[int, sources.Shard]] = {}
        self.per_actor: Dict[int, Deque[ray.ObjectRef]] = {i: deque() for i in range(len(actors))}
        self.pings: Dict[ray.ObjectRef, int] = {}
        # Calls that were queued behind a call whose actor died: they never ran, whatever order their
        # failures are collected in.
        self.never_ran: set = set()
        self.done_pairs = 0
        self.failed_pairs = 0

    def _healthy(self, index: int) -> bool:
        return index not in self.pings.values()

    def _fill(self) -> None:
        # Level by level, so that every idle actor gets a shard before any gets a second one.
        for level in range(1, SHARDS_IN_FLIGHT_PER_ACTOR + 1):
            for index, actor in enumerate(self.actors):
                if self.queue and self._healthy(index) and len(self.per_actor[index]) < level:
                    shard = self.queue.popleft()
                    ref = actor.run_shard.remote(shard, self.plan.passthrough_columns)
                    self.inflight[ref] = (index, shard)
                    self.per_actor[index].append(ref)

    def _on_failure(self, shard: sources.Shard, exc: Exception, counted: bool) -> None:
        self.last_error[shard.shard_id] = describe_error(exc)
        if counted:
            self.attempts[shard.shard_id] = self.attempts.get(shard.shard_id, 0) + 1
        if self.attempts.get(shard.shard_id, 0) >= self.cfg.runtime.max_shard_attempts:
            self._record(self._commit_worker_failed(shard))
        else:
            self.queue.appendleft(shard)

    def _commit_worker_failed(self, shard: sources.Shard) -> ShardResult:
        message = (
            f"shard {shard.shard_id} failed on {self.attempts[shard.shard_id]} attempt(s); "
            f"last error: {self.last_error[shard.shard_id]}"
        )
        rows = [
            {"pair_id": pair_id, "reference": reference, "distorted": distorted, "status": statuses.WORKER_FAILED,
             "error": message, "shard_id": shard.shard_id, **passthrough}
            for pair_id, reference, distorted, passthrough in sources.iter_shard_rows(shard, self.cfg.source)
        ]
        table = results.rows_to_table(rows, self.plan.passthrough_columns)
        results.write_shard(
            self.output_url,
            shard.shard_id,
            table,
            storage_options=dict(self.cfg.output.storage_options),
            stats=results.shard_stats(table, self.cfg.summary),
        )
        now = time.time()
        return ShardResult(shard.shard_id, len(rows), {statuses.WORKER_FAILED: len(rows)}, now, now, {}, "driver", "none")

    def _record(self, result: ShardResult) -> None:
        self.results.append(result)
        self.done_pairs += result.rows
        self.failed_pairs += sum(n for status, n in result.status_counts.items() if not statuses.is_ok(status))

    def _collect(self, ref: ray.ObjectRef) -> None:
        if ref in self.pings:
            index = self.pings.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                self.pings[self.actors[index].ping.remote()] = index  # still restarting: ask again
            return
        index, shard = self.inflight.pop(ref)
        # Calls on one actor run in order: the oldest unfinished one is the one that was running.
        was_running = self.per_actor[index][0] == ref and ref not in self.never_ran
        self.per_actor[index].remove(ref)
        self.never_ran.discard(ref)
        try:
            self._record(ray.get(ref))
        except ray.exceptions.RayTaskError as exc:  # the shard raised: a real attempt
            self._on_failure(shard, exc, True)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
            if was_running:
                self.never_ran.update(self.per_actor[index])
            self._on_failure(shard, exc, was_running)
            if self._healthy(index):
                self.pings[self.actors[index].ping.remote()] = index

    def run(self, todo: List[sources.Shard], progress: Progress) -> None:
        self.queue.extend(todo)
        last_progress = time.monotonic()
        stall_limit = self.cfg.runtime.stall_timeout_s
        while self.queue or self.inflight:
            self._fill()
            waiting = list(self.inflight) + list(self.pings)
            ready, _ = ray.wait(waiting, num_returns=1, timeout=self.cfg.runtime.progress_interval_s)
            finished_before = len(self.results)
            for ref in ready:
                self._collect(ref)
            if len(self.results) > finished_before:
                last_progress = time.monotonic()
            elif not self.inflight and time.monotonic() - last_progress > stall_limit:
                raise RuntimeError(
                    f"no actor could take a shard for {stall_limit:.0f} s ({len(self.queue)} shards left); "
                    "committed shards are kept: rerun with the same output.url to resume"
                )
            progress.update(done_pairs=self.done_pairs, failures=self.failed_pairs)


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


def _run_info(cfg, plan, computed: List[ShardResult], resumed: int, wall: Optional[float], placement) -> results.RunInfo:
    by_actors = [r for r in computed if r.worker != "driver"]
    span = (max(r.finished for r in by_actors) - min(r.started for r in by_actors)) if by_actors else None
    device = None
    if placement is not None:
        device = placement.device
        devices = sorted({r.device for r in by_actors})
        if devices:
            device = ", ".join(devices)
    return results.RunInfo(
        metric=metric_settings(
            win_size=cfg.ssim.win_size, sigma=cfg.ssim.sigma, k1=cfg.ssim.k1, k2=cfg.ssim.k2,
            gaussian=cfg.ssim.gaussian, downsample=cfg.ssim.downsample, precision=cfg.ssim.precision,
            data_range=cfg.ssim.data_range,
        ),
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
    )


def _check_passthrough(plan: sources.Plan) -> None:
    clashes = sorted(set(plan.passthrough_columns) & set(results.RESULT_COLUMNS))
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
    manifest = results.run_manifest(plan=plan, cfg=cfg)
    results.check_resume_compatible(
        output_url, manifest, mode=cfg.output.mode, storage_options=dict(cfg.output.storage_options)
    )
    committed = results.committed_shard_ids(output_url, storage_options=dict(cfg.output.storage_options))
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
    summary = results.merge(
        output_url,
        plan_shard_ids=plan_shard_ids,
        run_info=run_info,
        summary_cfg=cfg.summary,
        storage_options=storage_options,
        audit_cfg=cfg.audit,
    )
    if cfg.report.enabled:
        made = report.make_report(
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
    committed = results.committed_shard_ids(output_url, storage_options=dict(cfg.output.storage_options))
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
