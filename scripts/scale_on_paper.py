"""Scale on paper: a 100-million-pair audit on N nodes, from per-pair and per-shard costs measured here.

Nothing in this script runs the job; it combines figures measured by the other benchmark scripts (pass
your own with the flags; the defaults are the figures in docs/BENCHMARKS.md, named below) with the decode
capacity the job really gives each node, taken from `ssim_ray.placement` (the one home of that rule):
a CPU node runs `cpu_actors` actors (one per core) of 1 torch + `actor_decode_threads` decode threads; a GPU node runs one
actor per GPU, each decoding on `actor_decode_threads(..., reserved_cpus=gpu_actor_cpus(...))` threads.

- job efficiency: the job's pairs/s over the combined bound 1/(t_decode + t_ssim) (bench_job.py), applied
  to every node;
- decode: Pillow CPU ms per 512² RGB pair, PNG and JPEG mixed (bench_job.py, "decode only" row), and the
  cores' worth of decoding one actor's threads reach before the GIL serialises them (bench_decode.py);
- CPU SSIM: ssim_ray CPU ms per pair on the same pairs (bench_job.py, "SSIM only" row);
- GPU SSIM: ms per pair on one GPU (scripts/gpu_check.sh). **Not measured yet**: without `--gpu-ms` the GPU
  column says so and GPU-node times are lower bounds;
- storage bandwidth: encoded bytes per pair (bench_decode.py) against each node's network and, if given,
  the store's aggregate throughput — both **assumptions**, not measured here (no real store);
- driver: CPU ms per shard to dispatch and collect one shard (bench_job.py --dispatch);
- planning: ~410 bytes and ~17 µs per shard on the driver (bench_plan.py, 15,625 shards: 6.4 MiB, 0.27 s);
- merge: `MergeModel` below, a phase after the compute, from the CPU costs scripts/bench_merge.py measured
  (scripts/merge_costs.json) and the merge's own rules (`ssim_ray.output.merge`: blocks per merge, the row count
  above which ssim.parquet becomes a folder; `ssim_ray.merge_tasks.RAY_MERGE_MIN_ROWS`): the driver's share
  (folding each part's statistics, writing one file or not) plus the tasks' share spread over the cluster's CPUs,
  at most one task per block.

For each cluster size it prints each component's capacity in pairs/s and which saturates first. Cost =
node-hours x your price per node-hour (`--price`, none by default: prices are not measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from ssim_ray.merge_tasks import RAY_MERGE_MIN_ROWS
from ssim_ray.output.merge import SINGLE_FILE_MAX_ROWS, block_rows_for
from ssim_ray.placement import RAY_RESERVE_CPUS, actor_decode_threads, cpu_actors, gpu_actor_cpus

MERGE_COSTS = Path(__file__).with_name("merge_costs.json")  # written by scripts/bench_merge.py


@dataclasses.dataclass(frozen=True)
class MergeModel:
    """The merge after the compute, in seconds, from CPU costs measured by scripts/bench_merge.py.

    Below RAY_MERGE_MIN_ROWS the merge is one process on the driver (`one_process`). Above, Ray tasks read,
    check and summarise blocks of parts (`task`, shared by the cluster's CPUs, at most one per block) and the
    driver combines the blocks in plan order (statistics, the moments' trail per part, exact-percentile
    scores) and, up to SINGLE_FILE_MAX_ROWS, writes the one file (`driver_file`); above that the tasks write
    a folder of files (`task_folder_extra_row_s` more per row) and the driver only combines
    (`driver_folder`). Each is (per part s, per row s) plus, for the driver, `driver_fixed_s` (its Ray
    client, planning, publishing: what the row-count fit's intercept holds). Per-part costs are
    bench_merge.py's `per_part_measured` (the row count held, the part count varied) where present: the
    row-count fit has every point at one part count, so its own per-part term is that intercept spread over
    the parts, not a cost per part. Conservative: the driver's and the tasks' shares are added, though they
    overlap in the job.
    """

    one_process: Tuple[float, float]  # (per part s, per row s)
    task: Tuple[float, float]
    driver_file: Tuple[float, float]
    driver_folder: Tuple[float, float]
    driver_fixed_s: float
    task_folder_extra_row_s: float
    start_s: float
    bytes_per_row: float = 12.0

    @classmethod
    def from_costs(cls, costs: dict, *, bytes_per_row: float = 12.0) -> "MergeModel":
        measured = costs.get("per_part_measured", {})
        fit_parts = costs["measurements"][0]["parts"]  # the part count of the row-count fit's points

        def per_part(step: str, fitted: float) -> float:
            return measured[step]["per_part_s"] if step in measured else fitted

        one, task, driver = (costs[k] for k in ("one_process_merge", "ray_task_work", "ray_driver_file"))
        driver_file_part = per_part("driver_combine_file", driver["per_part_s"])
        # The fit's intercept less what the measured per-part combining explains of it.
        fixed = max(0.0, (driver["per_part_s"] - driver_file_part) * fit_parts)
        return cls((per_part("one_process_merge", one["per_part_s"]), one["per_row_s"]),
                   (per_part("ray_task_work", task["per_part_s"]), task["per_row_s"]),
                   (driver_file_part, driver["per_row_s"]),
                   (per_part("driver_combine_folder", driver["per_part_s"]), costs["ray_driver_folder_per_row_s"]),
                   fixed, costs["folder_task_extra_per_row_s"], costs["ray_start_s"], bytes_per_row)

    def seconds(self, *, rows: float, parts: float, cpus: float) -> Tuple[float, str]:
        """(wall seconds, how) to merge `rows` rows from `parts` part files on a cluster of `cpus` CPUs."""
        if rows < RAY_MERGE_MIN_ROWS:
            return parts * self.one_process[0] + rows * self.one_process[1], "one process on the driver"
        blocks = max(1.0, rows / block_rows_for(int(rows)))
        workers = max(1.0, min(cpus, blocks))
        folder = rows > SINGLE_FILE_MAX_ROWS
        task_row = self.task[1] + (self.task_folder_extra_row_s if folder else 0.0)
        tasks = (parts * self.task[0] + rows * task_row) / workers
        per_part, per_row = self.driver_folder if folder else self.driver_file
        driver = self.driver_fixed_s + parts * per_part + rows * per_row
        how = f"{blocks:,.0f} Ray tasks on {workers:,.0f} CPUs, {'a folder of files' if folder else 'one file'}"
        return self.start_s + driver + tasks, how


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=float, default=1e8)
    p.add_argument("--pairs-per-shard", type=int, default=256)
    p.add_argument("--nodes", type=int, nargs="*", default=[1, 8, 32, 128])
    p.add_argument("--cores-per-node", type=int, default=32, help="CPUs of one node (Ray's CPU resource)")
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=1.0, help="runtime.gpus_per_worker (0.5: two actors per GPU)")
    p.add_argument("--decode-threads", default="auto",
                   help="runtime.decode_threads: auto (the default) or an integer, as the job would be run")
    p.add_argument("--decode-ms", type=float, required=True, help="CPU ms per pair to fetch+decode (measured)")
    p.add_argument("--gil-cores", type=float, default=None,
                   help="cores' worth of decoding one actor's threads reach before the GIL serialises them: "
                        "CPU per pair / GIL-held time per pair (bench_decode.py); none: no cap")
    p.add_argument("--cpu-ssim-ms", type=float, required=True, help="CPU ms per pair of ssim_ray (measured)")
    p.add_argument("--gpu-ms", type=float, default=None, help="GPU ms per pair on one GPU (not measured here)")
    p.add_argument("--encoded-kib-per-pair", type=float, default=None,
                   help="encoded KiB fetched per pair (bench_decode.py prints it)")
    p.add_argument("--node-gbit", type=float, default=25.0, help="ASSUMED network of a node, Gbit/s")
    p.add_argument("--store-gbyte-s", type=float, default=None, help="ASSUMED aggregate store throughput, GB/s")
    p.add_argument("--dispatch-ms", type=float, required=True, help="driver CPU ms per shard (measured)")
    p.add_argument("--plan-us-per-shard", type=float, default=17.0)
    p.add_argument("--plan-bytes-per-shard", type=float, default=410.0)
    p.add_argument("--merge-costs", type=Path, default=MERGE_COSTS, help="scripts/bench_merge.py's measured costs")
    p.add_argument("--merge-bytes-per-row", type=float, default=12.0, help="MergeModel.bytes_per_row")
    p.add_argument("--job-efficiency", type=float, default=1.0,
                   help="the job's measured share of the combined bound (bench_job.py)")
    p.add_argument("--price", type=float, default=None, help="price per node-hour, for a cost column")
    args = p.parse_args(argv)
    if args.decode_threads != "auto":
        args.decode_threads = int(args.decode_threads)
    return args


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def node_decode(a: argparse.Namespace, *, gpu: bool) -> Tuple[float, str]:
    """(pairs/s one node decodes, how the job lays its decoding out), from the placement's own rule."""
    cores = float(a.cores_per_node)
    if not gpu:
        actors = cpu_actors([cores], torch_threads=1)
        threads = actor_decode_threads(a.decode_threads, device="cpu")
        # Decode and SSIM share the node's cores: an actor per core, its decode threads beside it.
        busy = min(cores, actors * (1 + threads))
        rate = a.job_efficiency * busy * 1e3 / (a.decode_ms + a.cpu_ssim_ms)
        return rate, f"{actors} actors x (1 torch + {threads} decode threads)"
    actors = int(a.gpus_per_node / a.gpus_per_worker + 1e-9)
    reserved = gpu_actor_cpus(cores, float(a.gpus_per_node), gpus_per_worker=a.gpus_per_worker, cpus_per_worker=1.0)
    if a.decode_threads != "auto":
        reserved = 1.0  # an explicit integer keeps the reservation before `auto` (cpus_per_worker)
    threads = actor_decode_threads(a.decode_threads, device="cuda", reserved_cpus=reserved)
    busy = min(threads, cores / actors, a.gil_cores or float("inf"))
    per_actor = busy * 1e3 / a.decode_ms
    return a.job_efficiency * actors * per_actor, f"{actors} GPU actors x {threads} decode threads ({reserved:g} CPUs reserved)"


def capacities(a: argparse.Namespace, n: int, *, gpu: bool, merge_s: float) -> Dict[str, Optional[float]]:
    """Pairs/s each component sustains on n nodes (None: not measured, no bound assumed)."""
    decode, _ = node_decode(a, gpu=gpu)
    caps: Dict[str, Optional[float]] = {"decode": n * decode}
    caps["GPU compute"] = (n * a.gpus_per_node * 1e3 / a.gpu_ms if a.gpu_ms else None) if gpu else None
    if a.encoded_kib_per_pair:
        pair_bytes = a.encoded_kib_per_pair * 1024
        network = n * a.node_gbit * 1e9 / 8 / pair_bytes
        store = a.store_gbyte_s * 1e9 / pair_bytes if a.store_gbyte_s else None
        caps["storage bandwidth"] = min(x for x in (network, store) if x is not None)
    else:
        caps["storage bandwidth"] = None
    caps["driver dispatch"] = a.pairs_per_shard * 1e3 / a.dispatch_ms
    caps["merge"] = a.pairs / merge_s
    return caps


def main(argv: Optional[Sequence[str]] = None) -> None:
    a = parse_args(argv)
    shards = a.pairs / a.pairs_per_shard
    merge = MergeModel.from_costs(json.loads(a.merge_costs.read_text()), bytes_per_row=a.merge_bytes_per_row)
    plan_s = shards * a.plan_us_per_shard * 1e-6
    print(f"{a.pairs:,.0f} pairs in {shards:,.0f} shards of {a.pairs_per_shard}; nodes of {a.cores_per_node} CPUs "
          f"({RAY_RESERVE_CPUS} left to Ray on GPU nodes) and {a.gpus_per_node} GPU(s); "
          f"runtime.decode_threads={a.decode_threads}")
    for gpu in (False, True):
        print(f"  {'GPU' if gpu else 'CPU'} node: {node_decode(a, gpu=gpu)[1]}")
    print(f"driver: plan {plan_s:.0f} s, {shards * a.plan_bytes_per_shard / 2**20:,.0f} MiB of shards; merge: "
          f"{a.pairs * merge.bytes_per_row / 2**30:.1f} GiB for exact percentiles; one process would take "
          f"{hours(shards * merge.one_process[0] + a.pairs * merge.one_process[1])} (the driver-only merge before)")
    for n in a.nodes:
        seconds, how = merge.seconds(rows=a.pairs, parts=shards, cpus=n * a.cores_per_node)
        print(f"  merge on {n} node(s): {hours(seconds)} ({how})")
    print()
    price = f" | cost at {a.price:g}/node-hour" if a.price else ""
    names = ("decode", "GPU compute", "storage bandwidth", "driver dispatch", "merge")
    print("| nodes | " + " | ".join(f"{name}, pairs/s" for name in names) +
          f" | saturates first | compute | + plan + merge | node-hours{price} |")
    print("|---|" + "---:|" * len(names) + "---|---:|---:|---:|" + ("---:|" if a.price else ""))
    for gpu in (False, True):
        for n in a.nodes:
            merge_s = merge.seconds(rows=a.pairs, parts=shards, cpus=n * a.cores_per_node)[0]
            print(_row(a, n, gpu=gpu, merge_s=merge_s, plan_s=plan_s, names=names))
    print("\nRates are capacities in pairs/s; the compute runs at the smallest of decode, GPU compute, storage and "
          "dispatch; the merge is a phase after it (its column: pairs / merge time). 'not measured': no bound used.")


def _row(a: argparse.Namespace, n: int, *, gpu: bool, merge_s: float, plan_s: float, names) -> str:
    caps = capacities(a, n, gpu=gpu, merge_s=merge_s)
    concurrent = {k: v for k, v in caps.items() if k != "merge" and v is not None}
    first = min(concurrent, key=concurrent.get)
    cluster = concurrent[first]
    compute_s = a.pairs / cluster
    lower_bound = gpu and a.gpu_ms is None
    if merge_s > compute_s:
        first = f"merge ({hours(merge_s)} > compute); then {first}"
    total_s = compute_s + plan_s + merge_s
    node_h = n * total_s / 3600
    ge = "≥ " if lower_bound else ""
    cost = f" | {ge}{node_h * a.price:,.0f}" if a.price else ""
    if lower_bound:
        first += " (GPU compute not measured)"
    cells = " | ".join("—" if (k == "GPU compute" and not gpu) else "not measured" if caps[k] is None
                       else f"{caps[k]:,.0f}" for k in names)
    return (f"| {n} {'GPU' if gpu else 'CPU'} | {cells} | {first} | {ge}{hours(compute_s)} | {ge}{hours(total_s)} | "
            f"{ge}{node_h:,.0f}{cost} |")


if __name__ == "__main__":
    main()
