"""Faults: an actor SIGKILLed mid-shard, and a node removed from a multi-node cluster. The job completes and
every pair is in the results exactly once."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from job_fixtures import job_config, make_job_dataset, read_results, read_summary
from ssim_ray.run import evaluate

pytestmark = pytest.mark.slow


def _markers(out) -> int:
    return len(list((out / "shards").glob("*.commit.json"))) if (out / "shards").exists() else 0


def _when_committed(out, count: int, action, timeout: float = 120.0) -> threading.Thread:
    """Run `action` in a thread once `count` shards are committed (the others are then mid-flight)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while _markers(out) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _when_busy(actors: int, action, timeout: float = 120.0) -> threading.Thread:
    """Run `action` in a thread once `actors` actor processes are running a shard at the same time."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while len(_running_shard_pids()) < actors and time.monotonic() < deadline:
            time.sleep(0.01)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _running_shard_pids() -> list:
    # Ray names an actor's process after the method it is executing. Only this test's actors count: their
    # parent is a raylet of this cluster (other Ray sessions may run on the machine), which also leaves out
    # the processes an actor forks (a C compiler it runs inherits its name).
    raylets = [node["RayletSocketName"] for node in ray.nodes() if node.get("RayletSocketName")]
    found = subprocess.run(["pgrep", "-f", "ray::ShardWorker.run_shard"], capture_output=True, text=True)
    return sorted(int(pid) for pid in found.stdout.split() if any(s in _parent_cmdline(int(pid)) for s in raylets))


def _parent_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{parent}/cmdline") as cmdline:
            return cmdline.read().replace("\0", " ")
    except (OSError, ValueError, IndexError):
        return ""


def _kill_a_busy_actor(killed: list) -> None:
    """SIGKILL one actor that is running a shard right now (waits up to 5 s for one)."""
    for _ in range(500):
        pids = _running_shard_pids()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
            return
        time.sleep(0.01)


@pytest.fixture
def dataset(tmp_path):
    return make_job_dataset(tmp_path / "data", photos=("camera", "astronaut", "coffee", "chelsea", "rocket"))


@pytest.fixture
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _assert_exactly_once(out, dataset) -> dict:
    ids = read_results(out).column("pair_id").to_pylist()
    assert len(ids) == len(set(ids)) == dataset.total
    summary = read_summary(out)
    assert summary["complete"] is True
    assert summary["status_counts"].get("worker_failed", 0) == 0
    return summary


def test_actor_sigkilled_mid_shard_is_retried_and_job_completes(cluster, dataset, tmp_path):
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    out = tmp_path / "out"
    killed: list = []
    kill_a_busy_actor = functools.partial(_kill_a_busy_actor, killed)
    cfg = job_config(dataset.manifest, out, pairs_per_shard=12, address=cluster.address)
    cfg.ssim.precision = "fp64"  # slower shards: the kill lands inside one
    watcher = _when_committed(out, 1, kill_a_busy_actor)
    outcome = evaluate(cfg, output_url=str(out))
    watcher.join()
    assert killed, "no actor was found running a shard to kill"
    assert sum(outcome.failed_attempts.values()) >= 1  # the killed shard failed once, then succeeded
    _assert_exactly_once(out, dataset)


def test_node_removed_mid_run_and_job_completes_on_the_other(cluster, dataset, tmp_path):
    first = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    out = tmp_path / "out"
    cfg = job_config(dataset.manifest, out, pairs_per_shard=12, address=cluster.address)
    cfg.ssim.precision = "fp64"
    # Once both actors run a shard: an actor that Ray had not started yet when its node went would have no
    # shard to lose (its queued shard goes to the other actor uncounted), and the test wants a lost one.
    watcher = _when_busy(2, lambda: cluster.remove_node(first))
    outcome = evaluate(cfg, output_url=str(out))
    watcher.join()
    summary = _assert_exactly_once(out, dataset)
    assert summary["shards"]["computed"] == summary["shards"]["total"]
    assert sum(outcome.failed_attempts.values()) >= 1


def test_shard_failing_on_every_attempt_becomes_worker_failed_rows(cluster, dataset, tmp_path):
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    out = tmp_path / "out"
    killed: list = []
    kill_a_busy_actor = functools.partial(_kill_a_busy_actor, killed)
    cfg = job_config(dataset.manifest, out, pairs_per_shard=12, address=cluster.address)
    cfg.ssim.precision = "fp64"
    cfg.runtime.max_shard_attempts = 1  # the one attempt that is killed is the last
    watcher = _when_committed(out, 1, kill_a_busy_actor)
    outcome = evaluate(cfg, output_url=str(out))
    watcher.join()
    assert killed
    rows = read_results(out).to_pylist()
    assert len({r["pair_id"] for r in rows}) == len(rows) == dataset.total
    failed = [r for r in rows if r["status"] == "worker_failed"]
    assert 1 <= len(failed) <= 12 and len({r["shard_id"] for r in failed}) == 1
    assert all("failed on 1 attempt(s)" in r["error"] and r["ssim"] is None for r in failed)
    assert outcome.summary["status_counts"]["worker_failed"] == len(failed)
