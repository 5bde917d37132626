"""The `wang2004` SSIM as Triton kernels: per-image, per-channel means straight from the pixels.

Owns the @triton.jit code and nothing else: the launcher (`ssim_ray.metric.triton.launcher`) checks inputs,
builds the window and the launch geometry, and calls `ssim_tiles_kernel` then `reduce_kernel`. The torch
path (`ssim_ray.metric.tiles`) is the oracle and the CPU path; these kernels are its fast path on CUDA.

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
  on the batch, its size or an image's position in it, and the tile shape is a constant of the launcher,
  not a function of the batch, so a pair's score has the same bits alone, in any batch, and in a ragged
  list.
- Ragged batches: one launch over a table of per-image addresses and extents; programs whose tile lies
  outside their image's valid map do nothing.

Windows up to 11 taps are supported: the window size is a compile-time constant (a shorter one loads only its
own columns; its vertical sliding window is zero-padded to 11 rows, read from rows clamped into the image).

triton is optional: without it this module still imports (the kernels stay plain functions, never launched)
and `triton is None` says so.

References:
    Z. Wang, A. C. Bovik, H. R. Sheikh, E. P. Simoncelli, "Image quality assessment: from error visibility
    to structural similarity", IEEE TIP 13(4), 2004.
"""

from __future__ import annotations

import functools

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # triton is optional: CPU-only installs use the torch path, and the launcher says why
    triton = None
    tl = None
    InterpretedFunction = None


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
def ssim_tiles_kernel(
    x_ptr, y_ptr, table_ptr, shape_ptr, range_ptr, taps_ptr, partial_ptr,
    height, width, stride_n, inv_range, c1, c2, n_strips, n_tiles, WIN: tl.constexpr,
    RAGGED: tl.constexpr, RANGE_PER_IMAGE: tl.constexpr, BLOCK_W: tl.constexpr, ROWS: tl.constexpr,
    COLS_PER_LANE: tl.constexpr, UNROLL_ROWS: tl.constexpr,
):
    """Grid (tiles, C, N): the fp64 sum of one tile of one image-channel's valid map, into its fixed slot
    `partial_ptr[(n * C + c) * n_tiles + tile]`. Ragged batches read each image's address and extent from
    `table_ptr` / `shape_ptr`; a per-image range from `range_ptr` (else the scalar `inv_range` = 1 / L)."""
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
def reduce_kernel(
    partial_ptr, shape_ptr, out_ptr, height, width, win, n_strips_max, n_tiles_max,
    RAGGED: tl.constexpr, BLOCK_W: tl.constexpr, ROWS: tl.constexpr,
):
    """Grid (C, N): an image-channel's tile sums added in a fixed order, / the valid map's size, as float32."""
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


def interpreted() -> bool:
    """Whether these kernels run under Triton's CPU interpreter in this process.

    TRITON_INTERPRET is read when a kernel is decorated, that is when this module is first imported, so the
    kernel object is the one source of truth (and this module reads no environment variable).

    Returns:
        True under TRITON_INTERPRET=1; False when triton compiles for a GPU or is not installed.

    Example:
        >>> interpreted() in (True, False)
        True
    """
    return InterpretedFunction is not None and isinstance(ssim_tiles_kernel, InterpretedFunction)
