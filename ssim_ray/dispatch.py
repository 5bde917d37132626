"""The dispatcher: hands shards to actors as they free up, retries shards of dead actors, types hopeless ones.

It commits nothing itself except `worker_failed` rows for a shard that failed on every attempt.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Deque, Dict, List, Tuple

import ray
import ray.exceptions

from ssim_ray import sources, statuses
from ssim_ray.config import AuditJobConfig
from ssim_ray.output.commit import write_shard_rows
from ssim_ray.output.schema import result_row
from ssim_ray.progress import Progress
from ssim_ray.worker import ShardResult

# Shards queued per actor: one running and one waiting, so an actor never idles between shards.
SHARDS_IN_FLIGHT_PER_ACTOR = 2


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
            result_row(pair_id=pair_id, reference=reference, distorted=distorted, status=statuses.WORKER_FAILED,
                       shard_id=shard.shard_id, passthrough=passthrough, error=message)
            for pair_id, reference, distorted, passthrough in sources.iter_shard_rows(shard, self.cfg.source)
        ]
        write_shard_rows(
            self.output_url, shard.shard_id, rows, passthrough_columns=self.plan.passthrough_columns,
            summary_cfg=self.cfg.summary, storage_options=dict(self.cfg.output.storage_options),
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
