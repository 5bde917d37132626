"""PSNR and MSE with `ssim()`'s input rules: `psnr()`, `mse()`, `psnr_from_mse()` and `psnr_settings()`.

PSNR = 10 log10(L^2 / MSE), the MSE over all pixels and channels of a pair (scikit-image's
`peak_signal_noise_ratio`, BasicSR's `calculate_psnr`), or per channel. L is explicit as in `ssim()`: the
dtype's maximum for uint8/uint16, required for float input, never inferred from the values (torchmetrics'
default estimates it from the data). Identical images give +inf, never NaN.

Exactness: squared differences are formed in the compute dtype (float32, or float64 with 'fp64') and
summed in float64 per plane by elementwise halving (`tiles.pairwise_sum_last`), rows first, in an order
fixed by the plane's own size; so a pair's value has the same bits in any batch, position or ragged
grouping. For uint8 pixels every partial sum is an integer below 2^53, so the MSE is exact in any
precision, and is taken as an int64 sum (the same bits, a fraction of the time; uint16 too in 'fp64').
The log is taken in float64 and rounded once to the output dtype.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ssim_ray.metric.batches import ImageInput, PairBatches, in_caller_order, pair_batches
from ssim_ray.metric.checks import (
    COMPILE_POLICIES,
    check_choice,
    check_crop_border,
    check_flag,
    check_positive_number,
    check_precision,
    raise_non_finite,
    resolve_data_range,
)
from ssim_ray.metric.plane_passes import exact_square_error_sums
from ssim_ray.metric.structural import mean_over_channels
from ssim_ray.metric.tiles import pairwise_sum_last
from ssim_ray.metric.window import crop_borders

# Planes squared and summed per step: bounds the float64 temporaries (~64 MB) without changing any bit,
# since each plane's sum involves its own pixels only.
_ELEMENTS_PER_STEP = 1 << 22


def _check_common(per_channel: object, precision: object, crop_border: object, compile: object) -> int:
    check_flag("per_channel", per_channel)
    check_precision(precision)
    check_choice("compile", compile, COMPILE_POLICIES)
    return check_crop_border(crop_border)


def _channel_mse(x: torch.Tensor, y: torch.Tensor, *, precision: str, crop_border: int, policy: str) -> torch.Tensor:
    """(N, C) MSE per image and channel of one checked same-shape (N, C, H, W) batch, in the output dtype."""
    count, channels, height, width = x.shape
    if height - 2 * crop_border < 1 or width - 2 * crop_border < 1:
        raise ValueError(
            f"images must keep at least one pixel after crop_border={crop_border} on each side, got {height}x{width}"
        )
    dtype = torch.float64 if precision == "fp64" else torch.float32
    pixels = (height - 2 * crop_border) * (width - 2 * crop_border)
    if _exact_integer_sums(x.dtype, dtype, pixels):
        total = exact_square_error_sums(x.reshape(count * channels, height, width),
                                        y.reshape(count * channels, height, width), crop=crop_border, policy=policy)
        return _finish(total, crop_borders(x, crop_border), crop_borders(y, crop_border), pixels, dtype, count,
                       channels)
    x, y = crop_borders(x, crop_border), crop_borders(y, crop_border)
    height, width = x.shape[-2:]
    xp, yp = x.reshape(count * channels, height, width), y.reshape(count * channels, height, width)
    step = max(1, _ELEMENTS_PER_STEP // (height * width))
    sums = [torch.zeros(0, dtype=torch.float64, device=x.device)]
    for start in range(0, count * channels, step):
        xs, ys = xp[start : start + step], yp[start : start + step]
        diff = xs.to(dtype) - ys.to(dtype)
        sums.append(pairwise_sum_last(pairwise_sum_last((diff * diff).to(torch.float64))))
    return _finish(torch.cat(sums), x, y, height * width, dtype, count, channels)


def _finish(total: torch.Tensor, x: torch.Tensor, y: torch.Tensor, pixels: int, dtype: torch.dtype, count: int,
            channels: int) -> torch.Tensor:
    """(N, C) MSE in `dtype` from float64 per-plane sums of squared differences."""
    # A tensor divisor: true division on every device (CUDA turns a scalar divisor into a reciprocal).
    mse = (total / torch.full_like(total, pixels)).to(dtype).reshape(count, channels)
    if not bool(torch.isfinite(mse).all()):
        raise_non_finite(x, y, metric="MSE")
    return mse


def _exact_integer_sums(pixel_dtype: torch.dtype, dtype: torch.dtype, pixels: int) -> bool:
    """Whether a plane's sum of squared differences can be taken in int64 with the bits of the float path.

    True when every square is exact in `dtype` (uint8 in float32 or float64; uint16 in float64 only: its
    squares reach 2^32, which float32 rounds) and the largest possible sum stays below 2^53: then every
    float64 partial sum of the pairwise path is an exact integer too, and the int64 sum (any order, one
    reduction) costs a fraction of the halving.
    """
    if pixel_dtype == torch.uint8:
        largest = 255
    elif pixel_dtype == torch.uint16 and dtype == torch.float64:
        largest = 65535
    else:
        return False
    return largest * largest * pixels < 2**53


def mse(x: ImageInput, y: ImageInput, *, per_channel: bool = False, precision: str = "fp32", crop_border: int = 0,
        compile: str = "auto"):
    """Mean squared error of image pairs over all pixels and channels (or per channel), batch-invariant.

    The overall value is the mean of the per-channel values, `mean_over_channels(mse(x, y, per_channel=True))`
    bitwise (every channel has as many pixels, so it is the mean over all of them).

    Args:
        x: Reference image(s): (H, W), (C, H, W), (N, C, H, W), or a list of (C, H, W) / (H, W) tensors of
            different sizes, as `ssim()` takes them.
        y: Distorted image(s), same form, shape, dtype and device.
        per_channel: Return (N, C) per-channel values instead of the value over all channels.
        precision: 'fp32' or 'amp' (differences squared in float32, summed in float64, float32 result),
            'fp64' (float64 throughout, for validation).
        crop_border: Pixels removed from each side of both images first.
        compile: The CPU compile policy, as in `ssim()` ('auto', 'always', 'never'): speed only, the same
            bits. Only the exact integer sums (uint8; uint16 in 'fp64') have a compiled pass.

    Returns:
        MSE in the pixels' units squared: (N,) for a batch or list, 0-d for one unbatched pair, with a
        trailing C dimension if `per_channel`; float32, or float64 for 'fp64'.

    Raises:
        TypeError: Not tensors (or lists), unsupported or different dtypes, an option of the wrong type.
        ValueError: Shapes differ, the crop leaves no pixel, an option is out of range, or the input holds
            NaN or inf.

    Example:
        >>> x = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
        >>> mse(x, x + 2)
        tensor([4.])

    References:
        scikit-image's `skimage.metrics.mean_squared_error`.
    """
    crop_border = _check_common(per_channel, precision, crop_border, compile)
    values = _mse_in_caller_order(pair_batches(x, y), precision=precision, crop_border=crop_border, policy=compile)
    return values if per_channel else mean_over_channels(values)


def _mse_in_caller_order(batches: PairBatches, *, precision: str, crop_border: int, policy: str) -> torch.Tensor:
    with torch.autocast(device_type=batches.device.type, enabled=False):
        per_batch = [_channel_mse(xb, yb, precision=precision, crop_border=crop_border, policy=policy)
                     for _, xb, yb in batches.groups]
    return in_caller_order(batches, per_batch)


def psnr_from_mse(mse_values: torch.Tensor, data_range: float) -> torch.Tensor:
    """10 log10(L^2 / MSE), computed in float64 and returned in the MSE's dtype; MSE 0 gives +inf.

    Args:
        mse_values: MSE values (any shape), e.g. from `mse()`; never negative.
        data_range: L, the range of the pixel values (255 for 8-bit data).

    Returns:
        PSNR in dB, same shape, dtype and device as `mse_values`.

    Raises:
        TypeError: data_range is not a real number.
        ValueError: data_range is not finite and positive.

    Example:
        >>> psnr_from_mse(torch.tensor([65.025, 0.0]), 255.0)
        tensor([30., inf])
    """
    data_range = check_positive_number("data_range", data_range)
    wide = mse_values.to(torch.float64)
    # L^2 / 0 is +inf in IEEE division and log10(+inf) = +inf: identical images are +inf, never NaN.
    return (10.0 * torch.log10((data_range * data_range) / wide)).to(mse_values.dtype)


def psnr(
    x: ImageInput,
    y: ImageInput,
    *,
    data_range: Optional[float] = None,
    per_channel: bool = False,
    precision: str = "fp32",
    crop_border: int = 0,
    compile: str = "auto",
):
    """Peak signal-to-noise ratio of image pairs, 10 log10(L^2 / MSE): exact, batch-invariant, +inf if identical.

    The MSE is over all pixels and channels of a pair, as scikit-image's `peak_signal_noise_ratio` and
    BasicSR's `calculate_psnr` take it (not the mean of per-channel PSNRs); `per_channel=True` gives one
    PSNR per channel. `psnr(x, y)` is bitwise `psnr_from_mse(mse(x, y), L)`, and the overall value is
    formed from `mean_over_channels(mse(x, y, per_channel=True))`, so a caller that needs both computes
    the squared errors once. Equals scikit-image within 1e-9 relative in 'fp64' (measured ~1e-15).

    Args:
        x: Reference image(s): (H, W), (C, H, W), (N, C, H, W), or a list of (C, H, W) / (H, W) tensors of
            different sizes, as `ssim()` takes them.
        y: Distorted image(s), same form, shape, dtype and device.
        data_range: L. None is allowed only for integer images and then means the dtype's maximum: 255 for
            uint8, 65535 for uint16 (pass 4095 for 12-bit data in 16-bit tensors). Never inferred.
        per_channel: Return (N, C) per-channel PSNRs.
        precision: 'fp32', 'amp' (float32 squares, float64 sums) or 'fp64' (float64 throughout).
        crop_border: Pixels removed from each side of both images first (BasicSR's `crop_border`).
        compile: The CPU compile policy, as in `mse()`: speed only, the same bits.

    Returns:
        PSNR in dB, float32 (float64 for 'fp64'): (N,) for a batch or list, 0-d for one unbatched pair, with
        a trailing C dimension if `per_channel`; +inf where the images (channels) are identical.

    Raises:
        TypeError: Not tensors (or lists), unsupported or different dtypes, an option of the wrong type.
        ValueError: Shapes differ, float input without data_range, the crop leaves no pixel, an option is
            out of range, or the input holds NaN or inf.

    Example:
        >>> x = torch.full((1, 3, 8, 8), 100, dtype=torch.uint8)
        >>> psnr(x, x + 1), psnr(x, x)
        (tensor([48.1308]), tensor([inf]))

    References:
        scikit-image's `skimage.metrics.peak_signal_noise_ratio`; BasicSR `basicsr/metrics/psnr_ssim.py`.
    """
    crop_border = _check_common(per_channel, precision, crop_border, compile)
    batches = pair_batches(x, y)
    value_range = resolve_data_range(batches.groups[0][1].dtype, data_range)  # one dtype per call
    errors = _mse_in_caller_order(batches, precision=precision, crop_border=crop_border, policy=compile)
    return psnr_from_mse(errors if per_channel else mean_over_channels(errors), value_range)


def psnr_settings(*, data_range: Union[float, str, None] = None, precision: str = "fp32", crop_border: int = 0) -> dict:
    """PSNR's definition and options, JSON-ready, for summaries and run manifests.

    Args:
        data_range: L as a number, 'auto' (from each file's bit depth) or None (the dtype's maximum).
        precision: 'fp32', 'fp64' or 'amp'.
        crop_border: Pixels removed from each side first.

    Returns:
        A dict with "name": "psnr" and every setting that changes the value.

    Raises:
        TypeError, ValueError: an option is invalid, as `psnr` would say.

    Example:
        >>> psnr_settings(data_range="auto")["mse"]
        'over all pixels and channels of the pair'
    """
    check_precision(precision)
    crop_border = check_crop_border(crop_border)
    if data_range not in (None, "auto"):
        data_range = check_positive_number("data_range", data_range)
    return {
        "name": "psnr",
        "formula": "10 log10(L^2 / MSE)",
        "mse": "over all pixels and channels of the pair",
        "identical_images": "+inf",
        "data_range": data_range,
        "precision": precision,
        "crop_border": crop_border,
    }
