"""Comparison cost at scale: `python scripts/bench_compare.py [--rows 1000000 10000000] [--workdir DIR]`.

For each row count, builds three audit output folders (ssim.parquet, summary.json, _run.json) over real
pair lists (the built-in sample set tiled: 222 pairs repeated under unique ids, as scripts/bench_report.py
does) with synthetic scores for ssim, psnr and ms_ssim (a skewed distribution near 1, 0.2% failure rows,
1% identical pairs with PSNR +inf):

- baseline;
- candidate, same plan: the same pairs in the same order, scores moved a little (the `jpeg` group down),
  other failures: compared in the aligned mode (one pass over both files);
- candidate, other plan: 1% of the pairs dropped, 1% new ones, row blocks of 64Ki in reverse order and
  another plan fingerprint: compared in the partitioned mode (hash partitions on disk).

Each comparison runs in a fresh process (so its peak RSS is its own) with the default settings, the report
included but without re-reading worst pairs (`compare.report_worst_k=0`: their cost does not depend on the
row count; scripts/bench_report.py measures it). Prints one table with the machine line; copy it into
docs/BENCHMARKS.md. Given again, `--workdir` reuses the runs it built.

Peak RSS is read from /proc/self/status (VmHWM) when the join ends (the statistics start) and at the end.
"Spilled" is what the statistics keep on local disk, not in memory: 12 bytes per paired pair per metric
(float64 delta as an order key, int32 group code), read back for exact percentiles and the histogram.
Set PYTHONPATH to another tree's root (e.g. `git archive <commit> ssim_ray | tar -x -C /tmp/old`) with the
same `--workdir` to time that version of the comparison on the same files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHUNK_ROWS = 1 << 20
BLOCK_ROWS = 1 << 16
FAILURE_FRACTION = 0.002
IDENTICAL_FRACTION = 0.01


from bench_machine import memory_kib as _memory_kib  # noqa: E402 (scripts/ is on sys.path when run)


def _sample_rows() -> pa.Table:
    from ssim_ray.sources.sample import ensure_sample_dataset

    return pq.read_table(ensure_sample_dataset())


def _chunk(sample: pa.Table, start: int, stop: int) -> pa.Table:
    """Rows start..stop of the sample tiled: pair_id made unique by the copy number."""
    index = np.arange(start, stop)
    tiled = sample.take(pa.array(index % sample.num_rows))
    ids = np.char.add(np.char.add(np.asarray(tiled["pair_id"].to_pylist(), dtype=str), "#"),
                      (index // sample.num_rows).astype(str))
    return tiled.set_column(0, "pair_id", pa.array(ids))


def _scores(rng: np.random.Generator, n: int) -> Dict[str, np.ndarray]:
    ssim = np.clip(1.0 - rng.gamma(2.0, 0.04, n), -1.0, 1.0)
    psnr = 20.0 + 25.0 * ssim + rng.normal(0.0, 1.0, n)
    psnr[rng.random(n) < IDENTICAL_FRACTION] = np.inf
    ms_ssim = np.clip(1.0 - rng.gamma(2.0, 0.02, n), -1.0, 1.0)
    return {"ssim": ssim, "psnr": psnr, "ms_ssim": ms_ssim}


def _moved(scores: Dict[str, np.ndarray], jpeg: np.ndarray, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    n = jpeg.size
    out = {"ssim": scores["ssim"] + rng.normal(0.0, 1e-3, n) - jpeg * rng.uniform(0.0, 0.02, n),
           "ms_ssim": scores["ms_ssim"] + rng.normal(0.0, 1e-3, n) - jpeg * rng.uniform(0.0, 0.01, n)}
    psnr = scores["psnr"] + rng.normal(0.0, 0.05, n) - jpeg * rng.uniform(0.0, 0.5, n)
    out["psnr"] = np.where(np.isinf(scores["psnr"]), np.inf, psnr)
    return out


def _results(rows: pa.Table, scores: Dict[str, np.ndarray], failed: np.ndarray) -> pa.Table:
    from ssim_ray.output.schema import RESULT_SCHEMA

    n = rows.num_rows
    columns = {
        "pair_id": rows["pair_id"], "reference": rows["reference"], "distorted": rows["distorted"],
        "ssim_per_channel": pa.nulls(n, pa.list_(pa.float64())), "height": np.full(n, 512, np.int32),
        "width": np.full(n, 512, np.int32), "channels": np.full(n, 3, np.int32), "data_range": np.full(n, 255.0),
        "bit_depth": np.full(n, 8, np.int32), "status": np.where(failed, "missing", "ok"),
        "error": pa.array(np.where(failed, "distorted: not found", None), pa.string()),
        "decoder": np.full(n, "Pillow (synthetic)"), "reference_version": pa.nulls(n, pa.string()),
        "distorted_version": pa.nulls(n, pa.string()), "shard_id": np.full(n, "shard-00000"),
    }
    for name, values in scores.items():
        columns[name] = pa.array(values, mask=failed)
    # Every result column, as an audit writes them (per-channel scores and MS-SSIM's reason null here).
    arrays = [pa.nulls(n, f.type) if f.name not in columns else columns[f.name].cast(f.type)
              if isinstance(columns[f.name], (pa.Array, pa.ChunkedArray)) else pa.array(columns[f.name]).cast(f.type)
              for f in RESULT_SCHEMA]
    names = list(RESULT_SCHEMA.names)
    for name in [m for m in scores if m not in names]:  # audits from before PSNR and MS-SSIM were columns
        arrays.append(columns[name])
        names.append(name)
    for name in ("image", "distortion", "level", "color"):
        arrays.append(rows[name])
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def _facts(folder: Path, plan: str) -> None:
    from ssim_ray.config import SSIMConfig

    metric = SSIMConfig().describe(["ssim", "psnr", "ms_ssim"])
    (folder / "summary.json").write_text(json.dumps({"metric": metric, "plan_fingerprint": plan, "complete": True,
                                                     "group_by": "distortion", "run_id": folder.name}))
    (folder / "_run.json").write_text(json.dumps({"metric": metric, "plan_fingerprint": plan, "source": {},
                                                  "run_id": folder.name}))


def _new_ids(ids: pa.ChunkedArray) -> pa.Array:
    """Ids no other row has: the candidate's pairs the baseline lacks."""
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(ids, pa.scalar("new"), "@").combine_chunks()


def build(workdir: Path, rows: int) -> None:
    """Write the baseline and the two candidates (see the module docstring) under `workdir`."""
    sample = _sample_rows()
    folders = {name: workdir / name for name in ("baseline", "same_plan", "other_plan")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    writers = {}
    other_blocks = []
    try:
        for start in range(0, rows, CHUNK_ROWS):
            chunk = _chunk(sample, start, min(rows, start + CHUNK_ROWS))
            n = chunk.num_rows
            scores = _scores(rng, n)
            jpeg = np.asarray(chunk["distortion"].to_pylist()) == "jpeg"
            moved = _moved(scores, jpeg, rng)
            tables = {"baseline": _results(chunk, scores, rng.random(n) < FAILURE_FRACTION),
                      "same_plan": _results(chunk, moved, rng.random(n) < FAILURE_FRACTION)}
            kept = rng.random(n) >= 0.01
            extra = chunk.filter(pa.array(rng.random(n) < 0.01))
            extra = extra.set_column(0, "pair_id", _new_ids(extra["pair_id"]))
            other = pa.concat_tables([
                _results(chunk, moved, rng.random(n) < FAILURE_FRACTION).filter(pa.array(kept)),
                _results(extra, {k: v[: extra.num_rows] for k, v in moved.items()},
                         np.zeros(extra.num_rows, dtype=bool))])
            for name, table in tables.items():
                if name not in writers:
                    writers[name] = pq.ParquetWriter(folders[name] / "ssim.parquet", table.schema, compression="zstd")
                writers[name].write_table(table, row_group_size=BLOCK_ROWS)
            # Another order: blocks written in reverse at the end (held as compressed IPC buffers meanwhile).
            for block in range(0, other.num_rows, BLOCK_ROWS):
                sink = pa.BufferOutputStream()
                piece = other.slice(block, BLOCK_ROWS)
                with pa.ipc.new_stream(sink, piece.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
                    w.write_table(piece)
                other_blocks.append(sink.getvalue())
        schema = pa.ipc.open_stream(other_blocks[0]).schema
        with pq.ParquetWriter(folders["other_plan"] / "ssim.parquet", schema, compression="zstd") as writer:
            for buffer in reversed(other_blocks):
                writer.write_table(pa.ipc.open_stream(buffer).read_all(), row_group_size=BLOCK_ROWS)
    finally:
        for writer in writers.values():
            writer.close()
    _facts(folders["baseline"], "plan-a")
    _facts(folders["same_plan"], "plan-a")
    _facts(folders["other_plan"], "plan-b")


def phase_compare(baseline: str, candidate: str, out: str) -> Dict[str, float]:
    from ssim_ray.compare import CompareConfig, CompareJobConfig, compare_runs
    from ssim_ray.compare import run as compare_run

    at_join_end: Dict[str, int] = {}
    statistics = compare_run.metric_statistics

    def measured(*args, **kwargs):  # the statistics start when the join has ended
        at_join_end.setdefault("peak_kib", _memory_kib()["VmHWM"])
        return statistics(*args, **kwargs)

    compare_run.metric_statistics = measured
    before = _memory_kib()
    started, cpu = time.perf_counter(), time.process_time()
    outcome = compare_runs(CompareJobConfig(baseline=baseline, candidate=candidate,
                                            compare=CompareConfig(report_worst_k=0)), output_url=out)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    after = _memory_kib()
    summary = outcome.summary
    paired = sum(summary["results"][m]["overall"]["finite"] for m in summary["metrics"])
    return {"seconds": seconds, "cpu_seconds": cpu, "mode": summary["join"]["mode"],
            "partitions": summary["join"]["partitions"], "pair_ids": summary["pairs"]["pair_ids"],
            "rss_before_mib": before["VmRSS"] / 1024, "join_peak_mib": at_join_end["peak_kib"] / 1024,
            "peak_mib": after["VmHWM"] / 1024, "spilled_mib": paired * 12 / 2**20,
            "phases": summary["seconds"], "verdict": summary["results"]["ssim"]["overall"]["verdict"]}


def _fresh(baseline: Path, candidate: Path, out: Path) -> Dict[str, float]:
    command = [sys.executable, __file__, "--phase", "compare", "--baseline", str(baseline), "--candidate",
               str(candidate), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--phase", choices=("compare",), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", help=argparse.SUPPRESS)
    parser.add_argument("--candidate", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "compare":
        print(json.dumps(phase_compare(args.baseline, args.candidate, args.out)))
        return
    from bench_machine import machine

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_compare_"))
    lines = []
    for rows in args.rows:
        folder = workdir / f"rows_{rows}"
        started = time.perf_counter()
        if not (folder / "built.json").exists():  # a workdir given again reuses what it holds
            build(folder, rows)
            (folder / "built.json").write_text(json.dumps({"rows": rows}))
        built = time.perf_counter() - started
        for candidate in ("same_plan", "other_plan"):
            result = _fresh(folder / "baseline", folder / candidate, folder / f"compare_{candidate}")
            phases = result["phases"]
            mode = result["mode"] + ("" if result["partitions"] is None else f" ({result['partitions']} partitions)")
            lines.append(
                f"| {rows:,} | {mode} "
                f"| {result['pair_ids']:,} | {result['seconds']:.1f} | "
                f"{phases['join']:.1f} / {phases['statistics']:.1f} / "
                f"{phases.get('report', 0):.1f} | {result['cpu_seconds']:.1f} | {result['join_peak_mib']:.0f} | "
                f"{result['peak_mib']:.0f} | {result['spilled_mib']:.0f} |")
            print(f"[bench_compare] {rows:,} rows, {candidate}: built in {built:.0f} s; {result}", file=sys.stderr)
    with open("/proc/loadavg") as load:
        load_average = load.read().split()[0]
    import torch

    print(f"machine: {machine(f'torch {torch.__version__}', f'pyarrow {pa.__version__}')}; load average "
          f"{load_average} at the end (other jobs share the cores)")
    print("3 metrics (ssim, psnr, ms_ssim), 5 groups, default settings (1000 bootstrap resamples of at most 50,000)")
    print("| rows per run | join | pair_ids | wall s | join / statistics / report s | CPU s | peak RSS at join end MiB "
          "| peak RSS MiB | deltas spilled to disk MiB |")
    print("|---:|---|---:|---:|---|---:|---:|---:|---:|")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
