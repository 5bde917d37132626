"""The `wang2004` SSIM as one fused Triton kernel: per-image, per-channel means straight from the pixels.

The torch path in `ssim_ray.metric.structural` is the oracle and the CPU path; this module is its fast path on CUDA.

Design (see also docs/BENCHMARKS.md, section "GPU"):

- Grid `(tiles, C, N)`. A program owns one tile of the *valid* SSIM map of one image and one channel:
  `ROWS` output rows by `BLOCK_W` output columns. Tiles are anchored at the image's own origin, so what a
  program computes depends only on that image's pixels and the tile's place in it.
- Separable Gaussian with the moments held on chip. For each input row the program loads the `BLOCK_W + 10`
  pixels of x and y it needs (as uint8, uint16, fp16, bf16 or fp32, converted in registers), blurs the four
  moments x, y, x^2 + y^2 and xy horizontally (the denominator needs only sigma_x^2 + sigma_y^2), and keeps
  the last 11 blurred rows in registers as a sliding window; each new row completes one output row, blurred
  vertically from that window. Nothing but the pixels is read from memory and nothing but one partial sum
  per tile is written, so each input pixel crosses DRAM about once (tile halos re-read from L2). A lane
  computes one output column, or two adjacent ones sharing their loaded and squared pixels
  (`TileConfig.cols_per_lane`: fewer instructions per pixel, more registers; offered to the GPU benchmark).
- Pixels are scaled by 1/L and centred before the moments are formed, each tile column on one of its own
  pixels (`x / L - c_j`): E[x^2] - mu^2 then cancels few fp32 bits in smooth regions, where it matters.
  Centring on a global 0.5 left errors up to 2e-6 against float64 on real photos; this leaves ~1e-7.
  Moments and the SSIM formula run in fp32 (no dot products, so TF32 has no say); the map is summed per
  column in fp64.
- Deterministic, batch-invariant reduction without float atomics: each program writes its tile's fp64 sum
  to a fixed slot `(image, channel, tile)`, and a second kernel adds an image's slots in a fixed order
  (tile rows, then tile columns) and divides by the size of the valid map. Nothing in either kernel depends
  on the batch, its size or an image's position in it, and the tile shape is a constant of this module,
  not a function of the batch, so a pair's score has the same bits alone, in any batch, and in a ragged
  list.
- Ragged batches: one launch over a table of per-image addresses and extents; programs whose tile lies
  outside their image's valid map do nothing.

Windows up to 11 taps are supported: the window size is a compile-time constant (a shorter one loads only its
own columns; its vertical sliding window is zero-padded to 11 rows, read from rows clamped into the image).

References:
    Z. Wang, A. C. Bovik, H. R. Sheikh, E. P. Simoncelli, "Image quality assessment: from error visibility
    to structural similarity", IEEE TIP 13(4), 2004.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # triton is optional: CPU-only installs use the torch path and triton_available() says so
    triton = None
    tl = None
    InterpretedFunction = None

MAX_WIN_SIZE = 11
SUPPORTED_DTYPES = (torch.uint8, torch.uint16, torch.float16, torch.bfloat16, torch.float32)
# torch's CUDA caching allocator rounds every block up to 512 bytes.
_ALLOCATION_GRANULE = 512
_MAX_BATCH = 65535


@dataclass(frozen=True)
class TileConfig:
    """Shape of the tile one program computes. Fixed per module so results never depend on the batch.

    block_w output columns by `rows` output rows; each lane computes `cols_per_lane` adjacent columns,
    sharing the loaded, centred and squared pixels between them (fewer instructions per pixel, more
    registers). `unroll_rows` unrolls the row loop by the window's 11 rows, so the sliding window turns
    through names instead of register copies: ~15% fewer instructions per pixel on sm_90, but 11 inlined
    copies of the row code make Triton's coalescing pass take ~20 s per compilation instead of ~0.5 s.
    The defaults compile fast; the GPU benchmark's tile sweep times the alternatives.
    """

    block_w: int = 128
    rows: int = 64
    num_warps: int = 4
    cols_per_lane: int = 1
    unroll_rows: bool = False

    def __post_init__(self) -> None:
        # Four columns per lane compiled with register spills (sm_90, Triton 3.9), so it is not offered.
        if self.cols_per_lane not in (1, 2) or self.block_w % self.cols_per_lane:
            raise ValueError(f"cols_per_lane must be 1 or 2 and divide block_w, got {self}")


DEFAULT_TILES = TileConfig()

DataRange = Union[float, torch.Tensor]


def _jit(fn=None, *, do_not_specialize=()):
    """`triton.jit` where triton is installed; without it the kernels are never launched."""
    if fn is None:
        return functools.partial(_jit, do_not_specialize=do_not_specialize)
    return triton.jit(fn, do_not_specialize=list(do_not_specialize)) if triton is not None else fn


# Sizes and counts are not specialised on (divisibility by 16, equality to 1): the loads use constant
# offsets from a row pointer either way, and each specialisation would cost a compilation.
_SIZES = ("height", "width", "stride_n", "n_strips", "n_tiles")


@_jit
def _by_column(vals, V: tl.constexpr):
    """One tensor from a lane's V output columns: (T,) for V = 1, (T, 2) with the column last for V = 2."""
    if V == 1:
        out = vals[0]
    else:
        out = tl.join(vals[0], vals[1])
    return out


@_jit
def _zero_row(BLOCK_W: tl.constexpr, V: tl.constexpr):
    """An empty blurred row, shaped as `_hrow` returns them: four distinct zero tensors."""
    if V == 1:
        shape: tl.constexpr = [BLOCK_W]
    else:
        shape: tl.constexpr = [BLOCK_W // V, V]
    return (tl.zeros(shape, dtype=tl.float32), tl.zeros(shape, dtype=tl.float32),
            tl.zeros(shape, dtype=tl.float32), tl.zeros(shape, dtype=tl.float32))


@_jit
def _hrow(x_img, y_img, row, height, width, base, inv_range, cx, cy, taps, WIN: tl.constexpr, V: tl.constexpr):
    """Horizontal blur of the four moments (x, y, x^2 + y^2, xy) of one input row, as a tuple of four
    (BLOCK_W,) tensors, or (T, V) ones.

    Lane t computes output columns base[t] .. base[t] + V - 1 from the V + WIN - 1 pixels from base[t]:
    each pixel is loaded, converted, centred and squared once per lane, not once per tap.
    """
    # Rows below the image are needed only by windows shorter than 11, whose extra taps are zero: any
    # finite row will do, so read the last one.
    row = tl.minimum(row, height - 1)
    xp = x_img + row * width + base
    yp = y_img + row * width + base
    xs = ()
    ys = ()
    squares = ()
    products = ()
    for m in tl.static_range(V + WIN - 1):
        # Pointer plus a constant offset: no address arithmetic per tap. The caller clamps `base` so that
        # no load needs a mask, except the last V - 1 when the valid map is narrower than V columns.
        if m >= WIN:
            inside = base + m < width
            xv = tl.load(xp + m, mask=inside, other=0).to(tl.float32) * inv_range - cx
            yv = tl.load(yp + m, mask=inside, other=0).to(tl.float32) * inv_range - cy
        else:
            xv = tl.load(xp + m).to(tl.float32) * inv_range - cx
            yv = tl.load(yp + m).to(tl.float32) * inv_range - cy
        xs = xs + (xv,)
        ys = ys + (yv,)
        squares = squares + (xv * xv + yv * yv,)
        products = products + (xv * yv,)
    hx = ()
    hy = ()
    hs = ()
    hp = ()
    for u in tl.static_range(V):
        sx = taps[0] * xs[u]
        sy = taps[0] * ys[u]
        ss = taps[0] * squares[u]
        sp = taps[0] * products[u]
        for k in tl.static_range(1, WIN):
            sx += taps[k] * xs[u + k]
            sy += taps[k] * ys[u + k]
            ss += taps[k] * squares[u + k]
            sp += taps[k] * products[u + k]
        hx = hx + (sx,)
        hy = hy + (sy,)
        hs = hs + (ss,)
        hp = hp + (sp,)
    return _by_column(hx, V), _by_column(hy, V), _by_column(hs, V), _by_column(hp, V)


@_jit
def _ssim_row(mx, my, sum_sq, cross, cx, cy, c1, c2, V: tl.constexpr):
    """SSIM of one output row from its blurred moments, centred on (cx, cy)."""
    var_sum = sum_sq - mx * mx - my * my
    cov = cross - mx * my
    # Undo the centring for the luminance term, which (unlike the variances) is not shift-invariant.
    if V == 1:
        mx += cx
        my += cy
    else:
        mx += cx[:, None]
        my += cy[:, None]
    num = (2.0 * mx * my + c1) * (2.0 * cov + c2)
    den = (mx * mx + my * my + c1) * (var_sum + c2)
    return num / den


@_jit
def _image_geometry(x_ptr, y_ptr, table_ptr, shape_ptr, n, height, width, stride_n, RAGGED: tl.constexpr):
    """Where image n starts in x and y, and its height and width."""
    if RAGGED:
        x_img = tl.load(table_ptr + 2 * n).to(tl.pointer_type(x_ptr.dtype.element_ty))
        y_img = tl.load(table_ptr + 2 * n + 1).to(tl.pointer_type(y_ptr.dtype.element_ty))
        height = tl.load(shape_ptr + 2 * n)
        width = tl.load(shape_ptr + 2 * n + 1)
    else:
        x_img = x_ptr + n.to(tl.int64) * stride_n
        y_img = y_ptr + n.to(tl.int64) * stride_n
    return x_img, y_img, height, width


@_jit
def _emit(
    acc, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, row, row_ok,
    x_img, y_img, height, width, base, col_ok, inv_range, cx, cy, c1, c2, taps, WIN: tl.constexpr,
    V: tl.constexpr,
):
    """One output row: blur input `row` horizontally, finish the vertical blur over a0..a9 and it, and add
    the row's SSIM to the per-column sums `acc` (unless `row_ok` is false). Returns (acc, the new row)."""
    new = _hrow(x_img, y_img, row, height, width, base, inv_range, cx, cy, taps, WIN, V)
    v = ()
    for j in tl.static_range(4):
        v = v + (taps[0] * a0[j] + taps[1] * a1[j] + taps[2] * a2[j] + taps[3] * a3[j] + taps[4] * a4[j]
                 + taps[5] * a5[j] + taps[6] * a6[j] + taps[7] * a7[j] + taps[8] * a8[j] + taps[9] * a9[j]
                 + taps[10] * new[j],)
    s = _ssim_row(v[0], v[1], v[2], v[3], cx, cy, c1, c2, V)
    acc += tl.where(col_ok & row_ok, s, 0.0).to(tl.float64)
    return acc, new


@_jit
def _columns(col0, out_w, BLOCK_W: tl.constexpr, V: tl.constexpr):
    """Each lane's first output column `base`, and which of its V columns are valid and its own."""
    lane = col0 + V * tl.arange(0, BLOCK_W // V)
    # Lanes past the valid map are pulled back inside it, so that no load needs a mask (column j reads
    # j .. j + win - 1); what they compute again is left out of the sum.
    base = tl.maximum(tl.minimum(lane, out_w - V), 0)
    if V == 1:
        col_ok = lane < out_w
    else:
        col = base[:, None] + tl.arange(0, V)[None, :]
        col_ok = (col >= lane[:, None]) & (col < out_w)
    return base, col_ok


@_jit
def _tile_sum(x_img, y_img, row0, col0, height, width, out_h, out_w, inv_range, taps_ptr, c1, c2,
              WIN: tl.constexpr, BLOCK_W: tl.constexpr, ROWS: tl.constexpr, V: tl.constexpr, UNROLL: tl.constexpr):
    """fp64 sum of the SSIM map over one tile: ROWS output rows from row0, BLOCK_W columns from col0."""
    base, col_ok = _columns(col0, out_w, BLOCK_W, V)
    # Each lane's pixels are centred on one of them (at the centre of the tile's first window there):
    # E[x^2] - mu^2 then cancels few fp32 bits where it matters, in smooth regions. Any constant shared by
    # a window is exact in real arithmetic (variances and covariance are shift-invariant and the means get
    # it back); a global 0.5 L left 2e-6 on a contrast-changed photo, this ~1e-7.
    centre = (row0 + WIN // 2) * width + base + WIN // 2
    cx = tl.load(x_img + centre).to(tl.float32) * inv_range
    cy = tl.load(y_img + centre).to(tl.float32) * inv_range
    taps = ()
    for k in tl.static_range(11):
        taps = taps + (tl.load(taps_ptr + k),)
    # The sliding window of horizontally blurred rows, oldest first, all distinct zero tensors: Triton
    # carries a name through a loop only if its value changes, and rotating aliases of one tensor would
    # look unchanged (a compiled-only bug that the interpreter cannot show; see the tests).
    h0 = _zero_row(BLOCK_W, V)
    h1 = _zero_row(BLOCK_W, V)
    h2 = _zero_row(BLOCK_W, V)
    h3 = _zero_row(BLOCK_W, V)
    h4 = _zero_row(BLOCK_W, V)
    h5 = _zero_row(BLOCK_W, V)
    h6 = _zero_row(BLOCK_W, V)
    h7 = _zero_row(BLOCK_W, V)
    h8 = _zero_row(BLOCK_W, V)
    h9 = _zero_row(BLOCK_W, V)
    # A loop, not ten inlined rows: straight-line code lets the compiler hoist every load (255 registers).
    for i in range(10):
        h10 = _hrow(x_img, y_img, row0 + i, height, width, base, inv_range, cx, cy, taps, WIN, V)
        h0, h1, h2, h3, h4, h5, h6, h7, h8, h9 = h1, h2, h3, h4, h5, h6, h7, h8, h9, h10
    acc = tl.zeros(col_ok.shape, dtype=tl.float64)
    n_rows = tl.minimum(ROWS, out_h - row0)
    if not UNROLL:
        for i in range(n_rows):
            acc, h10 = _emit(
                acc, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, row0 + i + 10, i < n_rows,
                x_img, y_img, height, width, base, col_ok, inv_range, cx, cy, c1, c2, taps, WIN, V,
            )
            h0, h1, h2, h3, h4, h5, h6, h7, h8, h9 = h1, h2, h3, h4, h5, h6, h7, h8, h9, h10
    else:
        # Unrolled by the window's length, so the window turns through the names instead of being copied
        # register by register each row; steps past the tile's last row are computed (rows are clamped into
        # the image) and left out of the sum.
        for i in range(0, n_rows, 11):
            first = row0 + i + 10
            acc, h10 = _emit(
                acc, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, first + 0, i + 0 < n_rows,
                x_img, y_img, height, width, base, col_ok, inv_range, cx, cy, c1, c2, taps, WIN, V,
            )
            acc, h0 = _emit(
                acc, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, first + 1, i + 1 < n_rows,
                x_img, y_img, height, width, base, col_ok, inv_range, cx, cy, c1, c2, taps, WIN, V,
            )
            acc, h1 = _emit(
                acc, h2, h3, h4, h5, h6, h7, h8, h9, h10, h0, first + 2, i + 2 < n_rows,
                x_img, y_img, height, width, base, col_ok, inv_range, cx, cy, c1, c2, taps, WIN, V,
            )
            acc, h2 = _emit(
                acc, h3, h4, h5, h6, h7, h8, h9, h10, h0, h1, first + 3, i + 3 < n_rows,
                x_img, y_img, height, width, base, col_ok, inv_range, cx, cy, c1, c2, taps, WIN, V,
            )
            acc, h3 = _emit(
                acc, h4, h5, h6, h7, h8, h9, h10, h0, h1, h2, first + 4, i + 4 < n_rows,
                x_img, y_img, height, width, base, col_ok, inv_range, cx, cy, c1, c2, taps, WIN, V,
            )
            acc, h4 = _emit(
                acc, h5, h6, h7, h8, h9, h10, h0, h1, h2, h3, first + 5, i + 5 < n_rows,
                x_img, y_img, height, width, base, col_ok, inv_range, cx, cy, c1, c2, taps, WIN, V,
            )
            acc, h5 = _emit(
                acc, h6, h7, h8, h9, h10, h0, h1, h2, h3, h4, first + 6, i + 6 < n_rows,
                x_img, y_img, height, width, base, col_ok, inv_range, cx, cy, c1, c2, taps, WIN, V,
            )
            acc, h6 = _emit(
                acc, h7, h8, h9, h10, h0, h1, h2, h3, h4, h5, first + 7, i + 7 < n_rows,
                x_img, y_img, height, width, base, col_ok, inv_range, cx, cy, c1, c2, taps, WIN, V,
            )
            acc, h7 = _emit(
                acc, h8, h9, h10, h0, h1, h2, h3, h4, h5, h6, first + 8, i + 8 < n_rows,
                x_img, y_img, height, width, base, col_ok, inv_range, cx, cy, c1, c2, taps, WIN, V,
            )
            acc, h8 = _emit(
                acc, h9, h10, h0, h1, h2, h3, h4, h5, h6, h7, first + 9, i + 9 < n_rows,
                x_img, y_img, height, width, base, col_ok, inv_range, cx, cy, c1, c2, taps, WIN, V,
            )
            acc, h9 = _emit(
                acc, h10, h0, h1, h2, h3, h4, h5, h6, h7, h8, first + 10, i + 10 < n_rows,
                x_img, y_img, height, width, base, col_ok, inv_range, cx, cy, c1, c2, taps, WIN, V,
            )
    if V > 1:
        acc = tl.sum(acc, axis=1)
    return tl.sum(acc, axis=0)


@_jit(do_not_specialize=_SIZES)
def _ssim_tiles_kernel(
    x_ptr, y_ptr, table_ptr, shape_ptr, range_ptr, taps_ptr, partial_ptr,
    height, width, stride_n, inv_range, c1, c2, n_strips, n_tiles, WIN: tl.constexpr,
    RAGGED: tl.constexpr, RANGE_PER_IMAGE: tl.constexpr, BLOCK_W: tl.constexpr, ROWS: tl.constexpr,
    COLS_PER_LANE: tl.constexpr, UNROLL_ROWS: tl.constexpr,
):
    tile = tl.program_id(0)
    c = tl.program_id(1)
    n = tl.program_id(2)
    x_img, y_img, height, width = _image_geometry(
        x_ptr, y_ptr, table_ptr, shape_ptr, n, height, width, stride_n, RAGGED
    )
    if RANGE_PER_IMAGE:
        # Same bits as the host's float32(1 / L) for a scalar range: divide in fp64, round once.
        inv_range = (1.0 / tl.load(range_ptr + n).to(tl.float64)).to(tl.float32)
    out_h = height - WIN + 1
    out_w = width - WIN + 1
    row0 = (tile // n_strips) * ROWS
    col0 = (tile % n_strips) * BLOCK_W
    # In a ragged batch the grid covers the largest image; tiles outside this one's map do nothing.
    if (row0 < out_h) & (col0 < out_w):
        plane = c * height * width
        total = _tile_sum(
            x_img + plane, y_img + plane, row0, col0, height, width, out_h, out_w, inv_range, taps_ptr,
            c1, c2, WIN, BLOCK_W, ROWS, COLS_PER_LANE, UNROLL_ROWS,
        )
        slot = (n.to(tl.int64) * tl.num_programs(1) + c) * n_tiles + tile
        tl.store(partial_ptr + slot, total)


@_jit(do_not_specialize=("height", "width", "win", "n_strips_max", "n_tiles_max"))
def _reduce_kernel(
    partial_ptr, shape_ptr, out_ptr, height, width, win, n_strips_max, n_tiles_max,
    RAGGED: tl.constexpr, BLOCK_W: tl.constexpr, ROWS: tl.constexpr,
):
    c = tl.program_id(0)
    n = tl.program_id(1)
    if RAGGED:
        height = tl.load(shape_ptr + 2 * n)
        width = tl.load(shape_ptr + 2 * n + 1)
    out_h = height - win + 1
    out_w = width - win + 1
    channel = n.to(tl.int64) * tl.num_programs(0) + c
    base = partial_ptr + channel * n_tiles_max
    # A fixed order over this image's own tiles: the same additions whatever the batch holds.
    total = tl.load(base)
    for t in range(1, tl.cdiv(out_h, ROWS) * tl.cdiv(out_w, BLOCK_W)):
        strips = tl.cdiv(out_w, BLOCK_W)
        total += tl.load(base + (t // strips) * n_strips_max + t % strips)
    count = out_h.to(tl.float64) * out_w.to(tl.float64)
    tl.store(out_ptr + channel, (total / count).to(tl.float32))


def triton_available() -> bool:
    """Whether the fused kernel can run here: triton is installed, compiled (not interpreted), and CUDA is up.

    Returns:
        True when `ssim_per_channel_triton` accepts CUDA tensors on this machine.

    Example:
        >>> from ssim_ray.metric.triton_ssim import triton_available
        >>> triton_available() in (True, False)
        True
    """
    return triton is not None and not _interpreted() and torch.cuda.is_available()


def _interpreted() -> bool:
    # TRITON_INTERPRET is read when a kernel is decorated, so the kernel object is the one source of truth.
    return InterpretedFunction is not None and isinstance(_ssim_tiles_kernel, InterpretedFunction)


def _allocated(nbytes: int) -> int:
    """A request of `nbytes` as torch's CUDA caching allocator rounds it."""
    return -(-nbytes // _ALLOCATION_GRANULE) * _ALLOCATION_GRANULE


def _grid_dims(height: int, width: int, win_size: int, tiles: TileConfig) -> tuple[int, int]:
    """(tile rows, tile columns) covering the valid map of an image."""
    out_h, out_w = height - win_size + 1, width - win_size + 1
    return -(-out_h // tiles.rows), -(-out_w // tiles.block_w)


def triton_workspace_bytes(
    n: int, c: int, h: int, w: int, dtype: torch.dtype, *, win_size: int = 11, per_image_range: bool = False
) -> int:
    """Device bytes one same-shape kernel call holds at its peak: both inputs plus the kernel's own buffers.

    The kernel keeps no SSIM maps: besides x and y it allocates one float64 sum per tile and image-channel
    and the (N, C) float32 scores. Each buffer is rounded up to 512 bytes as torch's CUDA caching allocator
    rounds it; `torch.cuda.max_memory_allocated` for the call can differ only where the allocator hands a
    large buffer a bigger cached block than it asked for (less than 2 MiB per input, measured in the gpu
    tests). The memory probe keeps its own margin on top.

    Args:
        n: Batch size.
        c: Channels.
        h: Height.
        w: Width.
        dtype: Pixel dtype of x and y (one of `SUPPORTED_DTYPES`).
        win_size: Window size (the valid map, hence the number of tiles, depends on it).
        per_image_range: Whether `data_range` is a (N,) tensor; counts one float64 copy of it (an upper
            bound: no copy is made when it is already float64 on the device).

    Returns:
        Bytes.

    Raises:
        ValueError: For sizes below one or smaller than the window.
        TypeError: For an unsupported dtype.

    Example:
        >>> import torch
        >>> from ssim_ray.metric.triton_ssim import triton_workspace_bytes
        >>> triton_workspace_bytes(64, 3, 256, 256, torch.uint8) > 2 * 64 * 3 * 256 * 256
        True
    """
    for name, value in (("n", n), ("c", c), ("h", h), ("w", w)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    _check_dtype(dtype)
    _check_window(win_size, 1.0)
    _check_size(h, w, win_size)
    itemsize = torch.empty((), dtype=dtype).element_size()
    tile_rows, tile_cols = _grid_dims(h, w, win_size, DEFAULT_TILES)
    sizes = [n * c * h * w * itemsize] * 2 + [n * c * tile_rows * tile_cols * 8, n * c * 4]
    if per_image_range:
        sizes.append(n * 8)
    return sum(_allocated(size) for size in sizes)


@dataclass(frozen=True)
class _Window:
    """The metric's options as the kernels take them."""

    win_size: int
    taps: torch.Tensor  # float32, zero-padded to MAX_WIN_SIZE, on the device
    c1: float
    c2: float


@dataclass(frozen=True)
class _Launch:
    """Geometry of one launch: the same-shape batch, or the bounding size of a ragged one."""

    n: int
    c: int
    height: int
    width: int
    stride_n: int
    ragged: bool
    table: torch.Tensor | None  # ragged: int64 (N, 2) addresses of x_i and y_i
    shapes: torch.Tensor | None  # ragged: int32 (N, 2) heights and widths


@functools.lru_cache(maxsize=16)
def _taps_on(device: torch.device, win_size: int, sigma: float, gaussian: bool) -> torch.Tensor:
    # Cached per device: uploading 11 floats on every call would cost a host-to-device copy each time.
    # Imported here, not at the top: ssim_ray.metric.structural dispatches to this module, so a top-level import would be
    # circular. The window is the torch path's own, rounded to float32 as its fp32 path rounds it.
    from ssim_ray.metric.structural import gaussian_window_1d

    taps = torch.zeros(MAX_WIN_SIZE, dtype=torch.float32)
    taps[:win_size] = gaussian_window_1d(win_size, sigma, gaussian=gaussian).to(torch.float32)
    return taps.to(device)


def _window(device, *, win_size, sigma, k1, k2, gaussian) -> _Window:
    _check_window(win_size, sigma)
    _check_constants(k1, k2)
    # Pixels are scaled by 1/L in the kernel, so the constants are (K L / L)^2.
    return _Window(win_size, _taps_on(torch.device(device), win_size, float(sigma), bool(gaussian)), k1**2, k2**2)


def _check_batch(n: int) -> None:
    # The batch is the grid's third dimension, which CUDA caps at 65535 programs.
    if n > _MAX_BATCH:
        raise ValueError(f"at most {_MAX_BATCH} pairs per call (the CUDA grid's z limit), got {n}")


def _check_constants(k1: float, k2: float) -> None:
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"pixel dtype must be one of {names}, got {dtype}")


def _check_window(win_size: int, sigma: float) -> None:
    if isinstance(win_size, bool) or not isinstance(win_size, int) or not 1 <= win_size <= MAX_WIN_SIZE:
        raise ValueError(f"win_size must be an odd integer from 1 to {MAX_WIN_SIZE}, got {win_size!r}")
    if win_size % 2 == 0:
        raise ValueError(f"win_size must be odd, got {win_size}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf:
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")


def _check_size(height: int, width: int, win_size: int) -> None:
    if height < win_size or width < win_size:
        raise ValueError(f"images must be at least {win_size}x{win_size} (the window), got {height}x{width}")


def _check_device(t: torch.Tensor, name: str) -> None:
    # The interpreter runs kernels on the CPU; compiled kernels need CUDA memory.
    if t.device.type != "cuda" and not (_interpreted() and t.device.type == "cpu"):
        where = "CPU (TRITON_INTERPRET=1) or CUDA" if _interpreted() else "CUDA"
        raise ValueError(f"{name} must be on a {where} device, got {t.device}")


def _check_image_pair(x, y, *, name_x: str, name_y: str, ndim: int) -> None:
    for name, t in ((name_x, x), (name_y, y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"{name_x} and {name_y} must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise TypeError(f"{name_x} and {name_y} must have the same dtype, got {x.dtype} and {y.dtype}")
    _check_dtype(x.dtype)
    if x.device != y.device:
        raise ValueError(f"{name_x} and {name_y} must be on the same device, got {x.device} and {y.device}")
    # Offsets inside one image are 32-bit in the kernel; the batch offset is 64-bit.
    if math.prod(x.shape[-3:]) >= 2**31:
        raise ValueError(f"one image of {name_x} must hold fewer than 2**31 values, got shape {tuple(x.shape)}")


def _check_range(data_range: DataRange, n: int) -> None:
    if isinstance(data_range, torch.Tensor):
        if data_range.shape != (n,) or not data_range.is_floating_point():
            raise ValueError(
                f"a tensor data_range must be floating point of shape ({n},), "
                f"got {data_range.dtype} of shape {tuple(data_range.shape)}"
            )
        # Values are not checked here: that would wait for the device. ssim_ray.metric.structural validates them.
        return
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not 0 < data_range < math.inf:
        raise ValueError(f"data_range must be a positive finite number or a ({n},) tensor, got {data_range!r}")


def _range_args(data_range: DataRange, device: torch.device) -> tuple[float, torch.Tensor | None]:
    """(float32 1/L for a scalar range, or a float64 (N,) tensor of ranges on the device)."""
    if isinstance(data_range, torch.Tensor):
        return 1.0, data_range.to(device=device, dtype=torch.float64).contiguous()
    # Rounded once from float64, as the kernel does for per-image ranges: both give the same bits.
    return float(torch.tensor(1.0 / float(data_range), dtype=torch.float32)), None


def _launch(x: torch.Tensor, y: torch.Tensor, geo: _Launch, window: _Window, data_range: DataRange,
            tiles: TileConfig) -> torch.Tensor:
    """Run the tile kernel and the fixed-order reduction; (N, C) float32 means."""
    inv_range, ranges = _range_args(data_range, x.device)
    tile_rows, tile_cols = _grid_dims(geo.height, geo.width, window.win_size, tiles)
    n_tiles = tile_rows * tile_cols
    partial = torch.empty((geo.n, geo.c, n_tiles), dtype=torch.float64, device=x.device)
    out = torch.empty((geo.n, geo.c), dtype=torch.float32, device=x.device)
    if geo.n == 0:
        return out
    dummy = partial  # stands in for pointer arguments that a specialisation never reads
    _ssim_tiles_kernel[(n_tiles, geo.c, geo.n)](
        x, y, geo.table if geo.ragged else dummy, geo.shapes if geo.ragged else dummy,
        ranges if ranges is not None else dummy, window.taps, partial,
        geo.height, geo.width, geo.stride_n, inv_range, window.c1, window.c2, tile_cols, n_tiles,
        WIN=window.win_size, RAGGED=geo.ragged, RANGE_PER_IMAGE=ranges is not None, BLOCK_W=tiles.block_w,
        ROWS=tiles.rows, COLS_PER_LANE=tiles.cols_per_lane, UNROLL_ROWS=tiles.unroll_rows, num_warps=tiles.num_warps,
    )
    _reduce_kernel[(geo.c, geo.n)](
        partial, geo.shapes if geo.ragged else dummy, out, geo.height, geo.width, window.win_size, tile_cols,
        n_tiles, RAGGED=geo.ragged, BLOCK_W=tiles.block_w, ROWS=tiles.rows, num_warps=1,
    )
    return out


def ssim_per_channel_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: DataRange,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    gaussian: bool = True,
) -> torch.Tensor:
    """Per-channel `wang2004` SSIM of a same-shape batch in one fused kernel (plus a tiny reduction).

    Mean of the SSIM map over the valid region ((H - win + 1) x (W - win + 1), no padding), per image and
    channel. Pixels are read once in their own dtype; moments and formula run in fp32, sums in fp64.
    A pair's scores have the same bits whatever batch it is in and wherever.

    Args:
        x: (N, C, H, W) uint8, uint16, float16, bfloat16 or float32 CUDA tensor (CPU under
            TRITON_INTERPRET=1).
        y: Same shape, dtype and device as `x`.
        data_range: L, the dynamic range of the pixels (255 for 8-bit, 65535 for 16-bit, 4095 for 12-bit
            data in 16-bit files), or a floating (N,) tensor with one range per pair. Never inferred.
        win_size: Odd window size, at most 11.
        sigma: Standard deviation of the Gaussian window.
        k1: The constant K1 (C1 = (K1 L)^2).
        k2: The constant K2 (C2 = (K2 L)^2).
        gaussian: False for a uniform window.

    Returns:
        (N, C) float32 SSIM means.

    Raises:
        TypeError: For non-tensors, mixed or unsupported dtypes.
        ValueError: For shape mismatches, images smaller than the window, a bad window, constant or range,
            or tensors that are not on a CUDA device.

    Example:
        >>> import torch
        >>> from ssim_ray.metric.triton_ssim import ssim_per_channel_triton
        >>> x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, device="cuda")  # doctest: +SKIP
        >>> ssim_per_channel_triton(x, x, data_range=255.0)  # doctest: +SKIP
        tensor([[1., 1., 1.], ...], device='cuda:0')
    """
    _check_image_pair(x, y, name_x="x", name_y="y", ndim=4)
    _check_window(win_size, sigma)
    _check_size(x.shape[2], x.shape[3], win_size)
    _check_constants(k1, k2)
    _check_batch(x.shape[0])
    _check_range(data_range, x.shape[0])
    _check_device(x, "x")
    window = _window(x.device, win_size=win_size, sigma=sigma, k1=k1, k2=k2, gaussian=gaussian)
    return _same_shape(x, y, data_range=data_range, window=window, tiles=DEFAULT_TILES)


def _same_shape(x: torch.Tensor, y: torch.Tensor, *, data_range: DataRange, window: _Window,
                tiles: TileConfig) -> torch.Tensor:
    x, y = x.contiguous(), y.contiguous()
    n, c, h, w = x.shape
    geo = _Launch(n, c, h, w, c * h * w, False, None, None)
    return _launch(x, y, geo, window, data_range, tiles)


def ssim_per_channel_triton_ragged(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    *,
    data_range: DataRange,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    gaussian: bool = True,
) -> torch.Tensor:
    """Per-channel `wang2004` SSIM of pairs of different sizes, in one launch over per-image extents.

    Pair i is `xs[i]` against `ys[i]`; pairs may differ in height and width, not in channels or dtype.
    Each pair's scores have the same bits as `ssim_per_channel_triton` gives it alone: tiles are anchored at
    each image's origin and reduced in the same fixed order.

    Args:
        xs: Sequence of (C, H_i, W_i) tensors, one dtype (see `ssim_per_channel_triton`), one device.
        ys: Sequence of the same length, `ys[i]` shaped like `xs[i]`.
        data_range: L for every pair, or a floating (N,) tensor with one range per pair.
        win_size: Odd window size, at most 11.
        sigma: Standard deviation of the Gaussian window.
        k1: The constant K1.
        k2: The constant K2.
        gaussian: False for a uniform window.

    Returns:
        (N, C) float32 SSIM means.

    Raises:
        TypeError: For non-tensors, mixed or unsupported dtypes.
        ValueError: For empty or unequal lists, shape or channel mismatches, images smaller than the window,
            a bad window, constant or range, or tensors that are not on one CUDA device.

    Example:
        >>> import torch
        >>> from ssim_ray.metric.triton_ssim import ssim_per_channel_triton_ragged
        >>> xs = [torch.randint(0, 256, (3, h, 64), dtype=torch.uint8, device="cuda")  # doctest: +SKIP
        ...       for h in (32, 48)]
        >>> ssim_per_channel_triton_ragged(xs, xs, data_range=255.0).shape  # doctest: +SKIP
        torch.Size([2, 3])
    """
    _check_window(win_size, sigma)
    _check_lists(xs, ys, win_size=win_size)
    _check_constants(k1, k2)
    _check_batch(len(xs))
    _check_range(data_range, len(xs))
    _check_device(xs[0], "xs[0]")
    window = _window(xs[0].device, win_size=win_size, sigma=sigma, k1=k1, k2=k2, gaussian=gaussian)
    return _ragged(xs, ys, data_range=data_range, window=window, tiles=DEFAULT_TILES)


def _check_lists(xs, ys, *, win_size: int) -> None:
    if not isinstance(xs, (list, tuple)) or not isinstance(ys, (list, tuple)):
        raise TypeError(f"xs and ys must be lists of tensors, got {type(xs).__name__} and {type(ys).__name__}")
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"xs and ys must be non-empty and of equal length, got {len(xs)} and {len(ys)}")
    for i, (x, y) in enumerate(zip(xs, ys)):
        _check_image_pair(x, y, name_x=f"xs[{i}]", name_y=f"ys[{i}]", ndim=3)
        _check_size(x.shape[1], x.shape[2], win_size)
        first = xs[0]
        if (x.shape[0], x.dtype, x.device) != (first.shape[0], first.dtype, first.device):
            raise ValueError(
                f"every pair must share channels, dtype and device: xs[0] has {first.shape[0]}, {first.dtype}, "
                f"{first.device}; xs[{i}] has {x.shape[0]}, {x.dtype}, {x.device}"
            )


def _ragged(xs: list[torch.Tensor], ys: list[torch.Tensor], *, data_range: DataRange, window: _Window,
            tiles: TileConfig) -> torch.Tensor:
    device = xs[0].device
    # The kernel assumes dense (C, H, W) images; contiguous() copies only those that are not.
    xs, ys = [x.contiguous() for x in xs], [y.contiguous() for y in ys]
    # Absolute addresses: the kernel turns them back into typed pointers (one launch, no concatenating copy).
    table = torch.tensor([[x.data_ptr(), y.data_ptr()] for x, y in zip(xs, ys)], dtype=torch.int64, device=device)
    shapes = torch.tensor([list(x.shape[1:]) for x in xs], dtype=torch.int32, device=device)
    height = max(x.shape[1] for x in xs)
    width = max(x.shape[2] for x in xs)
    geo = _Launch(len(xs), xs[0].shape[0], height, width, 0, True, table, shapes)
    return _launch(xs[0], ys[0], geo, window, data_range, tiles)
