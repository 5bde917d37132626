"""Decode capacity that follows the node, on a real multi-node Ray (issue 15, point 1).

A `ray.cluster_utils.Cluster` of 2 nodes x 8 CPUs x 2 fake GPUs (Ray's `num_gpus` is a label: no CUDA is
needed). The job's own placement, worker spec and actor class (`run.py`'s path: `plan_placement` ->
`_worker_spec` -> `ray.remote(ShardWorker).options(**placement.actor_options)`) start one actor per GPU;
each actor then loads a shard of real photographs through its own `compute_rows` with SSIM left out (the
batch flush is replaced inside the actor, so nothing runs on a GPU), and reports what Ray reserved for it
and which threads decoded. The rule under `runtime.decode_threads=auto`: (8 CPUs - 1 for Ray) // 2 GPU
actors = 3 CPUs reserved and 3 decode threads per actor; before it, every GPU actor reserved 1 CPU and
decoded on 2 threads, which this test rejects.
"""

from __future__ import annotations

import io
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.cloudpickle
from PIL import Image
from ray.cluster_utils import Cluster

from ssim_ray import placement as placing
from ssim_ray.config import AuditJobConfig
from ssim_ray.run import _worker_spec
from ssim_ray.sources import plan_shards
from ssim_ray.worker import ShardWorker

pytestmark = pytest.mark.slow  # a 2-node Ray and 4 actors importing torch: ~30-60 s on 2 shared cores

NODES, CPUS_PER_NODE, GPUS_PER_NODE = 2, 8, 2


@pytest.fixture(scope="module")
def fake_gpu_cluster():
    node = {"num_cpus": CPUS_PER_NODE, "num_gpus": GPUS_PER_NODE}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    for _ in range(NODES - 1):
        cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    # The actors run `_load_without_scoring`, which Ray's workers cannot import from this test module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield cluster
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        ray.shutdown()
        cluster.shutdown()


def _photo_manifest(path, pairs: int) -> str:
    """Pairs of 256x256 crops of scikit-image's RGB photographs, as PNG (reference) and JPEG (distorted)."""
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    rng = np.random.default_rng(15)
    refs, dists = [], []
    for i in range(pairs):
        photo = photos[i % len(photos)]
        top, left = (int(rng.integers(0, photo.shape[k] - 256)) for k in (0, 1))
        crop = Image.fromarray(np.ascontiguousarray(photo[top : top + 256, left : left + 256]))
        for out, fmt, extra in ((refs, "PNG", {}), (dists, "JPEG", {"quality": 40})):
            buffer = io.BytesIO()
            crop.save(buffer, format=fmt, **extra)
            out.append(buffer.getvalue())
    url = str(path / "pairs.parquet")
    pq.write_table(pa.table({"pair_id": [f"p{i}" for i in range(pairs)], "reference": refs, "distorted": dists}), url)
    return url


def _load_without_scoring(worker, shard) -> dict:
    """Run inside the actor: the worker's own loading path with its batch flush replaced (no SSIM).

    Records each thread that decoded an image and the most decodes in flight at once.
    """
    import threading

    import ssim_ray.sources.loading as loading

    lock, state = threading.Lock(), {"now": 0, "most": 0, "threads": set()}
    real_decode = loading.decode_image

    def counting_decode(*args, **kwargs):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            state["threads"].add(threading.current_thread().name)
        try:
            return real_decode(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    loading.decode_image = counting_decode
    worker.computer._flush = lambda key, bucket, rows: bucket.clear()
    try:
        rows = worker.computer.compute_rows(shard)
    finally:
        loading.decode_image = real_decode
    context = ray.get_runtime_context()
    return {
        "node": context.get_node_id(),
        "reserved": context.get_assigned_resources(),
        "spec_threads": worker.computer.spec.decode_threads,
        "decoding_threads": len(state["threads"]),
        "most_in_flight": state["most"],
        "ok_rows": sum(row["status"] == "ok" for row in rows),
    }


def test_gpu_actors_reserve_and_decode_on_their_share_of_each_node(fake_gpu_cluster, tmp_path):
    cfg = AuditJobConfig()
    assert cfg.runtime.decode_threads == "auto"  # the default under test
    cfg.source.kind, cfg.source.url = "parquet", _photo_manifest(tmp_path, 24)
    expected_cpus = (CPUS_PER_NODE - placing.RAY_RESERVE_CPUS) // GPUS_PER_NODE  # 3

    placement = placing.plan_placement(cfg)
    assert (placement.device, placement.num_workers) == ("cuda", NODES * GPUS_PER_NODE)
    assert placement.actor_options == {"num_gpus": 1.0, "num_cpus": float(expected_cpus)}
    assert placement.decode_threads == expected_cpus

    spec = _worker_spec(cfg, str(tmp_path / "out"), placement)
    assert spec.decode_threads == expected_cpus  # run.py hands the placement's threads to the actors
    actor_class = ray.remote(ShardWorker).options(max_restarts=0, **placement.actor_options)
    actors = [actor_class.remote(spec) for _ in range(placement.num_workers)]
    shard = plan_shards(cfg.source).shards[0]
    reports = ray.get([actor.__ray_call__.remote(_load_without_scoring, shard) for actor in actors], timeout=300)

    # What Ray reserved: 3 CPUs and 1 GPU each, two actors per node, and what is left is the 1-CPU reserve.
    assert [report["reserved"] for report in reports] == [{"CPU": float(expected_cpus), "GPU": 1.0}] * 4
    assert sorted(report["node"] for report in reports).count(reports[0]["node"]) == GPUS_PER_NODE
    left = ray.available_resources()
    assert left.get("CPU", 0.0) == NODES * (CPUS_PER_NODE - GPUS_PER_NODE * expected_cpus)
    assert left.get("GPU", 0.0) == 0.0
    # What each actor decoded with: its spec's threads, every one of them used, several at once.
    for report in reports:
        assert report["ok_rows"] == 24
        assert report["spec_threads"] == report["decoding_threads"] == expected_cpus
        assert report["most_in_flight"] >= 2
    for actor in actors:
        ray.kill(actor)
