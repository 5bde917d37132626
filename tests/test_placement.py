"""CPU placement: an actor per core of each node (per cpus_per_worker CPUs), spread over the nodes."""

from __future__ import annotations

import warnings

import pytest

from ssim_ray import placement as placing
from ssim_ray.config import AuditJobConfig


def _cluster(monkeypatch, *node_cpus: float, gpus: float = 0.0) -> None:
    nodes = [{"Alive": True, "Resources": {"CPU": cpus}} for cpus in node_cpus]
    if gpus:
        nodes[0]["Resources"]["GPU"] = gpus
    nodes.append({"Alive": False, "Resources": {"CPU": 64.0}})  # a dead node offers nothing
    nodes.append({"Alive": True, "Resources": {"memory": 1.0}})  # a head started with num_cpus=0
    monkeypatch.setattr(placing.ray, "nodes", lambda: nodes)
    monkeypatch.setattr(placing.ray, "cluster_resources", lambda: {"CPU": sum(node_cpus), "GPU": gpus})


@pytest.mark.parametrize(
    ("node_cpus", "actors", "share"),
    [((2.0,), 2, 0.5), ((4.0,), 4, 0.25), ((32.0, 32.0), 64, 1 / 32), ((1.0, 1.0), 2, 1.0), ((3.0,), 3, 1 / 3)],
)
def test_cpu_actors_put_a_compute_thread_on_every_core(monkeypatch, node_cpus, actors, share):
    _cluster(monkeypatch, *node_cpus)
    placement = placing.plan_placement(AuditJobConfig())  # 1 torch thread (+ 2 decode threads) per actor
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
    # decode_threads=auto: (16 CPUs - 1 for Ray) // 2 GPU actors = 7 CPUs reserved and decoding per actor
    assert placement.actor_options == {"num_gpus": 1.0, "num_cpus": 7.0}
    assert placement.decode_threads == 7


# ------------------------------------------------------------------------------------------------------
# Decode capacity that follows the node (issue 15, point 1)
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("node", "gpus_per_worker", "cpus", "threads"),
    [
        ({"CPU": 96.0, "GPU": 8.0}, 1.0, 11.0, 11),  # the node: 95 // 8
        ({"CPU": 8.0, "GPU": 2.0}, 1.0, 3.0, 3),
        ({"CPU": 8.0, "GPU": 2.0}, 0.5, 1.0, 2),  # 4 actors: 7 // 4 = 1 CPU, never fewer than 2 threads
        ({"CPU": 4.0, "GPU": 8.0}, 1.0, 1.0, 2),  # more GPUs than CPUs: the reservation before auto
        ({"CPU": 64.0, "GPU": 1.0}, 2.0, 1.0, 2),  # half a GPU per actor asked for two: no actor fits the node
    ],
)
def test_auto_gpu_actors_reserve_and_decode_on_their_share_of_the_node(monkeypatch, node, gpus_per_worker, cpus, threads):
    _nodes(monkeypatch, node)
    cfg = AuditJobConfig()
    cfg.runtime.gpus_per_worker, cfg.runtime.device = gpus_per_worker, "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", placing.PlacementWarning)  # the last case cannot place its actor
        if gpus_per_worker > node["GPU"]:
            with pytest.raises(placing.PlacementError):
                placing.plan_placement(cfg)
            return
        placement = placing.plan_placement(cfg)
    assert placement.actor_options["num_cpus"] == cpus
    assert placement.decode_threads == threads
    # Every actor fits beside the others: the reservations never exceed the node's CPUs.
    assert placement.num_workers * cpus <= node["CPU"]


def test_heterogeneous_gpu_nodes_reserve_what_the_smallest_share_allows(monkeypatch):
    # One options dict for every actor and Ray picks the node: the reservation must fit on each GPU node;
    # the CPU-only node does not count.
    _nodes(monkeypatch, {"CPU": 8.0, "GPU": 2.0}, {"CPU": 32.0, "GPU": 2.0}, {"CPU": 64.0})
    placement = placing.plan_placement(AuditJobConfig())
    assert (placement.num_workers, placement.actor_options["num_cpus"], placement.decode_threads) == (4, 3.0, 3)


def test_explicit_decode_threads_keep_the_reservation_they_had(monkeypatch):
    _cluster(monkeypatch, 16.0, gpus=2.0)
    cfg = AuditJobConfig()
    cfg.runtime.decode_threads = 5
    placement = placing.plan_placement(cfg)
    assert placement.actor_options == {"num_gpus": 1.0, "num_cpus": 1.0}
    assert placement.decode_threads == 5
    _cluster(monkeypatch, 4.0)
    cfg.runtime.decode_threads = 1  # CPU: still one actor per core, now with one decode thread each
    placement = placing.plan_placement(cfg)
    assert (placement.device, placement.num_workers, placement.decode_threads) == ("cpu", 4, 1)
    cfg.runtime.cpus_per_worker = 2.0  # two torch threads and two CPUs reserved per actor: one per 2 cores
    placement = placing.plan_placement(cfg)
    assert (placement.num_workers, placement.torch_threads, placement.actor_options["num_cpus"]) == (2, 2, 2.0)


def test_cpu_only_cluster_keeps_two_decode_threads_under_auto(monkeypatch):
    _cluster(monkeypatch, 32.0, 32.0)
    placement = placing.plan_placement(AuditJobConfig())
    assert AuditJobConfig().runtime.decode_threads == "auto"
    assert (placement.num_workers, placement.decode_threads, placement.actor_options["num_cpus"]) == (64, 2, 1.0)


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "many", None])
def test_decode_threads_must_be_auto_or_a_positive_integer(bad):
    from ssim_ray.config import RuntimeConfig

    with pytest.raises(ValueError, match=r"runtime.decode_threads must be 'auto' or a positive integer"):
        RuntimeConfig(decode_threads=bad)
    assert RuntimeConfig(decode_threads=3).decode_threads == 3


# ------------------------------------------------------------------------------------------------------
# Actors sized to what the cluster can place (issue 12, point 6)
# ------------------------------------------------------------------------------------------------------

def _nodes(monkeypatch, *resources: dict) -> None:
    nodes = [{"Alive": True, "Resources": dict(r)} for r in resources]
    nodes.append({"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}})  # a dead node offers nothing
    totals: dict = {}
    for r in resources:
        for key, value in r.items():
            totals[key] = totals.get(key, 0.0) + value
    monkeypatch.setattr(placing.ray, "nodes", lambda: nodes)
    monkeypatch.setattr(placing.ray, "cluster_resources", lambda: totals)


def test_more_workers_than_the_cluster_can_place_are_reduced_with_a_warning(monkeypatch):
    """Point 6: num_workers=3 on a 2-CPU machine left one actor unplaceable and the run hung at 16/24."""
    _cluster(monkeypatch, 2.0)
    cfg = AuditJobConfig()
    cfg.runtime.num_workers = 3
    with pytest.warns(placing.PlacementWarning) as caught:
        placement = placing.plan_placement(cfg)
    assert placement.num_workers == 2
    assert placement.memory_share == pytest.approx(0.5)  # the share follows the actors really started
    message = str(caught[0].message)
    assert "runtime.num_workers=3 asks for 3 actors of 1 CPU" in message
    assert "the cluster can place 2: using 2" in message


def test_spread_cpu_actors_count_what_fits_on_each_node_not_the_cluster_total(monkeypatch):
    _nodes(monkeypatch, {"CPU": 3.0}, {"CPU": 1.0})  # 4 CPUs in all, but an actor of 2 fits on one node only
    cfg = AuditJobConfig()
    cfg.runtime.num_workers, cfg.runtime.cpus_per_worker = 2, 2.0
    with pytest.warns(placing.PlacementWarning, match=r"can place 1: using 1"):
        assert placing.plan_placement(cfg).num_workers == 1


def test_gpu_actors_fit_per_node_by_gpus_and_cpus(monkeypatch):
    # Two nodes of 1 GPU: 0.6 GPU per actor fits once per node (2), not 2 / 0.6 = 3 times.
    _nodes(monkeypatch, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0})
    cfg = AuditJobConfig()
    cfg.runtime.gpus_per_worker = 0.6
    # decode_threads=auto: each node holds one such actor, which reserves (8 - 1) CPUs.
    with pytest.warns(placing.PlacementWarning, match=r"asks for 3 actors of 7 CPU \+ 0.6 GPU.*using 2"):
        assert placing.plan_placement(cfg).num_workers == 2
    # Half a GPU each would fit twice on a node's GPU, but the node has one CPU for them.
    _nodes(monkeypatch, {"CPU": 1.0, "GPU": 1.0})
    cfg.runtime.gpus_per_worker, cfg.runtime.num_workers = 0.5, None
    with pytest.warns(placing.PlacementWarning, match="using 1"):
        assert placing.plan_placement(cfg).num_workers == 1


def test_an_actor_no_node_can_place_fails_before_any_work(monkeypatch):
    _nodes(monkeypatch, {"CPU": 2.0}, {"CPU": 2.0})
    cfg = AuditJobConfig()
    cfg.runtime.cpus_per_worker = 4.0
    with pytest.raises(placing.PlacementError, match=r"no alive node can place one actor of 4 CPU.*2, 2 CPU"):
        placing.plan_placement(cfg)


def test_a_placement_that_fits_says_nothing(monkeypatch, recwarn):
    _nodes(monkeypatch, {"CPU": 4.0}, {"CPU": 4.0})
    cfg = AuditJobConfig()
    cfg.runtime.num_workers = 8
    assert placing.plan_placement(cfg).num_workers == 8
    assert not [w for w in recwarn if issubclass(w.category, placing.PlacementWarning)]


def test_scale_on_paper_takes_decode_capacity_from_the_placement_rule(monkeypatch):
    """scripts/scale_on_paper.py imports the rule: changing it in placement.py changes the script's node."""
    import argparse
    import runpy

    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "scale_on_paper.py"), run_name="scale_on_paper")
    args = script["parse_args"](["--decode-ms", "10", "--cpu-ssim-ms", "5", "--dispatch-ms", "1",
                                 "--cores-per-node", "96", "--gpus-per-node", "8"])
    assert isinstance(args, argparse.Namespace)
    threads = placing.actor_decode_threads(
        "auto", device="cuda", reserved_cpus=placing.gpu_actor_cpus(96, 8, gpus_per_worker=1, cpus_per_worker=1))
    rate, layout = script["node_decode"](args, gpu=True)
    assert rate == pytest.approx(8 * threads * 1e3 / 10)
    assert f"8 GPU actors x {threads} decode threads" in layout
    monkeypatch.setattr(placing, "RAY_RESERVE_CPUS", 17)  # (96 - 17) // 8 = 9 threads per actor
    assert script["node_decode"](args, gpu=True)[0] == pytest.approx(8 * 9 * 1e3 / 10)
    args.gil_cores = 4.0  # one actor's threads capped by the GIL
    assert script["node_decode"](args, gpu=True)[0] == pytest.approx(8 * 4 * 1e3 / 10)


def test_scale_on_paper_models_the_merge_from_the_measured_costs_and_the_merge_rules():
    """The merge model reads scripts/merge_costs.json (bench_merge.py's fit) and the merge's own block rule."""
    import json
    import runpy

    from pathlib import Path

    from ssim_ray.output.merge import SINGLE_FILE_MAX_ROWS, block_rows_for

    scripts = Path(__file__).parents[1] / "scripts"
    script = runpy.run_path(str(scripts / "scale_on_paper.py"), run_name="scale_on_paper")
    costs = json.loads((scripts / "merge_costs.json").read_text())
    model = script["MergeModel"].from_costs(costs)
    rows, parts = 100_000_000, 390_625
    assert rows > SINGLE_FILE_MAX_ROWS
    blocks = rows / block_rows_for(rows)
    seconds, how = model.seconds(rows=rows, parts=parts, cpus=4096)
    task, measured = costs["ray_task_work"], costs["per_part_measured"]
    # The row-count fit's per-part term is an intercept (all its points at one part count): the model takes
    # the measured per-part costs, and keeps the rest of that intercept as the driver's fixed cost.
    fit_parts = costs["measurements"][0]["parts"]
    assert all(m["parts"] == fit_parts for m in costs["measurements"])
    fixed = (costs["ray_driver_file"]["per_part_s"] - measured["driver_combine_file"]["per_part_s"]) * fit_parts
    assert fixed > 0
    expected = (costs["ray_start_s"] + fixed + parts * measured["driver_combine_folder"]["per_part_s"]
                + rows * costs["ray_driver_folder_per_row_s"]
                + (parts * measured["ray_task_work"]["per_part_s"]
                   + rows * (task["per_row_s"] + costs["folder_task_extra_per_row_s"])) / blocks)
    assert seconds == pytest.approx(expected) and "a folder of files" in how
    one_process = (parts * measured["one_process_merge"]["per_part_s"]
                   + rows * costs["one_process_merge"]["per_row_s"])
    assert seconds < one_process  # the parallel merge is the faster one on a cluster
    assert model.seconds(rows=rows, parts=parts, cpus=2)[0] > seconds  # and it uses the cluster's CPUs
