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
- Every image plane is cut into tiles of TILE_ROWS x TILE_COLS map pixels (plus the window's halo), anchored
  at the plane's own origin. A tile's map and its float64 sum are computed by the same elementwise ops
  whatever else is in the call, and a plane's tile sums are added by elementwise adds in an order fixed by
  its own size (no reduction kernel chooses an order for us). So a pair's score depends on nothing but its
  own pixels: the same bits in any batch, at any position, in any ragged grouping, with any thread count.
  The tile shape never depends on the batch, so one compiled kernel of one static shape (TILES_PER_CALL
  tiles, `ssim_ray.metric.compiled`) serves every image size, and the compiled and eager kernels give the
  same bits (no contraction into FMA, no reassociation: tested).
"""

from __future__ import annotations

from typing import List, Tuple

import torch

TILE_ROWS = 64
TILE_COLS = 128
TILES_PER_CALL = 32  # tiles per compiled call: 1.3 MB of fp32 input each for x and y, cache-sized
# Tiles per eager call: bounds the memory of the ~20 live temporaries of a tile batch.
EAGER_CHUNK = {"cpu": 64}
DEFAULT_EAGER_CHUNK = 1024

Chunk = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def taps_in(window: torch.Tensor, dtype: torch.dtype) -> List[float]:
    """Window taps as Python floats already rounded to the compute dtype, so every kernel multiplies alike."""
    return [float(v) for v in window.to(dtype).to(torch.float64)]


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


def _ssim_map(x: torch.Tensor, y: torch.Tensor, taps: List[float], c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """The SSIM map over the valid region of float images (..., H, W) -> (..., H - w + 1, W - w + 1)."""
    mean_s, var_s = _local_mean_and_var(x + y, taps)
    mean_d, var_d = _local_mean_and_var(x - y, taps)
    big_a, small_a = mean_s * mean_s * 0.5 + c1, mean_d * mean_d * 0.5
    big_b, small_b = var_s * 0.5 + c2, var_d * 0.5
    return ((big_a - small_a) * (big_b - small_b)) / ((big_a + small_a) * (big_b + small_b))


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
    x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, consts: torch.Tensor, taps: List[float]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(K, TILE_ROWS + w - 1, TILE_COLS + w - 1) tiles -> float64 sums over each tile's valid map, and the map.

    rows, cols: (K,) how many map rows / columns of each tile lie inside its image (the rest is padding).
    consts: (2,) C1, C2 in the compute dtype (a tensor, so a new data_range does not recompile).
    """
    ssim_map = _ssim_map(x.to(consts.dtype), y.to(consts.dtype), taps, consts[0], consts[1])
    row_ids = torch.arange(TILE_ROWS, device=x.device).view(1, TILE_ROWS, 1)
    col_ids = torch.arange(TILE_COLS, device=x.device).view(1, 1, TILE_COLS)
    inside = (row_ids < rows.view(-1, 1, 1)) & (col_ids < cols.view(-1, 1, 1))
    masked = torch.where(inside, ssim_map, torch.zeros((), dtype=ssim_map.dtype, device=x.device))
    sums = pairwise_sum_last(pairwise_sum_last(masked.to(torch.float64)))
    return sums, ssim_map


def tile_sums(
    x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, consts: torch.Tensor, taps: List[float]
) -> torch.Tensor:
    """Sums only, so that the map never has to be written out: what the compiled kernel runs."""
    return tile_kernel(x, y, rows, cols, consts, taps)[0]


def split_tiles(x, y, rows, cols, chunk: int, min_tiles: int = 1) -> List[Chunk]:
    """Chunks of `chunk` tiles, the last one padded with empty tiles (rows = cols = 0) to `min_tiles`."""
    chunks = []
    for start in range(0, x.shape[0], chunk):
        parts = tuple(t[start : start + chunk] for t in (x, y, rows, cols))
        real = parts[0].shape[0]
        if real < min_tiles:
            parts = tuple(torch.cat([t, t.new_zeros((min_tiles - real,) + t.shape[1:])]) for t in parts)
        chunks.append(parts)
    return chunks


def join_sums(sums: List[torch.Tensor], total: int) -> torch.Tensor:
    """Per-chunk tile sums back into one (K,) tensor, padding tiles dropped."""
    return torch.cat(sums)[:total]  # padding tiles exist only at the end of the last chunk


def eager_tile_sums(x, y, rows, cols, consts, taps: List[float]) -> torch.Tensor:
    """Tile sums by the eager kernel, a bounded number of tiles at a time."""
    chunks = split_tiles(x, y, rows, cols, EAGER_CHUNK.get(x.device.type, DEFAULT_EAGER_CHUNK))
    return join_sums([tile_sums(*chunk, consts, taps) for chunk in chunks], x.shape[0])


def eager_tile_maps(x, y, rows, cols, consts, taps: List[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tile sums and maps by the eager kernel (the same ops, so the same bits), a bounded number at a time."""
    chunk = EAGER_CHUNK.get(x.device.type, DEFAULT_EAGER_CHUNK)
    parts = [tile_kernel(x[i : i + chunk], y[i : i + chunk], rows[i : i + chunk], cols[i : i + chunk], consts, taps)
             for i in range(0, x.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ------------------------------------------------------------------------------------------- planes <-> tiles


def _tile_grid(height: int, width: int, win_size: int) -> Tuple[int, int, int, int]:
    """(map height, map width, tiles down, tiles across) of one plane."""
    out_h, out_w = height - win_size + 1, width - win_size + 1
    return out_h, out_w, -(-out_h // TILE_ROWS), -(-out_w // TILE_COLS)


def cut_tiles(planes: torch.Tensor, win_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(P, H, W) planes -> (P * tiles, TILE_ROWS + w - 1, TILE_COLS + w - 1) tiles in `dtype`, zero-padded."""
    count, height, width = planes.shape
    _, _, down, across = _tile_grid(height, width, win_size)
    halo = win_size - 1
    padded = planes.new_zeros((count, down * TILE_ROWS + halo, across * TILE_COLS + halo), dtype=dtype)
    padded[:, :height, :width] = planes  # converts uint8/uint16/half exactly into the compute dtype
    tiles = padded.unfold(1, TILE_ROWS + halo, TILE_ROWS).unfold(2, TILE_COLS + halo, TILE_COLS)
    return tiles.reshape(-1, TILE_ROWS + halo, TILE_COLS + halo)


def tile_extents(planes: int, height: int, width: int, win_size: int, device: torch.device):
    """(K,) rows and columns of each tile's map inside the image, tiles in row-major order per plane."""
    out_h, out_w, down, across = _tile_grid(height, width, win_size)
    rows = (out_h - TILE_ROWS * torch.arange(down, device=device)).clamp(max=TILE_ROWS)
    cols = (out_w - TILE_COLS * torch.arange(across, device=device)).clamp(max=TILE_COLS)
    return rows.repeat_interleave(across).repeat(planes), cols.repeat(down * planes)


def stitch(tile_maps: torch.Tensor, planes: int, height: int, width: int, win_size: int) -> torch.Tensor:
    """(K, TILE_ROWS, TILE_COLS) tile maps back into (P, map height, map width)."""
    out_h, out_w, down, across = _tile_grid(height, width, win_size)
    grid = tile_maps.reshape(planes, down, across, TILE_ROWS, TILE_COLS).permute(0, 1, 3, 2, 4)
    return grid.reshape(planes, down * TILE_ROWS, across * TILE_COLS)[:, :out_h, :out_w]
