"""The merge at scale: today's one-process merge against the merge as Ray tasks, with 1 and 2 workers.

`python scripts/bench_merge.py [--rows 1000000 10000000] [--parts 1000] [--workers 1 2] [--rounds 3]`
`python scripts/bench_merge.py --per-part [--per-part-rows 100000] [--rounds 3]`

For each row count, builds an audit output (part files with their commit markers, as actors write them) of
synthetic scores for real sample pairs, as scripts/bench_report.py makes them: the built-in sample set's 222
pairs tiled under unique pair ids, with its pass-through columns (`distortion` is the summary's group_by),
scores drawn from a skewed distribution near 1 and 0.2% failure rows. Columns of the result schema this
builder does not know are written null, so it follows the schema. Then times, each in a fresh process so
that its peak memory is its own:

- `sequential`: `output.merge.merge`, the driver's one-process merge (read ahead on threads);
- `ray, N workers`: `ssim_ray.merge_tasks.merge_parallel` on a local Ray started with N CPUs (Ray's start
  and its workers' start, each importing the package, are timed apart, not in the merge).

The merges of a row count alternate in order over `--rounds` rounds; the table shows medians: wall time,
the driver's CPU time and peak RSS (VmHWM), and the blocks' CPU time summed over the tasks. CPU times are
what to compare on a shared machine (wall time waits for cores other jobs hold). Every merge of a row count must give the same rows, in the same order, and the same summary statistics
(checked; timestamps and durations aside). Prints one table for docs/BENCHMARKS.md and writes the measured
costs to `--costs` (default docs/merge_costs.json), which scripts/scale_on_paper.py reads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FAILURE_FRACTION = 0.002
GROUP_BY = "distortion"
REPO = Path(__file__).resolve().parents[1]
# Summary fields that differ between two merges of the same parts by design (when, and how long).
VOLATILE = ("created", "merge_seconds", "run_id", "merge", "versions")


from bench_machine import memory_kib as _memory_kib  # noqa: E402 (scripts/ is on sys.path when run)


def _sample() -> pa.Table:
    from ssim_ray.sources.sample import ensure_sample_dataset

    return pq.read_table(ensure_sample_dataset())


def synthetic_part(sample: pa.Table, shard_id: str, start: int, rows: int, rng: np.random.Generator) -> pa.Table:
    """`rows` result rows of shard `shard_id` from row `start` on: sample pairs tiled, synthetic scores."""
    from ssim_ray.output.schema import RESULT_SCHEMA

    index = pa.array(np.arange(start, start + rows) % sample.num_rows)
    tiled = sample.take(index)
    failed = rng.random(rows) < FAILURE_FRACTION
    scores = np.clip(1.0 - rng.gamma(2.0, 0.04, rows), -1.0, 1.0)
    ids = pc.binary_join_element_wise(tiled["pair_id"], pc.cast(pa.array(np.arange(start, start + rows)), pa.string()),
                                      "#")
    error = pc.if_else(pa.array(failed), pc.binary_join_element_wise("distorted ", tiled["distorted"], ": not found", ""),
                       pa.scalar(None, pa.string()))
    known = {
        "pair_id": ids, "reference": tiled["reference"], "distorted": tiled["distorted"],
        "ssim": pa.array(np.where(failed, np.nan, scores), from_pandas=True),
        "height": pa.array(np.full(rows, 512, np.int32)), "width": pa.array(np.full(rows, 512, np.int32)),
        "channels": pa.array(np.full(rows, 3, np.int32)), "data_range": pa.array(np.full(rows, 255.0)),
        "bit_depth": pa.array(np.full(rows, 8, np.int32)),
        "status": pa.array(np.where(failed, "missing", "ok")), "error": error,
        "decoder": pa.array(np.full(rows, "Pillow (synthetic)")), "shard_id": pa.array(np.full(rows, shard_id)),
    }
    arrays = [known[f.name].cast(f.type) if f.name in known else pa.nulls(rows, f.type) for f in RESULT_SCHEMA]
    passthrough = [name for name in sample.column_names if name not in ("pair_id", "reference", "distorted")]
    arrays += [tiled[name] for name in passthrough]
    return pa.Table.from_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays],
                                names=RESULT_SCHEMA.names + passthrough)


def build(out: Path, *, rows: int, part_rows: int) -> dict:
    """Write the part files and markers of `rows` rows in parts of `part_rows`; return the plan's facts."""
    from ssim_ray.config import SummaryConfig
    from ssim_ray.output.commit import write_shard
    from ssim_ray.output.table_stats import shard_stats

    sample, rng = _sample(), np.random.default_rng(0)
    summary_cfg = SummaryConfig(group_by=GROUP_BY)
    shard_ids = []
    for index, start in enumerate(range(0, rows, part_rows)):
        shard_id = f"shard-{index:07d}"
        part = synthetic_part(sample, shard_id, start, min(part_rows, rows - start), rng)
        write_shard(str(out), shard_id, part, stats=shard_stats(part, summary_cfg))
        shard_ids.append(shard_id)
    return {"shards": shard_ids, "total": rows}


def _digest_rows(path: Path) -> str:
    """A digest of the results' pair ids and scores in reading order (file or folder: same rows, same digest)."""
    import hashlib

    import pyarrow.dataset as ds

    ids, scores = hashlib.sha256(), hashlib.sha256()
    for batch in ds.dataset(str(path), format="parquet").to_batches(columns=["pair_id", "ssim"]):
        ids.update(("\n".join(batch.column(0).to_pylist()) + "\n").encode("utf-8"))
        scores.update(batch.column(1).to_numpy(zero_copy_only=False).astype(np.float64).tobytes())
    return ids.hexdigest()[:16] + scores.hexdigest()[:16]


def _stable(summary: dict) -> str:
    """The summary without what says when and how the merge ran, as canonical JSON."""
    return json.dumps({k: v for k, v in summary.items() if k not in VOLATILE}, sort_keys=True)


def phase_merge(workdir: Path, mode: str, workers: int, layout: str) -> dict:
    """One merge in this (fresh) process: `sequential` (output.merge.merge) or `ray` with `workers` CPUs."""
    from ssim_ray.config import AuditConfig, SummaryConfig
    from ssim_ray.output.merge import RunInfo, merge

    plan = json.loads((workdir / "plan.json").read_text())
    arguments = dict(plan_shard_ids=plan["shards"], summary_cfg=SummaryConfig(group_by=GROUP_BY),
                     run_info=RunInfo(metric={}, plan_fingerprint="bench", total_pairs=plan["total"]),
                     audit_cfg=AuditConfig(min_ssim=0.8, max_fraction_below=0.05))
    out, extra = str(workdir / "out"), {}
    if mode == "ray":
        import ray

        from ssim_ray import merge_tasks

        began = time.perf_counter()
        ray.init(address="local", num_cpus=workers, include_dashboard=False, configure_logging=False)
        extra["ray_init_s"] = time.perf_counter() - began
        began = time.perf_counter()  # start the workers (each imports the package: torch included) untimed
        warm = ray.remote(num_cpus=1)(_warm_function)
        ray.get([warm.remote() for _ in range(workers * 2)])
        extra["workers_start_s"] = time.perf_counter() - began
        run = lambda: merge_tasks.merge_parallel(out, **arguments,  # noqa: E731
                                                 single_file_max_rows=0 if layout == "folder" else None)
    else:
        run = lambda: merge(out, **arguments)  # noqa: E731
    before = _memory_kib()
    began, cpu = time.perf_counter(), time.process_time()
    summary = run()
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    peak = _memory_kib()["VmHWM"] / 1024
    return {"mode": mode, "workers": workers, "layout": summary["merge"]["layout"], "seconds": seconds,
            "driver_cpu_s": cpu, "driver_peak_mib": peak, "driver_rss_before_mib": before["VmRSS"] / 1024,
            "rows": summary["pairs"]["merged"], "merge": summary["merge"], "stable": _stable(summary),
            "digest": _digest_rows(workdir / "out" / "ssim.parquet"), **extra}


def _warm_function() -> bool:
    """Import what a block task imports, so that the timed merge finds its workers started."""
    import ssim_ray.merge_tasks  # noqa: F401

    return True


def _in_fresh_process(workdir: Path, mode: str, workers: int, layout: str) -> dict:
    command = [sys.executable, __file__, "--phase", "merge", "--workdir", str(workdir), "--mode", mode,
               "--phase-workers", str(workers), "--layout", layout]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{mode} merge failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _at(results: List[dict], rows: int, key: str) -> Optional[float]:
    """The `merge` block's `key` of the result at `rows` rows, if measured."""
    found = [r["merge"][key] for r in results if r["rows"] == rows]
    return found[0] if found else None


def _single_file_max_rows() -> int:
    from ssim_ray.output.merge import SINGLE_FILE_MAX_ROWS

    return SINGLE_FILE_MAX_ROWS


def per_part_costs(workdir: Path, *, rows: int, parts: Tuple[int, int], rounds: int) -> dict:
    """CPU seconds per part file of each merge step, from `rows` rows cut into parts[0] and parts[1] parts.

    The row-count fit (`_fit`) has every point at one part count, so its per-part term is an intercept:
    fixed costs (the driver's Ray client, planning, publishing) spread over the parts. This measures the
    steps' cost per part directly, in this process, with the row count held: the one-process merge
    (`output.merge.merge`), a block's work (`summarise_block`, what one Ray task runs), and the driver's
    combining (`MergeAccumulator.add` of every block, plus the one file's writer for the file layout).
    """
    import statistics

    from ssim_ray.config import SummaryConfig
    from ssim_ray.output import merge as merging
    from ssim_ray.output.commit import scan_shards

    cfg = SummaryConfig(group_by=GROUP_BY)
    timed: Dict[str, Dict[int, List[float]]] = {}
    for count in parts:
        out = workdir / f"parts-{count}"
        plan = build(out / "out", rows=rows, part_rows=-(-rows // count))
        root = str(out / "out")
        info = merging.RunInfo(metric={}, plan_fingerprint="bench", total_pairs=rows)
        merge_plan = merging.plan_merge(scan_shards(root), plan["shards"], single_file_max_rows=rows,
                                        block_rows=merging.block_rows_for(rows))
        for _ in range(rounds):
            cpu = time.process_time()
            merging.merge(root, plan_shard_ids=plan["shards"], summary_cfg=cfg, run_info=info)
            timed.setdefault("one_process_merge", {}).setdefault(count, []).append(time.process_time() - cpu)
            cpu = time.process_time()
            blocks = [merging.summarise_block(root, merge_plan.block(i), index=i, schema=merge_plan.schema,
                                              summary_cfg=cfg) for i in range(len(merge_plan.blocks))]
            timed.setdefault("ray_task_work", {}).setdefault(count, []).append(time.process_time() - cpu)
            for layout in ("file", "folder"):
                accumulator = merging.MergeAccumulator(cfg, capacity=rows)
                sink = pa.BufferOutputStream()
                cpu = time.process_time()
                if layout == "file":
                    with merging.RowGroupWriter(sink, merge_plan.schema) as writer:
                        for block in blocks:
                            accumulator.add(block)
                            for table in block.tables:
                                writer.add(table)
                else:
                    for block in blocks:
                        accumulator.add(block)
                accumulator.result()
                timed.setdefault(f"driver_combine_{layout}", {}).setdefault(count, []).append(
                    time.process_time() - cpu)
        shutil.rmtree(out)
    low, high = parts
    return {step: {"per_part_s": (statistics.median(by[high]) - statistics.median(by[low])) / (high - low),
                   "cpu_s": {str(k): statistics.median(v) for k, v in by.items()}}
            for step, by in timed.items()} | {"rows": rows, "parts": list(parts), "rounds": rounds}


def _fit(points: List[dict], key: str) -> dict:
    """seconds = per_part * parts + per_row * rows, from two (parts, rows) points with equal parts.

    With equal parts the per-part term is the intercept (fixed costs included) divided by the parts: the
    per-part costs proper come from `per_part_costs` (`--per-part`).
    """
    (a, b) = sorted(points, key=lambda p: p["rows"])[:2]
    per_row = (b[key] - a[key]) / (b["rows"] - a["rows"])
    per_part = max(0.0, (a[key] - per_row * a["rows"]) / a["parts"])
    return {"per_part_s": per_part, "per_row_s": per_row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--parts", type=int, default=1000, help="part files per row count (rows/parts per part)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folder-at", type=int, nargs="*", default=[10_000_000],
                        help="row counts also merged into a folder (forced) with the most workers")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--costs", type=Path, default=REPO / "scripts" / "merge_costs.json")
    parser.add_argument("--keep", action="store_true", help="keep the built outputs")
    parser.add_argument("--per-part", action="store_true",
                        help="only measure each step's CPU cost per part file (in this process, no Ray: "
                             "--per-part-rows in 100 and 1,000 parts) and add it to --costs")
    parser.add_argument("--per-part-rows", type=int, default=100_000)
    parser.add_argument("--phase", choices=("merge",), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("sequential", "ray"), default="sequential", help=argparse.SUPPRESS)
    parser.add_argument("--phase-workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=("auto", "folder"), default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "merge":
        print(json.dumps(phase_merge(args.workdir, args.mode, args.phase_workers, args.layout)))
        return
    from bench_machine import machine

    base = args.workdir or Path(tempfile.mkdtemp(prefix="bench_merge_"))
    if args.per_part:
        measured = per_part_costs(base, rows=args.per_part_rows, parts=(100, 1000), rounds=args.rounds)
        costs = json.loads(args.costs.read_text())
        costs["per_part_measured"] = dict(measured, machine=machine())
        args.costs.write_text(json.dumps(costs, indent=1) + "\n")
        print(json.dumps(measured, indent=1))
        return
    results = []
    for rows in args.rows:
        workdir = base / f"rows-{rows}"
        workdir.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        plan = build(workdir / "out", rows=rows, part_rows=-(-rows // args.parts))
        (workdir / "plan.json").write_text(json.dumps(plan))
        print(f"built {rows:,} rows in {len(plan['shards'])} parts in {time.perf_counter() - began:.0f} s",
              file=sys.stderr, flush=True)
        runs = [("sequential", 1, "auto")] + [("ray", w, "auto") for w in args.workers]
        runs += [("ray", max(args.workers), "folder")] if rows in args.folder_at else []
        measured: Dict[tuple, List[dict]] = {run: [] for run in runs}
        for round_index in range(args.rounds):
            for mode, workers, layout in (runs if round_index % 2 == 0 else runs[::-1]):
                result = _in_fresh_process(workdir, mode, workers, layout)
                result.update(parts=len(plan["shards"]), rows=rows)
                measured[(mode, workers, layout)].append(result)
                print(f"{rows:,} rows, {mode} x{workers} ({result['layout']}): {result['seconds']:.1f} s, driver "
                      f"CPU {result['driver_cpu_s']:.1f} s, peak {result['driver_peak_mib']:.0f} MiB",
                      file=sys.stderr, flush=True)
        every = [r for runs_of in measured.values() for r in runs_of]
        if len({(r["stable"], r["digest"]) for r in every}) != 1:
            raise SystemExit(f"{rows:,} rows: the merges differ in rows or statistics")
        results.extend(_median(runs_of) for runs_of in measured.values())
        if not args.keep:
            shutil.rmtree(workdir)
    _print_table(results, machine())
    _write_costs(results, args.costs, machine())


def _median(runs: List[dict]) -> dict:
    """The first run's facts with the medians of its timings and memory over the rounds."""
    import statistics

    merged = dict(runs[0], rounds=len(runs))
    for key in ("seconds", "driver_cpu_s", "driver_peak_mib", "driver_rss_before_mib", "ray_init_s",
                "workers_start_s"):
        if key in runs[0]:
            merged[key] = statistics.median(r[key] for r in runs)
    merged["merge"] = dict(runs[0]["merge"])
    for key in ("task_seconds", "task_cpu_seconds", "driver_combine_seconds", "driver_wait_seconds"):
        if key in runs[0]["merge"]:
            merged["merge"][key] = statistics.median(r["merge"][key] for r in runs)
    return merged


def _print_table(results: List[dict], where: str) -> None:
    with open("/proc/loadavg") as load:
        load_average = load.read().split()[0]
    print(f"\n{where}; load average {load_average} at the end (other jobs share the cores); every merge of a row "
          "count gave the same rows, order and summary statistics")
    print("| rows | parts | merge | layout | wall s | driver CPU s | tasks' CPU s (sum) | driver peak MiB | "
          "driver RSS before MiB | Ray start s | workers' start s |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        tasks = r["merge"].get("task_cpu_seconds")
        name = "one process (today)" if r["mode"] == "sequential" else f"Ray tasks, {r['workers']} worker(s)"
        ray_start = f"{r['ray_init_s']:.1f} | {r['workers_start_s']:.1f}" if "ray_init_s" in r else "- | -"
        print(f"| {r['rows']:,} | {r['parts']:,} | {name} | {r['layout']} | {r['seconds']:.1f} | "
              f"{r['driver_cpu_s']:.1f} | {'-' if tasks is None else f'{tasks:.1f}'} | {r['driver_peak_mib']:.0f} | "
              f"{r['driver_rss_before_mib']:.0f} | {ray_start} |")


def _write_costs(results: List[dict], path: Path, where: str) -> None:
    """The fitted costs, for scripts/scale_on_paper.py: seconds = per_part * parts + per_row * rows."""
    sequential = [r for r in results if r["mode"] == "sequential"]
    ray_file = [r for r in results if r["mode"] == "ray" and r["layout"] == "file" and r["workers"] == 1]
    folder = [r for r in results if r["mode"] == "ray" and r["layout"] == "folder"]
    starts = [r["ray_init_s"] + r["workers_start_s"] for r in results if "ray_init_s" in r]

    def fit(points: List[dict], value) -> Optional[dict]:
        return _fit([dict(p, value=value(p)) for p in points], "value") if len(points) >= 2 else None

    costs = {
        "machine": where,
        "source": "scripts/bench_merge.py (CPU seconds, medians over rounds)",
        "model": "seconds = per_part_s * parts + per_row_s * rows",
        # Today's merge, one process: its CPU time.
        "one_process_merge": fit(sequential, lambda r: r["driver_cpu_s"]),
        # The blocks' work (read, sha256 check, statistics, score columns), summed over the tasks: on a cluster
        # it divides by the workers. Folder layout: add the writing of the files (folder_task_extra_per_row_s).
        "ray_task_work": fit(ray_file, lambda r: r["merge"]["task_cpu_seconds"]),
        # The driver's share, in order whatever the cluster: with one file, combining and writing it.
        "ray_driver_file": fit(ray_file, lambda r: r["driver_cpu_s"]),
        # With a folder, combining only (statistics, scores, the moments' trail): per row at the measured size.
        "ray_driver_folder_per_row_s": folder[0]["driver_cpu_s"] / folder[0]["rows"] if folder else None,
        "folder_task_extra_per_row_s": ((folder[0]["merge"]["task_cpu_seconds"]
                                         - _at(ray_file, folder[0]["rows"], "task_cpu_seconds")) / folder[0]["rows"])
        if folder and _at(ray_file, folder[0]["rows"], "task_cpu_seconds") is not None else None,
        "ray_start_s": sorted(starts)[len(starts) // 2] if starts else None,
        "single_file_max_rows": _single_file_max_rows(),
        "measurements": [{k: v for k, v in r.items() if k not in ("stable", "digest")} for r in results],
    }
    path.write_text(json.dumps(costs, indent=1) + "\n")
    print(f"costs written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
