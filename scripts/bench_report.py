"""Merge and report cost at scale: `python scripts/bench_report.py [--rows 1000000] [--parts 1000]`.

Builds an audit output of `rows` result rows in `parts` part files (with their commit markers), then
times, each in a fresh process so its peak memory is its own:

- merge: results.merge streaming every part into ssim.parquet and writing summary.json;
- report: report.make_report, which reads summary.json and re-reads and re-scores the k worst pairs.

The rows list real image pairs (the built-in sample set, tiled: 222 pairs repeated under unique ids), so
the k worst pairs are real files the report decodes and maps; their scores are synthetic (drawn from a
skewed distribution near 1, with 0.2% failure rows), which is enough to time merging and reporting.
Prints one table; copy it into docs/BENCHMARKS.md with the machine it ran on.

`--pair-side N [--pair-channels 1|3]` instead times the report's work on one worst pair of N x N pixels (a
real photograph upscaled, against its JPEG at quality 20): re-scoring it and drawing its map, in a fresh
process, peak memory above the decoded pair and seconds (10000 gray is the issue's 10^8-pixel pair).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FAILURE_FRACTION = 0.002


from bench_machine import memory_kib as _memory_kib  # noqa: E402 (scripts/ is on sys.path when run)


def _machine() -> str:
    from bench_machine import machine

    return machine()


def _tiled_manifest(workdir: Path, rows: int) -> tuple:
    """A Parquet manifest of `rows` pairs: the sample set repeated, ids made unique; and its base folder."""
    from ssim_ray.sources.sample import ensure_sample_dataset

    sample_manifest = ensure_sample_dataset()
    sample = pq.read_table(sample_manifest)
    repeats = -(-rows // sample.num_rows)
    tiled = pa.concat_tables([sample] * repeats).slice(0, rows)
    copy = np.repeat(np.arange(repeats), sample.num_rows)[:rows].astype(str)
    ids = np.char.add(np.char.add(np.asarray(tiled["pair_id"].to_pylist(), dtype=str), "#"), copy)
    tiled = tiled.set_column(tiled.schema.get_field_index("pair_id"), "pair_id", pa.array(ids))
    path = workdir / "manifest.parquet"
    pq.write_table(tiled, path, row_group_size=64 * 1024)
    return str(path), sample_manifest.rsplit("/", 1)[0]


def _result_table(manifest: pa.Table, shard_id: str, rng: np.random.Generator, passthrough: List[str]) -> pa.Table:
    """Synthetic but well-formed results for one shard's manifest rows."""
    from ssim_ray.output.schema import RESULT_SCHEMA

    n = manifest.num_rows
    failed = rng.random(n) < FAILURE_FRACTION
    scores = np.clip(1.0 - rng.gamma(2.0, 0.04, n), -1.0, 1.0)
    columns = {
        "pair_id": manifest["pair_id"], "reference": manifest["reference"], "distorted": manifest["distorted"],
        "ssim": pa.array(np.where(failed, np.nan, scores), from_pandas=True),
        "ssim_per_channel": pa.array([None] * n, pa.list_(pa.float64())),
        "height": pa.array(np.full(n, 512, np.int32)), "width": pa.array(np.full(n, 512, np.int32)),
        "channels": pa.array(np.full(n, 3, np.int32)), "data_range": pa.array(np.full(n, 255.0)),
        "bit_depth": pa.array(np.full(n, 8, np.int32)),
        "status": pa.array(np.where(failed, "missing", "ok")),
        "error": pa.array([f"distorted {p}: not found" if f else None
                           for p, f in zip(manifest["distorted"].to_pylist(), failed)], pa.string()),
        "decoder": pa.array(np.full(n, "Pillow (synthetic)")), "shard_id": pa.array(np.full(n, shard_id)),
    }
    # Columns this bench does not model (input versions, other metrics) are null, as a run without them writes.
    columns = {f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in RESULT_SCHEMA}
    arrays = [pa.array(columns[f.name]).cast(f.type) if not isinstance(columns[f.name], pa.ChunkedArray)
              else columns[f.name].cast(f.type) for f in RESULT_SCHEMA]
    arrays += [manifest[name] for name in passthrough]
    return pa.Table.from_arrays(arrays, names=RESULT_SCHEMA.names + passthrough)


def build(workdir: Path, *, rows: int, parts: int) -> None:
    """Plan the tiled manifest into `parts` shards and write every shard's part file and marker."""
    from dataclasses import asdict

    from ssim_ray.config import SourceConfig, SSIMConfig, SummaryConfig
    from ssim_ray.metric.structural import METRIC_NAME
    from ssim_ray.output.commit import write_shard
    from ssim_ray.output.resume import build_run_manifest, check_resume_compatible
    from ssim_ray.output.table_stats import shard_stats
    from ssim_ray.sources import plan_shards

    manifest_url, base_url = _tiled_manifest(workdir, rows)
    source = SourceConfig(kind="parquet", url=manifest_url, base_url=base_url, pairs_per_shard=-(-rows // parts))
    plan = plan_shards(source)
    out = str(workdir / "out")
    run = build_run_manifest(plan_fingerprint=plan.fingerprint, total_pairs=plan.total_pairs,
                             num_shards=len(plan.shards), metric={"name": METRIC_NAME, **asdict(SSIMConfig())},
                             source=asdict(source))
    check_resume_compatible(out, run, mode="overwrite")
    table = pq.read_table(manifest_url)
    summary_cfg = SummaryConfig(group_by="distortion")
    rng = np.random.default_rng(0)
    start = 0
    for shard in plan.shards:
        part = _result_table(table.slice(start, shard.num_pairs), shard.shard_id, rng, list(plan.passthrough_columns))
        write_shard(out, shard.shard_id, part, stats=shard_stats(part, summary_cfg))
        start += shard.num_pairs
    (workdir / "plan.json").write_text(json.dumps({"shards": [s.shard_id for s in plan.shards],
                                                   "fingerprint": plan.fingerprint, "total": plan.total_pairs,
                                                   "metric": run["metric"]}))


def phase_merge(workdir: Path) -> Dict[str, float]:
    from ssim_ray.config import AuditConfig, SummaryConfig
    from ssim_ray.output.merge import RunInfo, merge

    plan = json.loads((workdir / "plan.json").read_text())
    before = _memory_kib()
    started, cpu = time.perf_counter(), time.process_time()
    summary = merge(str(workdir / "out"), plan_shard_ids=plan["shards"], summary_cfg=SummaryConfig(group_by="distortion"),
                    run_info=RunInfo(metric=plan["metric"], plan_fingerprint=plan["fingerprint"],
                                     total_pairs=plan["total"]),
                    audit_cfg=AuditConfig(min_ssim=0.8, max_fraction_below=0.05))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    after = _memory_kib()
    return {"seconds": seconds, "cpu_seconds": cpu, "rows": summary["pairs"]["merged"], "rss_before_mib": before["VmRSS"] / 1024,
            "peak_mib": after["VmHWM"] / 1024, "arrow_pool_peak_mib": pa.default_memory_pool().max_memory() / 2**20}


def phase_report(workdir: Path, worst_k: int) -> Dict[str, float]:
    from ssim_ray.config import ReportConfig
    from ssim_ray.report import make_report

    before = _memory_kib()
    cpu = time.process_time()
    result = make_report(str(workdir / "out"), report_cfg=ReportConfig(worst_k=worst_k))
    cpu = time.process_time() - cpu
    after = _memory_kib()
    html_mib = os.path.getsize(result.html_path) / 2**20
    return {"seconds": result.seconds, "cpu_seconds": cpu, "worst_seconds": result.worst_seconds,
            "worst_with_images": result.worst_with_images, "html_mib": html_mib,
            "rss_before_mib": before["VmRSS"] / 1024, "peak_mib": after["VmHWM"] / 1024}


def _big_pair(side: int, channels: int):
    """A decoded pair of side x side pixels: a photograph upscaled (Lanczos) and its JPEG at quality 20."""
    import io

    import skimage.data
    import torch
    from PIL import Image

    from ssim_ray.sources import LoadedPair

    photo = skimage.data.astronaut() if channels == 3 else skimage.data.camera()
    reference = Image.fromarray(photo).resize((side, side), Image.LANCZOS)
    buffer = io.BytesIO()
    reference.save(buffer, format="JPEG", quality=20)
    del photo

    def tensor(image: Image.Image) -> "torch.Tensor":
        array = torch.from_numpy(np.asarray(image).copy())
        return array[None] if array.ndim == 2 else array.permute(2, 0, 1).contiguous()

    ref, dist = tensor(reference), tensor(Image.open(io.BytesIO(buffer.getvalue())))
    return LoadedPair(pair_id="big", row_index=0, reference="big-ref", distorted="big-dist", ref=ref, dist=dist,
                      bit_depth=8, data_range=255.0)


def phase_pair(side: int, channels: int) -> Dict[str, float]:
    """One worst pair re-scored and drawn (report.worst._fill_panel), after the pair is decoded."""
    import gc

    from ssim_ray.config import SSIMConfig
    from ssim_ray.report import worst

    pair = _big_pair(side, channels)
    gc.collect()
    before = _memory_kib()
    # VmHWM is the process's peak so far: reset it so the peak is this step's (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    started, cpu = time.perf_counter(), time.process_time()
    panel = worst.WorstPanel({"pair_id": "big"})
    worst._fill_panel(panel, pair, SSIMConfig())
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    after = _memory_kib()
    return {"seconds": seconds, "cpu_seconds": cpu, "pixels": side * side, "channels": channels,
            "pair_mib": (pair.ref.numel() + pair.dist.numel()) / 2**20, "rss_before_mib": before["VmRSS"] / 1024,
            "peak_mib": after["VmHWM"] / 1024, "recomputed": panel.recomputed, "images": len(panel.images or [])}


def pair_main(side: int, channels: int) -> None:
    command = [sys.executable, __file__, "--phase", "pair", "--pair-side", str(side), "--pair-channels", str(channels)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    import torch

    print(f"machine: {_machine()}, torch {torch.__version__}")
    print("| pair | decoded pair MiB | report step s | CPU s | RSS before MiB | peak RSS MiB | above the pair, "
          "bytes/pixel | recomputed ssim |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    extra = (result["peak_mib"] - result["rss_before_mib"]) * 2**20 / result["pixels"]
    print(f"| {side}x{side}x{channels} ({result['pixels']:.2e} px) | {result['pair_mib']:.0f} | {result['seconds']:.1f} | "
          f"{result['cpu_seconds']:.1f} | {result['rss_before_mib']:.0f} | {result['peak_mib']:.0f} | {extra:.1f} | "
          f"{result['recomputed']:.6f} |")


def _in_fresh_process(phase: str, workdir: Path, worst_k: int) -> Dict[str, float]:
    command = [sys.executable, __file__, "--phase", phase, "--workdir", str(workdir), "--worst-k", str(worst_k)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--parts", type=int, default=1000)
    parser.add_argument("--worst-k", type=int, default=12)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--pair-side", type=int, default=None, help="time one worst pair of this side instead")
    parser.add_argument("--pair-channels", type=int, choices=(1, 3), default=1)
    parser.add_argument("--phase", choices=("merge", "report", "pair"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "pair":
        print(json.dumps(phase_pair(args.pair_side, args.pair_channels)))
        return
    if args.pair_side:
        pair_main(args.pair_side, args.pair_channels)
        return
    if args.phase == "merge":
        print(json.dumps(phase_merge(args.workdir)))
        return
    if args.phase == "report":
        print(json.dumps(phase_report(args.workdir, args.worst_k)))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_report_"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    build(workdir, rows=args.rows, parts=args.parts)
    built = time.perf_counter() - started
    merged = _in_fresh_process("merge", workdir, args.worst_k)
    summary_only = _in_fresh_process("report", workdir, 0)
    reported = _in_fresh_process("report", workdir, args.worst_k)
    with open("/proc/loadavg") as load:
        load_average = load.read().split()[0]
    print(f"machine: {_machine()}; load average {load_average} at the end (other jobs share the cores)")
    print(f"{args.rows:,} rows in {args.parts} part files (written with markers in {built:.1f} s) under {workdir}")
    print("| step | rows | parts | wall s | CPU s | peak RSS MiB | RSS before MiB | notes |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    print(f"| merge | {merged['rows']:,} | {args.parts} | {merged['seconds']:.2f} | {merged['cpu_seconds']:.2f} | "
          f"{merged['peak_mib']:.0f} | {merged['rss_before_mib']:.0f} | Arrow pool peak "
          f"{merged['arrow_pool_peak_mib']:.0f} MiB |")
    for label, result in (("report, k=0", summary_only), (f"report, k={args.worst_k}", reported)):
        print(f"| {label} | {merged['rows']:,} | {args.parts} | {result['seconds']:.2f} | {result['cpu_seconds']:.2f} | "
              f"{result['peak_mib']:.0f} | {result['rss_before_mib']:.0f} | {result['worst_seconds']:.2f} s in "
              f"{result['worst_with_images']} worst pairs; page {result['html_mib']:.1f} MiB |")


if __name__ == "__main__":
    main()
