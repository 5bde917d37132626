"""Pairs/s against batch size, with the memory probe's choice marked: `python scripts/bench_batch_curve.py`.

For each image size (default 256x256 and 1024x1024 RGB uint8: crops of scikit-image's retina photograph,
distorted by JPEG at quality 30, so every pair has its own structure) and each batch size 1, 2, 4, ...,
512, it times the job's own compute path (`worker.ShardComputer._scores`: stack, pin and copy on CUDA,
ssim) in a process set up as an actor is (`worker.configure_process`: one torch thread on CPU, large
blocks kept in the heap, kernel compiled first). Each point runs whole batches until `--seconds-per-point`
have passed (at least `--min-batches`), and reports the median batch. A batch the actor's memory budget
would not allow (the probe's measured bytes per pair times the batch, against its budget) is skipped and
marked. The probe itself runs as an actor runs it (`batching.BatchSizer.probe` on a 4-pair trial batch,
`memory_share` = 1 / actors per node), and its choice is timed like any other point.

Prints one table per size and writes a PNG plot (Pillow only). `--device cuda` runs the same on a GPU;
`--max-seconds` bounds the whole run (points left are reported as not measured).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ssim_ray import sources
from ssim_ray.batching import BucketKey, bucket_key
from ssim_ray.config import BatchConfig, SourceConfig, SSIMConfig, SummaryConfig
from ssim_ray.worker import PROBE_TRIAL_PAIRS, ShardComputer, WorkerSpec, configure_process

DEFAULT_SIZES = (256, 1024)
BATCH_SIZES = tuple(2**k for k in range(10))  # 1 .. 512
DISTINCT_PAIRS = 16  # distinct crops per size; a batch repeats them (the cost does not depend on content)


@dataclass
class Point:
    batch: int
    rate: Optional[float] = None  # pairs/s; None: not measured
    why: str = ""
    batches: int = 0


@dataclass
class Curve:
    side: int
    points: List[Point] = field(default_factory=list)
    probe_batch: Optional[int] = None
    probe_rate: Optional[float] = None
    probe_bytes_per_pair: float = 0.0
    budget_bytes: int = 0

    def best(self) -> Optional[Point]:
        measured = [p for p in self.points if p.rate]
        return max(measured, key=lambda p: p.rate) if measured else None


def _pairs(side: int, count: int) -> List[sources.LoadedPair]:
    """`count` distinct (reference crop, JPEG-30 copy) pairs of side x side RGB from skimage's retina."""
    from skimage import data

    photo = Image.fromarray(data.retina())
    if min(photo.size) < side + count:
        photo = photo.resize((side + 2 * count, side + 2 * count), Image.LANCZOS)
    pairs = []
    for i in range(count):
        crop = photo.crop((i * 7, i * 5, i * 7 + side, i * 5 + side))
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=30)
        as_chw = lambda image: torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # noqa: E731
        pairs.append(sources.LoadedPair(
            pair_id=f"{side}/{i}", row_index=i, reference="", distorted="", ref=as_chw(crop),
            dist=as_chw(Image.open(buffer)), bit_depth=8, data_range=255.0,
        ))
    return pairs


def _spec(device: str, actors_per_node: int) -> WorkerSpec:
    return WorkerSpec(
        source=SourceConfig(), ssim=SSIMConfig(), batch=BatchConfig(), summary=SummaryConfig(), output_url="",
        output_storage_options={}, device=device, torch_threads=1, decode_threads=1,
        memory_share=1.0 / actors_per_node, expected_pairs=10**6,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_batch(computer: ShardComputer, batch: List[sources.LoadedPair]) -> float:
    _sync(computer.device)
    start = time.perf_counter()
    computer._scores(batch)
    _sync(computer.device)
    return time.perf_counter() - start


def _measure(computer: ShardComputer, pool: List[sources.LoadedPair], size: int, *, seconds: float,
             min_batches: int, deadline: float) -> Point:
    batch = [pool[i % len(pool)] for i in range(size)]
    _time_batch(computer, batch)  # warm-up: allocator, caches
    times: List[float] = []
    began = time.perf_counter()
    while len(times) < min_batches or time.perf_counter() - began < seconds:
        if time.perf_counter() > deadline:
            break
        times.append(_time_batch(computer, batch))
    if not times:
        return Point(size, None, "out of time")
    return Point(size, size / statistics.median(times), batches=len(times))


def _probe(computer: ShardComputer, pool: List[sources.LoadedPair], curve: Curve) -> None:
    """The probe exactly as an actor runs it on the bucket's first trial batch."""
    key: BucketKey = bucket_key(pool[0].ref)
    computer._warm_up(key)
    trial = pool[:PROBE_TRIAL_PAIRS]
    curve.probe_batch = computer.sizer.probe(key, len(trial), lambda: computer._scores(trial))
    record = computer.sizer.records[key]
    curve.probe_bytes_per_pair, curve.budget_bytes = record.peak_bytes_per_pair, record.budget_bytes


def run_curve(side: int, args: argparse.Namespace, deadline: float) -> Curve:
    computer = ShardComputer(_spec(args.device, args.actors_per_node))
    pool = _pairs(side, DISTINCT_PAIRS)
    curve = Curve(side)
    _probe(computer, pool, curve)
    for size in args.batches:
        if size * curve.probe_bytes_per_pair > curve.budget_bytes:
            curve.points.append(Point(size, None, "over the actor's memory budget"))
            continue
        curve.points.append(_measure(computer, pool, size, seconds=args.seconds_per_point,
                                     min_batches=args.min_batches, deadline=deadline))
        print(f"{side}² batch {size}: {curve.points[-1].rate or 0:.1f} pairs/s", file=sys.stderr, flush=True)
    probed = next((p for p in curve.points if p.batch == curve.probe_batch), None)
    if probed is None and curve.probe_batch:
        probed = _measure(computer, pool, curve.probe_batch, seconds=args.seconds_per_point,
                          min_batches=args.min_batches, deadline=deadline)
    curve.probe_rate = probed.rate if probed else None
    return curve


def print_curve(curve: Curve) -> None:
    best = curve.best()
    print(f"\n{curve.side}x{curve.side} RGB uint8: probe measured {curve.probe_bytes_per_pair / 2**20:.1f} MiB per pair "
          f"against a budget of {curve.budget_bytes / 2**30:.2f} GiB -> batch {curve.probe_batch}")
    print("| batch | pairs/s | of best | note |")
    print("|---:|---:|---:|---|")
    for point in curve.points:
        share = f"{point.rate / best.rate:.2f}" if point.rate and best else ""
        note = point.why or ("probe's choice" if point.batch == curve.probe_batch else "")
        rate = f"{point.rate:.1f}" if point.rate else "—"
        print(f"| {point.batch} | {rate} | {share} | {note} |")
    if curve.probe_batch not in [p.batch for p in curve.points] and curve.probe_rate and best:
        print(f"| {curve.probe_batch} | {curve.probe_rate:.1f} | {curve.probe_rate / best.rate:.2f} | probe's choice |")
    if curve.probe_rate and best:
        verdict = "within" if curve.probe_rate >= 0.9 * best.rate else "NOT within"
        print(f"\nprobe's choice {curve.probe_batch}: {curve.probe_rate:.1f} pairs/s = "
              f"{curve.probe_rate / best.rate:.2f} of the best ({best.rate:.1f} at batch {best.batch}): {verdict} 10%")


# ---------------------------------------------------------------------------------------------- plot

_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def plot(curves: Sequence[Curve], path: Path, title: str) -> None:
    """Pairs/s (relative to each curve's best, so sizes share one axis) against log2 batch size."""
    width, height, left, right, top, bottom = 900, 560, 80, 30, 100, 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 15), title, fill="black", font=_font(18))
    x_of = lambda b: left + (width - left - right) * math.log2(b) / math.log2(BATCH_SIZES[-1])  # noqa: E731
    y_of = lambda r: top + (height - top - bottom) * (1.1 - r) / 1.1  # noqa: E731
    _axes(draw, x_of, y_of, width, height, left, right, top, bottom)
    for index, curve in enumerate(curves):
        _plot_curve(draw, curve, _COLOURS[index % len(_COLOURS)], x_of, y_of, legend_y=40 + 22 * index,
                    legend_x=left)
    image.save(path)


def _axes(draw, x_of, y_of, width, height, left, right, top, bottom) -> None:
    font = _font(13)
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for batch in BATCH_SIZES:
        x = x_of(batch)
        draw.line((x, height - bottom, x, height - bottom + 5), fill="black")
        draw.text((x - 8, height - bottom + 8), str(batch), fill="black", font=font)
    for share in (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0):
        y = y_of(share)
        draw.line((left, y, width - right, y), fill=(225, 225, 225) if share != 0.9 else (150, 150, 150))
        draw.text((left - 40, y - 7), f"{share:.1f}", fill="black", font=font)
    draw.text((width // 2 - 60, height - 30), "batch size (pairs)", fill="black", font=font)
    draw.text((8, top - 20), "pairs/s relative to the best", fill="black", font=font)


def _plot_curve(draw, curve: Curve, colour, x_of, y_of, *, legend_y: int, legend_x: int) -> None:
    best = curve.best()
    if best is None:
        return
    points = [(x_of(p.batch), y_of(p.rate / best.rate)) for p in curve.points if p.rate]
    draw.line(points, fill=colour, width=2)
    for x, y in points:
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    if curve.probe_rate and curve.probe_batch:
        x, y = x_of(curve.probe_batch), y_of(curve.probe_rate / best.rate)
        draw.polygon(((x, y - 14), (x - 7, y - 26), (x + 7, y - 26)), fill=colour)
    font = _font(13)
    draw.line((legend_x, legend_y + 7, legend_x + 24, legend_y + 7), fill=colour, width=3)
    skipped = [p.batch for p in curve.points if p.why == "over the actor's memory budget"]
    label = (f"{curve.side}x{curve.side} RGB: best {best.rate:.0f} pairs/s at {best.batch}; probe's choice "
             f"(triangle) {curve.probe_batch}" + (f"; from {skipped[0]}: over memory budget" if skipped else ""))
    draw.text((legend_x + 30, legend_y), label, fill="black", font=font)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--sizes", type=int, nargs="*", default=list(DEFAULT_SIZES))
    parser.add_argument("--batches", type=int, nargs="*", default=list(BATCH_SIZES))
    parser.add_argument("--seconds-per-point", type=float, default=3.0)
    parser.add_argument("--min-batches", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=1500.0, help="bound on the whole run")
    parser.add_argument("--actors-per-node", type=int, default=None,
                        help="memory share of the probe; default: the job's CPU placement (placement.cpu_actors), 1 on cuda")
    parser.add_argument("--plot", type=Path, default=None, help="PNG to write (default docs/batch_curve_<device>.png)")
    args = parser.parse_args(argv)
    if args.actors_per_node is None:
        from ssim_ray.config import RuntimeConfig
        from ssim_ray.placement import cpu_actors

        runtime = RuntimeConfig()
        args.actors_per_node = 1 if args.device == "cuda" else cpu_actors(
            [float(os.cpu_count() or 1)], torch_threads=int(runtime.cpus_per_worker))
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    configure_process(_spec(args.device, args.actors_per_node))
    deadline = time.perf_counter() + args.max_seconds
    curves = [run_curve(side, args, deadline) for side in args.sizes]
    from bench_job import machine

    print(f"\n{machine()}; device {args.device}, 1 torch thread, load average {os.getloadavg()[0]:.1f}")
    for curve in curves:
        print_curve(curve)
    path = args.plot or Path(__file__).resolve().parent.parent / "docs" / f"batch_curve_{args.device}.png"
    plot(curves, path, f"ssim_ray batch-size curve on {args.device} ({machine().split(',')[0]}, 1 torch thread)")
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
