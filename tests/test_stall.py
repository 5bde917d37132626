"""A job asked for more actors than its Ray can place completes (issue 12, point 6), on a real local Ray.

`runtime.num_workers=3` on 2 CPUs used to hang forever: the third actor was never placed, the shards
queued on it counted as in flight, and the stall check never fired. The unit tests of the rule itself,
with fake refs and a fake clock, are in test_dispatcher.py and test_placement.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import ray
from job_fixtures import job_config, make_job_dataset, read_results, read_summary

from ssim_ray import run
from ssim_ray.placement import PlacementWarning
from ssim_ray.run import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture
def two_cpu_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.timeout(300)  # the bug was a hang: fail it in bounded time rather than wait forever
def test_three_workers_on_two_cpus_complete_with_two(two_cpu_ray, tmp_path):
    dataset = make_job_dataset(tmp_path / "data", photos=("camera",), with_bad=False)
    out = tmp_path / "out"
    cfg = job_config(dataset.manifest, out, pairs_per_shard=3, num_workers=3)
    cfg.runtime.stall_timeout_s = 120.0
    with pytest.warns(PlacementWarning, match=r"runtime.num_workers=3 asks for 3 actors of 1 CPU.*using 2"):
        outcome = evaluate(cfg, output_url=str(out))
    ids = read_results(out).column("pair_id").to_pylist()
    assert len(ids) == len(set(ids)) == dataset.total
    summary = read_summary(out)
    assert summary["complete"] is True and summary["status_counts"] == {"ok": dataset.total}
    assert outcome.summary["runtime"]["num_workers"] == 2


@pytest.mark.timeout(300)
def test_an_actor_ray_never_places_gives_its_shard_back_and_the_job_completes(two_cpu_ray, tmp_path, monkeypatch,
                                                                              capfd):
    """Three actors on 2 CPUs anyway (as when another job holds the CPUs the placement counted on): the third
    is never placed; the shard it was given is taken back once the others are free."""
    real = run.plan_placement
    monkeypatch.setattr(run, "plan_placement", lambda cfg: dataclasses.replace(real(cfg), num_workers=3))
    dataset = make_job_dataset(tmp_path / "data", photos=("camera",), with_bad=False)
    out = tmp_path / "out"
    cfg = job_config(dataset.manifest, out, pairs_per_shard=3, num_workers=2)
    cfg.runtime.stall_timeout_s = 120.0
    evaluate(cfg, output_url=str(out))
    assert "Ray has not started it yet (still starting, or no node has its resources free) while the others have "\
           "room; its 1 shard(s) go to the other actors" \
        in capfd.readouterr().err
    ids = read_results(out).column("pair_id").to_pylist()
    assert len(ids) == len(set(ids)) == dataset.total
    assert read_summary(out)["complete"] is True
