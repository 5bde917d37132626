"""The dispatcher's bookkeeping when an actor dies: only the call that was running counts as an attempt.

Ray is replaced by fakes here: the order in which a dead actor's failed calls are collected is chosen by
the test, which a real cluster does not let a test choose.
"""

from __future__ import annotations

import itertools

import pytest
import ray.exceptions

from ssim_ray import dispatch
from ssim_ray.config import AuditJobConfig
from ssim_ray.sources import Plan, PrefixRows, Shard


class _Ref:
    _ids = itertools.count()

    def __init__(self, label: str) -> None:
        self.label = f"{label}#{next(self._ids)}"

    def __repr__(self) -> str:
        return self.label


class _Method:
    def __init__(self, name: str) -> None:
        self.name = name

    def remote(self, *args) -> _Ref:
        return _Ref(self.name)


class _Actor:
    def __init__(self) -> None:
        self.run_shard = _Method("run_shard")
        self.ping = _Method("ping")


def _dispatcher(shards: int, actors: int) -> dispatch.ShardDispatcher:
    plan_shards = tuple(Shard(f"{i:08d}-x", 1, PrefixRows(keys=())) for i in range(shards))
    plan = Plan(shards=plan_shards, fingerprint="f", total_pairs=shards, passthrough_columns=())
    cfg = AuditJobConfig()
    cfg.runtime.max_shard_attempts = 3
    dispatcher = dispatch.ShardDispatcher([_Actor() for _ in range(actors)], plan, cfg, "unused://")
    dispatcher.queue.extend(plan_shards)
    dispatcher._fill()
    return dispatcher


@pytest.mark.parametrize("running_first", [True, False])
def test_dead_actor_counts_one_attempt_whatever_order_its_calls_fail_in(monkeypatch, running_first):
    def dead_actor(ref):
        raise ray.exceptions.RayActorError(error_msg="the actor died")

    monkeypatch.setattr(dispatch.ray, "get", dead_actor)
    dispatcher = _dispatcher(shards=2, actors=1)
    running, queued = list(dispatcher.per_actor[0])
    shard_running, shard_queued = dispatcher.inflight[running][1], dispatcher.inflight[queued][1]
    for ref in ([running, queued] if running_first else [queued, running]):
        dispatcher._collect(ref)
    assert dispatcher.attempts == {shard_running.shard_id: 1}
    assert list(dispatcher.queue) and set(dispatcher.queue) == {shard_running, shard_queued}
    assert not dispatcher.never_ran  # nothing left behind for calls made after the restart


def test_calls_after_a_restart_count_again(monkeypatch):
    def dead_actor(ref):
        raise ray.exceptions.RayActorError(error_msg="the actor died")

    monkeypatch.setattr(dispatch.ray, "get", dead_actor)
    dispatcher = _dispatcher(shards=2, actors=1)
    for ref in list(dispatcher.per_actor[0]):
        dispatcher._collect(ref)
    dispatcher.pings.clear()  # the restarted actor answered its ping
    dispatcher._fill()
    rerun = dispatcher.per_actor[0][0]
    dispatcher._collect(rerun)  # the actor dies again while running the retried shard
    assert sum(dispatcher.attempts.values()) == 2
