"""The torch path's arithmetic: local moments, the SSIM map, and the fixed tiles that make it batch-invariant.

How it computes (see docs/ARCHITECTURE.md for the contract and DESIGN.md §2 for the definition):

- The pair (x, y) is rewritten as s = x + y and d = x - y. Then, with local weighted means and variances
  mu_s, var_s, mu_d, var_d over the window,
      A = mu_s^2 / 2 + C1,  a = mu_d^2 / 2,  B = var_s / 2 + C2,  b = var_d / 2,
      SSIM = (A - a)(B - b) / ((A + a)(B + b)),
  which is Wang's formula exactly (mu_x^2 + mu_y^2 = (mu_s^2 + mu_d^2) / 2, 2 mu_x mu_y = (mu_s^2 - mu_d^2) / 2,
  and likewise for the variances). x == y gives d == 0, so exactly 1; |A - a| <= A + a and |B - b| <= B + b
  hold after rounding too, so the map is never above 1.
- Variances are not formed as E[s^2] - mu^2, which cancels most fp32 bits on flat, bright regions (measured:
  up to 7e-6 off the reference on small real crops, 5e-7 after centring). The separable window is applied
  in two passes with Chan's update instead: each row of the window gets its own mean and centred second
  moment, and the column pass adds w_j (var_j + (mu_j - mu)^2) - sums of non-negative terms, accurate to a
  few ulps of the variance itself (measured 4e-8 worst in fp32 on the same crops).
- s and d are formed once per pixel, while the tiles are cut (`PairTiles`; the compiled kernel forms them
  one input row at a time), not once per window tap inside the kernel: the same values (one rounding of
  x + y), a fifth fewer operations in the row pass, and one image per loop there.
- Every image plane is cut into tiles of TILE_ROWS x TILE_COLS map pixels (plus the window's halo), anchored
  at the plane's own origin. A tile's map and its float64 sum are computed by the same elementwise ops
  whatever else is in the call, and a plane's tile sums are added by elementwise adds in an order fixed by
  its own size (no reduction kernel chooses an order for us). So a pair's score depends on nothing but its
  own pixels: the same bits in any batch, at any position, in any ragged grouping, with any thread count.
  The tile shape never depends on the batch, and the compiled kernel (`ssim_ray.metric.native`, C) takes
  these operations in this order for every map pixel and sums each tile the same way, so the compiled and
  eager kernels give the same bits (no contraction into FMA, no reassociation: tested).
- Variants (`TileVariant`), each a flag of the compiled kernel, leave Wang's SSIM graph untouched: sample
  covariance (scikit-image's default) scales both variances by N / (N - 1) before the formula, and MS-SSIM
  adds the contrast-structure map cs = (B - b) / (B + b) = (2 sigma_xy + C2) / (sigma_x^2 + sigma_y^2 + C2),
  summed per tile beside the SSIM map, from the same subexpressions (so its SSIM map has ssim()'s bits).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Tuple

import torch

TILE_ROWS = 64
TILE_COLS = 128
MIN_TILE_SIDE = 16  # smallest side of a one-tile plane's tile (`tile_grid`): two AVX-512 vectors of fp32
TILES_PER_CALL = 32  # tiles per compiled call: the pool's unit of work (~1 ms of a 64 x 128 tile each)
# Tiles per eager call: bounds the memory of the ~20 live temporaries of a tile batch.
EAGER_CHUNK = {"cpu": 64}
DEFAULT_EAGER_CHUNK = 1024

Chunk = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TileVariant:
    """What a tile kernel computes besides Wang's population SSIM; each variant compiles its own kernel.

    sample_covariance: variances and covariance times consts[2] = N / (N - 1) (consts then holds 3 values).
    with_cs: tile sums of the contrast-structure map too, (K, 2) sums [ssim, cs] instead of (K,).
    cs_only: tile sums of the contrast-structure map alone, (K,) (MS-SSIM's middle scales, which use no
        SSIM): the luminance term, the SSIM map and its sums are never formed; the cs map has the bits
        of `with_cs`'s (the same subexpressions).
    """

    sample_covariance: bool = False
    with_cs: bool = False
    cs_only: bool = False

    def __post_init__(self) -> None:
        if self.with_cs and self.cs_only:
            raise ValueError("TileVariant: with_cs (SSIM and cs sums) and cs_only (cs sums alone) exclude each other")

    @property
    def sums_per_tile(self) -> int:
        """Maps summed per tile: 2 with `with_cs` ([ssim, cs]), else 1 (SSIM, or cs with `cs_only`)."""
        return 2 if self.with_cs else 1


WANG = TileVariant()


def taps_in(window: torch.Tensor, dtype: torch.dtype) -> List[float]:
    """Window taps as Python floats already rounded to the compute dtype, so every kernel multiplies alike."""
    return list(_taps_in(tuple(window.tolist()), dtype))


@functools.lru_cache(maxsize=64)
def _taps_in(window: Tuple[float, ...], dtype: torch.dtype) -> Tuple[float, ...]:
    return tuple(float(v) for v in torch.tensor(window, dtype=torch.float64).to(dtype).to(torch.float64))


# ------------------------------------------------------------------------------------------- moments


def _row_mean_and_m2(a: torch.Tensor, taps: List[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and centred second moment over each horizontal window ('valid' along the last dim)."""
    c = len(taps) // 2
    width = a.shape[-1] - 2 * c

    def shifted(k: int) -> torch.Tensor:
        return a[..., c + k : c + k + width]

    # The window is symmetric: pair taps c-k and c+k to halve the multiplies.
    mean = shifted(0) * taps[c]
    for k in range(1, c + 1):
        mean = mean + (shifted(-k) + shifted(k)) * taps[c + k]
    dev = shifted(0) - mean
    m2 = dev * dev * taps[c]
    for k in range(1, c + 1):
        lo, hi = shifted(-k) - mean, shifted(k) - mean
        m2 = m2 + (lo * lo + hi * hi) * taps[c + k]
    return mean, m2


def _column_combine(mean_r: torch.Tensor, m2_r: torch.Tensor, taps: List[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Combine row-window statistics down each column (Chan et al.): var = sum_j w_j (m2_j + (mu_j - mu)^2)."""
    c = len(taps) // 2
    height = mean_r.shape[-2] - 2 * c

    def rows(t: torch.Tensor, k: int) -> torch.Tensor:
        return t[..., c + k : c + k + height, :]

    mean = rows(mean_r, 0) * taps[c]
    for k in range(1, c + 1):
        mean = mean + (rows(mean_r, -k) + rows(mean_r, k)) * taps[c + k]
    dev = rows(mean_r, 0) - mean
    var = (rows(m2_r, 0) + dev * dev) * taps[c]
    for k in range(1, c + 1):
        lo, hi = rows(mean_r, -k) - mean, rows(mean_r, k) - mean
        var = var + (rows(m2_r, -k) + lo * lo + rows(m2_r, k) + hi * hi) * taps[c + k]
    return mean, var


def _local_mean_and_var(a: torch.Tensor, taps: List[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    return _column_combine(*_row_mean_and_m2(a, taps), taps)


def _maps(s: torch.Tensor, d: torch.Tensor, taps: List[float], consts: torch.Tensor,
          variant: TileVariant) -> Tuple[torch.Tensor, ...]:
    """(SSIM map,), (SSIM map, cs map) or (cs map,) over the valid region (per `variant`), from the sum
    s = x + y and difference d = x - y."""
    mean_s, var_s = _local_mean_and_var(s, taps)
    mean_d, var_d = _local_mean_and_var(d, taps)
    if variant.sample_covariance:
        var_s, var_d = var_s * consts[2], var_d * consts[2]
    big_b, small_b = var_s * 0.5 + consts[1], var_d * 0.5
    cs_num, cs_den = big_b - small_b, big_b + small_b
    if variant.cs_only:
        return (cs_num / cs_den,)
    big_a, small_a = mean_s * mean_s * 0.5 + consts[0], mean_d * mean_d * 0.5
    ssim_map = ((big_a - small_a) * cs_num) / ((big_a + small_a) * cs_den)
    return (ssim_map, cs_num / cs_den) if variant.with_cs else (ssim_map,)


# ------------------------------------------------------------------------------------------- one tile batch


def pairwise_sum_last(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim by halving: zero-pad to a power of two, then add the halves elementwise.

    Elementwise adds only: torch's reduction kernels pick their order (and their split across threads)
    from the whole tensor's shape, which would make a score depend on its batch.

    Example:
        >>> pairwise_sum_last(torch.tensor([[1.0, 2.0, 3.0]]))
        tensor([6.])
    """
    n = t.shape[-1]
    size = 1 << (n - 1).bit_length()
    if size != n:
        t = torch.nn.functional.pad(t, (0, size - n))
    while t.shape[-1] > 1:
        half = t.shape[-1] // 2
        t = t[..., :half] + t[..., half:]
    return t[..., 0]


def tile_kernel(
    s: torch.Tensor, d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, consts: torch.Tensor, taps: List[float],
    variant: TileVariant = WANG,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(K, rows + w - 1, cols + w - 1) tiles of s = x + y and d = x - y -> float64 sums over each tile's valid
    map, and the (K, rows, cols) map.

    s, d: in the compute dtype (`PairTiles` forms them: once per pixel, not once per window tap).
    rows, cols: (K,) int32, how many map rows / columns of each tile lie inside its image (the rest is padding).
    consts: C1, C2 (and N / (N - 1) for sample covariance) in the compute dtype (a tensor, so a new
    data_range does not recompile).
    Returns (K,) sums, or (K, 2) sums of the SSIM and cs maps with `variant.with_cs`, and the SSIM map (cs
    sums and the cs map with `variant.cs_only`).
    """
    maps = _maps(s, d, taps, consts, variant)
    map_rows, map_cols = maps[0].shape[-2:]  # TILE_ROWS x TILE_COLS, or a smaller tile (see `tile_grid`)
    # int32 indices: one AVX2 vector per 8 map pixels for the mask, where int64 took two.
    row_ids = torch.arange(map_rows, device=s.device, dtype=rows.dtype).view(1, map_rows, 1)
    col_ids = torch.arange(map_cols, device=s.device, dtype=cols.dtype).view(1, 1, map_cols)
    inside = (row_ids < rows.view(-1, 1, 1)) & (col_ids < cols.view(-1, 1, 1))
    zero = torch.zeros((), dtype=maps[0].dtype, device=s.device)
    sums = [pairwise_sum_last(pairwise_sum_last(torch.where(inside, m, zero).to(torch.float64))) for m in maps]
    return (sums[0] if len(sums) == 1 else torch.stack(sums, dim=-1)), maps[0]


def tile_sums(
    s: torch.Tensor, d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, consts: torch.Tensor, taps: List[float],
    variant: TileVariant = WANG,
) -> torch.Tensor:
    """Sums only, so that the map never has to be written out (what `eager_tile_sums` runs)."""
    return tile_kernel(s, d, rows, cols, consts, taps, variant)[0]


def split_tiles(s, d, rows, cols, chunk: int) -> List[Chunk]:
    """Chunks of at most `chunk` tiles (views)."""
    return [tuple(t[start : start + chunk] for t in (s, d, rows, cols)) for start in range(0, s.shape[0], chunk)]


def join_sums(sums: List[torch.Tensor], total: int) -> torch.Tensor:
    """Per-chunk tile sums back into one (K,) tensor, padding tiles dropped."""
    return torch.cat(sums)[:total]  # padding tiles exist only at the end of the last chunk


def eager_tile_sums(tiles: "PairTiles", rows, cols, consts, taps: List[float],
                    variant: TileVariant = WANG) -> torch.Tensor:
    """Tile sums by the eager kernel, a bounded number of tiles at a time."""
    s, d = tiles.all()
    chunks = split_tiles(s, d, rows, cols, EAGER_CHUNK.get(s.device.type, DEFAULT_EAGER_CHUNK))
    return join_sums([tile_sums(*chunk, consts, taps, variant) for chunk in chunks], s.shape[0])


def eager_tile_maps(tiles: "PairTiles", rows, cols, consts, taps: List[float],
                    variant: TileVariant = WANG) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tile sums and maps by the eager kernel (the same ops, so the same bits), a bounded number at a time."""
    s, d = tiles.all()
    chunk = EAGER_CHUNK.get(s.device.type, DEFAULT_EAGER_CHUNK)
    parts = [tile_kernel(s[i : i + chunk], d[i : i + chunk], rows[i : i + chunk], cols[i : i + chunk], consts, taps,
                         variant)
             for i in range(0, s.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ------------------------------------------------------------------------------------------- planes <-> tiles


@dataclass(frozen=True)
class TileGrid:
    """How planes of one size are cut into tiles, and where those tiles lie in memory.

    A tile is rows x cols map pixels plus the window's halo. A plane is cut into `across` vertical strips
    cols + halo columns wide (columns past the image are zeros), each strip `slots` * rows input rows high
    (rows past the image are zeros), and the strips of all planes are stacked in one buffer. Tile `i` of
    strip `s` then starts `(s * slots + i) * rows` rows into that buffer, so every tile of a call is a view
    with the same strides whatever the plane's size: one copy of the pixels (converting their dtype), no
    per-tile copy. Tiles are in strip order (plane, strip, tile down the strip); `plane_sums_in_order` and
    `stitch` put them back in row-major order per plane. A strip holds `down` tiles of the map plus one more
    slot when the image's last input rows spill past `down` tiles (height mod rows in 1..w-1): an empty tile
    (its extents are 0).
    """

    height: int
    width: int
    win: int
    rows: int
    cols: int

    @property
    def out_h(self) -> int:
        return self.height - self.win + 1

    @property
    def out_w(self) -> int:
        return self.width - self.win + 1

    @property
    def down(self) -> int:
        return -(-self.out_h // self.rows)

    @property
    def across(self) -> int:
        return -(-self.out_w // self.cols)

    @property
    def slots(self) -> int:
        return -(-self.height // self.rows)

    def tiles(self, planes: int) -> int:
        """Tiles in the buffer for `planes` planes, empty slots included."""
        return planes * self.across * self.slots


def _one_tile_side(needed: int, full: int) -> int:
    """The smallest power of two >= needed (at least MIN_TILE_SIDE), or `full` if that is larger."""
    side = max(MIN_TILE_SIDE, 1 << (needed - 1).bit_length())
    return side if side <= full else full


def tile_grid(height: int, width: int, win_size: int) -> TileGrid:
    """The tiling of a plane: TILE_ROWS x TILE_COLS tiles, or one smaller tile for a plane whose map fits in one.

    A plane whose whole map fits in one tile is not cut into a full one: it gets the smallest power-of-two
    tile that holds it (at least MIN_TILE_SIDE a side; rows enough for all its input rows, so that a strip
    has one slot). The tile's sum is then the same to the bit: a full tile's pairwise halving only adds exact
    zeros (masked map pixels) until it reaches the smaller power of two, and from there adds the same
    values in the same order. Coarse MS-SSIM scales and thumbnails thus cost what their pixels cost.
    """
    out_h, out_w = height - win_size + 1, width - win_size + 1
    rows = TILE_ROWS if out_h > TILE_ROWS else _one_tile_side(height, TILE_ROWS)
    cols = TILE_COLS if out_w > TILE_COLS else _one_tile_side(out_w, TILE_COLS)
    return TileGrid(height, width, win_size, rows, cols)


@dataclass(frozen=True)
class PairTiles:
    """The tiles of s = x + y and d = x - y for same-size planes of a pair batch, in `dtype`, in strip order
    (`TileGrid`), formed when they are needed.

    s and d are what the window statistics are taken of (`_maps`); forming them once per pixel here saves the
    kernel an add and a subtract per window tap. `all()` forms every tile at once (the eager kernel); the
    compiled kernel reads x and y themselves (`ssim_ray.metric.compiled`).
    """

    x: torch.Tensor
    y: torch.Tensor
    grid: TileGrid
    dtype: torch.dtype

    @property
    def count(self) -> int:
        return self.grid.tiles(self.x.shape[0])

    @property
    def tile_shape(self) -> Tuple[int, int]:
        """(rows, cols) of a tile with its halo."""
        return self.grid.rows + self.grid.win - 1, self.grid.cols + self.grid.win - 1

    def all(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every tile of s and d, each (count, rows + w - 1, cols + w - 1): views of buffers filled by whole-batch ops."""
        x_buffer, y_buffer = self._whole_buffer(self.x), self._whole_buffer(self.y)
        s_buffer = x_buffer + y_buffer
        torch.sub(x_buffer, y_buffer, out=y_buffer)
        return self._view(s_buffer, self.count), self._view(y_buffer, self.count)

    def _whole_buffer(self, planes: torch.Tensor) -> torch.Tensor:
        """Every tile of `planes` in `dtype`, as the rows of one buffer (tiles overlap by the halo): whole-batch copies."""
        grid = self.grid
        count, height, width = planes.shape
        tile_h, tile_w = self.tile_shape
        strip_h = grid.slots * grid.rows
        buffer = planes.new_empty((self.count * grid.rows + tile_h - grid.rows, tile_w), dtype=self.dtype)
        body = buffer[: self.count * grid.rows].view(count, grid.across, strip_h, tile_w)
        # Strips that lie inside the image: one strided copy (converts uint8/uint16/half exactly into dtype).
        inside = min(grid.across, max(0, (width - tile_w) // grid.cols + 1))
        if inside:
            p_stride, r_stride, c_stride = planes.stride()
            source = planes.as_strided((count, inside, height, tile_w),
                                       (p_stride, grid.cols * c_stride, r_stride, c_stride), planes.storage_offset())
            body[:, :inside, :height].copy_(source)
        for strip in range(inside, grid.across):  # at most the last one: it runs past the image's right edge
            kept = width - strip * grid.cols
            body[:, strip, :height, :kept].copy_(planes[:, :, strip * grid.cols :])
            body[:, strip, :height, kept:].zero_()
        body[:, :, height:].zero_()
        buffer[self.count * grid.rows :].zero_()
        return buffer

    def _view(self, buffer: torch.Tensor, count: int) -> torch.Tensor:
        tile_h, tile_w = self.tile_shape
        return buffer.as_strided((count, tile_h, tile_w), (self.grid.rows * tile_w, tile_w, 1))


def pair_tiles(x: torch.Tensor, y: torch.Tensor, grid: TileGrid, dtype: torch.dtype) -> PairTiles:
    """The s and d tiles of (P, H, W) plane pairs cut per `grid`, in `dtype` (uint8/uint16/half converted
    exactly), not yet formed."""
    return PairTiles(x, y, grid, dtype)


def tile_extents(planes: int, grid: TileGrid, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(K,) int32 rows and columns of each tile's map inside the image, tiles in strip order (0 for an empty slot).

    Kept per (planes, grid, device) (a batch's coarse MS-SSIM scales asked for them again and again: a
    tenth of a millisecond each time): the tensors are shared, read-only.
    """
    return _tile_extents(planes, grid, str(device))


@functools.lru_cache(maxsize=64)
def _tile_extents(planes: int, grid: TileGrid, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    slots = torch.arange(grid.slots, device=device, dtype=torch.int32)
    strips = torch.arange(grid.across, device=device, dtype=torch.int32)
    rows = (grid.out_h - grid.rows * slots).clamp(min=0, max=grid.rows)
    cols = (grid.out_w - grid.cols * strips).clamp(max=grid.cols)
    return rows.repeat(planes * grid.across), cols.repeat_interleave(grid.slots).repeat(planes)


def plane_sums_in_order(sums: torch.Tensor, planes: int, grid: TileGrid) -> torch.Tensor:
    """(K, ...) tile sums in strip order -> (P, down * across, ...) per plane in row-major tile order."""
    per_strip = sums.reshape((planes, grid.across, grid.slots) + tuple(sums.shape[1:]))[:, :, : grid.down]
    return per_strip.transpose(1, 2).reshape((planes, grid.down * grid.across) + tuple(sums.shape[1:]))


def stitch(tile_maps: torch.Tensor, planes: int, grid: TileGrid) -> torch.Tensor:
    """(K, rows, cols) tile maps in strip order back into (P, map height, map width)."""
    per_strip = tile_maps.reshape(planes, grid.across, grid.slots, grid.rows, grid.cols)[:, :, : grid.down]
    whole = per_strip.permute(0, 2, 3, 1, 4).reshape(planes, grid.down * grid.rows, grid.across * grid.cols)
    return whole[:, : grid.out_h, : grid.out_w]
