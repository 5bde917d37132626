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
from ssim_ray.worker import ShardResult


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


# ------------------------------------------------------------------------------------------------------
# The stall rule and actors Ray cannot start (issue 12, point 6)
# ------------------------------------------------------------------------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Progress:
    def update(self, **counts) -> None:
        pass


def _actor_of(ref) -> int:
    return int(ref.label.split("@")[1].split("#")[0])


def _fake_ray(monkeypatch, clock: _Clock, *, ready=lambda ref: False, max_waits: int = 2000) -> set:
    """ray.wait that answers the refs `ready` accepts (else waits out its timeout on the fake clock);
    ray.get that returns a committed ShardResult for a run_shard ref and a host name for a ping; ray.kill
    after which the actor's calls fail as a dead actor's do. Returns the indices of the killed actors."""
    waits = itertools.count()
    killed: set = set()

    def wait(refs, num_returns, timeout):
        if next(waits) >= max_waits:
            raise AssertionError(f"the dispatcher kept waiting: {max_waits} waits, {clock.now:.0f} fake seconds")
        done = [ref for ref in refs if _actor_of(ref) in killed or ready(ref)][:num_returns]
        if not done:
            clock.now += timeout
        return done, [ref for ref in refs if ref not in done]

    def get(ref):
        if _actor_of(ref) in killed:
            raise ray.exceptions.RayActorError(error_msg="the actor was killed")
        if ref.label.startswith("ping"):
            return "host:1"
        return ShardResult(ref.shard_id, 1, {"ok": 1}, 0.0, 0.0, {}, "host:1", "cpu")

    def kill(actor, no_restart=False):
        assert no_restart, "an actor that was never started must not be restarted"
        killed.add(actor.index)

    monkeypatch.setattr(dispatch.ray, "wait", wait)
    monkeypatch.setattr(dispatch.ray, "get", get)
    monkeypatch.setattr(dispatch.ray, "kill", kill)
    return killed


class _ShardMethod(_Method):
    def __init__(self, name: str, clock: _Clock) -> None:
        super().__init__(name)
        self.clock = clock

    def remote(self, shard, *args) -> _Ref:
        ref = _Ref(self.name)
        ref.shard_id, ref.created = shard.shard_id, self.clock.now
        return ref


class _TracedActor(_Actor):
    """An actor whose calls are labelled with its index, so a fake ray.wait can answer some actors only."""

    def __init__(self, index: int, clock: _Clock) -> None:
        self.index = index
        self.run_shard = _ShardMethod(f"run_shard@{index}", clock)
        self.ping = _Method(f"ping@{index}")


def _stall_dispatcher(shards: int, actors: int, *, stall_timeout_s: float, clock: _Clock) -> tuple:
    plan_shards = tuple(Shard(f"{i:08d}-x", 1, PrefixRows(keys=())) for i in range(shards))
    plan = Plan(shards=plan_shards, fingerprint="f", total_pairs=shards, passthrough_columns=())
    cfg = AuditJobConfig()
    cfg.runtime.stall_timeout_s, cfg.runtime.progress_interval_s = stall_timeout_s, 10.0
    pool = [_TracedActor(i, clock) for i in range(actors)]
    return dispatch.ShardDispatcher(pool, plan, cfg, "unused://", clock=clock), list(plan_shards)


def test_stall_fires_while_shards_sit_on_an_actor_that_never_answers(monkeypatch):
    """Point 6: shards queued on an actor that never runs them used to count as in flight, forever."""
    clock = _Clock()
    # The actor answers its ping (it exists), then never finishes a shard (a hung read, a lost node...).
    _fake_ray(monkeypatch, clock, ready=lambda ref: ref.label.startswith("ping"))
    dispatcher, todo = _stall_dispatcher(shards=4, actors=1, stall_timeout_s=60.0, clock=clock)
    with pytest.raises(RuntimeError) as raised:
        dispatcher.run(todo, _Progress())
    message = str(raised.value)
    assert "no shard finished in 60 s (runtime.stall_timeout_s)" in message
    assert "actor 0: 2 shard(s) (00000000-x, 00000001-x)" in message  # what waits where
    assert "2 shard(s) not handed out yet" in message
    assert "Committed shards are kept" in message and "same output.url to resume" in message
    assert 60.0 < clock.now <= 80.0  # fired within one progress interval after the limit


def test_stall_fires_when_no_actor_ever_starts(monkeypatch):
    clock = _Clock()
    _fake_ray(monkeypatch, clock)  # nothing is ever ready: no actor can be placed
    dispatcher, todo = _stall_dispatcher(shards=3, actors=2, stall_timeout_s=30.0, clock=clock)
    with pytest.raises(RuntimeError, match="no shard finished in 30 s") as raised:
        dispatcher.run(todo, _Progress())
    # Until an actor has started it holds one shard, which it has not begun.
    assert "actor 0: 1 shard(s) (00000000-x) waiting for Ray to start the actor" in str(raised.value)
    assert "actor 1: 1 shard(s) (00000001-x) waiting for Ray to start the actor" in str(raised.value)
    assert "1 shard(s) not handed out yet" in str(raised.value)


def test_an_actor_ray_cannot_start_is_given_no_shard_and_the_others_finish(monkeypatch):
    """Point 6: an actor that never starts (or restarts where nothing can place it) holds no shard."""
    clock = _Clock()
    killed = _fake_ray(monkeypatch, clock, ready=lambda ref: "@1" in ref.label)  # actor 0 never starts
    dispatcher, todo = _stall_dispatcher(shards=5, actors=2, stall_timeout_s=60.0, clock=clock)
    dispatcher.run(todo, _Progress())
    assert sorted(r.shard_id for r in dispatcher.results) == [s.shard_id for s in todo]
    assert {r.worker for r in dispatcher.results} == {"host:1"}
    assert killed == {0} and not dispatcher.per_actor[0]  # its shard was taken back once actor 1 was free
    assert dispatcher.attempts == {}  # it never ran: no attempt counted
    assert clock.now < 60.0  # without waiting for the stall rule


def test_progress_resets_the_stall_clock(monkeypatch):
    """A slow but steady run is not a stall: each finished shard restarts the count."""
    clock = _Clock()
    # A shard takes 50 fake seconds, under the 60 s limit; four of them take longer than the limit.
    _fake_ray(monkeypatch, clock, ready=lambda ref: ref.label.startswith("ping") or clock.now - ref.created >= 50)
    dispatcher, todo = _stall_dispatcher(shards=4, actors=1, stall_timeout_s=60.0, clock=clock)
    dispatcher.run(todo, _Progress())
    assert len(dispatcher.results) == 4 and clock.now > 60.0
