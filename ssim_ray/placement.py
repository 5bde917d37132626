"""Where actors run and how many: Ray connection, device choice, actor count and resources per actor.

One actor per GPU (or per `runtime.gpus_per_worker`); on CPU-only clusters, unless `runtime.num_workers`
is set, `cpu_actors` per node (one per core), spread over the nodes. Each actor runs `cpus_per_worker` torch threads and
`actor_decode_threads` fetch-and-decode threads: with `runtime.decode_threads=auto` (the default) a GPU actor
reserves and decodes on its node's CPUs divided among the node's GPU actors (`gpu_actor_cpus`), a CPU actor
keeps `CPU_DECODE_THREADS`; an integer is used as given. This module is the one home of that rule
(scripts/scale_on_paper.py imports it).

Never more actors than the alive nodes can hold: an actor Ray cannot place waits forever for resources,
so the count is reduced to what fits node by node (`actors_that_fit`), with a `PlacementWarning` naming
the reduction, and a placement where not one actor fits is refused (`PlacementError`) before any work.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import ray

from ssim_ray.config import AuditJobConfig


# Tolerance when dividing a node's resources by an actor's: 0.1 CPU ten times must fit in 1 CPU.
_FIT_EPSILON = 1e-9
_RESOURCE_UNITS = (("CPU", "num_cpus"), ("GPU", "num_gpus"))
# CPUs of each node not handed to GPU actors under decode_threads=auto: Ray's own processes (raylet, object
# manager, log monitor; GCS and the driver on the head) and the part-file writes need a core, and a
# decode thread that shares one with them is descheduled at random, stalling its actor's ordered stream.
RAY_RESERVE_CPUS = 1
# Decode threads of an actor under decode_threads=auto on a CPU-only cluster (the rule before `auto`): a
# CPU actor (one per core, see cpu_actors) decodes on 2 threads beside its torch thread, so that fetches
# that wait on storage overlap with decoding. Also the least a GPU actor gets.
CPU_DECODE_THREADS = 2


class PlacementWarning(UserWarning):
    """Fewer actors than asked for: the alive nodes cannot place more."""


class PlacementError(RuntimeError):
    """Not one actor fits on any alive node: refused before any work."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where actors run and how many."""

    device: str
    num_workers: int
    actor_options: Dict[str, Any]
    torch_threads: int
    memory_share: float
    decode_threads: int = CPU_DECODE_THREADS  # fetch-and-decode threads of each actor (WorkerSpec.decode_threads)


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

    CPU actors, unless `runtime.num_workers` is set: `cpu_actors` per node (one per `cpus_per_worker` CPUs),
    spread over the nodes. Each runs `cpus_per_worker` torch threads and `actor_decode_threads` decode threads. A GPU actor under
    `runtime.decode_threads=auto` reserves `min_gpu_actor_cpus` CPUs and decodes on as many threads; with
    an integer it reserves `cpus_per_worker` CPUs, as before `auto`. The count is then reduced to what the
    alive nodes can place (`fit_to_cluster`).

    Raises:
        RuntimeError: `runtime.device=cuda` on a cluster without GPUs.
        PlacementError: no alive node can place a single actor.
    """
    runtime = cfg.runtime
    torch_threads = max(1, int(runtime.cpus_per_worker))
    gpus = ray.cluster_resources().get("GPU", 0.0)
    device = runtime.device
    if device == "auto":
        device = "cuda" if gpus > 0 and runtime.gpus_per_worker > 0 else "cpu"
    nodes = alive_node_resources()
    if device == "cuda":
        if gpus <= 0:
            raise RuntimeError("runtime.device=cuda, but the Ray cluster reports no GPU")
        requested = runtime.num_workers or max(1, int(gpus // runtime.gpus_per_worker))
        cpus = runtime.cpus_per_worker
        if runtime.decode_threads == "auto":
            cpus = min_gpu_actor_cpus(nodes, gpus_per_worker=runtime.gpus_per_worker,
                                      cpus_per_worker=runtime.cpus_per_worker)
        options = {"num_gpus": runtime.gpus_per_worker, "num_cpus": cpus}
        num_workers = fit_to_cluster(requested, options, nodes, asked=_asked(runtime.num_workers, "one per GPU"))
        share = min(1.0, runtime.gpus_per_worker)
    else:
        node_cpus = [node["CPU"] for node in nodes if node.get("CPU")]
        requested = runtime.num_workers or cpu_actors(node_cpus, torch_threads=torch_threads)
        # Spread over the nodes: Ray's default packs actors onto one node until half its CPUs are taken.
        options = {"num_cpus": runtime.cpus_per_worker, "scheduling_strategy": "SPREAD"}
        asked = _asked(runtime.num_workers, f"one per {torch_threads} CPU{'s' if torch_threads > 1 else ''} of each node")
        num_workers = fit_to_cluster(requested, options, nodes, asked=asked)
        share = 1.0 / max(1, math.ceil(num_workers / max(1, len(node_cpus))))
    threads = actor_decode_threads(runtime.decode_threads, device=device, reserved_cpus=options["num_cpus"])
    return Placement(device, num_workers, options, torch_threads, share, threads)


def alive_node_resources() -> List[Dict[str, float]]:
    """Each alive node's total resources (CPU, GPU, ...), from `ray.nodes()`; dead nodes left out."""
    return [dict(node.get("Resources") or {}) for node in ray.nodes() if node.get("Alive")]


def _asked(num_workers: Optional[int], default_rule: str) -> str:
    if num_workers:
        return f"runtime.num_workers={num_workers}"
    return f"the default ({default_rule}, runtime.num_workers=null)"


def _per_actor(options: Mapping[str, Any]) -> Dict[str, float]:
    return {resource: float(options[key]) for resource, key in _RESOURCE_UNITS if options.get(key)}


def _describe(per_actor: Mapping[str, float]) -> str:
    return " + ".join(f"{amount:g} {resource}" for resource, amount in per_actor.items()) or "no resources"


def actors_that_fit(per_actor: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> List[int]:
    """How many actors needing `per_actor` resources each alive node can hold (an actor never spans nodes).

    Args:
        per_actor: resources of one actor, e.g. {"CPU": 1.0, "GPU": 0.5}.
        nodes: each node's total resources (`alive_node_resources()`).

    Returns:
        Actors per node, in node order.

    Example:
        >>> actors_that_fit({"CPU": 2.0}, [{"CPU": 3.0}, {"CPU": 1.0}])
        [1, 0]
        >>> actors_that_fit({"CPU": 1.0, "GPU": 0.5}, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 2.0}])
        [2, 1]
    """
    counts = []
    for node in nodes:
        fits = [math.floor(node.get(resource, 0.0) / amount + _FIT_EPSILON) for resource, amount in per_actor.items()]
        counts.append(max(0, min(fits)) if fits else 0)
    return counts


def fit_to_cluster(requested: int, options: Mapping[str, Any], nodes: Sequence[Mapping[str, float]], *,
                   asked: str) -> int:
    """The number of actors to start: `requested`, or as many as the alive nodes can place if fewer.

    An actor Ray cannot place waits for resources forever; shards handed to it would never finish. So the
    count is reduced here, with a PlacementWarning naming the reduction.

    Args:
        requested: actors asked for.
        options: the actor's Ray options (`num_cpus`, `num_gpus`).
        nodes: each alive node's total resources.
        asked: who asked, for the messages (e.g. "runtime.num_workers=3").

    Returns:
        min(requested, actors that fit), at least 1.

    Raises:
        PlacementError: not one actor fits on any alive node.

    Example:
        >>> fit_to_cluster(2, {"num_cpus": 1.0}, [{"CPU": 4.0}], asked="runtime.num_workers=2")
        2
    """
    per_actor = _per_actor(options)
    counts = actors_that_fit(per_actor, nodes)
    capacity = sum(counts)
    offered = ", ".join(f"{node.get(resource, 0.0):g}" for node in nodes for resource in per_actor
                        if resource == "CPU") or "none"
    gpus = [f"{node.get('GPU', 0.0):g}" for node in nodes]
    offer = f"alive nodes have {offered} CPU" + (f" and {', '.join(gpus)} GPU" if "GPU" in per_actor else "")
    if capacity == 0:
        raise PlacementError(
            f"{asked}: no alive node can place one actor of {_describe(per_actor)} ({offer}); lower "
            "runtime.cpus_per_worker / runtime.gpus_per_worker or add a larger node"
        )
    if requested <= capacity:
        return requested
    warnings.warn(
        f"{asked} asks for {requested} actors of {_describe(per_actor)}; {offer} (actors per node: "
        f"{', '.join(map(str, counts))}), so the cluster can place {capacity}: using {capacity}",
        PlacementWarning, stacklevel=3,
    )
    return capacity


def cpu_actors(node_cpus: List[float], *, torch_threads: int) -> int:
    """CPU actors for a cluster: on each node, one per `torch_threads` CPUs (one per core by default).

    Each actor computes on its main thread (plus a pool of `torch_threads` for the tile kernel) and decodes
    on its own threads, which wait whenever its queue of decoded pairs is full. An actor's compute is held
    to about one core by the GIL its Python steps share with its decode threads, and a pair's compute costs
    about as much CPU as its decoding (measured on 512² RGB pairs: 15-16 ms for [ssim, psnr, ms_ssim], 16
    ms to decode), so a node needs compute threads on every core to keep its cores busy whichever side is
    behind. Measured with `scripts/bench_job.py` on 2 shared cores (2,048 pairs, all three metrics): one
    actor (the earlier rule, one per 1 torch + 2 decode threads) reached 0.70-0.74 of the combined bound,
    using ~1.3 cores, its main thread busy 95% of the time at 2/3 of its alone speed; two actors 0.84-0.86
    (10% more CPU per pair for the second actor's fixed costs, more than repaid).

    Example:
        >>> cpu_actors([2.0], torch_threads=1), cpu_actors([32.0, 32.0], torch_threads=1), cpu_actors([4.0], torch_threads=2)
        (2, 64, 2)
    """
    return max(1, sum(math.ceil(cpus / max(1, torch_threads)) for cpus in node_cpus))


def gpu_actor_cpus(node_cpus: float, node_gpus: float, *, gpus_per_worker: float, cpus_per_worker: float) -> float:
    """CPUs a GPU actor on this node reserves under `runtime.decode_threads=auto`.

    The node's CPUs less `RAY_RESERVE_CPUS`, divided among the GPU actors the node holds, rounded down,
    and never below `cpus_per_worker` (the reservation before `auto`). Decoding a 512² RGB pair costs ~10 ms
    of a core, so one reserved CPU fed a GPU actor ~100 pairs/s whatever the GPU could score; it is now fed
    by as many cores as its node can give it.

    Args:
        node_cpus: the node's CPUs (Ray's `CPU` resource).
        node_gpus: the node's GPUs.
        gpus_per_worker: GPUs per actor (`runtime.gpus_per_worker`).
        cpus_per_worker: the least an actor reserves (`runtime.cpus_per_worker`).

    Returns:
        CPUs per GPU actor, or 0.0 for a node that holds no GPU actor.

    Example:
        >>> gpu_actor_cpus(8, 2, gpus_per_worker=1, cpus_per_worker=1), gpu_actor_cpus(96, 8, gpus_per_worker=1, cpus_per_worker=1)
        (3.0, 11.0)
        >>> gpu_actor_cpus(8, 8, gpus_per_worker=1, cpus_per_worker=1), gpu_actor_cpus(64, 0, gpus_per_worker=1, cpus_per_worker=1)
        (1.0, 0.0)
    """
    actors = math.floor(node_gpus / gpus_per_worker + _FIT_EPSILON)
    if actors < 1:
        return 0.0
    share = math.floor((node_cpus - RAY_RESERVE_CPUS) / actors + _FIT_EPSILON)
    return float(max(cpus_per_worker, share))


def min_gpu_actor_cpus(nodes: Sequence[Mapping[str, float]], *, gpus_per_worker: float, cpus_per_worker: float) -> float:
    """One CPU reservation for every GPU actor: the smallest `gpu_actor_cpus` over the nodes with GPUs.

    All actors share one set of Ray options and Ray picks their nodes, so the reservation must fit on the
    GPU node with the fewest CPUs per GPU actor; larger GPU nodes keep the rest idle (or for other work).
    Nodes without a GPU actor do not count.

    Example:
        >>> min_gpu_actor_cpus([{"CPU": 8.0, "GPU": 2.0}, {"CPU": 32.0, "GPU": 2.0}, {"CPU": 64.0}],
        ...                    gpus_per_worker=1.0, cpus_per_worker=1.0)
        3.0
    """
    shares = [gpu_actor_cpus(node.get("CPU", 0.0), node.get("GPU", 0.0), gpus_per_worker=gpus_per_worker,
                             cpus_per_worker=cpus_per_worker) for node in nodes]
    return min((share for share in shares if share > 0), default=float(cpus_per_worker))


def actor_decode_threads(setting: Union[int, str], *, device: str, reserved_cpus: float = 1.0) -> int:
    """Fetch-and-decode threads of one actor, from `runtime.decode_threads`.

    An integer is used as given. `auto`: a GPU actor decodes on every CPU it reserved (its main thread
    mostly waits for decoded pairs and the GPU), but never on fewer than `CPU_DECODE_THREADS`; a CPU actor
    keeps `CPU_DECODE_THREADS` beside its torch thread.
    Threads rather than processes or decode actors: Pillow releases the GIL while it decodes, and pixels
    then need no copy between processes (docs/ARCHITECTURE.md, "Decode capacity", has the measurements).

    Args:
        setting: a positive integer, or "auto".
        device: "cuda" or "cpu": the actor's device.
        reserved_cpus: the CPUs the actor reserves (its `num_cpus`).

    Example:
        >>> actor_decode_threads("auto", device="cuda", reserved_cpus=11.0), actor_decode_threads("auto", device="cpu")
        (11, 2)
        >>> actor_decode_threads(5, device="cuda", reserved_cpus=1.0)
        5
    """
    if setting != "auto":
        return int(setting)
    if device == "cuda":
        return max(CPU_DECODE_THREADS, int(reserved_cpus))
    return CPU_DECODE_THREADS
