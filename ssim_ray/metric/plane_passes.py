"""One-pass plane kernels beside the tile kernel: PSNR's exact squared-error sums and MS-SSIM's 2x2 halving.

Each pass is a small function of whole image planes with an eager definition; on CPU, once the caller's
compile policy says so (the tile kernel's rule: 'always' at once, 'auto' after COMPILE_AFTER_S seconds of
eager time for that pass, 'never' not at all), torch.compile fuses it into one single-threaded C++ loop
nest, run over chunks of planes by the tile kernel's thread pool. Both give the same bits:

- `exact_square_error_sums`: per plane, sum of (x - y)^2 for integer pixels whose squares and sums are exact
  integers in float64 (`peak_snr` decides when). Exact integers add the same in any order, so the fused
  loop's order cannot move a bit; eagerly it is an int64 sum. (Measured: the eager path's ATen ops and
  their int temporaries cost a quarter of SSIM's time, the fused loop a few percent.)
- `halve`: `imfilter(im, ones(2)/4, 'symmetric', 'same')` then every second pixel, as
  `window.wang_downsample(im, 2)` computes it - ((a + b) + (c + e)) / 4 over each 2x2 block (rows first; an
  odd side's last row/column averaged with itself) - in the compute dtype, converting integer pixels on the
  way (no float copy of the image first).

Compiled with dynamic shapes, so one kernel serves every image size; the even part of a plane goes through
it and an odd side's last row or column through the eager definition (so odd and even sizes share the
compiled code).

State kept here is a cache, not configuration: one runner per (pass, dtypes), with its eager seconds.
"""

from __future__ import annotations

import threading
import time
import warnings
from typing import Callable, List, Optional

import torch

from ssim_ray.metric.compiled import COMPILE_AFTER_S, COMPILE_OPTIONS, _pool

# The eager integer sums work on cache-sized blocks: whole-batch int temporaries cost ~15x the arithmetic in
# page faults and memory traffic (measured on 16x3x256^2 uint8).
_EXACT_EAGER_ELEMENTS = 1 << 17
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


def _square_error_sums_fused(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    diff = x.to(torch.float64) - y.to(torch.float64)
    return (diff * diff).sum(dim=-1)


def _halve_blocks(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, 2, w, 2) pixel blocks (two input rows, w column pairs) -> (R, w): ((a + b) + (c + e)) / 4 with a, b
    the block's left column, rows first, as `wang_downsample` adds them. (This view of the planes, rather
    than stride-2 slices of (P, H, W), is what inductor turns into vector code: measured 2x.)"""
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


class _PlanePass:
    """One pass, eager until its policy says compile, then compiled with dynamic shapes (same bits).

    The compiled kernel always gets contiguous planes (any other layout, and sizes 0 or 1, would each be
    guarded into a recompile of their own); calls whose planes or outputs are that small run eagerly.
    """

    def __init__(self, name: str, eager: Callable, fused: Callable) -> None:
        self.name, self.eager, self.fused = name, eager, fused
        self.eager_seconds = 0.0
        self.compiled: Optional[Callable] = None
        self.failed: Optional[str] = None

    def _compiled_for(self, policy: str) -> Optional[Callable]:
        with _lock:
            if self.compiled is None and self.failed is None and policy != "never" and (
                    policy == "always" or self.eager_seconds >= COMPILE_AFTER_S):
                fused = self.fused

                def kernel(*args):
                    return fused(*args)

                # A code object of its own per runner: torch.compile keeps at most 8 variants per code object.
                kernel.__code__ = kernel.__code__.replace(co_name=f"ssim_ray_{self.name}_{id(self):x}")
                self.compiled = torch.compile(kernel, dynamic=True, fullgraph=True, options=COMPILE_OPTIONS)
            return None if policy == "never" else self.compiled

    def run(self, planes: List[torch.Tensor], extra: tuple, *, policy: str, tiny: bool) -> torch.Tensor:
        """The pass over (P, H, W) planes (several same-shape tensors), its outputs concatenated along P.

        `tiny`: the caller's sizes that the compiled kernel would specialise on (an output side of 1).
        """
        count = planes[0].shape[0]
        compiled = None
        if planes[0].device.type == "cpu" and count >= 2 and not tiny:
            compiled = self._compiled_for(policy)
        if compiled is None:
            start = time.perf_counter()
            out = self.eager(*planes, *extra)
            self.eager_seconds += time.perf_counter() - start
            return out
        # Contiguous, and not views (dynamo guards on a view's base too), so that only sizes are guarded.
        planes = [p.contiguous().detach() for p in planes]  # (the callers' tensors are contiguous: no copy)
        # One call per thread (each call's guards cost tens of microseconds), every call two planes or more.
        calls = max(1, min(torch.get_num_threads(), count // 2))
        try:
            if calls == 1:
                return _call(compiled, planes, extra)
            chunks = zip(*(torch.tensor_split(p, calls) for p in planes))
            parts = list(_pool(calls).map(lambda chunk: _call(compiled, [c.detach() for c in chunk], extra), chunks))
        except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as exc:
            with _lock:
                self.compiled, self.failed = None, f"{type(exc).__name__}: {exc}".splitlines()[0]
            warnings.warn(f"ssim_ray: compiled {self.name} pass failed, using the eager one (same bits): {self.failed}")
            return self.run(planes, extra, policy=policy, tiny=tiny)
        return torch.cat(parts)


def _call(compiled: Callable, planes: List[torch.Tensor], extra: tuple) -> torch.Tensor:
    # No duck sizing: equal sizes (square planes, as many planes as rows) would otherwise be guarded as one
    # symbol, and the next unequal pair recompiled.
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        return compiled(*planes, *extra)


def _runner(name: str, key: tuple, eager: Callable, fused: Callable) -> _PlanePass:
    with _lock:
        if (name, key) not in _runners:
            _runners[(name, key)] = _PlanePass(name, eager, fused)
        return _runners[(name, key)]


def exact_square_error_sums(x: torch.Tensor, y: torch.Tensor, *, crop: int, policy: str) -> torch.Tensor:
    """(P,) float64 sums of (x - y)^2 per plane of (P, H, W) integer planes, `crop` pixels off each side,
    whose sums are exact in float64.

    The caller checks exactness (`peak_snr._exact_integer_sums`): then the eager int64 sum and the compiled
    float64 loop give the same bits, whatever the order.
    """
    count, height, width = x.shape
    if crop:  # a contiguous copy of the kept pixels (1 or 2 bytes each): the pass sees (P, L) rows
        x, y = (t[:, crop : height - crop, crop : width - crop].contiguous() for t in (x, y))
    x, y = x.reshape(count, -1), y.reshape(count, -1)
    runner = _runner("square_error_sums", (x.dtype,), _square_error_sums_eager, _square_error_sums_fused)
    return runner.run([x, y], (), policy=policy, tiny=x.shape[-1] < 2)


def halve(images: torch.Tensor, dtype: torch.dtype, *, policy: str) -> torch.Tensor:
    """`wang_downsample(images.to(dtype), 2)` of an (N, C, H, W) batch, to the bit, converting on the way.

    Example:
        >>> halve(torch.arange(9, dtype=torch.uint8).reshape(1, 1, 3, 3), torch.float32, policy="never")[0, 0]
        tensor([[2.0000, 3.5000],
                [6.5000, 8.0000]])
    """
    count, channels, height, width = images.shape
    planes = images.reshape(count * channels, height, width)
    even_h, even_w = height // 2, width // 2
    runner = _runner("halve", (images.dtype, dtype), _halve_blocks, _halve_blocks)
    if even_h and not height % 2 and not width % 2:
        out = runner.run([planes.reshape(count * channels * even_h, 2, even_w, 2)], (dtype,), policy=policy,
                         tiny=even_w < 2)
        return out.reshape(count, channels, even_h, even_w)
    out = torch.empty((count * channels, -(-height // 2), -(-width // 2)), dtype=dtype, device=images.device)
    if even_h and even_w:
        blocks = planes[:, : 2 * even_h, : 2 * even_w].contiguous().reshape(count * channels * even_h, 2, even_w, 2)
        out[:, :even_h, :even_w] = runner.run([blocks], (dtype,), policy=policy,
                                              tiny=even_w < 2).reshape(count * channels, even_h, even_w)
    if width % 2 and even_h:  # an odd side's last column or row: the definition, eagerly
        out[:, :even_h, even_w:] = halve_reference(planes[:, : 2 * even_h, width - 1 :], dtype)
    if height % 2:
        out[:, even_h:, :] = halve_reference(planes[:, height - 1 :, :], dtype)
    return out.reshape(count, channels, out.shape[-2], out.shape[-1])
