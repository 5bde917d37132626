"""One-pass plane kernels beside the tile kernel: PSNR's exact squared-error sums and MS-SSIM's 2x2 halving.

Both give the bits of their definitions, however they are computed:

- `exact_square_error_sums`: per plane, sum of (x - y)^2 for integer pixels whose squares and sums are exact
  integers in float64 (`peak_snr` decides when). Exact integers add the same in any order, so no order can
  move a bit; eagerly it is an int64 sum over cache-sized blocks.
- `halve` / `halve_pair`: `imfilter(im, ones(2)/4, 'symmetric', 'same')` then every second pixel, as
  `window.wang_downsample(im, 2)` computes it - ((a + b) + (c + e)) / 4 over each 2x2 block (rows first; an
  odd side's last row/column averaged with itself) - in the compute dtype, converting the pixels on the way
  (no float copy of the image first). Eagerly it is three numpy ufunc calls on strided views.

On CPU, once the caller's compile policy says so (the tile kernel's rule, `compiled.wants_compile`), both run
in C instead (plane_kernel.c, built by `ssim_ray.metric.native`): the halving with the definition's
operations in its order, the sums in int64; the planes split among the pool's threads (ctypes releases the
GIL). These passes were torch.compile'd before; inductor left the halving's stride-2 loads scalar and paid
~0.2 ms of dynamic-shape guards a call, so uint8 needed a 32-bit word trick to be fast; C reads the pixels
in their own dtype, at any stride, with no guards.

State kept here is a cache, not configuration: one runner per pass, with its eager seconds.
"""

from __future__ import annotations

import threading
import time
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ssim_ray.metric import native
from ssim_ray.metric.compiled import _pool, wants_compile

# The eager integer sums work on cache-sized blocks: whole-batch int temporaries cost ~15x the arithmetic in
# page faults and memory traffic (measured on 16x3x256^2 uint8).
_EXACT_EAGER_ELEMENTS = 1 << 17
# Passes over fewer input pixels than this (x and y together) run on the calling thread: handing them to the
# pool costs more than they do.
_SERIAL_ELEMENTS = 1 << 17
# Dtypes whose halving numpy computes (bfloat16 has no numpy dtype: the torch definition takes it).
_NUMPY_HALVE = {torch.uint8: np.uint8, torch.uint16: np.uint16, torch.float16: np.float16,
                torch.float32: np.float32, torch.float64: np.float64}
_lock = threading.Lock()
_runners: dict = {}


def _square_error_sums_eager(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(P,) float64 sums of (x - y)^2 over (P, L) integer rows, as int64 sums of cache-sized blocks."""
    wide = torch.int32 if x.dtype == torch.uint8 else torch.int64  # int32 holds a uint8 difference's square
    step = max(1, _EXACT_EAGER_ELEMENTS // max(1, x.shape[-1]))
    sums = [x.new_zeros(0, dtype=torch.float64)]
    for start in range(0, x.shape[0], step):
        diff = x[start : start + step].to(wide).sub_(y[start : start + step].to(wide))
        sums.append(diff.mul_(diff).sum(dim=-1, dtype=torch.int64).to(torch.float64))
    return torch.cat(sums)


class _PlanePass:
    """One pass's state: eager until its policy says compile, then the C library (same bits)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.eager_seconds = 0.0
        self.compiled = None
        self.failed: Optional[str] = None

    def library_for(self, policy: str):
        """The C library if calls under `policy` run it now (building it if the policy says it is time), else None."""
        with _lock:
            if wants_compile(policy, self.eager_seconds, decided=self.compiled is not None or self.failed is not None):
                try:
                    self.compiled = native.plane_library()
                except native.NativeKernelError as exc:
                    self.failed = str(exc).splitlines()[0]
                    warnings.warn(f"ssim_ray: compiled {self.name} pass failed, using the eager one (same bits): "
                                  f"{self.failed}")
            return None if policy == "never" else self.compiled

    def eager(self, function: Callable, *args):
        """`function(*args)`, its time counted towards 'auto' compiling."""
        start = time.perf_counter()
        out = function(*args)
        self.eager_seconds += time.perf_counter() - start
        return out


def _runner(name: str) -> _PlanePass:
    with _lock:
        if name not in _runners:
            _runners[name] = _PlanePass(name)
        return _runners[name]


def _in_parallel(work: List[Callable[[], None]], elements: int) -> None:
    """Run the work items, on the pool's threads when there is enough of it to pay for the hand-over."""
    threads = torch.get_num_threads()
    if threads == 1 or len(work) < 2 or elements < _SERIAL_ELEMENTS:
        for item in work:
            item()
    else:
        list(_pool(threads).map(lambda item: item(), work))


def _plane_ranges(count: int, pieces: int) -> List[slice]:
    bounds = [count * i // pieces for i in range(pieces + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def exact_square_error_sums(x: torch.Tensor, y: torch.Tensor, *, crop: int, policy: str) -> torch.Tensor:
    """(P,) float64 sums of (x - y)^2 per plane of (P, H, W) integer planes, `crop` pixels off each side,
    whose sums are exact in float64.

    The caller checks exactness (`peak_snr._exact_integer_sums`): then the eager int64 sum and the C
    kernel's give the same bits, whatever the order.
    """
    count, height, width = x.shape
    runner = _runner("square_error_sums")
    lib = runner.library_for(policy) if x.device.type == "cpu" and x.dtype in (torch.uint8, torch.uint16) else None
    if lib is None:
        return runner.eager(_square_error_sums_cropped, x, y, crop)
    out = torch.empty(count, dtype=torch.float64)
    pieces = _plane_ranges(count, max(1, min(torch.get_num_threads(), count)))
    _in_parallel([lambda part=part: native.square_error_sums(lib, x, y, crop, out, part.start, part.stop)
                  for part in pieces], 2 * x.numel())
    return out


def _square_error_sums_cropped(x: torch.Tensor, y: torch.Tensor, crop: int) -> torch.Tensor:
    count, height, width = x.shape
    if crop:  # a contiguous copy of the kept pixels (1 or 2 bytes each): the sums see (P, L) rows
        x, y = (t[:, crop : height - crop, crop : width - crop].contiguous() for t in (x, y))
    return _square_error_sums_eager(x.contiguous().reshape(count, -1), y.contiguous().reshape(count, -1))


# ------------------------------------------------------------------------------------------- halving


def _halve_blocks(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, 2, w, 2) pixel blocks (two input rows, w column pairs) -> (R, w): ((a + b) + (c + e)) / 4 with a, b
    the block's left column, rows first, as `wang_downsample` adds them."""
    p = blocks.to(dtype)
    return ((p[:, 0, :, 0] + p[:, 1, :, 0]) + (p[:, 0, :, 1] + p[:, 1, :, 1])) / 4.0


def halve_reference(planes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The halving's definition on (P, H, W) planes of any size: an odd side's last row/column doubled first."""
    p = planes.to(dtype)
    if p.shape[-2] % 2:
        p = torch.cat([p, p[:, -1:]], dim=-2)
    if p.shape[-1] % 2:
        p = torch.cat([p, p[:, :, -1:]], dim=-1)
    count, height, width = p.shape
    return _halve_blocks(p.reshape(count * height // 2, 2, width // 2, 2), dtype).reshape(count, height // 2, -1)


def _halve_numpy(planes: np.ndarray, out: np.ndarray) -> None:
    """`halve_reference` of (P, H, W) planes (any strides) into `out`, (P, ceil(H/2), ceil(W/2)) in the
    compute dtype, by the definition's own operations: row pairs added (converted to the compute dtype
    first, as `dtype=` makes numpy do), then column pairs, then / 4 (an odd side's last row or column is
    added to itself)."""
    count, height, width = planes.shape
    half_h, half_w = height // 2, width // 2
    rows = np.empty((count, out.shape[1], width), dtype=out.dtype)
    np.add(planes[:, 0 : 2 * half_h : 2], planes[:, 1 : 2 * half_h : 2], out=rows[:, :half_h], dtype=out.dtype)
    if height % 2:
        np.add(planes[:, height - 1], planes[:, height - 1], out=rows[:, half_h], dtype=out.dtype)
    np.add(rows[:, :, 0 : 2 * half_w : 2], rows[:, :, 1 : 2 * half_w : 2], out=out[:, :, :half_w])
    if width % 2:
        np.add(rows[:, :, width - 1], rows[:, :, width - 1], out=out[:, :, half_w])
    np.divide(out, out.dtype.type(4), out=out)


def halve_pair(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, *,
               policy: str = "never") -> Tuple[torch.Tensor, torch.Tensor]:
    """`halve(x, dtype)` and `halve(y, dtype)`, their planes shared among the pool's threads in one go."""
    (x_half,), (y_half,) = _halve_all([x, y], dtype, policy, 1)
    return x_half, y_half


def halve_pyramid(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, levels: int, *,
                  policy: str = "never") -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """`levels` halvings of x and y, each from the one before: [(x / 2, y / 2), (x / 4, y / 4), ...], the bits of
    `halve_pair` applied again and again. In C, each plane's whole pyramid is made in one go (while it is in
    cache), the planes shared among the pool's threads in one hand-off."""
    x_levels, y_levels = _halve_all([x, y], dtype, policy, levels)
    return list(zip(x_levels, y_levels))


def halve(images: torch.Tensor, dtype: torch.dtype, *, policy: str = "never") -> torch.Tensor:
    """`wang_downsample(images.to(dtype), 2)` of an (N, C, H, W) batch, to the bit, converting on the way.

    `policy` is the caller's compile policy: CPU batches go through the C kernel once it says so (the same
    bits: the same operations in the same order).

    Example:
        >>> halve(torch.arange(9, dtype=torch.uint8).reshape(1, 1, 3, 3), torch.float32)[0, 0]
        tensor([[2.0000, 3.5000],
                [6.5000, 8.0000]])
    """
    return _halve_all([images], dtype, policy, 1)[0][0]


def _halve_all(batches: Sequence[torch.Tensor], dtype: torch.dtype, policy: str,
               levels: int) -> List[List[torch.Tensor]]:
    """Per (N, C, H, W) batch, its `levels` successive halvings: in C (policy permitting, CPU batches) or level
    by level eagerly (numpy on CPU, the torch definition elsewhere)."""
    if levels == 0:
        return [[] for _ in batches]
    runner = _runner("halve")
    lib = None
    if all(b.device.type == "cpu" for b in batches) and dtype in (torch.float32, torch.float64):
        lib = runner.library_for(policy)
    if lib is None:
        results: List[List[torch.Tensor]] = [[] for _ in batches]
        current = list(batches)
        for _ in range(levels):
            current = runner.eager(_halve_once_eagerly, current, dtype)
            for result, level in zip(results, current):
                result.append(level)
        return results
    results, work, elements = [], [], 0
    threads = torch.get_num_threads()
    for images in batches:
        count, channels, height, width = images.shape
        planes = images.reshape(count * channels, height, width)
        if planes.dtype not in native.PIXEL_CODES:  # float16 / bfloat16: converting first is exact, the same bits
            planes = planes.to(dtype)
        outs, h, w = [], height, width
        for _ in range(levels):
            h, w = -(-h // 2), -(-w // 2)
            outs.append(torch.empty((count * channels, h, w), dtype=dtype))
        results.append([out.reshape(count, channels, out.shape[1], out.shape[2]) for out in outs])
        elements += planes.numel()
        parts = _plane_ranges(planes.shape[0], max(1, min(threads, planes.shape[0])))
        work += [lambda planes=planes, outs=outs, part=part: native.halve(lib, planes, outs, part.start, part.stop)
                 for part in parts if planes.shape[0]]
    _in_parallel(work, elements)
    return results


def _halve_once_eagerly(batches: Sequence[torch.Tensor], dtype: torch.dtype) -> List[torch.Tensor]:
    """Each batch halved once: numpy on CPU (split among the pool's threads), the torch definition elsewhere."""
    outputs, work, elements = [], [], 0
    threads = torch.get_num_threads()
    for images in batches:
        count, channels, height, width = images.shape
        planes = images.reshape(count * channels, height, width)
        shape = (count * channels, -(-height // 2), -(-width // 2))
        if images.device.type != "cpu" or planes.shape[0] == 0 or planes.dtype not in _NUMPY_HALVE:
            outputs.append(halve_reference(planes, dtype).reshape(count, channels, shape[1], shape[2]))
            continue
        out = torch.empty(shape, dtype=dtype)
        outputs.append(out.reshape(count, channels, shape[1], shape[2]))
        elements += planes.numel()
        source, target = planes.detach().numpy(), out.numpy()
        work += [lambda part=part, source=source, target=target: _halve_numpy(source[part], target[part])
                 for part in _plane_ranges(planes.shape[0], max(1, min(threads, planes.shape[0])))]
    _in_parallel(work, elements)
    return outputs
