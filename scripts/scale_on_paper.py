"""Scale on paper: a 100-million-pair audit on N nodes, from per-pair and per-shard costs measured here.

Nothing in this script runs the job; it combines figures measured by the other benchmark scripts (pass
your own with the flags; the defaults are the figures in docs/BENCHMARKS.md, named below):

- job efficiency: the job's pairs/s over the combined bound 1/(t_decode + t_ssim) (bench_job.py), applied
  to every node;
- decode: Pillow CPU ms per 512² RGB pair, PNG and JPEG mixed (bench_job.py, "decode only" row);
- CPU SSIM: ssim_ray CPU ms per pair on the same pairs (bench_job.py, "SSIM only" row);
- GPU SSIM: ms per pair on the GPU (scripts/gpu_check.sh). **Not measured yet**: without `--gpu-ms`, a
  GPU node is taken to keep up with its CPUs' decoding, so GPU-node times are lower bounds;
- driver: CPU ms per shard to dispatch and collect one shard (bench_job.py --dispatch);
- planning: ~410 bytes and ~17 µs per shard on the driver (bench_plan.py, 15,625 shards: 6.4 MiB, 0.27 s);
- merge: ~2 ms per part file plus ~1 µs per row, and 12 bytes per ok row for exact percentiles
  (bench_report.py, 1M rows in 1,000 parts: 2.9 s).

For each cluster size it prints the audit's time, node-hours, and the rate each shared component would have
to sustain, so the first one to saturate can be read off. Cost = node-hours x your price per node-hour
(`--price`, none by default: prices are not measured).
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=float, default=1e8)
    p.add_argument("--pairs-per-shard", type=int, default=256)
    p.add_argument("--nodes", type=int, nargs="*", default=[1, 8, 32, 128])
    p.add_argument("--cores-per-node", type=int, default=32, help="CPU cores of one node (decode)")
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--decode-ms", type=float, required=True, help="CPU ms per pair to fetch+decode (measured)")
    p.add_argument("--cpu-ssim-ms", type=float, required=True, help="CPU ms per pair of ssim_ray (measured)")
    p.add_argument("--gpu-ms", type=float, default=None, help="GPU ms per pair (not measured here)")
    p.add_argument("--dispatch-ms", type=float, required=True, help="driver CPU ms per shard (measured)")
    p.add_argument("--plan-us-per-shard", type=float, default=17.0)
    p.add_argument("--plan-bytes-per-shard", type=float, default=410.0)
    p.add_argument("--merge-ms-per-part", type=float, default=2.0)
    p.add_argument("--merge-us-per-row", type=float, default=1.0)
    p.add_argument("--merge-bytes-per-row", type=float, default=12.0)
    p.add_argument("--job-efficiency", type=float, default=1.0,
                   help="the job's measured share of the combined bound (bench_job.py)")
    p.add_argument("--price", type=float, default=None, help="price per node-hour, for a cost column")
    return p.parse_args(argv)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(argv: Optional[Sequence[str]] = None) -> None:
    a = parse_args(argv)
    shards = a.pairs / a.pairs_per_shard
    driver_pairs_per_s = a.pairs_per_shard * 1e3 / a.dispatch_ms
    plan_s = shards * a.plan_us_per_shard * 1e-6
    merge_s = shards * a.merge_ms_per_part * 1e-3 + a.pairs * a.merge_us_per_row * 1e-6
    print(f"{a.pairs:,.0f} pairs in {shards:,.0f} shards of {a.pairs_per_shard}; nodes of {a.cores_per_node} cores"
          f" and {a.gpus_per_node} GPU(s)")
    print(f"driver: plan {plan_s:.0f} s, {shards * a.plan_bytes_per_shard / 2**20:,.0f} MiB of shards; dispatch "
          f"cap {driver_pairs_per_s:,.0f} pairs/s ({a.dispatch_ms:.2f} CPU ms per shard); merge {hours(merge_s)} "
          f"single-threaded, {a.pairs * a.merge_bytes_per_row / 2**30:.1f} GiB for exact percentiles\n")
    price = f" | cost at {a.price:g}/node-hour" if a.price else ""
    print(f"| nodes | node rate, pairs/s | bound by | cluster pairs/s | share of driver cap | compute time | "
          f"+ plan + merge | node-hours{price} |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if a.price else ""))
    for cpu_only in (True, False):
        for n in a.nodes:
            decode_rate = a.job_efficiency * a.cores_per_node * 1e3 / (a.decode_ms + (a.cpu_ssim_ms if cpu_only else 0.0))
            if cpu_only:
                rate, bound = decode_rate, "CPU: decode + SSIM share the cores"
            elif a.gpu_ms is None:
                rate, bound = decode_rate, "CPU decode (GPU SSIM not measured: lower bound on time)"
            else:
                gpu_rate = a.gpus_per_node * 1e3 / a.gpu_ms
                rate, bound = min(decode_rate, gpu_rate), "GPU" if gpu_rate < decode_rate else "CPU decode"
            cluster = min(n * rate, driver_pairs_per_s)
            if n * rate > driver_pairs_per_s:
                bound += "; DRIVER dispatch caps the cluster"
            compute_s = a.pairs / cluster
            total_s = compute_s + plan_s + merge_s
            node_h = n * total_s / 3600
            cost = f" | {node_h * a.price:,.0f}" if a.price else ""
            kind = "CPU" if cpu_only else "GPU"
            print(f"| {n} {kind} | {rate:,.0f} | {bound} | {cluster:,.0f} | {n * rate / driver_pairs_per_s:.2f} | "
                  f"{hours(compute_s)} | {hours(total_s)} | {node_h:,.0f}{cost} |")


if __name__ == "__main__":
    main()
