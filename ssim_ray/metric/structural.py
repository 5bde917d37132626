"""The `wang2004` SSIM: pure torch, tensors in, tensors out. No I/O, Ray or Hydra here.

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
- Every step is an elementwise torch op on shifted slices of fixed-size tiles of one image plane, and the
  map is summed in float64 by elementwise adds in an order fixed by the plane's own size, so a pair's score
  depends on nothing but its own pixels: the same bits in any batch, at any position, in any ragged
  grouping, with any thread count. No reduction kernel chooses an order for us.
- On CPU the tile kernel is compiled with torch.compile once it pays (see "kernel choice" below); compiled
  and eager kernels give the same bits.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple, Union

import torch

METRIC_NAME = "wang2004"
PRECISIONS = ("fp32", "fp64", "amp")
DOWNSAMPLE_MODES = (None, "wang")
SUPPORTED_DTYPES = (torch.uint8, torch.uint16, torch.float16, torch.bfloat16, torch.float32, torch.float64)
# data_range=None for integer images: the dtype's maximum. Never inferred from the values.
INTEGER_DATA_RANGES = {torch.uint8: 255.0, torch.uint16: 65535.0}

ImageInput = Union[torch.Tensor, Sequence[torch.Tensor]]


def matlab_round(value: float) -> int:
    """Round half away from zero, as MATLAB's round() does (Python's round() rounds half to even)."""
    return int(math.floor(abs(value) + 0.5)) * (1 if value >= 0 else -1)


def wang_downsample_factor(height: int, width: int) -> int:
    """The factor of ssim.m (2009): f = max(1, round(min(H, W) / 256)) with MATLAB rounding."""
    return max(1, matlab_round(min(height, width) / 256))


def output_size(height: int, width: int, *, downsample: str | None) -> tuple[int, int]:
    """Image size the SSIM window sees: unchanged, or after `downsample='wang'` (every f-th pixel)."""
    if downsample is None:
        return height, width
    if downsample != "wang":
        raise ValueError(f"downsample must be None or 'wang', got {downsample!r}")
    f = wang_downsample_factor(height, width)
    return -(-height // f), -(-width // f)


# --------------------------------------------------------------------------------------------- options


def _check_window(win_size: int, sigma: float, gaussian: bool) -> None:
    if isinstance(win_size, bool) or not isinstance(win_size, numbers.Integral):
        raise TypeError(f"win_size must be an int, got {type(win_size).__name__} {win_size!r}")
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd integer, got {win_size}")
    if not isinstance(gaussian, bool):
        raise TypeError(f"gaussian must be a bool, got {type(gaussian).__name__} {gaussian!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma must be a real number, got {type(sigma).__name__} {sigma!r}")
    if gaussian and not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")


def _check_positive_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_options(
    *, win_size: int, sigma: float, k1: float, k2: float, gaussian: bool, downsample: Optional[str], precision: str
) -> None:
    _check_window(win_size, sigma, gaussian)
    _check_positive_number("k1", k1)
    _check_positive_number("k2", k2)
    if downsample not in DOWNSAMPLE_MODES:
        raise ValueError(f"downsample must be one of {list(DOWNSAMPLE_MODES)}, got {downsample!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")


def gaussian_window_1d(win_size: int, sigma: float, *, gaussian: bool = True) -> torch.Tensor:
    """The normalised 1-D window of the metric, in float64; its outer product is the 2-D window.

    Wang's `fspecial('gaussian', 11, 1.5)` is exactly the outer product of this window with itself.

    Args:
        win_size: Taps, a positive odd integer.
        sigma: Standard deviation of the Gaussian in pixels (ignored when `gaussian=False`).
        gaussian: False gives the uniform window, every tap 1 / win_size.

    Returns:
        A float64 tensor of shape (win_size,) that sums to 1 (to rounding) and is symmetric.

    Raises:
        TypeError: win_size is not an int, sigma not a real number, or gaussian not a bool.
        ValueError: win_size is even or not positive, or sigma is not a finite positive number.

    Example:
        >>> w = gaussian_window_1d(11, 1.5)
        >>> round(float(w[5]), 8), round(float(w[0]), 8)
        (0.26601172, 0.00102838)
    """
    _check_window(win_size, sigma, gaussian)
    if not gaussian:
        return torch.full((win_size,), 1.0 / win_size, dtype=torch.float64)
    offsets = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    taps = torch.exp(-(offsets * offsets) / (2.0 * float(sigma) ** 2))
    return taps / taps.sum()


def metric_settings(
    *,
    win_size: int,
    sigma: float,
    k1: float,
    k2: float,
    gaussian: bool,
    downsample: Optional[str],
    precision: str,
    data_range: Union[float, str, None] = None,
) -> dict:
    """The metric's name and every option that changes a score, for summaries and run manifests.

    Args:
        win_size: Window taps per side.
        sigma: Gaussian standard deviation.
        k1: Luminance constant K1 (C1 = (K1 L)^2).
        k2: Contrast constant K2 (C2 = (K2 L)^2).
        gaussian: Gaussian (True) or uniform (False) window.
        downsample: None or 'wang'.
        precision: 'fp32', 'fp64' or 'amp'.
        data_range: L as a number, 'auto' (from each file's bit depth) or None (the dtype's maximum).

    Returns:
        A JSON-ready dict with "name": "wang2004" and the options above, plus the fixed parts of the
        definition (population moments, valid region, mean over the map then over channels).

    Raises:
        TypeError, ValueError: an option is invalid, exactly as `ssim` would say.

    Example:
        >>> metric_settings(win_size=11, sigma=1.5, k1=0.01, k2=0.03, gaussian=True, downsample=None,
        ...                 precision="fp32")["name"]
        'wang2004'
    """
    _check_options(
        win_size=win_size, sigma=sigma, k1=k1, k2=k2, gaussian=gaussian, downsample=downsample, precision=precision
    )
    if data_range not in (None, "auto"):
        data_range = _check_positive_number("data_range", data_range)
    return {
        "name": METRIC_NAME,
        "win_size": int(win_size),
        "sigma": float(sigma) if gaussian else None,
        "window": "gaussian" if gaussian else "uniform",
        "gaussian": bool(gaussian),
        "k1": float(k1),
        "k2": float(k2),
        "data_range": data_range,
        "downsample": downsample,
        "precision": precision,
        "moments": "population",
        "region": "valid",
        "reduction": "mean over the map per channel, then mean over channels",
    }


# ----------------------------------------------------------------------------------------------- inputs


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        supported = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; supported: {supported}")
    return t


def _check_same(x: torch.Tensor, y: torch.Tensor, where: str) -> None:
    if x.dtype != y.dtype:
        raise TypeError(f"x and y{where} must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"x and y{where} must be on the same device, got {x.device} and {y.device}")
    if x.shape != y.shape:
        raise ValueError(f"x and y{where} must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def _as_batch(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(H,W) / (C,H,W) / (N,C,H,W) to (N,C,H,W) views; shapes already checked equal."""
    if x.dim() == 2:
        return x[None, None], y[None, None]
    if x.dim() == 3:
        return x[None], y[None]
    if x.dim() == 4:
        return x, y
    raise ValueError(f"x and y must have shape (H, W), (C, H, W) or (N, C, H, W), got {tuple(x.shape)}")


def _ragged_pairs(x: Sequence, y: Sequence) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Checked (C,H,W) views of two equal-length lists of images of possibly different sizes."""
    if not isinstance(x, (list, tuple)) or not isinstance(y, (list, tuple)):
        raise TypeError(
            f"x and y must both be tensors or both be lists of tensors, got {type(x).__name__} and {type(y).__name__}"
        )
    if len(x) != len(y):
        raise ValueError(f"x and y must be lists of the same length, got {len(x)} and {len(y)}")
    pairs = []
    for i, (xi, yi) in enumerate(zip(x, y)):
        xi, yi = _check_tensor(f"x[{i}]", xi), _check_tensor(f"y[{i}]", yi)
        _check_same(xi, yi, f"[{i}]")
        if xi.dim() not in (2, 3):
            raise ValueError(f"x[{i}] must have shape (H, W) or (C, H, W) in a list, got {tuple(xi.shape)}")
        pairs.append((xi[None], yi[None]) if xi.dim() == 2 else (xi, yi))
    for i, (xi, _) in enumerate(pairs[1:], start=1):
        first = pairs[0][0]
        if (xi.dtype, xi.device, xi.shape[0]) != (first.dtype, first.device, first.shape[0]):
            raise ValueError(
                "every pair of a ragged list must share dtype, device and channel count; pair 0 has "
                f"{first.dtype}, {first.device}, {first.shape[0]} channels, pair {i} has "
                f"{xi.dtype}, {xi.device}, {xi.shape[0]} channels"
            )
    return pairs


def _resolve_data_range(dtype: torch.dtype, data_range: object) -> float:
    if data_range is None:
        if dtype in INTEGER_DATA_RANGES:
            return INTEGER_DATA_RANGES[dtype]
        raise ValueError(
            f"data_range is required for {str(dtype).replace('torch.', '')} input (e.g. 1.0 for images in "
            "[0, 1] or 255.0 for [0, 255]), got None; it is never inferred from the values"
        )
    return _check_positive_number("data_range", data_range)


def _check_size(height: int, width: int, win_size: int, downsample: Optional[str]) -> None:
    seen_h, seen_w = output_size(height, width, downsample=downsample)
    if min(seen_h, seen_w) < win_size:
        after = f" ({seen_h}x{seen_w} after downsample={downsample!r})" if downsample else ""
        raise ValueError(
            f"images must be at least {win_size}x{win_size} (the window) for SSIM, got {height}x{width}{after}"
        )


# -------------------------------------------------------------------------------------- downsampling


def _box_decimate(img: torch.Tensor, f: int, dim: int) -> torch.Tensor:
    """Sum of f neighbours along `dim` at every f-th position, as ssim.m's imfilter + img(1:f:end) sees it.

    MATLAB's `imfilter(img, ones(f)/f^2, 'symmetric', 'same')` puts the kernel origin at floor((f+1)/2)
    (1-based), so output i (0-based) covers inputs f*i + u for u in [1 - origin, f - origin]; 'symmetric'
    mirrors with the edge pixel repeated (index -1 reads 0, index n reads n - 1).
    """
    n = img.shape[dim]
    origin = (f + 1) // 2
    starts = torch.arange(0, n, f, device=img.device)
    total = None
    for u in range(1 - origin, f - origin + 1):
        idx = starts + u
        idx = torch.where(idx < 0, -idx - 1, idx)
        idx = torch.where(idx >= n, 2 * n - 1 - idx, idx)
        part = img.index_select(dim, idx)
        total = part if total is None else total + part
    return total


def _wang_downsample(img: torch.Tensor, f: int) -> torch.Tensor:
    """ssim.m's pre-filter and decimation for factor f on a float (N, C, H, W) batch (f == 1: unchanged)."""
    if f == 1:
        return img
    # Rows then columns of the separable box; one division at the end keeps integer sums exact.
    summed = _box_decimate(_box_decimate(img, f, -2), f, -1)
    return summed / torch.full_like(summed[:1, :1, :1, :1], f * f)


# ------------------------------------------------------------------------------------------- moments


def _taps_in(window: torch.Tensor, dtype: torch.dtype) -> List[float]:
    """Window taps as Python floats already rounded to the compute dtype, so every kernel multiplies alike."""
    return [float(v) for v in window.to(dtype).to(torch.float64)]


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


# ----------------------------------------------------------------------------------------------- tiles
#
# Every image plane is cut into tiles of TILE_ROWS x TILE_COLS map pixels (plus the window's halo), anchored
# at the plane's own origin. A tile's map and its float64 sum are computed by the same elementwise ops
# whatever else is in the call, and a plane's tile sums are added in an order fixed by its own size. So the
# tile shape never depends on the batch, one compiled kernel of one static shape (TILES_PER_CALL tiles)
# serves every image size (no recompiles for ragged data), and the compiled and eager kernels give the same
# bits (no contraction into FMA, no reassociation: tested), which lets the choice between them be a matter
# of speed only.

TILE_ROWS = 64
TILE_COLS = 128
TILES_PER_CALL = 32  # tiles per compiled call: 1.3 MB of fp32 input each for x and y, cache-sized


def _pairwise_sum_last(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim by halving: zero-pad to a power of two, then add the halves elementwise.

    Elementwise adds only: torch's reduction kernels pick their order (and their split across threads)
    from the whole tensor's shape, which would make a score depend on its batch.
    """
    n = t.shape[-1]
    size = 1 << (n - 1).bit_length()
    if size != n:
        t = torch.nn.functional.pad(t, (0, size - n))
    while t.shape[-1] > 1:
        half = t.shape[-1] // 2
        t = t[..., :half] + t[..., half:]
    return t[..., 0]


def _tile_kernel(
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
    sums = _pairwise_sum_last(_pairwise_sum_last(masked.to(torch.float64)))
    return sums, ssim_map


def _tile_sums(
    x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, consts: torch.Tensor, taps: List[float]
) -> torch.Tensor:
    """The compiled entry point: sums only, so the map never has to be written out."""
    return _tile_kernel(x, y, rows, cols, consts, taps)[0]


def _tile_grid(height: int, width: int, win_size: int) -> Tuple[int, int, int, int]:
    """(map height, map width, tiles down, tiles across) of one plane."""
    out_h, out_w = height - win_size + 1, width - win_size + 1
    return out_h, out_w, -(-out_h // TILE_ROWS), -(-out_w // TILE_COLS)


def _cut_tiles(planes: torch.Tensor, win_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(P, H, W) planes -> (P * tiles, TILE_ROWS + w - 1, TILE_COLS + w - 1) tiles in `dtype`, zero-padded."""
    count, height, width = planes.shape
    _, _, down, across = _tile_grid(height, width, win_size)
    halo = win_size - 1
    padded = planes.new_zeros((count, down * TILE_ROWS + halo, across * TILE_COLS + halo), dtype=dtype)
    padded[:, :height, :width] = planes  # converts uint8/uint16/half exactly into the compute dtype
    tiles = padded.unfold(1, TILE_ROWS + halo, TILE_ROWS).unfold(2, TILE_COLS + halo, TILE_COLS)
    return tiles.reshape(-1, TILE_ROWS + halo, TILE_COLS + halo)


def _tile_extents(planes: int, height: int, width: int, win_size: int, device: torch.device):
    """(K,) rows and columns of each tile's map inside the image, tiles in row-major order per plane."""
    out_h, out_w, down, across = _tile_grid(height, width, win_size)
    rows = (out_h - TILE_ROWS * torch.arange(down, device=device)).clamp(max=TILE_ROWS)
    cols = (out_w - TILE_COLS * torch.arange(across, device=device)).clamp(max=TILE_COLS)
    return rows.repeat_interleave(across).repeat(planes), cols.repeat(down * planes)


def _stitch(tile_maps: torch.Tensor, planes: int, height: int, width: int, win_size: int) -> torch.Tensor:
    """(K, TILE_ROWS, TILE_COLS) tile maps back into (P, map height, map width)."""
    out_h, out_w, down, across = _tile_grid(height, width, win_size)
    grid = tile_maps.reshape(planes, down, across, TILE_ROWS, TILE_COLS).permute(0, 1, 3, 2, 4)
    return grid.reshape(planes, down * TILE_ROWS, across * TILE_COLS)[:, :out_h, :out_w]


# --------------------------------------------------------------------------------------- kernel choice
#
# torch.compile turns the ~300 elementwise ops of a tile batch into fused, vectorised C++ loops (about 10-20x
# faster than eager on CPU) but costs seconds to compile, in every process. Compiling only once a process has
# spent COMPILE_AFTER_S seconds in the eager kernel keeps short runs (tests, small jobs, Ray workers that
# score a handful of pairs) from paying for it, and costs a long run at most that much extra. The bits are
# the same either way. SSIM_RAY_COMPILE=always|never|auto (default auto) overrides this.
#
# The compiled kernel is single-threaded (no OpenMP) and torch.get_num_threads() Python threads take chunks
# of tiles from a queue: OpenMP's barriers, several per chunk, made the kernel 5x slower with two threads
# than with one whenever another process held a core (measured on a shared 2-core machine), while a queue
# of independent chunks only loses the share of the busy core.

COMPILE_AFTER_S = 3.0
_EAGER_CHUNK = {"cpu": 64}  # tiles per eager call: bounds the memory of ~20 live temporaries
_DEFAULT_EAGER_CHUNK = 1024
_kernels: dict = {}
_kernel_lock = threading.Lock()
_pools: dict = {}


def _compile_mode() -> str:
    mode = os.environ.get("SSIM_RAY_COMPILE", "auto")
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"SSIM_RAY_COMPILE must be auto, always or never, got {mode!r}")
    return mode


def _pool(threads: int) -> ThreadPoolExecutor:
    with _kernel_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ssim_ray")
        return _pools[threads]


class _CompiledTiles:
    """The compiled tile kernel for one (dtype, window) on CPU, or the eager one until it pays to compile."""

    def __init__(self, taps: List[float]) -> None:
        self.taps = taps
        self.eager_seconds = 0.0
        self.compiled = None
        self.ready_for_threads: set = set()
        self.failed: Optional[str] = None

    def wants_compile(self, mode: str) -> bool:
        if self.compiled is not None or self.failed is not None or mode == "never":
            return False
        return mode == "always" or self.eager_seconds >= COMPILE_AFTER_S

    def compile(self) -> None:
        import torch._inductor.config  # noqa: F401 - loaded here, not at import: only compiling needs it

        taps = self.taps

        def kernel(x, y, rows, cols, consts):
            return _tile_sums(x, y, rows, cols, consts, taps)

        # torch.compile keeps its compiled variants on the function's code object, at most 8 of them; every
        # runner's `kernel` shares one code object, so (dtype, window, thread count) variants would add up
        # and hit that limit. A code object of its own per runner keeps them apart.
        kernel.__code__ = kernel.__code__.replace(co_name=f"ssim_tiles_{id(self):x}")
        # One static shape, TILES_PER_CALL tiles of one size, for every image size and batch: compiled once.
        # (Marking the tile count dynamic instead cost 1.6x the CPU time per tile and as long to compile.)
        self.compiled = torch.compile(kernel, dynamic=False, fullgraph=True)

    def call(self, chunk: Tuple[torch.Tensor, ...], consts: torch.Tensor) -> torch.Tensor:
        return self.compiled(*chunk, consts)

    def compiled_sums(self, chunks: List[Tuple[torch.Tensor, ...]], consts: torch.Tensor) -> List[torch.Tensor]:
        threads = torch.get_num_threads()
        first = []
        if threads not in self.ready_for_threads:
            # torch.compile guards on the thread count: (re)compile here, single-threaded code, one at a time.
            with _kernel_lock, torch._inductor.config.patch({"cpp.threads": 1}):
                first = [self.call(chunks[0], consts)]
                self.ready_for_threads.add(threads)
        rest = chunks[len(first):]
        return first + list(_pool(threads).map(lambda chunk: self.call(chunk, consts), rest))

    def sums(self, x, y, rows, cols, consts) -> torch.Tensor:
        """Tile sums: eager until compiling pays, compiled afterwards (same bits)."""
        mode = _compile_mode()
        with _kernel_lock:
            if self.wants_compile(mode):
                self.compile()
        if self.compiled is None or mode == "never":
            start = time.perf_counter()
            chunks = _split(x, y, rows, cols, _EAGER_CHUNK["cpu"])
            out = _join([_tile_sums(*chunk, consts, self.taps) for chunk in chunks], x.shape[0])
            self.eager_seconds += time.perf_counter() - start
            return out
        chunks = _split(x, y, rows, cols, TILES_PER_CALL, min_tiles=TILES_PER_CALL)
        try:
            return _join(self.compiled_sums(chunks, consts), x.shape[0])
        except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as exc:
            # e.g. no C++ compiler on this machine: said once, then the eager kernel (same bits)
            self.compiled, self.failed = None, f"{type(exc).__name__}: {exc}".splitlines()[0]
            warnings.warn(f"ssim_ray: compiled SSIM kernel failed, using the eager one (same bits): {self.failed}")
            return self.sums(x, y, rows, cols, consts)


def _split(x, y, rows, cols, chunk: int, min_tiles: int = 1) -> List[Tuple[torch.Tensor, ...]]:
    """Chunks of `chunk` tiles, the last one padded with empty tiles (rows = cols = 0) to `min_tiles`."""
    chunks = []
    for start in range(0, x.shape[0], chunk):
        parts = tuple(t[start : start + chunk] for t in (x, y, rows, cols))
        real = parts[0].shape[0]
        if real < min_tiles:
            parts = tuple(torch.cat([t, t.new_zeros((min_tiles - real,) + t.shape[1:])]) for t in parts)
        chunks.append(parts)
    return chunks


def _join(sums: List[torch.Tensor], total: int) -> torch.Tensor:
    """Per-chunk tile sums back into one (K,) tensor, padding tiles dropped."""
    return torch.cat(sums)[:total]  # padding tiles exist only at the end of the last chunk


def _tile_maps(x, y, rows, cols, consts, taps: List[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eager tile sums and maps, a bounded number of tiles at a time."""
    chunk = _EAGER_CHUNK.get(x.device.type, _DEFAULT_EAGER_CHUNK)
    parts = [_tile_kernel(x[i : i + chunk], y[i : i + chunk], rows[i : i + chunk], cols[i : i + chunk], consts, taps)
             for i in range(0, x.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _tile_sums_any_device(x, y, rows, cols, consts, taps: List[float]) -> torch.Tensor:
    if x.device.type != "cpu":
        chunks = _split(x, y, rows, cols, _EAGER_CHUNK.get(x.device.type, _DEFAULT_EAGER_CHUNK))
        return _join([_tile_sums(*chunk, consts, taps) for chunk in chunks], x.shape[0])
    key = (consts.dtype, tuple(taps))
    with _kernel_lock:
        runner = _kernels.setdefault(key, _CompiledTiles(taps))
    return runner.sums(x, y, rows, cols, consts)


# ------------------------------------------------------------------------------------------- compute


TRITON_ENV = "SSIM_RAY_TRITON"


def _fused_kernel(x: torch.Tensor, *, count: int, win: int, dtype: torch.dtype, return_map: bool):
    """The Triton module when this batch goes to the fused kernel, else None.

    Opt-in with SSIM_RAY_TRITON=on: the kernel matches this path within 1e-7 under Triton's interpreter
    and compiles for sm_90, but it has not yet run on a GPU here, so it is not the default (issue 7).
    It serves fp32/amp scores without maps, windows up to 11 taps and its grid's batch limit.
    """
    if os.environ.get(TRITON_ENV, "off") != "on" or return_map or dtype != torch.float32:
        return None
    from ssim_ray.metric import triton_ssim

    if x.dtype not in triton_ssim.SUPPORTED_DTYPES or win > triton_ssim.MAX_WIN_SIZE or count > 65535:
        return None
    on_device = x.is_cuda and triton_ssim.triton_available()
    interpreted = x.device.type == "cpu" and triton_ssim._interpreted()
    return triton_ssim if on_device or interpreted else None


def _per_channel_means(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: float,
    window: torch.Tensor,
    window_spec: Tuple[int, float, bool],
    k1: float,
    k2: float,
    dtype: torch.dtype,
    return_map: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Mean SSIM per image and channel, (N, C) in `dtype`, of one validated same-shape batch (N, C, H, W).

    `x` and `y` may still be integer or half precision; they are converted here. This is the one place
    that chooses how a batch is computed (a device-specific kernel may be dispatched here).
    """
    count, channels, height, width = x.shape
    win = window.numel()
    fused = _fused_kernel(x, count=count, win=win, dtype=dtype, return_map=return_map)
    if fused is not None:
        win_size, sigma, gaussian = window_spec
        means = fused.ssim_per_channel_triton(
            x, y, data_range=data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2, gaussian=gaussian
        )
        return means, None
    taps = _taps_in(window, dtype)
    consts = torch.tensor([(k1 * data_range) ** 2, (k2 * data_range) ** 2], dtype=dtype, device=x.device)
    planes = count * channels
    xt = _cut_tiles(x.reshape(planes, height, width), win, dtype)
    yt = _cut_tiles(y.reshape(planes, height, width), win, dtype)
    rows, cols = _tile_extents(planes, height, width, win, x.device)
    if return_map:  # diagnostic path: eager, same ops, so the same bits as the compiled sums
        sums, tile_maps = _tile_maps(xt, yt, rows, cols, consts, taps)
        ssim_map = _stitch(tile_maps, planes, height, width, win).reshape(count, channels, height - win + 1, -1)
    else:
        sums, ssim_map = _tile_sums_any_device(xt, yt, rows, cols, consts, taps), None
    plane_sums = _pairwise_sum_last(sums.reshape(planes, -1))
    # A tensor divisor: true division on every device (CUDA turns a scalar divisor into a reciprocal).
    count_px = torch.full_like(plane_sums, (height - win + 1) * (width - win + 1))
    means = (plane_sums / count_px).to(dtype)
    return means.reshape(count, channels), ssim_map


def _raise_non_finite(x: torch.Tensor, y: torch.Tensor) -> None:
    """Called only when a score came out NaN/inf, so valid input pays no extra pass or device sync."""
    for name, t in (("x", x), ("y", y)):
        if t.is_floating_point():
            bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
            if bool(bad.any()):
                where = torch.nonzero(bad).flatten()[:5].tolist()
                raise ValueError(f"{name} must be finite, got NaN or inf in batch item(s) {where}")
    raise ValueError(
        "SSIM came out NaN or inf for finite input: the values overflow the compute precision; "
        "scale the images to their data_range"
    )


def _ssim_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: Optional[float],
    window: torch.Tensor,
    window_spec: Tuple[int, float, bool],
    k1: float,
    k2: float,
    downsample: Optional[str],
    precision: str,
    return_map: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-channel scores (N, C) [and maps] of one checked same-shape (N, C, H, W) batch."""
    if x.shape[1] == 0:
        raise ValueError(f"images must have at least one channel, got shape {tuple(x.shape)}")
    _check_size(x.shape[-2], x.shape[-1], window.numel(), downsample)
    data_range = _resolve_data_range(x.dtype, data_range)
    # amp keeps fp32 moments and formula; half precision would only be an exact storage format for uint8 /
    # fp16 pixels, which the torch path converts once anyway, so it has nothing to gain from it.
    dtype = torch.float64 if precision == "fp64" else torch.float32
    if downsample == "wang":
        f = wang_downsample_factor(x.shape[-2], x.shape[-1])
        x, y = _wang_downsample(x.to(dtype), f), _wang_downsample(y.to(dtype), f)
    if x.shape[0] == 0:  # an empty batch is a valid batch: empty scores (and maps of the right size)
        map_shape = (0, x.shape[1], x.shape[-2] - window.numel() + 1, x.shape[-1] - window.numel() + 1)
        empty_map = torch.empty(map_shape, dtype=dtype, device=x.device) if return_map else None
        return torch.empty(x.shape[:2], dtype=dtype, device=x.device), empty_map
    means, ssim_map = _per_channel_means(
        x, y, data_range=data_range, window=window, window_spec=window_spec, k1=k1, k2=k2, dtype=dtype,
        return_map=return_map,
    )
    if not bool(torch.isfinite(means).all()):
        _raise_non_finite(x, y)
    return means, ssim_map


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def ssim(
    x: ImageInput,
    y: ImageInput,
    *,
    data_range: Optional[float] = None,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    gaussian: bool = True,
    per_channel: bool = False,
    return_map: bool = False,
    downsample: Optional[str] = None,
    precision: str = "fp32",
):
    """SSIM of image pairs as Wang et al. (2004) define it (`wang2004`): exact, batch-invariant, any bit depth.

    An 11x11 Gaussian window (sigma 1.5), population moments, the 'valid' region only, the mean of the map
    per channel, then the mean over channels; C1 = (k1 L)^2, C2 = (k2 L)^2 with L = `data_range`. Equals
    `skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=L)` to 1e-6 in fp32 and 1e-10 in fp64.

    A pair's score has the same bits whatever batch it is computed in (size, position, ragged grouping,
    thread count), and `ssim(x, y)` equals `mean_over_channels(ssim(x, y, per_channel=True))` bitwise,
    which is `ssim(x, y, per_channel=True).mean(-1)` on CPU for up to 4 channels.

    Speed on CPU: a process starts with an eager kernel and compiles a fused one with torch.compile once it
    has spent a few seconds computing (same bits; needs a C++ compiler, else it stays eager with a
    warning). SSIM_RAY_COMPILE=always compiles on the first call, =never never does. CUDA tensors run the
    same torch code.

    Args:
        x: Reference image(s): (H, W), (C, H, W) or (N, C, H, W), or a list of (C, H, W) / (H, W) tensors of
            different sizes (ragged; every pair must share dtype, device and channel count).
        y: Distorted image(s), same form, shape, dtype and device as `x`.
        data_range: L, the range of the pixel values. None is allowed only for integer images and then
            means the dtype's maximum: 255 for uint8, 65535 for uint16 (pass 4095 for 12-bit data in
            16-bit tensors). Never inferred from the values.
        win_size: Window taps per side, a positive odd integer.
        sigma: Gaussian standard deviation in pixels.
        k1: Luminance constant.
        k2: Contrast constant.
        gaussian: False uses a uniform window of 1 / win_size^2.
        per_channel: Return (N, C) per-channel scores instead of their mean over channels.
        return_map: Also return the SSIM map(s), (..., H - win_size + 1, W - win_size + 1), a list for
            ragged input.
        downsample: None, or 'wang' for the pre-filter of the later ssim.m: factor
            f = max(1, round(min(H, W) / 256)) (MATLAB rounding), an f x f box filter with MATLAB's
            'symmetric' padding and origin, then every f-th pixel.
        precision: 'fp32' (moments and formula in float32), 'fp64' (float64, for validation) or 'amp'
            (float32 moments and formula as well: half precision is never used for E[x^2]-like terms, and
            a surrounding torch.autocast has no effect here).

    Returns:
        Scores, float32 ('fp32', 'amp') or float64 ('fp64'): shape (N,) for a batch or a list, 0-d for a
        single (H, W) or (C, H, W) pair, with a trailing C dimension if `per_channel`. With `return_map`,
        a tuple (scores, maps).

    Raises:
        TypeError: x or y is not a tensor (or list of tensors), has an unsupported dtype (bool, complex,
            int8/16/32/64 ...) or the two have different dtypes; an option has the wrong type.
        ValueError: shapes differ, a side is smaller than the window (after downsampling), the window is
            even or not positive, float input has no data_range, an option is out of range, or the input
            holds NaN or inf.

    Example:
        >>> import torch
        >>> x = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64) % 251
        >>> round(float(ssim(x, x, data_range=255.0)), 6)
        1.0
        >>> ssim(x[None, None].repeat(4, 3, 1, 1), x.flip(0)[None, None].repeat(4, 3, 1, 1),
        ...      data_range=255.0, per_channel=True).shape
        torch.Size([4, 3])

    References:
        Z. Wang, A. C. Bovik, H. R. Sheikh, E. P. Simoncelli, "Image quality assessment: from error
        visibility to structural similarity", IEEE Trans. Image Processing 13(4), 600-612, 2004.
    """
    _check_options(
        win_size=win_size, sigma=sigma, k1=k1, k2=k2, gaussian=gaussian, downsample=downsample, precision=precision
    )
    _check_flag("per_channel", per_channel)
    _check_flag("return_map", return_map)
    window = gaussian_window_1d(win_size, sigma, gaussian=gaussian)
    options = dict(data_range=data_range, window=window, window_spec=(int(win_size), float(sigma), bool(gaussian)),
                   k1=float(k1), k2=float(k2), downsample=downsample,
                   precision=precision, return_map=return_map)
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        scores, maps = _ssim_tensors(x, y, options)
    else:
        scores, maps = _ssim_ragged(x, y, options)
    if not per_channel:
        scores = mean_over_channels(scores)
    return (scores, maps) if return_map else scores


def mean_over_channels(per_channel: torch.Tensor) -> torch.Tensor:
    """The overall score from per-channel scores, exactly as `ssim` forms it: channels added in order, / C.

    Elementwise adds, so the result does not depend on how many rows are reduced together or on the
    device. For C <= 4 this is bitwise `per_channel.mean(-1)` on CPU (tested); torch's own mean changes
    its order with the batch size from C = 5 on, so code that stores scores should call this.

    Args:
        per_channel: Scores with channels last, e.g. `ssim(x, y, per_channel=True)`: (N, C) or (C,).

    Returns:
        The mean over the last dimension, same dtype and device, shape (N,) or 0-d.

    Raises:
        ValueError: the last dimension is empty.

    Example:
        >>> mean_over_channels(torch.tensor([[0.5, 0.25, 1.0]]))
        tensor([0.5833])
    """
    channels = per_channel.shape[-1]
    if channels == 0:
        raise ValueError(f"per_channel must have at least one channel in its last dimension, got {tuple(per_channel.shape)}")
    total = per_channel[..., 0]
    for c in range(1, channels):
        total = total + per_channel[..., c]
    # A tensor divisor: CUDA divides by a Python scalar as a multiplication by its reciprocal (other bits).
    return total / torch.full_like(total, channels)


def _ssim_tensors(x: torch.Tensor, y: torch.Tensor, options: dict) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    x, y = _check_tensor("x", x), _check_tensor("y", y)
    _check_same(x, y, "")
    xb, yb = _as_batch(x, y)
    with torch.autocast(device_type=x.device.type, enabled=False):
        scores, maps = _ssim_batch(xb, yb, **options)
    if x.dim() < 4:  # one unbatched pair: drop the batch dim (and the channel dim of the map for (H, W))
        scores = scores[0]
        maps = None if maps is None else (maps[0, 0] if x.dim() == 2 else maps[0])
    return scores, maps


def _ssim_ragged(x: Sequence, y: Sequence, options: dict) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]]]:
    """Pairs of different sizes: same-shape pairs are batched together; scores come back in list order."""
    pairs = _ragged_pairs(x, y)
    if not pairs:
        raise ValueError("x and y are empty lists; give at least one pair")
    groups: dict = {}
    for i, (xi, _) in enumerate(pairs):
        groups.setdefault(tuple(xi.shape), []).append(i)
    first = pairs[0][0]
    dtype = torch.float64 if options["precision"] == "fp64" else torch.float32
    scores = torch.empty((len(pairs), first.shape[0]), dtype=dtype, device=first.device)
    maps: List[Optional[torch.Tensor]] = [None] * len(pairs)
    with torch.autocast(device_type=first.device.type, enabled=False):
        for indices in groups.values():
            xb = torch.stack([pairs[i][0] for i in indices])
            yb = torch.stack([pairs[i][1] for i in indices])
            group_scores, group_maps = _ssim_batch(xb, yb, **options)
            scores[indices] = group_scores
            for j, i in enumerate(indices):
                maps[i] = None if group_maps is None else group_maps[j]
    return scores, (maps if options["return_map"] else None)
