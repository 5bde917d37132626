"""What PSNR and MS-SSIM add to SSIM, side by side: `[ssim]`, `[ssim, psnr]`, `[ssim, psnr, ms_ssim]` as the
job computes them, beside pytorch-msssim's ssim / ms_ssim and torchmetrics' PSNR / MS-SSIM on the same inputs.

Inputs: crops of scikit-image's photos and their JPEG + noise copies (`bench_ssim.make_inputs`), N x 3 x S x S.
ssim_ray gets them in their own dtype (uint8 by default, as the job passes decoded pixels; `--dtype float32`
too), the peers float32 copies made outside the timed region. ssim_ray's sets: `[ssim]` is
`ssim(per_channel=True)`; `+ psnr` adds `mse(per_channel=True)` (the job forms PSNR from it); `+ ms_ssim`
replaces `ssim` by `ms_ssim_terms_and_ssim` (SSIM's full-resolution pass is MS-SSIM's first scale). All run
in one process with torch threads fixed, taking turns (shuffled; each turn an untimed call, then the timed
one: see bench_machine; medians of `--repeats` rounds; what a
metric adds is the median over rounds of each round's own difference), the compiled CPU kernel warm. Prints the CPU model and its vector ISA (what the C kernels are built for).

Usage:
    python scripts/bench_metrics.py                         # 16x3x256^2 uint8 and float32, 2 threads
    python scripts/bench_metrics.py --threads 1 --repeats 15
    python scripts/bench_metrics.py --warm-malloc          # peers without their page faults (see bench_machine)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from bench_machine import cpu_model, malloc_mode, minor_faults, rerun_with_warm_malloc, turns, vector_isa
from bench_ssim import make_inputs

from ssim_ray.metric import ms_ssim_terms_and_ssim, mse, ssim


def contenders(x: torch.Tensor, y: torch.Tensor, xf: torch.Tensor, yf: torch.Tensor) -> dict:
    """name -> zero-argument callable; ssim_ray on x, y (their dtype), peers on float32 copies."""
    import pytorch_msssim
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as tm_ms_ssim
    from torchmetrics.functional.image import peak_signal_noise_ratio as tm_psnr

    options = {} if x.dtype in (torch.uint8, torch.uint16) else {"data_range": 255.0}
    return {
        "ssim_ray [ssim]": lambda: ssim(x, y, per_channel=True, compile="always", **options),
        "ssim_ray [ssim, psnr]": lambda: (ssim(x, y, per_channel=True, compile="always", **options),
                                          mse(x, y, per_channel=True, compile="always")),
        "ssim_ray [ssim, psnr, ms_ssim]": lambda: (ms_ssim_terms_and_ssim(x, y, compile="always", **options),
                                                   mse(x, y, per_channel=True, compile="always")),
        "ssim_ray ms_ssim alone": lambda: ms_ssim_terms_and_ssim(x, y, compile="always", **options),
        "ssim_ray psnr alone": lambda: mse(x, y, per_channel=True, compile="always"),
        "pytorch-msssim ssim": lambda: pytorch_msssim.ssim(xf, yf, data_range=255.0, size_average=False),
        "pytorch-msssim ms_ssim": lambda: pytorch_msssim.ms_ssim(xf, yf, data_range=255.0, size_average=False),
        "torchmetrics psnr": lambda: tm_psnr(xf, yf, data_range=255.0, reduction="none", dim=(1, 2, 3)),
        "torchmetrics ms_ssim": lambda: tm_ms_ssim(xf, yf, data_range=255.0, reduction="none"),
    }


def time_turns(calls: dict, repeats: int) -> dict:
    """Wall and CPU seconds of each call, taking turns every round (order shuffled, each turn one untimed call
    then one timed: `bench_machine.turns`), after one warm-up each."""
    for call in calls.values():
        call()
    names = list(calls)
    times = {name: {"wall": [], "cpu": [], "faults": []} for name in names}
    for r in range(repeats):
        for name in turns(names, r):
            calls[name]()  # the switch-in call, untimed (bench_machine: turn-taking's transients)
            faults, wall, cpu = minor_faults(), time.perf_counter(), time.process_time()
            calls[name]()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["faults"].append(minor_faults() - faults)
    return times


def table(batch: int, side: int, dtype: str, times: dict) -> str:
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    base = med["ssim_ray [ssim]"]
    lines = [f"\n### {batch} x 3 x {side} x {side}, ssim_ray given {dtype}, peers float32\n",
             "| contender | pairs/s (median) | ms/pair wall | CPU ms/pair | wall / ssim_ray [ssim] | CPU / ssim_ray [ssim] "
             "| page faults / call |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in med.items():
        lines.append(f"| {name} | {batch / m['wall']:.1f} | {1000 * m['wall'] / batch:.2f} | {1000 * m['cpu'] / batch:.2f} "
                     f"| {m['wall'] / base['wall']:.2f} | {m['cpu'] / base['cpu']:.2f} | {m['faults']:.0f} |")
    added = {"psnr": ("ssim_ray [ssim, psnr]", "ssim_ray [ssim]"), "ms_ssim": ("ssim_ray [ssim, psnr, ms_ssim]",
                                                                              "ssim_ray [ssim, psnr]")}
    for what, (more, less) in added.items():
        wall = (med[more]["wall"] - med[less]["wall"]) / base["wall"]
        cpu = (med[more]["cpu"] - med[less]["cpu"]) / base["cpu"]
        # Each round ran every contender once, back to back: a round's own difference compares like with like
        # when the shared machine's load drifts between rounds (the medians' difference mixes rounds).
        rounds = {k: statistics.median((m - l) / b for m, l, b in zip(times[more][k], times[less][k],
                                                                      times["ssim_ray [ssim]"][k]))
                  for k in ("wall", "cpu")}
        lines.append(f"\nAdding {what}: {100 * rounds['wall']:+.0f}% of [ssim]'s wall time ({100 * rounds['cpu']:+.0f}% of "
                     f"its CPU time), median of the rounds' own differences; from the medians {100 * wall:+.0f}% "
                     f"({100 * cpu:+.0f}%).")
    ratio = {k: med["pytorch-msssim ssim"][k] / base[k] for k in ("wall", "cpu")}
    lines.append(f"ssim_ray [ssim] vs pytorch-msssim ssim: {ratio['wall']:.1f}x (wall), {ratio['cpu']:.1f}x (CPU).")
    per_round = [p / s for p, s in zip(times["pytorch-msssim ssim"]["wall"], times["ssim_ray [ssim]"]["wall"])]
    lines.append(f"Per round (wall): median {statistics.median(per_round):.1f}x, "
                 f"min {min(per_round):.1f}x, max {max(per_round):.1f}x.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--dtypes", default="uint8,float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warm-malloc", action="store_true",
                        help="rerun with glibc keeping freed memory (bench_machine.WARM_MALLOC): peers' temporaries "
                             "then cost no page faults")
    args = parser.parse_args()
    if args.warm_malloc:
        rerun_with_warm_malloc()
    torch.set_num_threads(args.threads)
    print(f"Machine: {cpu_model()} ({vector_isa()}), {os.cpu_count()} cores, torch {torch.__version__}, "
          f"torch threads {args.threads}, {malloc_mode()}, load average "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} at the start")
    x_np, y_np = make_inputs(args.batch, args.side)
    xf, yf = torch.from_numpy(x_np).float(), torch.from_numpy(y_np).float()
    for dtype in args.dtypes.split(","):
        x, y = torch.from_numpy(x_np).to(getattr(torch, dtype)), torch.from_numpy(y_np).to(getattr(torch, dtype))
        print(table(args.batch, args.side, dtype, time_turns(contenders(x, y, xf, yf), args.repeats)), flush=True)
    print(f"\nload average {', '.join(f'{v:.1f}' for v in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
