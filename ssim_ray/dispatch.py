"""The dispatcher: hands shards to actors as they free up, retries shards of dead actors, types hopeless ones.

It commits nothing itself except `worker_failed` rows for a shard that failed on every attempt.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Tuple

import ray
import ray.exceptions

from ssim_ray import sources, statuses
from ssim_ray.config import AuditJobConfig
from ssim_ray.output.commit import write_shard_rows
from ssim_ray.output.stamps import CommitStamp
from ssim_ray.output.schema import result_row
from ssim_ray.progress import Progress
from ssim_ray.worker import ShardResult

# Shards queued per actor: one running and one waiting, so an actor never idles between shards.
SHARDS_IN_FLIGHT_PER_ACTOR = 2
_LISTED = 4  # shard ids a stall error names per actor


class StalledError(RuntimeError):
    """No shard finished for `runtime.stall_timeout_s`: the message says what was waiting where."""


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
    Until an actor answers its first ping (sent before any shard, so an unanswered ping means it has run
    nothing yet) it holds one shard only; if Ray never starts it (no node has its resources free), that
    shard is taken back once the other actors have nothing left to do: the actor is killed and its shard
    goes to them, so the run completes instead of waiting forever. When an actor dies, its calls fail: the
    one that was running counts as an attempt of its shard, the ones queued behind it do not. It is not
    given work again until a ping shows that Ray has restarted it (an actor whose node is gone may never
    come back; the others take its share).

    The stall rule: when no shard finishes for `runtime.stall_timeout_s`, whatever is queued or running,
    the run stops with an error that says what waits where (`stall_report`); committed shards are kept.

    Args:
        actors: the actor handles (`run_shard`, `ping`).
        plan: the plan (for the pass-through columns).
        cfg: the job's config (attempts, stall timeout, progress interval, where worker_failed rows go).
        output_url: the output, for worker_failed rows.
        clock: seconds, monotonic; injectable for tests.
        stamp: the run's CommitStamp, recorded in the markers of worker_failed shards.
    """

    def __init__(self, actors: list, plan: sources.Plan, cfg: AuditJobConfig, output_url: str, *,
                 clock: Callable[[], float] = time.monotonic, stamp: Optional[CommitStamp] = None) -> None:
        self.actors = actors
        self.clock = clock
        self.stamp = stamp
        self.plan = plan
        self.cfg = cfg
        self.output_url = output_url
        self.attempts: Dict[str, int] = {}
        self.last_error: Dict[str, str] = {}
        self.results: List[ShardResult] = []
        self.queue: Deque[sources.Shard] = deque()
        self.inflight: Dict[ray.ObjectRef, Tuple[int, sources.Shard]] = {}
        self.per_actor: Dict[int, Deque[ray.ObjectRef]] = {i: deque() for i in range(len(actors))}
        self.pings: Dict[ray.ObjectRef, int] = {}  # actors restarting after a death
        self.first_pings: Dict[ray.ObjectRef, int] = {}  # actors Ray has not started yet
        self.retired: set = set()  # actors killed because Ray never started them
        # Calls that were queued behind a call whose actor died: they never ran, whatever order their
        # failures are collected in.
        self.never_ran: set = set()
        self.done_pairs = 0
        self.failed_pairs = 0

    def _healthy(self, index: int) -> bool:
        return index not in self.pings.values() and index not in self.retired

    def _capacity(self, index: int) -> int:
        if not self._healthy(index):
            return 0
        return 1 if index in self.first_pings.values() else SHARDS_IN_FLIGHT_PER_ACTOR

    def _fill(self) -> None:
        # Level by level, so that every idle actor gets a shard before any gets a second one.
        for level in range(1, SHARDS_IN_FLIGHT_PER_ACTOR + 1):
            for index, actor in enumerate(self.actors):
                if self.queue and len(self.per_actor[index]) < min(level, self._capacity(index)):
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
            stamp=self.stamp,
        )
        now = time.time()
        return ShardResult(shard.shard_id, len(rows), {statuses.WORKER_FAILED: len(rows)}, now, now, {}, "driver", "none")

    def _record(self, result: ShardResult) -> None:
        self.results.append(result)
        self.done_pairs += result.rows
        self.failed_pairs += sum(n for status, n in result.status_counts.items() if not statuses.is_ok(status))

    def _collect(self, ref: ray.ObjectRef) -> None:
        if ref in self.first_pings:
            index = self.first_pings.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayError:  # it failed as it started: wait for Ray to restart it
                if self._healthy(index):
                    self.pings[self.actors[index].ping.remote()] = index
            return
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
        """Compute `todo`: returns once every shard has a result, raises StalledError on a stall."""
        self.queue.extend(todo)
        for index, actor in enumerate(self.actors):
            if self._healthy(index):
                self.first_pings[actor.ping.remote()] = index
        last_finished = self.clock()
        stall_limit = self.cfg.runtime.stall_timeout_s
        while self.queue or self.inflight:
            self._fill()
            waiting = list(self.inflight) + list(self.pings) + list(self.first_pings)
            ready, _ = ray.wait(waiting, num_returns=1, timeout=self.cfg.runtime.progress_interval_s)
            finished_before = len(self.results)
            for ref in ready:
                self._collect(ref)
            self._take_back_from_unstarted()
            if len(self.results) > finished_before:
                last_finished = self.clock()
            elif self.clock() - last_finished > stall_limit:
                raise StalledError(self.stall_report(stall_limit))
            progress.update(done_pairs=self.done_pairs, failures=self.failed_pairs)

    def _take_back_from_unstarted(self) -> None:
        """Once nothing is left to hand out and a started actor could run more, kill the actors Ray has not
        started that hold a shard: their calls then fail and the shards go back to the queue, uncounted."""
        full = SHARDS_IN_FLIGHT_PER_ACTOR
        spare = any(self._capacity(i) == full and len(self.per_actor[i]) < full for i in range(len(self.actors)))
        holding = {index: ref for ref, index in self.first_pings.items() if self.per_actor[index]}
        if self.queue or not spare or not holding:
            return
        # A ping answered since the last wait means the actor has just started: its shard may be running.
        answered, _ = ray.wait(list(holding.values()), num_returns=len(holding), timeout=0)
        for index, ref in holding.items():
            if ref in answered:
                continue
            del self.first_pings[ref]
            self.retired.add(index)
            self.never_ran.update(self.per_actor[index])
            ray.kill(self.actors[index], no_restart=True)
            print(f"[ssim_ray] actor {index}: Ray has not started it yet (still starting, or no node has its "
                  f"resources free) while the others have room; its {len(self.per_actor[index])} shard(s) go to the "
                  f"other actors", file=sys.stderr)

    def stall_report(self, stall_limit: float) -> str:
        """What waits where when nothing finishes: the driver's queue, each actor's shards or its state.

        Example:
            >>> from ssim_ray.sources import Plan
            >>> empty = ShardDispatcher([], Plan((), "f", 0, ()), AuditJobConfig(), "unused://")
            >>> empty.stall_report(60.0).split(":")[0]
            'no shard finished in 60 s (runtime.stall_timeout_s)'
        """
        places = []
        for index in range(len(self.actors)):
            held = [self.inflight[ref][1].shard_id for ref in self.per_actor[index]]
            starting = index in self.first_pings.values()
            if held:
                places.append(f"actor {index}: {len(held)} shard(s) ({', '.join(held[:_LISTED])}) "
                              + ("waiting for Ray to start the actor" if starting
                                 else "queued or running without finishing"))
            elif (starting or not self._healthy(index)) and index not in self.retired:
                places.append(f"actor {index}: not started or restarting (Ray has not placed it: no node "
                              "with its resources free, or its process keeps failing as it starts)")
        if self.queue:
            places.append(f"{len(self.queue)} shard(s) not handed out yet")
        return (
            f"no shard finished in {stall_limit:.0f} s (runtime.stall_timeout_s): "
            + ("; ".join(places) or "nothing was waiting")
            + f". {len(self.results)} shard(s) finished in this run. Committed shards are kept: rerun with the "
            "same output.url to resume (with a larger runtime.stall_timeout_s if shards are just slow)"
        )
