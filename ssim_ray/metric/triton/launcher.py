"""The Triton kernel's Python side: input checks, the window, the launch geometry, two launches per call.

Owns what the fused kernel (`ssim_ray.metric.triton.kernels`) accepts beyond `ssim()`'s own rules, which it
applies through `ssim_ray.metric.checks` and `ssim_ray.metric.window` (the same messages): pixels of
`SUPPORTED_DTYPES` only (no float64), windows of at most `MAX_WIN_SIZE` taps, at most `MAX_BATCH` pairs
per call (the CUDA grid's z limit), (N, C, H, W) batches or lists of (C, H, W) images, CUDA tensors (CPU
ones under Triton's interpreter). It also owns the tile shape (`TileConfig`, fixed per module so that a
score never depends on its batch) and the launch geometry (`grid_dims`); `.memory` counts a call's bytes.

Besides the kernels it imports only the metric's checks and window, never `ssim_ray.metric.structural` or
`.kernel_choice`, which dispatch here: no import cycle.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import torch

from ssim_ray.metric.checks import check_is_tensor, check_positive_number, check_same, check_window, dtype_names
from ssim_ray.metric.triton import kernels
from ssim_ray.metric.window import check_size, gaussian_window_1d

MAX_WIN_SIZE = 11
# The batch is the grid's third dimension, which CUDA caps at 65535 programs.
MAX_BATCH = 65535
SUPPORTED_DTYPES = (torch.uint8, torch.uint16, torch.float16, torch.bfloat16, torch.float32)

DataRange = Union[float, torch.Tensor]


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


def triton_installed() -> bool:
    """Whether triton imports here (Linux x86-64 installs only).

    Example:
        >>> triton_installed() in (True, False)
        True
    """
    return kernels.triton is not None


def triton_interpreted() -> bool:
    """Whether the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1 when they were imported).

    Example:
        >>> triton_interpreted() in (True, False)
        True
    """
    return kernels.interpreted()


def triton_available() -> bool:
    """Whether the fused kernel can run here: triton is installed, compiled (not interpreted), and CUDA is up.

    Returns:
        True when `ssim_per_channel_triton` accepts CUDA tensors on this machine.

    Example:
        >>> triton_available() in (True, False)
        True
    """
    return triton_installed() and not triton_interpreted() and torch.cuda.is_available()


def grid_dims(height: int, width: int, win_size: int, tiles: TileConfig) -> tuple[int, int]:
    """(tile rows, tile columns) covering the valid map of an image: a launch's tiles per image-channel."""
    out_h, out_w = height - win_size + 1, width - win_size + 1
    return -(-out_h // tiles.rows), -(-out_w // tiles.block_w)


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
    # The window is the torch path's own, rounded to float32 as its fp32 path rounds it.
    taps = torch.zeros(MAX_WIN_SIZE, dtype=torch.float32)
    taps[:win_size] = gaussian_window_1d(win_size, sigma, gaussian=gaussian).to(torch.float32)
    return taps.to(device)


def _window(device, *, win_size, sigma, k1, k2, gaussian) -> _Window:
    check_kernel_window(win_size, sigma, gaussian)
    _check_constants(k1, k2)
    # Pixels are scaled by 1/L in the kernel, so the constants are (K L / L)^2.
    return _Window(win_size, _taps_on(torch.device(device), win_size, float(sigma), bool(gaussian)), k1**2, k2**2)


# ----------------------------------------------------------------------------------------------- checks
#
# ssim()'s rules through ssim_ray.metric.checks and .window; only what the kernel adds is written here.


def check_kernel_window(win_size: int, sigma: float, gaussian: bool) -> None:
    """ssim()'s window rules, and at most MAX_WIN_SIZE taps (TypeError / ValueError)."""
    check_window(win_size, sigma, gaussian)
    if win_size > MAX_WIN_SIZE:
        raise ValueError(
            f"win_size must be at most {MAX_WIN_SIZE} taps for the Triton kernel: an odd integer from 1 to "
            f"{MAX_WIN_SIZE}, got {win_size}"
        )


def _check_constants(k1: float, k2: float) -> None:
    check_positive_number("k1", k1)
    check_positive_number("k2", k2)


def _check_batch(n: int) -> None:
    if n > MAX_BATCH:
        raise ValueError(f"at most {MAX_BATCH} pairs per call (the CUDA grid's z limit), got {n}")


def check_pixel_dtype(dtype: torch.dtype) -> None:
    """TypeError unless the kernel reads pixels of `dtype` (`SUPPORTED_DTYPES`: no float64)."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"pixel dtype must be one of {dtype_names(SUPPORTED_DTYPES)}, got {dtype}")


def _check_device(t: torch.Tensor, name: str) -> None:
    # The interpreter runs kernels on the CPU; compiled kernels need CUDA memory.
    if t.device.type != "cuda" and not (triton_interpreted() and t.device.type == "cpu"):
        where = "CPU (TRITON_INTERPRET=1) or CUDA" if triton_interpreted() else "CUDA"
        raise ValueError(f"{name} must be on a {where} device, got {t.device}")


def _check_image_pair(x, y, *, names: Tuple[str, str], ndim: int) -> None:
    for name, t in zip(names, (x, y)):
        check_is_tensor(name, t)
        check_pixel_dtype(t.dtype)
    check_same(x, y, names=names)
    for name, t in zip(names, (x, y)):
        if t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    # Offsets inside one image are 32-bit in the kernel; the batch offset is 64-bit.
    if math.prod(x.shape[-3:]) >= 2**31:
        raise ValueError(f"one image of {names[0]} must hold fewer than 2**31 values, got shape {tuple(x.shape)}")


def _check_range(data_range: DataRange, n: int) -> None:
    if isinstance(data_range, torch.Tensor):
        if data_range.shape != (n,) or not data_range.is_floating_point():
            raise ValueError(
                f"a tensor data_range must be floating point of shape ({n},), "
                f"got {data_range.dtype} of shape {tuple(data_range.shape)}"
            )
        # Values are not checked here: that would wait for the device. ssim() validates its scalar range.
        return
    check_positive_number("data_range", data_range)


def _check_lists(xs, ys, *, win_size: int) -> None:
    if not isinstance(xs, (list, tuple)) or not isinstance(ys, (list, tuple)):
        raise TypeError(f"xs and ys must be lists of tensors, got {type(xs).__name__} and {type(ys).__name__}")
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"xs and ys must be non-empty and of equal length, got {len(xs)} and {len(ys)}")
    for i, (x, y) in enumerate(zip(xs, ys)):
        _check_image_pair(x, y, names=(f"xs[{i}]", f"ys[{i}]"), ndim=3)
        check_size(x.shape[1], x.shape[2], win_size)
        first = xs[0]
        if (x.shape[0], x.dtype, x.device) != (first.shape[0], first.dtype, first.device):
            raise ValueError(
                f"every pair must share channels, dtype and device: xs[0] has {first.shape[0]}, {first.dtype}, "
                f"{first.device}; xs[{i}] has {x.shape[0]}, {x.dtype}, {x.device}"
            )


# ----------------------------------------------------------------------------------------------- launch


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
    tile_rows, tile_cols = grid_dims(geo.height, geo.width, window.win_size, tiles)
    n_tiles = tile_rows * tile_cols
    partial = torch.empty((geo.n, geo.c, n_tiles), dtype=torch.float64, device=x.device)
    out = torch.empty((geo.n, geo.c), dtype=torch.float32, device=x.device)
    if geo.n == 0:
        return out
    dummy = partial  # stands in for pointer arguments that a specialisation never reads
    kernels.ssim_tiles_kernel[(n_tiles, geo.c, geo.n)](
        x, y, geo.table if geo.ragged else dummy, geo.shapes if geo.ragged else dummy,
        ranges if ranges is not None else dummy, window.taps, partial,
        geo.height, geo.width, geo.stride_n, inv_range, window.c1, window.c2, tile_cols, n_tiles,
        WIN=window.win_size, RAGGED=geo.ragged, RANGE_PER_IMAGE=ranges is not None, BLOCK_W=tiles.block_w,
        ROWS=tiles.rows, COLS_PER_LANE=tiles.cols_per_lane, UNROLL_ROWS=tiles.unroll_rows, num_warps=tiles.num_warps,
    )
    kernels.reduce_kernel[(geo.c, geo.n)](
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
        TypeError: For non-tensors, mixed or unsupported dtypes, options or a scalar range of the wrong type.
        ValueError: For shape mismatches, images smaller than the window, a bad window, constant or range,
            more than MAX_BATCH pairs, or tensors that are not on a CUDA device.

    Example:
        >>> import torch
        >>> x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, device="cuda")  # doctest: +SKIP
        >>> ssim_per_channel_triton(x, x, data_range=255.0)  # doctest: +SKIP
        tensor([[1., 1., 1.], ...], device='cuda:0')
    """
    _check_image_pair(x, y, names=("x", "y"), ndim=4)
    check_kernel_window(win_size, sigma, gaussian)
    check_size(x.shape[2], x.shape[3], win_size)
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
        TypeError: For non-tensors, mixed or unsupported dtypes, options or a scalar range of the wrong type.
        ValueError: For empty or unequal lists, shape or channel mismatches, images smaller than the window,
            a bad window, constant or range, or tensors that are not on one CUDA device.

    Example:
        >>> import torch
        >>> xs = [torch.randint(0, 256, (3, h, 64), dtype=torch.uint8, device="cuda")  # doctest: +SKIP
        ...       for h in (32, 48)]
        >>> ssim_per_channel_triton_ragged(xs, xs, data_range=255.0).shape  # doctest: +SKIP
        torch.Size([2, 3])
    """
    check_kernel_window(win_size, sigma, gaussian)
    _check_lists(xs, ys, win_size=win_size)
    _check_constants(k1, k2)
    _check_batch(len(xs))
    _check_range(data_range, len(xs))
    _check_device(xs[0], "xs[0]")
    window = _window(xs[0].device, win_size=win_size, sigma=sigma, k1=k1, k2=k2, gaussian=gaussian)
    return _ragged(xs, ys, data_range=data_range, window=window, tiles=DEFAULT_TILES)


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
