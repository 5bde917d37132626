"""Shard planning cost on the driver: time and peak memory for manifests of 100k and 1M rows.

Writes path-only manifests (no images) into a temporary folder, then plans each case in a fresh child
process, so that peak figures belong to planning alone:

- time: wall seconds of `plan_shards` (first run, without tracemalloc, which slows allocation);
- Python peak: tracemalloc's peak during a second run (Python objects: shards, footers, id hashes);
- Arrow peak: pyarrow's memory pool high-water mark (column data read for the id check);
- RSS peak: growth of the process's peak resident set (VmHWM, reset before planning) on Linux.

Cases: the same shard count at 100k and 1M rows (memory should not follow the rows), the same rows at
three shard counts (memory should follow the shards), and 1M rows without a pair_id column (no id check:
planning from the footers alone). It also times reading one shard's rows at the start and the end of a
1M-row manifest, with 64k-row row groups and with a single 1M-row group, since shards that start deep
inside a row group must decode the rows before them.

Usage: python scripts/bench_plan.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP_ROWS = 65_536


def write_manifest(path: str, *, rows: int, with_ids: bool, row_group_size: int) -> None:
    """A path-only manifest in the layout of a real one (ids, two relative paths, a codec column)."""
    writer = None
    for start in range(0, rows, 100_000):
        stop = min(rows, start + 100_000)
        columns = {
            "reference": [f"reference/{i // 1000:04d}/img_{i:08d}.png" for i in range(start, stop)],
            "distorted": [f"distorted/{i // 1000:04d}/img_{i:08d}_q{10 * (i % 9 + 1)}.jpg" for i in range(start, stop)],
            "codec": ["jpeg"] * (stop - start),
        }
        if with_ids:
            columns = {"pair_id": [f"pair-{i:08d}" for i in range(start, stop)], **columns}
        table = pa.table(columns)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=row_group_size)
    writer.close()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_child(manifest: str, pairs_per_shard: int) -> dict:
    """Plan once for time, once under tracemalloc for the Python peak; report RSS and Arrow peaks."""
    from ssim_ray.config import SourceConfig
    from ssim_ray.sources import plan_shards

    cfg = SourceConfig(kind="parquet", url=manifest, pairs_per_shard=pairs_per_shard)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM so the peak below is this planning's
    rss_before = _rss_kib("VmRSS")
    started = time.perf_counter()
    plan = plan_shards(cfg)
    seconds = time.perf_counter() - started
    rss_peak = _rss_kib("VmHWM") - rss_before
    arrow_peak = pa.default_memory_pool().max_memory()
    del plan
    tracemalloc.start()
    plan = plan_shards(cfg)
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "shards": len(plan.shards), "pairs": plan.total_pairs, "seconds": seconds, "python_peak_mib": python_peak / 2**20,
        "arrow_peak_mib": arrow_peak / 2**20, "rss_peak_mib": rss_peak / 1024,
    }


def time_shard_reads(manifest: str, pairs_per_shard: int) -> dict:
    """Seconds to stream the rows (no images) of the first and of the last shard of a manifest."""
    from ssim_ray.config import SourceConfig
    from ssim_ray.sources import plan_shards, read_manifest_rows

    cfg = SourceConfig(kind="parquet", url=manifest, pairs_per_shard=pairs_per_shard)
    plan = plan_shards(cfg)
    result = {}
    for label, shard in (("first", plan.shards[0]), ("last", plan.shards[-1])):
        rows = shard.rows
        started = time.perf_counter()
        count = sum(1 for _ in read_manifest_rows(
            manifest, source=cfg, columns=rows.columns, row_groups=rows.row_groups,
            skip=rows.row_start - rows.first_group_row, limit=shard.num_pairs, batch_size=64,
        ))
        result[label] = {"seconds": time.perf_counter() - started, "rows": count}
    return result


def _child(args: list) -> dict:
    output = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _machine() -> str:
    from bench_machine import machine

    return machine(f"pyarrow {pa.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=2, metavar=("MANIFEST", "PAIRS_PER_SHARD"))
    parser.add_argument("--reads", nargs=2, metavar=("MANIFEST", "PAIRS_PER_SHARD"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_child(args.child[0], int(args.child[1]))))
        return
    if args.reads:
        print(json.dumps(time_shard_reads(args.reads[0], int(args.reads[1]))))
        return
    run_all(rows=args.rows)


def run_all(*, rows: int) -> None:
    small = rows // 10
    with tempfile.TemporaryDirectory(prefix="bench_plan-") as folder:
        layouts = {  # name: (rows, with pair_id, row group size)
            "ids": (rows, True, ROW_GROUP_ROWS), "ids_small": (small, True, ROW_GROUP_ROWS),
            "noids": (rows, False, ROW_GROUP_ROWS), "noids_small": (small, False, ROW_GROUP_ROWS),
            "onegroup": (rows, True, rows),
        }
        paths = {name: os.path.join(folder, f"{name}.parquet") for name in layouts}
        started = time.perf_counter()
        for name, (count, with_ids, group) in layouts.items():
            write_manifest(paths[name], rows=count, with_ids=with_ids, row_group_size=group)
        print(f"# machine: {_machine()}")
        print(f"# manifests written in {time.perf_counter() - started:.1f} s; row groups of {ROW_GROUP_ROWS:,} rows")
        cases = [
            ("noids_small", 64, "footers only: 1/10 rows, same shards"), ("noids", 640, "footers only: all rows, same shards"),
            ("noids", 64, "footers only: same rows, 10x shards"), ("noids", 6400, "footers only: same rows, 1/10 shards"),
            ("ids_small", 64, "with id check: 1/10 rows"), ("ids", 640, "with id check: all rows"),
            ("ids", 64, "with id check: all rows, 10x shards"),
        ]
        print("| manifest rows | pair_id | pairs/shard | shards | plan s | Python peak MiB | Arrow peak MiB | RSS peak MiB | case |")
        print("|---:|:---:|---:|---:|---:|---:|---:|---:|:---|")
        for name, pairs_per_shard, label in cases:
            m = _child(["--child", paths[name], str(pairs_per_shard)])
            ids = "yes" if layouts[name][1] else "no"
            print(f"| {m['pairs']:,} | {ids} | {pairs_per_shard} | {m['shards']:,} | {m['seconds']:.2f} | "
                  f"{m['python_peak_mib']:.1f} | {m['arrow_peak_mib']:.1f} | {m['rss_peak_mib']:.1f} | {label} |")
        print()
        print("| layout | first shard rows s | last shard rows s |")
        print("|:---|---:|---:|")
        for name, label in (("ids", f"{ROW_GROUP_ROWS:,}-row groups"), ("onegroup", f"one {rows:,}-row group")):
            r = _child(["--reads", paths[name], "64"])
            print(f"| {label} | {r['first']['seconds']:.4f} | {r['last']['seconds']:.4f} |")


if __name__ == "__main__":
    main()
