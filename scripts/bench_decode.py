"""One actor's decode rate against the decode parallelism it is given, side by side (issue 15, point 1).

The actor's own loading path (`sources.iter_shard_pairs`, what `ShardWorker.compute_rows` runs: read the
row, fetch both sides, decode with Pillow, check, to tensors) over the same pairs with 1 and 2 decode
threads, in one process, rounds alternating the order; medians. Beside them, the designs that were weighed
against threads (docs/ARCHITECTURE.md, "Decode capacity"):

- 2 decode processes: `decode_image` in a process pool, pixels pickled back to the actor;
- the GIL-held share of a pair on one thread (cProfile: the time outside Pillow's C decoder and encoder,
  which release the GIL; profiling inflates the Python side, so the share is an upper bound), and the
  pairs/s one process's threads could reach before the GIL serialises them (1 / that time);
- nvJPEG (`torchvision.io.decode_jpeg(..., device="cuda")`) on the JPEG sides, only where torchvision and
  a CUDA device are present: measured there, reported "not available" elsewhere, never estimated.

Inputs: 512x512 RGB crops of scikit-image's photographs (references PNG; distorted JPEG q20-90 or noisy
PNG, alternating), embedded in a Parquet manifest so that storage is not timed. Prints the CPU model and
SIMD flags, Pillow's version and whether it decodes JPEG with libjpeg-turbo.

    python scripts/bench_decode.py [--pairs 96] [--rounds 5]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, features

from ssim_ray.config import SourceConfig, SSIMConfig
from ssim_ray.sources import iter_shard_pairs, plan_shards
from ssim_ray.sources.decode import decode_image

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_tile")
# Pillow's C calls that release the GIL while they run (ImagingSectionEnter in decode.c / encode.c).
GIL_FREE_CALLS = (("decode", "ImagingDecoder"), ("encode", "ImagingEncoder"))


def cpu_description() -> str:
    """CPU model, cores and the SIMD flags that matter for decoders, from /proc/cpuinfo."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    present = [flag for flag in SIMD_FLAGS if flag in flags]
    return f"{model}, {os.cpu_count()} cores, SIMD: {' '.join(present) or 'none found'}"


def scheduler_note() -> str:
    """Whether the kernel shares CPUs between sessions first (autogroup): then a process cannot get more than
    its session's share of the cores, whatever its threads, while other sessions are busy."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as flag:
            enabled = flag.read().strip() == "1"
    except OSError:
        return "autogroup unknown"
    return "autogroup scheduling ON: busy sessions split the cores" if enabled else "autogroup off"


def make_pairs(count: int, seed: int = 15) -> Tuple[List[bytes], List[bytes]]:
    """Encoded (reference, distorted) 512x512 RGB pairs cut from scikit-image's photographs."""
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.rocket(), skimage.data.chelsea()]
    photos = [p for p in photos if p.shape[0] >= 512 and p.shape[1] >= 512] or photos[:1]
    rng = np.random.default_rng(seed)
    refs, dists = [], []
    for i in range(count):
        photo = photos[i % len(photos)]
        top, left = (int(rng.integers(0, photo.shape[k] - 511)) for k in (0, 1))
        crop = np.ascontiguousarray(photo[top : top + 512, left : left + 512])
        refs.append(_encode(crop, "PNG"))
        if i % 2:
            noisy = np.clip(np.rint(crop + rng.normal(0.0, 8.0, crop.shape)), 0, 255).astype(np.uint8)
            dists.append(_encode(noisy, "PNG"))
        else:
            dists.append(_encode(crop, "JPEG", quality=int(rng.integers(20, 91))))
    return refs, dists


def _encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def actor_loading(manifest: str, pairs: int, threads: int) -> int:
    """The actor's loading path over the whole manifest with `threads` decode threads; pairs loaded ok."""
    source = SourceConfig(kind="parquet", url=manifest, pairs_per_shard=pairs)
    shard = plan_shards(source).shards[0]
    loaded = iter_shard_pairs(shard, source, SSIMConfig(), threads=threads, prefetch=64)
    return sum(pair.status == "ok" for pair in loaded)


def _decode_pair(pair: Tuple[bytes, bytes]) -> Tuple[np.ndarray, np.ndarray]:
    options = {"color": "rgb", "alpha": "drop", "max_pixels": 10**8}
    return tuple(decode_image(data, name="bench", **options).pixels for data in pair)  # type: ignore[return-value]


def process_pool_loading(pool: ProcessPoolExecutor, pairs: List[Tuple[bytes, bytes]]) -> int:
    """Decode processes: bytes out, decoded pixels pickled back (what a decode-process design moves)."""
    return sum(1 for _ in pool.map(_decode_pair, pairs, chunksize=4))


def _nothing() -> None:
    return None


def profiler_cost_per_call(calls: int = 200_000) -> float:
    """Thread CPU seconds cProfile adds to one Python call (to take out of the profiled GIL-held time)."""
    def loop() -> None:
        for _ in range(calls):
            _nothing()

    started = time.thread_time()
    loop()
    bare = time.thread_time() - started
    profile = cProfile.Profile(time.thread_time)
    started = time.thread_time()
    profile.runcall(loop)
    return max(0.0, (time.thread_time() - started - bare) / calls)


def gil_held_seconds_per_pair(pairs: List[Tuple[bytes, bytes]]) -> Tuple[float, float, float]:
    """(CPU s per pair on one thread under cProfile, of which outside Pillow's GIL-free C calls, that minus
    the profiler's own cost for the calls it counted)."""
    # The thread's CPU clock, for the profile and the total: time spent descheduled on a shared machine
    # is neither held nor released.
    profile = cProfile.Profile(time.thread_time)
    started = time.thread_time()
    profile.enable()
    for pair in pairs:
        _decode_pair(pair)
    profile.disable()
    total = time.thread_time() - started
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    free = sum(entry[2] for (_file, _line, name), entry in stats.items()
               if any(call in name and owner in name for call, owner in GIL_FREE_CALLS))
    calls = sum(entry[1] for entry in stats.values())
    held = (total - free) / len(pairs)
    return total / len(pairs), held, max(0.0, held - calls * profiler_cost_per_call() / len(pairs))


def pillow_load_seconds_per_pair(pairs: List[Tuple[bytes, bytes]]) -> float:
    """Thread CPU seconds per pair of Pillow's bare `Image.open(...).load()` on both sides: almost all of it in
    the C decoder, which releases the GIL; what the actor spends per pair beyond this is mostly Python."""
    started = time.thread_time()
    for pair in pairs:
        for data in pair:
            Image.open(io.BytesIO(data)).load()
    return (time.thread_time() - started) / len(pairs)


def gpu_decode_rate(dists: List[bytes]) -> Optional[float]:
    """JPEGs per second through nvJPEG, or None where torchvision or a CUDA device is missing."""
    try:
        import torch
        from torchvision.io import decode_jpeg
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    jpegs = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in dists if d[:2] == b"\xff\xd8"]
    decode_jpeg(jpegs[:2], device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    decode_jpeg(jpegs, device="cuda")
    torch.cuda.synchronize()
    return len(jpegs) / (time.perf_counter() - started)


def _cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) of this process and of the given child processes, from /proc."""
    total = time.process_time()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def timed(run: Callable[[], int], pids: Sequence[int]) -> Tuple[float, float, int]:
    """(wall s, CPU s of this process and of `pids`, items) of one call."""
    wall, cpu = time.perf_counter(), _cpu_seconds(pids)
    items = run()
    return time.perf_counter() - wall, _cpu_seconds(pids) - cpu, items


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_description()}")
    print(f"Pillow {Image.__version__}, libjpeg-turbo: {features.check_feature('libjpeg_turbo')}; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; {scheduler_note()}")
    refs, dists = make_pairs(args.pairs)
    encoded = sum(map(len, refs)) + sum(map(len, dists))
    print(f"{args.pairs} pairs of 512x512 RGB, {encoded / args.pairs / 1024:.0f} KiB encoded per pair\n")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = os.path.join(tmp, "pairs.parquet")
        ids = [f"p{i}" for i in range(args.pairs)]
        pq.write_table(pa.table({"pair_id": ids, "reference": refs, "distorted": dists}), manifest)
        actor_loading(manifest, args.pairs, 1)  # warm: imports, page cache
        runs: Dict[str, List[Tuple[float, float, int]]] = {}
        with ProcessPoolExecutor(max_workers=2) as pool:
            process_pool_loading(pool, list(zip(refs, dists))[:4])  # start the workers
            contenders = {
                "actor loading path, 1 decode thread": lambda: actor_loading(manifest, args.pairs, 1),
                "actor loading path, 2 decode threads": lambda: actor_loading(manifest, args.pairs, 2),
                "2 decode processes (pixels pickled back)": lambda: process_pool_loading(pool, list(zip(refs, dists))),
            }
            for round_ in range(args.rounds):
                names = list(contenders)
                names = names[round_ % len(names):] + names[: round_ % len(names)]
                for name in names:
                    runs.setdefault(name, []).append(timed(contenders[name], list(pool._processes or {})))
    print_table(runs, args.pairs)
    per_pair, held, corrected = gil_held_seconds_per_pair(list(zip(refs, dists))[: min(32, args.pairs)])
    print(f"\nOne thread under cProfile: {per_pair * 1e3:.2f} CPU ms per pair, of which {held * 1e3:.2f} ms outside "
          f"Pillow's GIL-free decode/encode ({held / per_pair:.0%}; an upper bound: profiling inflates Python), "
          f"{corrected * 1e3:.2f} ms with the profiler's own per-call cost taken out ({corrected / per_pair:.0%}). "
          f"One process's decode threads serialise on the GIL near 1 / held: {1 / held:,.0f} to "
          f"{1 / max(corrected, 1e-9):,.0f} pairs/s, or {per_pair / held:.1f} to {per_pair / max(corrected, 1e-9):.1f} "
          f"cores' worth of decoding")
    load = pillow_load_seconds_per_pair(list(zip(refs, dists)))
    path = statistics.median(cpu for _, cpu, _ in runs["actor loading path, 1 decode thread"]) / args.pairs
    print(f"Without a profiler: the actor's path costs {path * 1e3:.2f} CPU ms per pair on 1 thread, Pillow's bare "
          f"open+load {load * 1e3:.2f}: {(path - load) * 1e3:.2f} ms per pair outside the decoder (mostly GIL-held), "
          f"a GIL cap near {1 / max(path - load, 1e-9):,.0f} pairs/s per process")
    rate = gpu_decode_rate(dists)
    print("nvJPEG (torchvision.io.decode_jpeg on cuda): " +
          (f"{rate:,.0f} JPEG/s" if rate else "not available here (needs torchvision and a CUDA device); not measured"))


def print_table(runs: Dict[str, List[Tuple[float, float, int]]], pairs: int) -> None:
    """Median pairs/s, CPU ms per pair (this process and its decode processes), cores used, ratio to 1 thread."""
    base = None
    print("| contender | pairs/s (median) | ÷ 1 thread | CPU ms/pair | cores busy | rounds, pairs/s |")
    print("|---|---:|---:|---:|---:|---|")
    for name, samples in runs.items():
        if any(items != pairs for _, _, items in samples):
            raise RuntimeError(f"{name}: not every pair loaded ok")
        rates = [pairs / wall for wall, _, _ in samples]
        rate = statistics.median(rates)
        base = base or rate
        cpu_ms = statistics.median(cpu for _, cpu, _ in samples) * 1e3 / pairs
        cores = statistics.median(cpu / wall for wall, cpu, _ in samples)
        print(f"| {name} | {rate:,.1f} | {rate / base:.2f} | {cpu_ms:.1f} | {cores:.2f} | "
              f"{', '.join(f'{r:.0f}' for r in rates)} |")


if __name__ == "__main__":
    main()
