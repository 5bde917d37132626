"""GPU benchmark: ssim_ray's Triton kernel and ssim() against pytorch-msssim, torchmetrics, kornia and fused-ssim.

One run, same inputs, same card; prints Markdown tables and writes them to --out:

1. Throughput at 64x3x256^2, 8x3x512^2 and 2x3x2048^2: median time (triton.testing.do_bench, L2 flushed
   between runs), pairs/s, achieved GB/s (input bytes read once / time) and the share of the bandwidth floor
   (input bytes / measured device-to-device copy bandwidth, counting bytes read plus written).
2. Accuracy on real photographs with real distortions (JPEG, noise, blur, contrast) against scikit-image in
   float64 with Wang's settings: max |delta| of each method's per-pair score, and amp (half-precision storage
   of fractional pixels) against float64.
3. The kernel's tile shapes (block width, rows, warps) at each size, for the record.

Timing inputs are random uint8 pixels: none of the methods has a data-dependent path, and random pixels are
not zeros. `--dry-run` runs everything on the CPU at tiny sizes (wall-clock medians; the kernel only under
TRITON_INTERPRET=1) to check the script itself; its numbers mean nothing.

    python3 scripts/bench_gpu.py --out $OUT/bench_gpu.md
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ssim_ray.metric import ssim
from ssim_ray.metric.triton import launcher

SIZES = ((64, 3, 256, 256), (8, 3, 512, 512), (2, 3, 2048, 2048))
DRY_SIZES = ((2, 3, 48, 48),)
# (block_w, rows, warps, columns per lane, unrolled rows); the module's default first. Unrolled shapes take
# ~20 s each to compile, so they come last: if the step runs out of time, the rest is already written.
TILE_CONFIGS = (
    (128, 64, 4, 1, False), (64, 64, 2, 1, False), (256, 64, 8, 1, False), (128, 128, 4, 1, False),
    (128, 64, 2, 2, False), (128, 64, 4, 1, True), (128, 64, 2, 2, True),
)


@dataclass
class Row:
    method: str
    dtype: str
    size: tuple
    ms: Optional[float]
    note: str = ""


# ---------------------------------------------------------------------------------------------- timing


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of fn: do_bench (CUDA events, L2 flushed) on CUDA, wall clock on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu(fn):
        times = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu


def copy_bandwidth(device: str, timer) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    nbytes = 2**30 if device == "cuda" else 2**24
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------------- methods


def _peers() -> dict[str, Optional[object]]:
    """Importable peers; None where a package is missing (reported as "not available")."""
    found: dict[str, Optional[object]] = {}
    for name, module in (("pytorch_msssim", "pytorch_msssim"), ("torchmetrics", "torchmetrics.functional.image"),
                         ("kornia", "kornia.metrics"), ("fused_ssim", "fused_ssim")):
        try:
            found[name] = __import__(module, fromlist=["_"])
        except Exception as exc:  # a peer that fails to import is reported, not fatal
            print(f"{name}: not available ({type(exc).__name__}: {exc})")
            found[name] = None
    return found


def methods(peers: dict) -> list[tuple[str, str, Callable]]:
    """(name, input dtype, fn(x_u8, y_u8, inputs) -> result) for every method; inputs holds converted copies."""
    kernel = launcher.ssim_per_channel_triton
    rows = [
        ("ssim_ray triton kernel", "uint8", lambda i: kernel(i["u8"][0], i["u8"][1], data_range=255.0)),
        ("ssim_ray triton kernel", "float32", lambda i: kernel(i["f32"][0], i["f32"][1], data_range=255.0)),
        ("ssim_ray triton kernel", "float16 (amp storage)", lambda i: kernel(i["f16"][0], i["f16"][1], data_range=1.0)),
        ("ssim_ray.ssim()", "uint8", lambda i: ssim(i["u8"][0], i["u8"][1], data_range=255.0, per_channel=True)),
        ("ssim_ray.ssim(kernel='triton')", "uint8",
         lambda i: ssim(i["u8"][0], i["u8"][1], data_range=255.0, per_channel=True, kernel="triton")),
        ("ssim_ray.ssim()", "float32", lambda i: ssim(i["f32"][0], i["f32"][1], data_range=255.0, per_channel=True)),
        ("ssim_ray.ssim() amp", "float32",
         lambda i: ssim(i["f32"][0], i["f32"][1], data_range=255.0, per_channel=True, precision="amp")),
    ]
    # Each peer's function is bound as a default argument: a closure would see only the last one.
    if peers["pytorch_msssim"] is not None:
        rows.append(("pytorch-msssim", "float32", lambda i, f=peers["pytorch_msssim"].ssim: f(
            i["f32"][0], i["f32"][1], data_range=255, size_average=False)))
    if peers["torchmetrics"] is not None:
        tm_ssim = peers["torchmetrics"].structural_similarity_index_measure
        rows.append(("torchmetrics", "float32", lambda i, f=tm_ssim: f(
            i["f32"][0], i["f32"][1], data_range=255.0, reduction="none")))
    if peers["kornia"] is not None:
        rows.append(("kornia (valid)", "float32", lambda i, f=peers["kornia"].ssim: f(
            i["f32"][0], i["f32"][1], 11, max_val=255.0, padding="valid").mean((1, 2, 3))))
    if peers["fused_ssim"] is not None:
        rows.append(("fused-ssim (valid, one mean)", "float32 [0,1]", lambda i, f=peers["fused_ssim"].fused_ssim: f(
            i["f32n"][0], i["f32n"][1], padding="valid", train=False)))
    return rows


def _inputs(size: tuple, device: str, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randint(0, 256, size, dtype=torch.uint8, device=device, generator=g)
    y = torch.randint(0, 256, size, dtype=torch.uint8, device=device, generator=g)
    f32 = (x.float(), y.float())
    f32n = (f32[0] / 255, f32[1] / 255)
    return {"u8": (x, y), "f32": f32, "f32n": f32n, "f16": (f32n[0].half(), f32n[1].half())}


def _time_one(timer, fn, inputs) -> tuple[Optional[float], str]:
    try:
        return timer(lambda: fn(inputs)), ""
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "out of memory"
    except Exception as exc:  # one failing method must not hide the others' figures
        return None, f"{type(exc).__name__}: {str(exc)[:80]}"


def throughput(sizes, device: str, timer, peers) -> list[Row]:
    rows = []
    for size in sizes:
        inputs = _inputs(size, device, seed=0)
        for name, dtype, fn in methods(peers):
            ms, note = _time_one(timer, fn, inputs)
            rows.append(Row(name, dtype, size, ms, note))
            print(f"  {size} {name} [{dtype}]: {'%.4f ms' % ms if ms is not None else note}", flush=True)
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def tile_sweep(sizes, device: str, timer) -> list[Row]:
    """The kernel's uint8 time for each tile shape (the module's default is the first)."""
    rows = []
    for size in sizes:
        x, y = _inputs(size, device, seed=1)["u8"]
        window = launcher._window(x.device, win_size=11, sigma=1.5, k1=0.01, k2=0.03, gaussian=True)
        for block_w, n_rows, warps, per_lane, unroll in TILE_CONFIGS:
            tiles = launcher.TileConfig(block_w, n_rows, warps, per_lane, unroll)
            ms, note = _time_one(timer, lambda _, t=tiles: launcher._same_shape(
                x, y, data_range=255.0, window=window, tiles=t), None)
            name = f"kernel tiles {block_w}x{n_rows}, {warps} warps, {per_lane} col/lane" + (", unrolled" * unroll)
            rows.append(Row(name, "uint8", size, ms, note))
            print(f"  {size} {name}: {'%.4f ms' % ms if ms is not None else note}", flush=True)
    return rows


# -------------------------------------------------------------------------------------------- accuracy


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue()))).copy()


def photo_pairs(crop: int, photos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(6 photos, 3, crop, crop) uint8 pairs: crops of photographs against real distortions of themselves."""
    from skimage import data, filters

    xs, ys = [], []
    rng = np.random.RandomState(0)
    everyone = (data.astronaut(), data.chelsea(), data.coffee(), np.stack([data.camera()] * 3, axis=-1))
    for photo in everyone[:photos]:
        img = np.ascontiguousarray(photo[:crop, :crop])
        blurred = filters.gaussian(img, sigma=1.5, channel_axis=-1, preserve_range=True).round().astype(np.uint8)
        for distorted in (_jpeg(img, 10), _jpeg(img, 50), _jpeg(img, 90), blurred,
                          np.clip(img + 15 * rng.randn(*img.shape), 0, 255).round().astype(np.uint8),
                          np.clip(img * 0.7 + 30, 0, 255).round().astype(np.uint8)):
            xs.append(torch.from_numpy(img).permute(2, 0, 1))
            ys.append(torch.from_numpy(distorted).permute(2, 0, 1))
    return torch.stack(xs).contiguous(), torch.stack(ys).contiguous()


def _reference(x: torch.Tensor, y: torch.Tensor, data_range: float) -> np.ndarray:
    """Per-pair scikit-image SSIM (Wang's settings, float64), mean over channels."""
    from skimage.metrics import structural_similarity

    return np.array([
        np.mean([structural_similarity(a.double().numpy(), b.double().numpy(), data_range=data_range,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
                 for a, b in zip(xi, yi)])
        for xi, yi in zip(x, y)
    ])


def accuracy(device: str, peers, crop: int, photos: int) -> list[tuple[str, str, str]]:
    """(method, inputs, max |delta| vs float64) on uint8 photo pairs and on fractional versions of them."""
    x8, y8 = photo_pairs(crop, photos)
    ref8 = _reference(x8, y8, 255.0)
    # Fractional pixels: half-precision storage is no longer exact, which is what amp has to survive.
    xf, yf = x8.double() / 255, (y8.double() / 255 * 0.9 + 0.05)
    reff = _reference(xf, yf, 1.0)
    inputs = {"u8": (x8.to(device), y8.to(device)), "f32": (x8.float().to(device), y8.float().to(device)),
              "f32n": (xf.float().to(device), yf.float().to(device))}
    inputs["f16"] = (inputs["f32n"][0].half(), inputs["f32n"][1].half())
    out = []
    for name, dtype, fn in methods(peers):
        fractional = dtype.startswith("float16") or "[0,1]" in dtype
        ref = reff if fractional else ref8
        try:
            scores = fn(inputs).double().cpu()
        except Exception as exc:
            out.append((name, dtype, f"{type(exc).__name__}"))
            continue
        got = scores.mean(-1).numpy() if scores.dim() == 2 else scores.numpy()
        if got.ndim == 0:  # fused-ssim: one mean for the whole batch
            out.append((name, dtype, f"{abs(float(got) - ref.mean()):.2e} (batch mean only)"))
        else:
            out.append((name, dtype, f"{np.max(np.abs(got - ref)):.2e}"))
    amp = ssim(inputs["f32n"][0], inputs["f32n"][1], data_range=1.0, per_channel=True, precision="amp")
    out.append(("ssim_ray.ssim() amp", "float32 [0,1] fractional",
                f"{np.max(np.abs(amp.double().cpu().mean(-1).numpy() - reff)):.2e}"))
    return out


# --------------------------------------------------------------------------------------------- tables


def throughput_table(rows: list[Row], bandwidth_gbs: float) -> str:
    lines = ["| size | method | input | median ms | pairs/s | GB/s | % of bandwidth floor | vs pytorch-msssim |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for size in dict.fromkeys(r.size for r in rows):
        base = next((r.ms for r in rows if r.size == size and r.method == "pytorch-msssim" and r.ms), None)
        for r in (r for r in rows if r.size == size):
            lines.append(_row_line(r, base, bandwidth_gbs))
    return "\n".join(lines)


def _input_bytes(size: tuple, dtype: str) -> int:
    per = 1 if dtype == "uint8" else 2 if dtype.startswith("float16") else 4
    return 2 * int(np.prod(size)) * per


def _row_line(r: Row, base: Optional[float], bandwidth_gbs: float) -> str:
    size = "x".join(map(str, r.size))
    if r.ms is None:
        return f"| {size} | {r.method} | {r.dtype} | {r.note} | | | | |"
    nbytes = _input_bytes(r.size, r.dtype)
    floor_ms = nbytes / (bandwidth_gbs * 1e9) * 1e3
    speedup = f"{base / r.ms:.1f}x" if base else "n/a"
    return (f"| {size} | {r.method} | {r.dtype} | {r.ms:.4f} | {r.size[0] / (r.ms * 1e-3):,.0f} | "
            f"{nbytes / (r.ms * 1e-3) / 1e9:.1f} | {100 * floor_ms / r.ms:.1f}% | {speedup} |")


def environment(device: str) -> str:
    import triton

    lines = [f"- python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(f"- device: {props.name}, {props.multi_processor_count} SMs, "
                     f"{props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
        lines.append(f"- cudnn allow_tf32 (peers' fp32 convolutions): {torch.backends.cudnn.allow_tf32}")
    else:
        lines.append("- device: CPU dry run (numbers are meaningless)")
    return "\n".join(lines)


def _write(parts: list[str], out: Optional[str]) -> None:
    """Print the newest section and rewrite the report: a step cut short by its timeout keeps what it had."""
    print(parts[-1], flush=True)
    if out:
        with open(out, "w") as fh:
            fh.write("\n\n".join(parts) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the Markdown report here (rewritten after every section)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script, not the GPU")
    parser.add_argument("--skip-sweep", action="store_true", help="leave out the tile-shape sweep")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to check the script on the CPU")
    sizes = DRY_SIZES if args.dry_run else SIZES
    timer = _timer(device)
    peers = _peers()
    bandwidth = copy_bandwidth(device, timer)
    parts = ["## Environment\n\n" + environment(device) + f"\n- copy bandwidth (read + write): {bandwidth:.0f} GB/s"]
    _write(parts, args.out)
    parts.append("## Throughput\n\n" + throughput_table(throughput(sizes, device, timer, peers), bandwidth))
    _write(parts, args.out)
    acc = accuracy(device, peers, crop=24 if args.dry_run else 256, photos=1 if args.dry_run else 4)
    table = ["| method | inputs | max abs delta |", "|---|---|---:|"] + [f"| {m} | {d} | {v} |" for m, d, v in acc]
    parts.append("## Accuracy: max |delta| per pair vs scikit-image float64 (photo crops, 6 distortions each)\n\n"
                 + "\n".join(table))
    _write(parts, args.out)
    if not args.skip_sweep:
        sweep = tile_sweep(sizes, device, timer)
        parts.append("## Kernel tile shapes (uint8)\n\n" + throughput_table(sweep, bandwidth))
        _write(parts, args.out)


if __name__ == "__main__":
    main()
