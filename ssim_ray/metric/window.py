"""The window and the image it slides over: its taps, the image size it sees, and ssim.m's downsampling.

Owns the normalised 1-D window (Gaussian or uniform; the 2-D window is its outer product), the rule that an
image holds at least one window, the border crop (`crop_border`: that many pixels removed from each side
before anything else, as super-resolution evaluations do), and the optional pre-filter of the later MATLAB
`ssim.m` (`downsample='wang'`): factor f = max(1, round(min(H, W) / 256)) with MATLAB's rounding, an f x f
box filter with MATLAB's 'symmetric' padding and kernel origin, then every f-th pixel. MS-SSIM's step
between scales is the same filter at f = 2. The torch path and the Triton launcher take the window from
here, so both round the same taps.
"""

from __future__ import annotations

import math

import torch

from ssim_ray.metric.checks import check_window


def matlab_round(value: float) -> int:
    """Round half away from zero, as MATLAB's round() does (Python's round() rounds half to even).

    Example:
        >>> matlab_round(2.5), round(2.5), matlab_round(-2.5)
        (3, 2, -3)
    """
    return int(math.floor(abs(value) + 0.5)) * (1 if value >= 0 else -1)


def wang_downsample_factor(height: int, width: int) -> int:
    """The factor of ssim.m (2009): f = max(1, round(min(H, W) / 256)) with MATLAB rounding.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.

    Returns:
        f, at least 1.

    Example:
        >>> wang_downsample_factor(640, 700), wang_downsample_factor(100, 100)
        (3, 1)
    """
    return max(1, matlab_round(min(height, width) / 256))


def output_size(height: int, width: int, *, downsample: str | None, crop_border: int = 0) -> tuple[int, int]:
    """Image size the SSIM window sees: after the border crop, then after `downsample='wang'` if asked.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        downsample: None or 'wang'.
        crop_border: Pixels removed from each side first (0: none). A crop that leaves nothing gives a
            size of 0.

    Returns:
        (height, width) as the window sees them.

    Raises:
        ValueError: downsample is neither None nor 'wang'.

    Example:
        >>> output_size(640, 700, downsample="wang")
        (214, 234)
        >>> output_size(100, 120, downsample=None, crop_border=4)
        (92, 112)
    """
    if downsample not in (None, "wang"):
        raise ValueError(f"downsample must be None or 'wang', got {downsample!r}")
    height, width = max(0, height - 2 * crop_border), max(0, width - 2 * crop_border)
    if downsample is None or min(height, width) == 0:
        return height, width
    f = wang_downsample_factor(height, width)
    return -(-height // f), -(-width // f)


def check_size(height: int, width: int, win_size: int, downsample: str | None = None, crop_border: int = 0) -> None:
    """Refuse an image smaller than the window (after the border crop and downsampling): its map would be empty.

    Raises:
        ValueError: A side, as the window sees it, is shorter than win_size.
    """
    seen_h, seen_w = output_size(height, width, downsample=downsample, crop_border=crop_border)
    if min(seen_h, seen_w) < win_size:
        steps = ([f"crop_border={crop_border}"] if crop_border else []) + ([f"downsample={downsample!r}"] if downsample else [])
        after = f" ({seen_h}x{seen_w} after {' and '.join(steps)})" if steps else ""
        raise ValueError(
            f"images must be at least {win_size}x{win_size} (the window) for SSIM, got {height}x{width}{after}"
        )


def crop_borders(img: torch.Tensor, crop_border: int) -> torch.Tensor:
    """`img` (..., H, W) without `crop_border` pixels on each side (a view; 0: `img` itself).

    BasicSR's `img[c:-c, c:-c]`: super-resolution evaluations drop a border as wide as the scale factor,
    where the upscaler has no neighbours to work from.

    Example:
        >>> crop_borders(torch.arange(16.0).reshape(4, 4), 1)
        tensor([[ 5.,  6.],
                [ 9., 10.]])
    """
    if crop_border == 0:
        return img
    return img[..., crop_border : img.shape[-2] - crop_border, crop_border : img.shape[-1] - crop_border]


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
    check_window(win_size, sigma, gaussian)
    if not gaussian:
        return torch.full((win_size,), 1.0 / win_size, dtype=torch.float64)
    offsets = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    taps = torch.exp(-(offsets * offsets) / (2.0 * float(sigma) ** 2))
    return taps / taps.sum()


def _box_decimate(img: torch.Tensor, f: int, dim: int) -> torch.Tensor:
    """Sum of f neighbours along `dim` at every f-th position, as ssim.m's imfilter + img(1:f:end) sees it.

    MATLAB's `imfilter(img, ones(f)/f^2, 'symmetric', 'same')` puts the kernel origin at floor((f+1)/2)
    (1-based), so output i (0-based) covers inputs f*i + u for u in [1 - origin, f - origin]; 'symmetric'
    mirrors with the edge pixel repeated (index -1 reads 0, index n reads n - 1). The mirrored samples are
    put beside the image once, so that each term is a strided view (index_select's gather along the last
    dimension cost as much as a whole SSIM pass); the terms are added in the same order either way.
    """
    dim = dim % img.dim()
    n = img.shape[dim]
    origin = (f + 1) // 2
    before, after = origin - 1, f - origin  # how far the window reaches on each side of its output sample
    count = -(-n // f)
    past_end = max(0, (count - 1) * f + after + 1 - n)
    if before > n or past_end > n:  # a mirror of a mirror: the gather below is the plain definition
        return _box_decimate_gathered(img, f, dim)
    pieces = [img.narrow(dim, 0, before).flip(dim), img, img.narrow(dim, n - past_end, past_end).flip(dim)]
    padded = img if before == past_end == 0 else torch.cat([p for p in pieces if p.shape[dim]], dim)
    total = None
    for u in range(-before, after + 1):
        index = [slice(None)] * img.dim()
        index[dim] = slice(before + u, before + u + (count - 1) * f + 1, f)
        part = padded[tuple(index)]
        total = part if total is None else total + part
    return total


def _box_decimate_gathered(img: torch.Tensor, f: int, dim: int) -> torch.Tensor:
    """`_box_decimate` by index_select: the definition, for images shorter than the window's mirror."""
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


def wang_downsample(img: torch.Tensor, f: int) -> torch.Tensor:
    """ssim.m's pre-filter and decimation for factor f on a float (N, C, H, W) batch (f == 1: unchanged).

    Args:
        img: Float images, (N, C, H, W), in the compute dtype.
        f: The factor, usually `wang_downsample_factor(H, W)`.

    Returns:
        (N, C, ceil(H / f), ceil(W / f)) in img's dtype.

    Example:
        >>> wang_downsample(torch.arange(16.0).reshape(1, 1, 4, 4), 2)[0, 0]
        tensor([[ 2.5000,  4.5000],
                [10.5000, 12.5000]])
    """
    if f == 1:
        return img
    # Rows then columns of the separable box; one division at the end keeps integer sums exact.
    summed = _box_decimate(_box_decimate(img, f, -2), f, -1)
    return summed / torch.full_like(summed[:1, :1, :1, :1], f * f)
