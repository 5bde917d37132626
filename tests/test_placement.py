"""CPU placement: actors per node from the threads each actor keeps busy, spread over the nodes."""

from __future__ import annotations

import pytest

from ssim_ray import placement as placing
from ssim_ray.config import AuditJobConfig


def _cluster(monkeypatch, *node_cpus: float, gpus: float = 0.0) -> None:
    nodes = [{"Alive": True, "Resources": {"CPU": cpus}} for cpus in node_cpus]
    nodes.append({"Alive": False, "Resources": {"CPU": 64.0}})  # a dead node offers nothing
    nodes.append({"Alive": True, "Resources": {"memory": 1.0}})  # a head started with num_cpus=0
    monkeypatch.setattr(placing.ray, "nodes", lambda: nodes)
    monkeypatch.setattr(placing.ray, "cluster_resources", lambda: {"CPU": sum(node_cpus), "GPU": gpus})


@pytest.mark.parametrize(
    ("node_cpus", "actors", "share"),
    [((2.0,), 1, 1.0), ((4.0,), 2, 0.5), ((32.0, 32.0), 22, 1 / 11), ((1.0, 1.0), 2, 1.0)],
)
def test_cpu_actors_fill_each_node_with_torch_plus_decode_threads(monkeypatch, node_cpus, actors, share):
    _cluster(monkeypatch, *node_cpus)
    placement = placing.plan_placement(AuditJobConfig())  # 1 torch thread + 2 decode threads per actor
    assert (placement.device, placement.num_workers, placement.torch_threads) == ("cpu", actors, 1)
    assert placement.memory_share == pytest.approx(share)
    assert placement.actor_options == {"num_cpus": 1.0, "scheduling_strategy": "SPREAD"}


def test_explicit_worker_count_and_threads_are_kept(monkeypatch):
    _cluster(monkeypatch, 2.0)
    cfg = AuditJobConfig()
    cfg.runtime.num_workers, cfg.runtime.cpus_per_worker, cfg.runtime.decode_threads = 2, 1.0, 1
    placement = placing.plan_placement(cfg)
    assert (placement.num_workers, placement.memory_share) == (2, 0.5)


def test_gpu_placement_is_one_actor_per_gpu(monkeypatch):
    _cluster(monkeypatch, 16.0, gpus=2.0)
    placement = placing.plan_placement(AuditJobConfig())
    assert (placement.device, placement.num_workers, placement.memory_share) == ("cuda", 2, 1.0)
    assert placement.actor_options == {"num_gpus": 1.0, "num_cpus": 1.0}
