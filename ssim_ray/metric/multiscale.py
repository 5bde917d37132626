"""MS-SSIM as Wang, Simoncelli and Bovik (2003) and their `msssim.m` define it, and when it has no value.

Owns `ms_ssim()`, its parts for callers that type undefined values per pair (`ms_ssim_terms()`,
`ms_ssim_nonpositive()`, `ms_ssim_too_small()`, `ms_ssim_from_terms()`), `ms_ssim_terms_and_ssim()` (the
terms and SSIM from one pass, for callers that report both), `ms_ssim_db()` and `ms_ssim_settings()`.

The definition: at each of L = len(weights) scales the SSIM machinery of `ssim()` over the valid region
(11x11 Gaussian, sigma 1.5, population moments) gives the mean contrast-structure term cs at scales 1..L-1
and the mean SSIM at scale L, per channel; the value is prod_l cs_l^w_l * ssim_L^w_L per channel, then the
mean over channels. Between scales `imfilter(im, ones(2)/4, 'symmetric', 'same')` then `im(1:2:end,
1:2:end)`: an odd side n becomes ceil(n/2) and its last row/column is averaged with itself (pytorch-msssim
averages zero padding into it instead, which moves odd-sized images by up to ~1e-2). The means come from
the tile kernel (`ssim_ray.metric.tiles`: SSIM and cs at scale 1, cs alone at the middle scales, SSIM alone
at the last), so a pair's value has the same bits in any batch, and the SSIM maps have `ssim()`'s own bits.

Undefined values are never NaN. Two reasons, as codes: TOO_SMALL, an image whose short side is below
win_size * 2^(L-1) (`msssim.m` refuses those: its last scale would be smaller than the window), and
NONPOSITIVE_TERM, a pair with a term <= 0 in some channel (a fractional power of a negative number is
complex in MATLAB; pytorch-msssim clamps it to 0 or returns NaN, depending on the version). `ms_ssim()`
raises `MSSSIMUndefinedError` naming the pairs; a job that records them per pair checks
`ms_ssim_too_small` per shape, computes `ms_ssim_terms`, sets aside `ms_ssim_nonpositive(terms)`, and
combines the rest with `ms_ssim_from_terms` (the same bits as `ms_ssim()`).
"""

from __future__ import annotations

import numbers
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from ssim_ray.metric.batches import ImageInput, in_caller_order, pair_batches
from ssim_ray.metric.checks import (
    COMPILE_POLICIES,
    check_choice,
    check_crop_border,
    check_flag,
    check_options,
    check_positive_number,
    raise_non_finite,
    resolve_data_range,
)
from ssim_ray.metric.kernel_choice import tile_means_of
from ssim_ray.metric.structural import mean_over_channels
from ssim_ray.metric.tiles import WANG, TileVariant
from ssim_ray.metric.plane_passes import halve_pyramid
from ssim_ray.metric.window import crop_borders, gaussian_window_1d

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
TOO_SMALL = "too_small"
NONPOSITIVE_TERM = "nonpositive_term"
_WITH_CS = TileVariant(with_cs=True)
_CS_ONLY = TileVariant(cs_only=True)


class MSSSIMUndefinedError(ValueError):
    """MS-SSIM has no value for some pairs of a call.

    Attributes:
        reason: TOO_SMALL or NONPOSITIVE_TERM.
        pairs: Indices of those pairs in the call (list order, or batch position).
        details: One line per pair, e.g. "pair 3: cs at scale 4 is -0.0123 (channel 0)".
    """

    def __init__(self, reason: str, pairs: Sequence[int], details: Sequence[str]) -> None:
        self.reason, self.pairs, self.details = reason, list(pairs), list(details)
        shown = "; ".join(self.details[:5]) + (f"; ... ({len(self.details)} pairs)" if len(self.details) > 5 else "")
        super().__init__(f"MS-SSIM is undefined ({reason}) for pair(s) {self.pairs[:20]}: {shown}")


def ms_ssim_too_small(height: int, width: int, *, levels: int = 5, win_size: int = 11,
                      crop_border: int = 0) -> Optional[str]:
    """Why an image of this size has no MS-SSIM (`msssim.m`'s rule), or None when it has one.

    msssim.m refuses min(H, W) / 2^(L-1) < win_size, i.e. a short side under 176 px for five scales and an
    11-tap window (pytorch-msssim asserts > 160 instead).

    Args:
        height: Image height in pixels (before the crop).
        width: Image width in pixels.
        levels: Scales L.
        win_size: Window taps.
        crop_border: Pixels removed from each side first.

    Returns:
        None, or a sentence saying what was needed and what was got.

    Example:
        >>> ms_ssim_too_small(176, 300) is None, ms_ssim_too_small(175, 300)
        (True, 'a short side of at least 176 px is needed for 5 scales with an 11-tap window, got 175x300')
    """
    seen_h, seen_w = height - 2 * crop_border, width - 2 * crop_border
    need = win_size * 2 ** (levels - 1)
    if min(seen_h, seen_w) >= need:
        return None
    after = f" after crop_border={crop_border}" if crop_border else ""
    return (f"a short side of at least {need} px is needed for {levels} scales with an {win_size}-tap window, "
            f"got {height}x{width}{after}")


def _check_weights(weights: object) -> Tuple[float, ...]:
    if not isinstance(weights, (list, tuple)) or not weights:
        raise TypeError(f"weights must be a non-empty list or tuple of numbers, got {type(weights).__name__} {weights!r}")
    return tuple(check_positive_number(f"weights[{i}]", w) for i, w in enumerate(weights))


def _check_levels(levels: object) -> int:
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral):
        raise TypeError(f"levels must be an int, got {type(levels).__name__} {levels!r}")
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    return int(levels)


def _terms_batch(x: torch.Tensor, y: torch.Tensor, *, data_range: float, levels: int, window: torch.Tensor,
                 k1: float, k2: float, dtype: torch.dtype, crop_border: int,
                 policy: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(n, C, levels) float64 terms of one checked same-shape batch that is large enough, and (n, C) float64
    mean SSIM at scale 1 (`ssim()`'s own per-channel means with the same window and constants)."""
    x, y = crop_borders(x, crop_border), crop_borders(y, crop_border)  # scale 1 reads the pixels as they are
    scales = [(x, y)] + halve_pyramid(x, y, dtype, levels - 1, policy=policy)
    # Scale 1 sums SSIM and cs (SSIM is also the caller's), the middle scales cs alone, the last SSIM alone:
    # each map with the bits it has in the with-cs kernel (the same subexpressions). All the scales' kernel
    # calls share one queue of the pool: the coarse scales' few calls fill the threads' idle ends.
    variants = [_WITH_CS] + [_CS_ONLY] * (levels - 2) + [WANG] if levels > 1 else [_WITH_CS]
    means = tile_means_of([(sx, sy, variant) for (sx, sy), variant in zip(scales, variants)], policy=policy,
                          data_range=data_range, window=window, k1=k1, k2=k2, dtype=dtype)
    full_ssim = means[0][..., 0]
    terms = [m[..., -1] for m in means[:-1]] + [means[-1][..., 0]]
    return torch.stack(terms, dim=-1), full_ssim


def _checked_terms(x: ImageInput, y: ImageInput, *, data_range: Optional[float], levels: int, win_size: int,
                   sigma: float, k1: float, k2: float, precision: str, crop_border: int,
                   compile: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """`ms_ssim_terms` and the scale-1 SSIM per channel, both in caller order, in the output dtype."""
    check_options(win_size=win_size, sigma=sigma, k1=k1, k2=k2, gaussian=True, downsample=None, precision=precision,
                  crop_border=crop_border)
    levels = _check_levels(levels)
    check_choice("compile", compile, COMPILE_POLICIES)
    batches = pair_batches(x, y)
    value_range = resolve_data_range(batches.groups[0][1].dtype, data_range)  # one dtype per call
    small = [(i, why) for indices, xb, _ in batches.groups
             for why in [ms_ssim_too_small(xb.shape[-2], xb.shape[-1], levels=levels, win_size=win_size,
                                           crop_border=crop_border)] if why for i in indices]
    if small:
        small.sort()
        raise MSSSIMUndefinedError(TOO_SMALL, [i for i, _ in small], [f"pair {i}: {why}" for i, why in small])
    dtype = torch.float64 if precision == "fp64" else torch.float32
    window = gaussian_window_1d(win_size, sigma)
    all_terms, all_ssim = [], []
    with torch.autocast(device_type=batches.device.type, enabled=False):
        for _, xb, yb in batches.groups:
            if xb.shape[1] == 0:
                raise ValueError(f"images must have at least one channel, got shape {tuple(xb.shape)}")
            terms, full_ssim = _terms_batch(xb, yb, data_range=value_range, levels=levels, window=window,
                                            k1=float(k1), k2=float(k2), dtype=dtype, crop_border=crop_border,
                                            policy=compile)
            terms, full_ssim = terms.to(dtype), full_ssim.to(dtype)
            if not bool(torch.isfinite(terms).all()):
                raise_non_finite(xb, yb, metric="MS-SSIM")
            all_terms.append(terms)
            all_ssim.append(full_ssim)
    return in_caller_order(batches, all_terms), in_caller_order(batches, all_ssim)


def ms_ssim_terms_and_ssim(
    x: ImageInput,
    y: ImageInput,
    *,
    data_range: Optional[float] = None,
    levels: int = 5,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    precision: str = "fp32",
    crop_border: int = 0,
    compile: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`ms_ssim_terms()` and SSIM per channel from one pass: MS-SSIM's first scale is SSIM's own computation.

    The scale-1 pass computes the SSIM map beside the cs map from the same subexpressions and sums both per
    tile in the same order (`ssim_ray.metric.tiles`), so the SSIM returned here has exactly the bits of
    `ssim(x, y, per_channel=True, ...)` with the same window, constants, precision and crop, a Gaussian
    window, population moments, no downsampling and the torch kernel. A job that reports SSIM and MS-SSIM
    calls this instead of both: MS-SSIM then costs its coarser scales only (about a third of SSIM's time)
    instead of a second full-resolution pass.

    Args:
        x: Reference image(s) in any form `ssim()` takes (a tensor batch or a ragged list).
        y: Distorted image(s), same form.
        data_range: L; None only for uint8/uint16 (the dtype's maximum). Never inferred.
        levels: Scales L.
        win_size: Gaussian window taps (odd).
        sigma: Gaussian standard deviation.
        k1: Luminance constant.
        k2: Contrast constant.
        precision: 'fp32'/'amp' (float32 pixels, moments and maps, float64 sums) or 'fp64'.
        crop_border: Pixels removed from each side first.
        compile: The CPU kernel's compile policy, as in `ssim()` (speed only: the same bits).

    Returns:
        (terms, ssim_per_channel): (N, C, levels) as `ms_ssim_terms` returns them and (N, C) SSIM per
        channel, float32 (float64 for 'fp64'); (C, levels) and (C,) for one unbatched pair.

    Raises:
        MSSSIMUndefinedError: Some images are too small for MS-SSIM (reason TOO_SMALL; checked before any
            work). A caller that still wants their SSIM calls `ssim()` for those.
        TypeError, ValueError: Invalid input or options, as `ssim()` says; NaN or inf in the input.

    Example:
        >>> from ssim_ray.metric import ssim
        >>> x = torch.arange(200 * 200, dtype=torch.float32).reshape(1, 1, 200, 200) % 97
        >>> terms, full = ms_ssim_terms_and_ssim(x, x.flip(-1), data_range=96.0, compile="never")
        >>> bool(torch.equal(full, ssim(x, x.flip(-1), data_range=96.0, per_channel=True, compile="never")))
        True
    """
    return _checked_terms(x, y, data_range=data_range, levels=levels, win_size=win_size, sigma=sigma, k1=k1,
                          k2=k2, precision=precision, crop_border=crop_border, compile=compile)


def ms_ssim_terms(
    x: ImageInput,
    y: ImageInput,
    *,
    data_range: Optional[float] = None,
    levels: int = 5,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    precision: str = "fp32",
    crop_border: int = 0,
    compile: str = "auto",
) -> torch.Tensor:
    """The per-scale means MS-SSIM is made of: cs at scales 1..L-1 and SSIM at scale L, per channel.

    Args:
        x: Reference image(s) in any form `ssim()` takes (a tensor batch or a ragged list).
        y: Distorted image(s), same form.
        data_range: L; None only for uint8/uint16 (the dtype's maximum). Never inferred.
        levels: Scales L.
        win_size: Gaussian window taps (odd).
        sigma: Gaussian standard deviation.
        k1: Luminance constant.
        k2: Contrast constant.
        precision: 'fp32'/'amp' (float32 pixels, moments and maps, float64 sums) or 'fp64'.
        crop_border: Pixels removed from each side first.
        compile: The CPU kernel's compile policy, as in `ssim()` (speed only: the same bits).

    Returns:
        (N, C, levels) terms, float32 (float64 for 'fp64'); (C, levels) for one unbatched pair.

    Raises:
        MSSSIMUndefinedError: Some images are too small (reason TOO_SMALL; checked before any work).
        TypeError, ValueError: Invalid input or options, as `ssim()` says; NaN or inf in the input.

    Example:
        >>> x = torch.arange(200 * 200, dtype=torch.float32).reshape(1, 1, 200, 200) % 97
        >>> ms_ssim_terms(x, x.flip(-1), data_range=96.0, compile="never").shape
        torch.Size([1, 1, 5])
    """
    return _checked_terms(x, y, data_range=data_range, levels=levels, win_size=win_size, sigma=sigma, k1=k1,
                          k2=k2, precision=precision, crop_border=crop_border, compile=compile)[0]


def ms_ssim_nonpositive(terms: torch.Tensor) -> Dict[int, str]:
    """Pairs whose MS-SSIM is undefined because a term is <= 0 (reason NONPOSITIVE_TERM), with the first one.

    Args:
        terms: (N, C, L) from `ms_ssim_terms` (or (C, L) for one pair, reported as pair 0).

    Returns:
        {pair index: "pair i: cs at scale l is v (channel c)"} for each such pair; empty when all are defined.

    Example:
        >>> ms_ssim_nonpositive(torch.tensor([[[0.9, 0.8]], [[-0.1, 0.7]]]))
        {1: 'pair 1: cs at scale 1 is -0.1 (channel 0)'}
    """
    batch = terms if terms.dim() == 3 else terms[None]
    bad = (batch <= 0).reshape(batch.shape[0], -1)
    found = {}
    for i in torch.nonzero(bad.any(dim=1)).flatten().tolist():
        flat = int(torch.nonzero(bad[i]).flatten()[0])
        channel, level = divmod(flat, batch.shape[-1])
        what = "SSIM" if level == batch.shape[-1] - 1 else "cs"
        found[i] = f"pair {i}: {what} at scale {level + 1} is {float(batch[i, channel, level]):.6g} (channel {channel})"
    return found


def ms_ssim_from_terms(terms: torch.Tensor, *, weights: Sequence[float] = MS_SSIM_WEIGHTS,
                       per_channel: bool = False) -> torch.Tensor:
    """prod_l term_l^w_l per channel (in float64, rounded once to the terms' dtype), then the channel mean.

    Args:
        terms: (N, C, L) or (C, L) from `ms_ssim_terms`, L = len(weights).
        weights: The exponents, one per scale.
        per_channel: Return (N, C) per-channel values instead of their mean over channels.

    Returns:
        (N,) values (0-d for (C, L) terms), with a trailing C dimension if `per_channel`.

    Raises:
        MSSSIMUndefinedError: A pair has a term <= 0 (reason NONPOSITIVE_TERM).
        TypeError, ValueError: The weights are not positive numbers, or do not match the terms.

    Example:
        >>> ms_ssim_from_terms(torch.tensor([[[0.25, 1.0]]], dtype=torch.float64), weights=(0.5, 2.0))
        tensor([0.5000], dtype=torch.float64)
    """
    weights = _check_weights(weights)
    check_flag("per_channel", per_channel)
    if terms.dim() not in (2, 3) or terms.shape[-1] != len(weights) or not terms.is_floating_point():
        raise ValueError(f"terms must be floating point (N, C, {len(weights)}) or (C, {len(weights)}) for "
                         f"{len(weights)} weights, got {terms.dtype} {tuple(terms.shape)}")
    bad = ms_ssim_nonpositive(terms)
    if bad:
        raise MSSSIMUndefinedError(NONPOSITIVE_TERM, list(bad), list(bad.values()))
    wide = terms.to(torch.float64)
    value = wide[..., 0] ** weights[0]
    for level in range(1, len(weights)):  # scale by scale, elementwise: no reduction chooses the order
        value = value * wide[..., level] ** weights[level]
    value = value.to(terms.dtype)
    return value if per_channel else mean_over_channels(value)


def ms_ssim(
    x: ImageInput,
    y: ImageInput,
    *,
    data_range: Optional[float] = None,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    per_channel: bool = False,
    precision: str = "fp32",
    crop_border: int = 0,
    compile: str = "auto",
):
    """Multi-scale SSIM as `msssim.m` computes it: exact, batch-invariant, never NaN.

    Five scales with weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333): cs at scales 1-4, full SSIM at
    scale 5, each the mean over the valid region of an 11x11 Gaussian window (sigma 1.5); between scales a
    2x2 mean with MATLAB's 'symmetric' border, then every second pixel. Per channel, then the mean over
    channels. Equals pytorch-msssim's `ms_ssim` (float64 input, win_size=11) to 1e-5 where every scale's
    sides are even; on odd sides it follows msssim.m, which pytorch-msssim does not. `ms_ssim(x, y)` is
    bitwise `ms_ssim_from_terms(ms_ssim_terms(x, y), weights=weights)`.

    Args:
        x: Reference image(s) in any form `ssim()` takes (a tensor batch or a ragged list).
        y: Distorted image(s), same form.
        data_range: L; None only for uint8/uint16 (the dtype's maximum). Never inferred.
        weights: One exponent per scale; their count is the number of scales.
        win_size: Gaussian window taps (odd).
        sigma: Gaussian standard deviation.
        k1: Luminance constant.
        k2: Contrast constant.
        per_channel: Return (N, C) per-channel values.
        precision: 'fp32'/'amp' (float32 moments, float64 sums and powers) or 'fp64'.
        crop_border: Pixels removed from each side first.
        compile: The CPU kernel's compile policy, as in `ssim()` (speed only: the same bits).

    Returns:
        Values in (0, 1], float32 (float64 for 'fp64'): (N,) for a batch or list, 0-d for one unbatched
        pair, with a trailing C dimension if `per_channel`.

    Raises:
        MSSSIMUndefinedError: (a ValueError) pairs without a value: `.reason` TOO_SMALL (short side below
            win_size * 2^(scales-1), 176 px by default) or NONPOSITIVE_TERM (a term <= 0), `.pairs` their
            indices, `.details` why, one line each.
        TypeError, ValueError: Invalid input or options, as `ssim()` says; NaN or inf in the input.

    Example:
        >>> x = (torch.arange(192 * 200).reshape(1, 1, 192, 200) * 7 % 251).to(torch.uint8)
        >>> round(float(ms_ssim(x, x, compile="never")), 6)
        1.0

    References:
        Z. Wang, E. P. Simoncelli, A. C. Bovik, "Multiscale structural similarity for image quality
        assessment", Asilomar Conference on Signals, Systems and Computers, 2003; their `msssim.m`.
    """
    weights = _check_weights(weights)
    check_flag("per_channel", per_channel)
    terms = ms_ssim_terms(x, y, data_range=data_range, levels=len(weights), win_size=win_size, sigma=sigma, k1=k1,
                          k2=k2, precision=precision, crop_border=crop_border, compile=compile)
    return ms_ssim_from_terms(terms, weights=weights, per_channel=per_channel)


def ms_ssim_db(value: Union[torch.Tensor, float]) -> Union[torch.Tensor, float]:
    """MS-SSIM in dB as codec papers print it (CompressAI): -10 log10(1 - v); v = 1 gives +inf.

    Args:
        value: MS-SSIM value(s) in [0, 1], a float or a tensor.

    Returns:
        The same type (a tensor keeps its dtype), computed in float64.

    Raises:
        ValueError: A value is above 1, negative, or not finite.

    Example:
        >>> round(ms_ssim_db(0.99), 9), ms_ssim_db(torch.tensor([0.75, 1.0], dtype=torch.float64))
        (20.0, tensor([6.0206,    inf], dtype=torch.float64))
    """
    wide = torch.as_tensor(value, dtype=torch.float64)
    if not bool(((wide >= 0) & (wide <= 1)).all()):
        raise ValueError(f"MS-SSIM values must lie in [0, 1], got {value!r}")
    db = -10.0 * torch.log10(1.0 - wide) + 0.0  # + 0.0: v = 0 gives 0.0, not -0.0
    if isinstance(value, torch.Tensor):
        return db.to(value.dtype)
    return float(db)


def ms_ssim_settings(*, weights: Sequence[float] = MS_SSIM_WEIGHTS, win_size: int = 11, sigma: float = 1.5,
                     k1: float = 0.01, k2: float = 0.03, data_range: Union[float, str, None] = None,
                     precision: str = "fp32", crop_border: int = 0) -> dict:
    """MS-SSIM's definition and options, JSON-ready, for summaries and run manifests.

    Args:
        weights: One exponent per scale.
        win_size: Gaussian window taps.
        sigma: Gaussian standard deviation.
        k1: Luminance constant.
        k2: Contrast constant.
        data_range: L as a number, 'auto' (from each file's bit depth) or None (the dtype's maximum).
        precision: 'fp32', 'fp64' or 'amp'.
        crop_border: Pixels removed from each side first.

    Returns:
        A dict with "name": "ms_ssim" and every setting that changes the value.

    Raises:
        TypeError, ValueError: an option is invalid, as `ms_ssim` would say.

    Example:
        >>> ms_ssim_settings()["levels"]
        5
    """
    weights = _check_weights(weights)
    check_options(win_size=win_size, sigma=sigma, k1=k1, k2=k2, gaussian=True, downsample=None, precision=precision,
                  crop_border=crop_border)
    if data_range not in (None, "auto"):
        data_range = check_positive_number("data_range", data_range)
    levels = len(weights)
    return {
        "name": "ms_ssim",
        "reference": "Wang, Simoncelli, Bovik (2003), msssim.m",
        "levels": levels,
        "weights": list(weights),
        "win_size": int(win_size),
        "sigma": float(sigma),
        "window": "gaussian",
        "k1": float(k1),
        "k2": float(k2),
        "data_range": data_range,
        "precision": precision,
        "crop_border": check_crop_border(crop_border),
        "moments": "population",
        "region": "valid, at every scale",
        "downsampling": "2x2 mean with MATLAB imfilter 'symmetric' 'same', then every second pixel",
        "terms": f"cs at scales 1-{levels - 1}, SSIM at scale {levels}" if levels > 1 else "SSIM at scale 1",
        "reduction": "product of term^weight per channel, then mean over channels",
        "undefined": (f"null with reason {TOO_SMALL} (short side < win_size * 2^{levels - 1}) or "
                      f"{NONPOSITIVE_TERM} (a term <= 0)"),
    }
