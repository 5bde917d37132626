"""One-pass plane kernels beside the tile kernel: PSNR's exact squared-error sums and MS-SSIM's 2x2 halving.

Both give the bits of their definitions, however they are computed:

- `exact_square_error_sums`: per plane, sum of (x - y)^2 for integer pixels whose squares and sums are exact
  integers in float64 (`peak_snr` decides when). Exact integers add the same in any order, so no order can
  move a bit; eagerly it is an int64 sum. On CPU, once the caller's compile policy says so (the tile
  kernel's rule, `compiled.wants_compile`), torch.compile fuses it into one single-threaded C++ loop run
  over chunks of planes by the tile kernel's thread pool. uint8 planes reach that loop as words of four
  pixels each, typed float32 (bit patterns only, never computed with) and bit-cast to int32 in the loop,
  where shifts and masks unpack them: inductor's vector loads of uint8 and of int32 lanes go through a
  stack buffer (a store-forwarding stall per vector; measured 1.5 and 0.8 ns per pixel, a tenth of SSIM's
  time), its float32 loads do not (0.2 ns per pixel).
- `halve` / `halve_pair`: `imfilter(im, ones(2)/4, 'symmetric', 'same')` then every second pixel, as
  `window.wang_downsample(im, 2)` computes it - ((a + b) + (c + e)) / 4 over each 2x2 block (rows first; an
  odd side's last row/column averaged with itself) - in the compute dtype, converting the pixels on the way
  (no float copy of the image first). On CPU it is three numpy ufunc calls on strided views (which release
  the GIL, so the pool's threads share the planes): inductor leaves stride-2 loads scalar, and its
  dynamic-shape guards cost ~0.2 ms a call, more than a coarse scale's whole halving (measured). uint8 and
  uint16 batches of even height whose rows are whole 32-bit words (4 or 2 pixels), once the caller's compile
  policy says so, instead go through one compiled integer pass over those words (typed float32, bit-cast to
  int32, as PSNR's): a block's four pixels add exactly in int32, so any order gives the definition's bits,
  and each output reads whole words (half the time of numpy's casting adds on 16x3x256^2 uint8, measured).
  x and y are then halved side by side, one whole call each, on the pool's threads.

State kept here is a cache, not configuration: one runner per (pass, dtypes), with its eager seconds.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ssim_ray.metric.compiled import COMPILE_OPTIONS, _pool, wants_compile

# The eager integer sums work on cache-sized blocks: whole-batch int temporaries cost ~15x the arithmetic in
# page faults and memory traffic (measured on 16x3x256^2 uint8).
_EXACT_EAGER_ELEMENTS = 1 << 17
# Halvings of fewer input pixels than this (x and y together) run on the calling thread: handing them to the
# pool costs more than they do.
_SERIAL_HALVE_ELEMENTS = 1 << 17
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


def _square_error_sums_fused(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    diff = x.to(torch.float64) - y.to(torch.float64)
    return (diff * diff).sum(dim=-1)


def _byte_square_error_sums_eager(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(P,) sums over (P, L / 4) words of four uint8 pixels (typed float32): the pixels' own int64 sums."""
    return _square_error_sums_eager(x.view(torch.uint8), y.view(torch.uint8))


def _byte_square_error_sums_fused(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(P,) sums over (P, L / 4) words of four uint8 pixels each, typed float32: bit-cast to int32, the four
    bytes unpacked by shifts and masks (which byte is which does not matter: x's and y's bytes pair up
    alike), their squared differences added in int32 (at most 4 * 255^2), the words' sums in float64
    (exact integers)."""
    x, y = x.view(torch.int32), y.view(torch.int32)
    total = None
    for shift in (0, 8, 16, 24):
        diff = ((x >> shift) & 255) - ((y >> shift) & 255)
        total = diff * diff if total is None else total + diff * diff
    return total.to(torch.float64).sum(dim=-1)


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
            if wants_compile(policy, self.eager_seconds, decided=self.compiled is not None or self.failed is not None):
                fused = self.fused

                def kernel(*args):
                    return fused(*args)

                # A code object of its own per runner: torch.compile keeps at most 8 variants per code object.
                kernel.__code__ = kernel.__code__.replace(co_name=f"ssim_ray_{self.name}_{id(self):x}")
                self.compiled = torch.compile(kernel, dynamic=True, fullgraph=True, options=COMPILE_OPTIONS)
            return None if policy == "never" else self.compiled

    def run(self, planes: List[torch.Tensor], *, policy: str, tiny: bool, extra: tuple = (),
            split: bool = True) -> torch.Tensor:
        """The pass over (P, ...) planes (several same-shape tensors), its outputs concatenated along P.

        `tiny`: the caller's sizes that the compiled kernel would specialise on (a side of 1). `extra`:
        arguments after the planes that are the same for every call of this runner (a dtype).
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
        calls = max(1, min(torch.get_num_threads(), count // 2)) if split else 1
        try:
            if calls == 1:
                return _call(compiled, planes, extra)
            chunks = zip(*(torch.tensor_split(p, calls) for p in planes))
            parts = list(_pool(calls).map(lambda chunk: _call(compiled, [c.detach() for c in chunk], extra), chunks))
        except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as exc:
            with _lock:
                self.compiled, self.failed = None, f"{type(exc).__name__}: {exc}".splitlines()[0]
            warnings.warn(f"ssim_ray: compiled {self.name} pass failed, using the eager one (same bits): {self.failed}")
            return self.run(planes, policy=policy, tiny=tiny, extra=extra)
        return torch.cat(parts)


def _call(compiled: Callable, planes: List[torch.Tensor], extra: tuple = ()) -> torch.Tensor:
    # No duck sizing: equal sizes (square planes, as many planes as rows) would otherwise be guarded as one
    # symbol, and the next unequal pair recompiled.
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        return compiled(*planes, *extra)


def _runner(name: str, key: tuple, eager: Callable, fused: Callable) -> _PlanePass:
    with _lock:
        if (name, key) not in _runners:
            _runners[(name, key)] = _PlanePass(name, eager, fused)
        return _runners[(name, key)]


def _as_words(rows: torch.Tensor) -> Optional[torch.Tensor]:
    """(P, L) contiguous uint8 rows as (P, L / 4) words typed float32, or None where L is not a multiple of 4."""
    if rows.shape[-1] % 4:
        return None
    if rows.storage_offset() % 4:  # a view that starts mid-word: its own aligned copy (a byte a pixel)
        rows = rows.clone()
    return rows.view(torch.float32)


def exact_square_error_sums(x: torch.Tensor, y: torch.Tensor, *, crop: int, policy: str) -> torch.Tensor:
    """(P,) float64 sums of (x - y)^2 per plane of (P, H, W) integer planes, `crop` pixels off each side,
    whose sums are exact in float64.

    The caller checks exactness (`peak_snr._exact_integer_sums`): then the eager int64 sum and the compiled
    float64 loop give the same bits, whatever the order.
    """
    count, height, width = x.shape
    if crop:  # a contiguous copy of the kept pixels (1 or 2 bytes each): the pass sees (P, L) rows
        x, y = (t[:, crop : height - crop, crop : width - crop].contiguous() for t in (x, y))
    x, y = x.contiguous().reshape(count, -1), y.contiguous().reshape(count, -1)
    if x.dtype == torch.uint8 and x.device.type == "cpu" and x.shape[-1] >= 8:
        words = _as_words(x), _as_words(y)
        if words[0] is not None:
            runner = _runner("byte_square_error_sums", (), _byte_square_error_sums_eager,
                             _byte_square_error_sums_fused)
            return runner.run(list(words), policy=policy, tiny=False)
    runner = _runner("square_error_sums", (x.dtype,), _square_error_sums_eager, _square_error_sums_fused)
    return runner.run([x, y], policy=policy, tiny=x.shape[-1] < 2)


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


def _words_halve_eager(pixels: torch.dtype, words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(P, H, W / k) words of k `pixels` (uint8 or uint16, typed float32) -> (P, H / 2, W / 2) halving, by numpy."""
    planes = words.view(pixels).numpy()
    out = torch.empty((planes.shape[0], planes.shape[1] // 2, planes.shape[2] // 2), dtype=dtype)
    _halve_numpy(planes, out.numpy())
    return out


def _byte_words_halve_fused(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The same from the words bit-cast to int32: a row pair's two words masked into 16-bit lanes (bytes 0
    and 2, then 1 and 3) and added, so that each lane holds one 2x2 block's sum (at most 1020); the two
    lanes are the word's two outputs. Integer sums are exact, so this is the definition's value."""
    count, height, quarter = words.shape
    pairs = words.view(torch.int32).reshape(count, height // 2, 2, quarter)
    top, bottom = pairs[:, :, 0], pairs[:, :, 1]
    lanes = 0x00FF00FF
    sums = (top & lanes) + ((top >> 8) & lanes) + (bottom & lanes) + ((bottom >> 8) & lanes)
    halves = torch.stack(((sums & 0xFFFF).to(dtype), (sums >> 16).to(dtype)), dim=-1)
    return halves.reshape(count, height // 2, 2 * quarter) / 4.0


def _short_words_halve_fused(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The same from the words bit-cast to int32: each word is one 2x2 block's row half, its two 16-bit
    pixels unpacked by shift and mask and the block's four added in int32 (at most 4 * 65535): exact."""
    count, height, half = words.shape
    pairs = words.view(torch.int32).reshape(count, height // 2, 2, half)
    top, bottom = pairs[:, :, 0], pairs[:, :, 1]
    sums = (top & 0xFFFF) + ((top >> 16) & 0xFFFF) + (bottom & 0xFFFF) + ((bottom >> 16) & 0xFFFF)
    return sums.to(dtype) / 4.0


def _halve_integer_words(images: torch.Tensor, dtype: torch.dtype, policy: str) -> Optional[torch.Tensor]:
    """The halving of a uint8/uint16 CPU batch by the compiled word pass, or None where it does not apply
    (another dtype or device, an odd height, rows that are not whole words, or the policy says not yet; a
    big-endian host, where the words' lanes would be the other way round)."""
    count, channels, height, width = images.shape
    per_word = {torch.uint8: 4, torch.uint16: 2}.get(images.dtype)
    if (per_word is None or sys.byteorder != "little" or images.device.type != "cpu" or height % 2 or width % per_word
            or dtype not in (torch.float32, torch.float64) or count * channels < 2 or policy == "never"):
        return None
    planes = images.reshape(count * channels, height, width).contiguous()
    if planes.storage_offset() % per_word:
        planes = planes.clone()
    words = planes.view(torch.float32)
    eager = functools.partial(_words_halve_eager, images.dtype)
    if per_word == 4:
        runner = _runner("byte_words_halve", (dtype,), eager, _byte_words_halve_fused)
    else:
        runner = _runner("short_words_halve", (dtype,), eager, _short_words_halve_fused)
    out = runner.run([words], policy=policy, tiny=height < 4 or width < 2 * per_word, extra=(dtype,), split=False)
    return out.reshape(count, channels, height // 2, width // 2)


def halve_pair(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, *,
               policy: str = "never") -> Tuple[torch.Tensor, torch.Tensor]:
    """`halve(x, dtype)` and `halve(y, dtype)`, their planes shared among the pool's threads in one go."""
    out = _halve_all([x, y], dtype, policy)
    return out[0], out[1]


def halve(images: torch.Tensor, dtype: torch.dtype, *, policy: str = "never") -> torch.Tensor:
    """`wang_downsample(images.to(dtype), 2)` of an (N, C, H, W) batch, to the bit, converting on the way.

    `policy` is the caller's compile policy: uint8/uint16 batches of even height and whole-word rows go
    through a compiled integer pass once it says so (the same bits: their sums are exact).

    Example:
        >>> halve(torch.arange(9, dtype=torch.uint8).reshape(1, 1, 3, 3), torch.float32)[0, 0]
        tensor([[2.0000, 3.5000],
                [6.5000, 8.0000]])
    """
    return _halve_all([images], dtype, policy)[0]


def _halve_all(batches: Sequence[torch.Tensor], dtype: torch.dtype, policy: str) -> List[torch.Tensor]:
    if len(batches) > 1 and torch.get_num_threads() > 1:  # x and y side by side, each one whole call
        words = list(_pool(torch.get_num_threads()).map(lambda b: _halve_integer_words(b, dtype, policy), batches))
    else:
        words = [_halve_integer_words(images, dtype, policy) for images in batches]
    if all(w is not None for w in words):
        return words
    threads = torch.get_num_threads()
    if sum(b.numel() for b, w in zip(batches, words) if w is None) < _SERIAL_HALVE_ELEMENTS:
        threads = 1
    outputs, work = [], []
    for images, done in zip(batches, words):
        if done is not None:
            outputs.append(done)
            continue
        count, channels, height, width = images.shape
        planes = images.reshape(count * channels, height, width)
        if images.device.type != "cpu" or images.dtype not in _NUMPY_HALVE or planes.shape[0] == 0:
            outputs.append(halve_reference(planes, dtype).reshape(count, channels, -(-height // 2), -(-width // 2)))
            continue
        out = torch.empty((count * channels, -(-height // 2), -(-width // 2)), dtype=dtype)
        pieces = max(1, min(threads, planes.shape[0]))
        source = planes.detach().numpy()
        target = out.numpy()
        work += [(source[part], target[part]) for part in _plane_ranges(planes.shape[0], pieces)]
        outputs.append(out.reshape(count, channels, out.shape[1], out.shape[2]))
    if threads == 1 or len(work) < 2:
        for source, target in work:
            _halve_numpy(source, target)
    else:
        list(_pool(threads).map(lambda item: _halve_numpy(*item), work))
    return outputs


def _plane_ranges(count: int, pieces: int) -> List[slice]:
    bounds = [count * i // pieces for i in range(pieces + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
