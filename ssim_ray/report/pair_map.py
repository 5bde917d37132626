"""One pair's SSIM map at bounded memory, for the report's worst pairs: the score again, the map to show.

The whole map of a large pair, with the metric's temporaries, costs tens of bytes per pixel (6.5 GB for
one 81-Mpx pair), so it is never held. `map_pair` computes it strip by strip (rows of the map, each from
its image rows plus the window's win_size - 1 rows of halo) and keeps only what the report shows:

- the score, recomputed from the full-resolution map: per channel the float64 sum of the map over all
  strips, divided by the map's size and rounded to the metric's precision, then the channel mean as
  `ssim()` forms it. The map values are `ssim()`'s own, bit for bit (a map pixel depends only on its
  window), so this equals the stored score up to the order of a float64 sum (tested equal);
- the map reduced for display: the map framed by the border the window never sees, averaged over square
  cells so that at most `DISPLAY_CELLS` cells lie along a side (each cell shows its mean SSIM);
- the window of lowest mean SSIM, found on the full-resolution map with running window sums, and the
  map's values there (computed again from that crop of the pair: the same bits).

With `downsample='wang'` the metric sees the images downsampled first, so the map (already small) comes
from one `ssim()` call on the whole pair; that call's memory is the metric's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Tuple

import numpy as np
import torch

from ssim_ray.metric import mean_over_channels, ssim

ZOOM_WINDOW = 64  # side, in SSIM-map pixels, of the region with the lowest mean SSIM shown enlarged
DISPLAY_CELLS = 640  # cells along the long side of the reduced map: twice the thumbnail it is drawn at
# Map values (rows x width x channels) per ssim() call: the call's temporaries are some tens of bytes per
# value, so a strip costs ~100 MB whatever the image's size.
STRIP_VALUES = 1 << 21


@dataclass(frozen=True)
class PairMap:
    """What the report keeps of a pair's SSIM map.

    Attributes:
        score: the pair's score recomputed from the full-resolution map.
        display: the framed map averaged over cells of `cell` x `cell` map pixels, (ceil((H_map + 2 border)
            / cell), ...); NaN where a cell holds only border.
        cell: map pixels per display cell along each side (1: the map as it is).
        border: win_size // 2, the frame the window never sees.
        scale: image pixels per map pixel (1 without downsampling).
        map_shape: (H_map, W_map), the full map's size.
        window: (row, column, side) of the side x side map window with the lowest mean (ties: first found).
        zoom: the map's values in that window, (side, side), mean over channels.
    """

    score: float
    display: np.ndarray
    cell: int
    border: int
    scale: float
    map_shape: Tuple[int, int]
    window: Tuple[int, int, int]
    zoom: np.ndarray


def map_pair(reference: torch.Tensor, distorted: torch.Tensor, *, data_range: float, options: Mapping[str, Any],
             display_cells: int = DISPLAY_CELLS, strip_values: int = STRIP_VALUES) -> PairMap:
    """A pair's score and its map as the report shows it, holding one strip of the map at a time.

    Args:
        reference: (C, H, W) pixels, as the sources decode them.
        distorted: the same for the distorted image.
        data_range: L, the pair's data range.
        options: `ssim()` keyword options (`SSIMConfig.ssim_options()`, with the kernel that draws maps).
        display_cells: at most this many display cells along the map's long side.
        strip_values: map values (rows x width x channels) computed per `ssim()` call.

    Returns:
        The PairMap.

    Example:
        >>> x = torch.arange(40 * 48, dtype=torch.uint8).reshape(1, 40, 48)
        >>> mapped = map_pair(x, 255 - x, data_range=255.0, options={"compile": "never"}, strip_values=200)
        >>> mapped.map_shape, mapped.window, mapped.display.shape
        ((30, 38), (0, 0, 30), (40, 48))
        >>> mapped.score == float(ssim(x, 255 - x, data_range=255.0, compile="never"))
        True
    """
    win = int(options.get("win_size", 11))
    border = win // 2
    if options.get("downsample"):
        whole = _call(reference, distorted, data_range, options)
        strips: Iterator[Tuple[int, torch.Tensor]] = iter([(0, whole)])
        map_h, map_w = whole.shape[-2:]
    else:
        whole = None
        map_h, map_w = reference.shape[-2] - win + 1, reference.shape[-1] - win + 1
        rows = max(1, strip_values // max(1, map_w * reference.shape[0]))
        strips = _strips(reference, distorted, data_range, options, rows=rows, map_h=map_h)
    side = min(ZOOM_WINDOW, map_h, map_w)
    cell = max(1, math.ceil(max(map_h, map_w) / display_cells))
    display = _CellMeans((map_h + 2 * border, map_w + 2 * border), cell, border)
    lowest = _LowestWindow(side, map_w)
    totals: Optional[torch.Tensor] = None
    for first_row, strip in strips:
        sums = strip.to(torch.float64).sum(dim=(-2, -1))
        totals = sums if totals is None else totals + sums
        values = strip.to(torch.float64).mean(dim=0).numpy()  # mean over channels, as the map is shown
        display.add(first_row, values)
        lowest.add(values)
    means = (totals / (map_h * map_w)).to(strip.dtype)  # per channel, in the metric's precision
    row, col = lowest.best
    zoom = _zoom(reference, distorted, data_range, options, whole, row=row, col=col, side=side)
    return PairMap(score=float(mean_over_channels(means)), display=display.means(), cell=cell, border=border,
                   scale=reference.shape[-2] / (map_h + 2 * border), map_shape=(map_h, map_w),
                   window=(row, col, side), zoom=zoom)


def _call(reference: torch.Tensor, distorted: torch.Tensor, data_range: float,
          options: Mapping[str, Any]) -> torch.Tensor:
    """The per-channel map (C, h, w) of one pair (or one strip of it), on the CPU."""
    _, ssim_map = ssim(reference, distorted, data_range=data_range, return_map=True, per_channel=True, **options)
    return ssim_map.detach().to("cpu")


def _strips(reference: torch.Tensor, distorted: torch.Tensor, data_range: float, options: Mapping[str, Any], *,
            rows: int, map_h: int) -> Iterator[Tuple[int, torch.Tensor]]:
    """(first map row, per-channel map of `rows` map rows) from image rows plus the window's halo."""
    halo = int(options.get("win_size", 11)) - 1
    for start in range(0, map_h, rows):
        stop = min(start + rows, map_h)
        yield start, _call(reference[:, start:stop + halo], distorted[:, start:stop + halo], data_range, options)


def _zoom(reference, distorted, data_range, options, whole: Optional[torch.Tensor], *, row: int, col: int,
          side: int) -> np.ndarray:
    if whole is not None:
        window = whole[:, row:row + side, col:col + side]
    else:
        span = side + int(options.get("win_size", 11)) - 1
        window = _call(reference[:, row:row + span, col:col + span], distorted[:, row:row + span, col:col + span],
                       data_range, options)
    return window.to(torch.float64).mean(dim=0).numpy()


class _CellMeans:
    """The framed map's mean per square cell, accumulated strip by strip (sums and counts per cell)."""

    def __init__(self, framed: Tuple[int, int], cell: int, border: int) -> None:
        self.cell, self.border = cell, border
        self.shape = (math.ceil(framed[0] / cell), math.ceil(framed[1] / cell))
        self.sums = np.zeros(self.shape)
        self.counts = np.zeros(self.shape)

    def add(self, first_row: int, values: np.ndarray) -> None:
        rows, width = values.shape
        padded = np.zeros((rows, self.shape[1] * self.cell))
        padded[:, self.border:self.border + width] = values
        covered = np.zeros(self.shape[1] * self.cell)
        covered[self.border:self.border + width] = 1.0
        cell_rows = (np.arange(rows) + first_row + self.border) // self.cell
        np.add.at(self.sums, cell_rows, padded.reshape(rows, self.shape[1], self.cell).sum(axis=2))
        per_cell = covered.reshape(-1, self.cell).sum(axis=1)
        np.add.at(self.counts, cell_rows, np.broadcast_to(per_cell, (rows, self.shape[1])))

    def means(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), np.nan)


class _LowestWindow:
    """The side x side window of lowest mean over a map fed row strip by row strip, in order.

    Keeps the horizontal window sums of the last side - 1 rows, so its memory is side rows of the map.
    Ties go to the first window in row-major order, as in `worst.lowest_window`.
    """

    def __init__(self, side: int, width: int) -> None:
        self.side = side
        self.carry = np.zeros((0, width - side + 1))
        self.seen = 0
        self.best = (0, 0)
        self.lowest = math.inf

    def add(self, values: np.ndarray) -> None:
        cumulative = np.cumsum(values, axis=1)
        across = np.concatenate([cumulative[:, self.side - 1:self.side],
                                 cumulative[:, self.side:] - cumulative[:, :-self.side]], axis=1)
        block = np.concatenate([self.carry, across])
        top = self.seen - self.carry.shape[0]  # the map row of block's first row
        self.seen += values.shape[0]
        self.carry = block[block.shape[0] - min(block.shape[0], self.side - 1):]
        if block.shape[0] < self.side:
            return
        down = np.cumsum(block, axis=0)
        sums = down[self.side - 1:] - np.concatenate([np.zeros((1, block.shape[1])), down[:-self.side]])
        index = int(np.argmin(sums))
        if sums.flat[index] < self.lowest:
            self.lowest = float(sums.flat[index])
            row, col = np.unravel_index(index, sums.shape)
            self.best = (top + int(row), int(col))
