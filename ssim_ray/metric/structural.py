"""The `wang2004` SSIM's public face: `ssim()`, `metric_settings()` and `mean_over_channels()`.

Pure torch, tensors in, tensors out; no I/O, Ray, Hydra or environment variables. The arithmetic lives in
`ssim_ray.metric.tiles` (see its docstring for how the map is computed exactly and batch-invariantly), the
rules for valid input in `.checks` and `.window`, how a call becomes batches in `.batches`, and the choice
of kernel in `.kernel_choice`.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ssim_ray.metric.batches import ImageInput, in_caller_order, pair_batches
from ssim_ray.metric.checks import (
    COMPILE_POLICIES,
    KERNELS,
    check_choice,
    check_flag,
    check_options,
    check_positive_number,
    raise_non_finite,
    resolve_data_range,
)
from ssim_ray.metric.kernel_choice import per_channel_means, refuse_unservable, resolve_kernel, triton_refusals
from ssim_ray.metric.window import (
    check_size,
    crop_borders,
    gaussian_window_1d,
    wang_downsample,
    wang_downsample_factor,
)

METRIC_NAME = "wang2004"


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
    covariance: str = "population",
    crop_border: int = 0,
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
        covariance: 'population' (Wang's moments) or 'sample' (times N / (N - 1), scikit-image's default).
        crop_border: Pixels removed from each side before anything else.

    Returns:
        A JSON-ready dict with "name": "wang2004" and the options above ("moments" says what the
        covariance means), plus the fixed parts of the definition (valid region, mean over the map then
        over channels).

    Raises:
        TypeError, ValueError: an option is invalid, exactly as `ssim` would say.

    Example:
        >>> metric_settings(win_size=11, sigma=1.5, k1=0.01, k2=0.03, gaussian=True, downsample=None,
        ...                 precision="fp32")["name"]
        'wang2004'
    """
    check_options(
        win_size=win_size, sigma=sigma, k1=k1, k2=k2, gaussian=gaussian, downsample=downsample, precision=precision,
        covariance=covariance, crop_border=crop_border,
    )
    if data_range not in (None, "auto"):
        data_range = check_positive_number("data_range", data_range)
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
        "covariance": covariance,
        "moments": covariance if covariance == "population" else f"{covariance}: variances and covariance x N/(N-1)",
        "crop_border": int(crop_border),
        "region": "valid",
        "reduction": "mean over the map per channel, then mean over channels",
    }


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
    kernel: str,
    policy: str,
    covariance: str,
    crop_border: int,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-channel scores (N, C) [and maps] of one checked same-shape (N, C, H, W) batch."""
    if x.shape[1] == 0:
        raise ValueError(f"images must have at least one channel, got shape {tuple(x.shape)}")
    check_size(x.shape[-2], x.shape[-1], window.numel(), downsample, crop_border)
    data_range = resolve_data_range(x.dtype, data_range)
    # amp keeps fp32 moments and formula; half precision would only be an exact storage format for uint8 /
    # fp16 pixels, which the torch path converts once anyway, so it has nothing to gain from it.
    dtype = torch.float64 if precision == "fp64" else torch.float32
    refuse_unservable(kernel, triton_refusals(
        x.device, precision=precision, return_map=return_map, win_size=window.numel(),
        pixel_dtype=dtype if downsample == "wang" else x.dtype, batch=x.shape[0], covariance=covariance,
    ))
    x, y = crop_borders(x, crop_border), crop_borders(y, crop_border)
    if downsample == "wang":
        f = wang_downsample_factor(x.shape[-2], x.shape[-1])
        x, y = wang_downsample(x.to(dtype), f), wang_downsample(y.to(dtype), f)
    if x.shape[0] == 0:  # an empty batch is a valid batch: empty scores (and maps of the right size)
        map_shape = (0, x.shape[1], x.shape[-2] - window.numel() + 1, x.shape[-1] - window.numel() + 1)
        empty_map = torch.empty(map_shape, dtype=dtype, device=x.device) if return_map else None
        return torch.empty(x.shape[:2], dtype=dtype, device=x.device), empty_map
    means, ssim_map = per_channel_means(
        x, y, kernel=kernel, policy=policy, data_range=data_range, window=window, window_spec=window_spec, k1=k1,
        k2=k2, dtype=dtype, return_map=return_map, covariance=covariance,
    )
    if not bool(torch.isfinite(means).all()):
        raise_non_finite(x, y, metric="SSIM")
    return means, ssim_map


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
    covariance: str = "population",
    crop_border: int = 0,
    kernel: str = "auto",
    compile: str = "auto",
):
    """SSIM of image pairs as Wang et al. (2004) define it (`wang2004`): exact, batch-invariant, any bit depth.

    An 11x11 Gaussian window (sigma 1.5), population moments, the 'valid' region only, the mean of the map
    per channel, then the mean over channels; C1 = (k1 L)^2, C2 = (k2 L)^2 with L = `data_range`. Equals
    `skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=L)` to 1e-6 in fp32 and 1e-10 in fp64.

    A pair's score has the same bits whatever batch it is computed in (size, position, ragged grouping,
    thread count), and `ssim(x, y)` equals `mean_over_channels(ssim(x, y, per_channel=True))` bitwise,
    which is `ssim(x, y, per_channel=True).mean(-1)` on CPU for up to 4 channels.

    Speed on CPU: with `compile='auto'` a process starts with an eager kernel and, once it has spent a few
    seconds computing, builds a C one with the system's C compiler (same bits, same operations in the same
    order; about a second, once per machine; with no compiler it stays eager with a warning).
    `compile='always'` compiles on the first call, `'never'` never does. CUDA tensors run the same torch code
    eagerly, or the fused Triton kernel with `kernel='triton'`.
    `kernel_in_use` says which kernel a process runs.

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
        covariance: 'population' (Wang's biased moments) or 'sample' (every variance and the covariance
            times N / (N - 1), N = win_size^2: scikit-image's default `use_sample_covariance=True`).
        crop_border: Pixels removed from each side of both images before anything else (BasicSR's
            `crop_border`, usually the super-resolution scale); 0 keeps the whole image.
        kernel: 'torch' (the tile path above, on any device), 'triton' (the fused CUDA kernel: float32
            scores within 1e-6 of the torch path, not the same bits; it refuses what it cannot score
            rather than fall back) or 'auto' (for now the torch path everywhere: the Triton kernel has
            not yet been run on a GPU here).
        compile: When the CPU torch kernel is compiled: 'auto' (after a few seconds of eager work in the
            process), 'always' (on first use) or 'never'. No effect elsewhere.

    Returns:
        Scores, float32 ('fp32', 'amp') or float64 ('fp64'): shape (N,) for a batch or a list, 0-d for a
        single (H, W) or (C, H, W) pair, with a trailing C dimension if `per_channel`. With `return_map`,
        a tuple (scores, maps).

    Raises:
        TypeError: x or y is not a tensor (or list of tensors), has an unsupported dtype (bool, complex,
            int8/16/32/64 ...) or the two have different dtypes; an option has the wrong type.
        ValueError: shapes differ, a side is smaller than the window (after the border crop and
            downsampling), the window is even or not positive, float input has no data_range, an option is
            out of range, the input holds NaN or inf, or kernel='triton' cannot score the call (the message
            says why: device, triton missing, precision='fp64', return_map, covariance='sample', a window
            over 11 taps, float64 pixels, a batch over 65535 pairs).

    Example:
        >>> import torch
        >>> x = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64) % 251
        >>> round(float(ssim(x, x, data_range=255.0)), 6)
        1.0
        >>> ssim(x[None, None].repeat(4, 3, 1, 1), x.flip(0)[None, None].repeat(4, 3, 1, 1),
        ...      data_range=255.0, per_channel=True, compile="never").shape
        torch.Size([4, 3])

    References:
        Z. Wang, A. C. Bovik, H. R. Sheikh, E. P. Simoncelli, "Image quality assessment: from error
        visibility to structural similarity", IEEE Trans. Image Processing 13(4), 600-612, 2004.
    """
    check_options(
        win_size=win_size, sigma=sigma, k1=k1, k2=k2, gaussian=gaussian, downsample=downsample, precision=precision,
        covariance=covariance, crop_border=crop_border,
    )
    check_flag("per_channel", per_channel)
    check_flag("return_map", return_map)
    kernel = resolve_kernel(check_choice("kernel", kernel, KERNELS))
    check_choice("compile", compile, COMPILE_POLICIES)
    window = gaussian_window_1d(win_size, sigma, gaussian=gaussian)
    options = dict(data_range=data_range, window=window, window_spec=(int(win_size), float(sigma), bool(gaussian)),
                   k1=float(k1), k2=float(k2), downsample=downsample, precision=precision, return_map=return_map,
                   kernel=kernel, policy=compile, covariance=covariance, crop_border=int(crop_border))
    batches = pair_batches(x, y)
    with torch.autocast(device_type=batches.device.type, enabled=False):
        results = [_ssim_batch(xb, yb, **options) for _, xb, yb in batches.groups]
    scores = in_caller_order(batches, [means for means, _ in results])
    if not per_channel:
        scores = mean_over_channels(scores)
    if not return_map:
        return scores
    if batches.ragged:
        maps = [None] * batches.count
        for (indices, _, _), (_, group_maps) in zip(batches.groups, results):
            for j, i in enumerate(indices):
                maps[i] = group_maps[j]
        return scores, maps
    maps = results[0][1]
    if batches.single:  # one unbatched pair: no batch dim (and no channel dim of the map for (H, W))
        maps = maps[0, 0] if batches.single == 2 else maps[0]
    return scores, maps


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
