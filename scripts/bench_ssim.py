"""SSIM core on CPU: ssim_ray against pytorch-msssim, torchmetrics, kornia and scikit-image, same inputs.

All implementations are timed in one process with torch's threads fixed (default 2), taking turns call by
call so that other jobs on a shared machine slow them alike (each round in a shuffled order, each turn an
untimed call and then the timed one: see bench_machine). Per case it prints pairs/s (median, and the
range, of the timed calls after one warm-up), CPU ms per pair, the ratio of ssim_ray's pairs/s to each
peer's, and max |score - skimage| per pair; in a fresh process per implementation, the first call's
latency (ssim_ray builds its C kernel there, or loads it from this machine's kernel cache) and the growth of
peak RSS during a second call. Inputs are crops of real photos (scikit-image's data)
and their JPEG-compressed, noisy copies.

Settings, as close to Wang's as each peer allows: ssim_ray defaults (Gaussian 11 / 1.5, K = 0.01, 0.03,
valid region) with data_range=255; pytorch-msssim `ssim(data_range=255, size_average=False)` (valid
region); torchmetrics `structural_similarity_index_measure(gaussian_kernel=True, sigma=1.5,
kernel_size=11, data_range=255.0, reduction='none')` (it averages a reflect-padded border); kornia
`metrics.ssim(window_size=11, max_val=255.0, padding='valid')` then the mean of each map; skimage
`structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
channel_axis=0)` in float64, one pair at a time. Peers that cannot take uint8 get float32 copies (made
outside the timed region; noted in the table).

Usage:
    python scripts/bench_ssim.py                 # all cases, 2 threads
    python scripts/bench_ssim.py --cold-compile  # also: ssim_ray's first call with an empty compile cache
    python scripts/bench_ssim.py --warm-malloc   # the peers without their page faults (bench_machine.WARM_MALLOC)

Each table row also gives the median page faults per timed call: a peer whose temporaries are freshly
mapped pays them in its time (under glibc's defaults it varies from run to run: see bench_machine).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from bench_machine import minor_faults, rerun_with_warm_malloc, turns

CASES = [(16, 256, "float32"), (16, 256, "uint8"), (2, 1024, "float32"), (2, 1024, "uint8")]
IMPLEMENTATIONS = ["ssim_ray", "ssim_ray eager", "pytorch-msssim", "torchmetrics", "kornia", "skimage"]
FLOAT_ONLY = {"pytorch-msssim", "torchmetrics", "kornia"}  # msssim returns 1.0 for uint8; the others refuse


@dataclass(frozen=True)
class Case:
    """One memory measurement: which implementation, batch, side, input dtype, threads."""

    impl: str
    batch: int
    side: int
    dtype: str
    threads: int


def make_inputs(batch: int, side: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, side, side) uint8 crops of real photos (resized up) and JPEG q30..80 + noise copies."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    refs, dists = [], []
    for i in range(batch):
        img = Image.fromarray(photos[i % len(photos)]).resize((side + 64, side + 64), Image.Resampling.BICUBIC)
        top, left = (int(v) for v in rng.integers(0, 64, 2))
        crop = img.crop((left, top, left + side, top + side))
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=int(rng.integers(30, 81)))
        dist = np.array(Image.open(io.BytesIO(buf.getvalue()))).astype(np.float64)
        dist = np.clip(np.rint(dist + rng.normal(0, 2, dist.shape)), 0, 255).astype(np.uint8)
        refs.append(np.array(crop).transpose(2, 0, 1))
        dists.append(dist.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(refs)), np.ascontiguousarray(np.stack(dists))


def scorer(impl: str):
    """The implementation as f(x, y) -> per-pair scores (N,), with its Wang-like settings."""
    import torch

    if impl in ("ssim_ray", "ssim_ray eager"):
        from ssim_ray import ssim

        # The eager row must not use the kernel the compiled row compiled: each names its compile policy.
        policy = "never" if impl == "ssim_ray eager" else "always"
        return lambda x, y: ssim(x, y, data_range=255.0, compile=policy)
    if impl == "pytorch-msssim":
        import pytorch_msssim

        return lambda x, y: pytorch_msssim.ssim(x, y, data_range=255.0, size_average=False)
    if impl == "torchmetrics":
        from torchmetrics.functional import structural_similarity_index_measure as tm_ssim

        return lambda x, y: tm_ssim(x, y, gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=255.0,
                                    reduction="none")
    if impl == "kornia":
        import kornia

        return lambda x, y: kornia.metrics.ssim(x, y, window_size=11, max_val=255.0, padding="valid").mean((1, 2, 3))
    if impl == "skimage":
        from skimage.metrics import structural_similarity

        def per_pair(x, y):
            return torch.tensor([structural_similarity(a.astype(np.float64), b.astype(np.float64), gaussian_weights=True,
                                                       sigma=1.5, use_sample_covariance=False, data_range=255.0,
                                                       channel_axis=0) for a, b in zip(x, y)])

        return per_pair
    raise ValueError(f"unknown implementation {impl!r}, expected one of {IMPLEMENTATIONS}")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset VmHWM so the peak covers only the timed calls (Linux; False where not allowed)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prepare(impl: str, dtype: str, x_np: np.ndarray, y_np: np.ndarray):
    """Inputs in the dtype this implementation is given (float32 copies for float-only peers)."""
    import torch

    given = "float32" if impl in FLOAT_ONLY else dtype
    if impl == "skimage":
        return given, x_np.astype(given), y_np.astype(given)
    as_torch = getattr(torch, given)
    return given, torch.from_numpy(x_np).to(as_torch), torch.from_numpy(y_np).to(as_torch)


def measure_memory(case: Case) -> dict:
    """In a fresh process: first call (compiles, for ssim_ray), then the peak RSS growth of a second call."""
    import torch

    torch.set_num_threads(case.threads)
    given, x, y = prepare(case.impl, case.dtype, *make_inputs(case.batch, case.side))
    score = scorer(case.impl)
    start = time.perf_counter()
    scores = score(x, y)
    first_call = time.perf_counter() - start
    reset_ok = reset_peak_rss()
    base = rss_bytes()
    score(x, y)
    return {"impl": case.impl, "given": given, "first_call_s": first_call, "scores": [float(v) for v in scores],
            "peak_mb": (peak_rss_bytes() - base) / 2**20 if reset_ok else None}


def run_in_fresh_process(case: Case, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case.__dict__)], capture_output=True,
                         text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{case.impl} failed on {case.batch}x3x{case.side}^2 {case.dtype}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_interleaved(batch: int, side: int, dtype: str, threads: int, repeats: int) -> dict:
    """Wall and CPU seconds per call, all implementations in this process, taking turns every repeat.

    Taking turns spreads the load of other jobs on a shared machine evenly over the implementations, so
    the ratios are steadier than the rates themselves.
    """
    import torch

    torch.set_num_threads(threads)
    x_np, y_np = make_inputs(batch, side)
    runs = {impl: (scorer(impl), *prepare(impl, dtype, x_np, y_np)[1:]) for impl in IMPLEMENTATIONS}
    for score, x, y in runs.values():
        score(x, y)  # warm-up: compiles ssim_ray's kernel (or loads it from the cache)
    times = {impl: {"wall_s": [], "cpu_s": [], "faults": []} for impl in IMPLEMENTATIONS}
    for r in range(repeats):
        for impl in turns(IMPLEMENTATIONS, r):
            score, x, y = runs[impl]
            score(x, y)  # the switch-in call, untimed (bench_machine: turn-taking's transients)
            faults, wall, cpu = minor_faults(), time.perf_counter(), time.process_time()
            score(x, y)
            times[impl]["wall_s"].append(time.perf_counter() - wall)
            times[impl]["cpu_s"].append(time.process_time() - cpu)
            times[impl]["faults"].append(minor_faults() - faults)
    return times


def table(batch: int, side: int, dtype: str, memory: dict, times: dict) -> str:
    """A markdown table for one case: pairs/s, CPU s/pair, ratio, memory, max |delta| vs skimage."""
    ref = np.array(memory["skimage"]["scores"])
    ours = batch / statistics.median(times["ssim_ray"]["wall_s"])
    lines = [f"\n### {batch} x 3 x {side} x {side}, {dtype}\n",
             "| implementation | input given | pairs/s (median) | min..max | CPU ms/pair | ssim_ray / this "
             "| peak RSS growth MiB | max abs delta vs skimage | first call s | page faults / call |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for impl in IMPLEMENTATIONS:
        mem, wall = memory[impl], times[impl]["wall_s"]
        rate = batch / statistics.median(wall)
        cpu_ms = 1000 * statistics.median(times[impl]["cpu_s"]) / batch
        delta = float(np.abs(np.array(mem["scores"]) - ref).max())
        peak = "n/a" if mem["peak_mb"] is None else f"{mem['peak_mb']:.0f}"
        lines.append(f"| {impl} | {mem['given']} | {rate:.1f} | {batch / max(wall):.1f}..{batch / min(wall):.1f} "
                     f"| {cpu_ms:.2f} | {ours / rate:.2f}x | {peak} | {delta:.1e} | {mem['first_call_s']:.2f} "
                     f"| {statistics.median(times[impl]['faults']):.0f} |")
    return "\n".join(lines)


def parse_cases(text: str) -> list[tuple[int, int, str]]:
    cases = []
    for item in text.split(","):
        try:
            size, dtype = item.split(":")
            batch, side = (int(v) for v in size.split("x"))
        except ValueError:
            raise ValueError(f"--cases items look like 16x256:float32, got {item!r}") from None
        if dtype not in ("float32", "uint8"):
            raise ValueError(f"--cases dtype must be float32 or uint8, got {dtype!r}")
        cases.append((batch, side, dtype))
    return cases


def machine() -> str:
    import torch

    from bench_machine import cpu_model, malloc_mode, vector_isa

    return (f"{cpu_model()} ({vector_isa()}), {os.cpu_count()} cores, torch {torch.__version__}, {malloc_mode()}, "
            f"load average {', '.join(f'{v:.1f}' for v in os.getloadavg())} at the start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", default=",".join(f"{n}x{side}:{dtype}" for n, side, dtype in CASES),
                        help="comma-separated NxSIDE:DTYPE, e.g. 16x256:float32,2x1024:uint8")
    parser.add_argument("--cold-compile", action="store_true",
                        help="first measure ssim_ray's first call with an empty kernel cache (a fresh TMPDIR)")
    parser.add_argument("--warm-malloc", action="store_true",
                        help="rerun with glibc keeping freed memory (bench_machine.WARM_MALLOC): the peers' "
                             "temporaries then cost no page faults")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warm_malloc:
        rerun_with_warm_malloc()
    if args.worker:
        print(json.dumps(measure_memory(Case(**json.loads(args.worker)))))
        return
    print(f"Machine: {machine()}; torch threads: {args.threads}")
    env = dict(os.environ)
    if args.cold_compile:
        with tempfile.TemporaryDirectory() as cache:  # the kernel cache lives under the temporary directory
            cold = run_in_fresh_process(Case("ssim_ray", 16, 256, "float32", args.threads), {**env, "TMPDIR": cache})
        print(f"ssim_ray first call with an empty kernel cache (builds the C kernel): {cold['first_call_s']:.1f} s")
    for batch, side, dtype in parse_cases(args.cases):
        memory = {impl: run_in_fresh_process(Case(impl, batch, side, dtype, args.threads), env)
                  for impl in IMPLEMENTATIONS}
        times = time_interleaved(batch, side, dtype, args.threads, args.repeats)
        print(table(batch, side, dtype, memory, times), flush=True)


if __name__ == "__main__":
    main()
