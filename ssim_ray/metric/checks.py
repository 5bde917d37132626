"""Input and option checks of the metric: the one set of rules that `ssim()` and the Triton launcher apply.

Owns what a valid call looks like: the pixel dtypes, the option choices (precision, downsample, covariance,
kernel, compile policy), the window's and the constants' ranges, the border crop, the data range, and the
forms of x and y (tensors
of one dtype, device and shape; a batch or a ragged list). A wrong kind of value is a TypeError and a value
out of range a ValueError, and each message names what was expected and what was got. Nothing here computes.
The one rule that needs the window's geometry, an image at least one window large after downsampling,
lives beside that geometry in `ssim_ray.metric.window`.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Sequence, Tuple

import torch

PRECISIONS = ("fp32", "fp64", "amp")
DOWNSAMPLE_MODES = (None, "wang")
# population: Wang's biased moments (divide by the window's weight, 1); sample: scikit-image's default,
# every variance and the covariance times N / (N - 1) with N = win_size^2.
COVARIANCES = ("population", "sample")
KERNELS = ("auto", "torch", "triton")
COMPILE_POLICIES = ("auto", "always", "never")
SUPPORTED_DTYPES = (torch.uint8, torch.uint16, torch.float16, torch.bfloat16, torch.float32, torch.float64)
# data_range=None for integer images: the dtype's maximum. Never inferred from the values.
INTEGER_DATA_RANGES = {torch.uint8: 255.0, torch.uint16: 65535.0}


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    """'uint8, uint16, ...': dtypes as messages name them."""
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_is_tensor(name: str, t: object) -> torch.Tensor:
    """`t` itself, if it is a tensor.

    Raises:
        TypeError: `t` is not a torch.Tensor.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_tensor(name: str, t: object) -> torch.Tensor:
    """`t` itself, if it is a tensor of a pixel dtype the metric reads (`SUPPORTED_DTYPES`).

    Raises:
        TypeError: `t` is not a tensor, or its dtype is bool, complex, a signed integer...

    Example:
        >>> check_tensor("x", torch.zeros(2, 2, dtype=torch.int32))
        Traceback (most recent call last):
        ...
        TypeError: x has dtype int32; supported: uint8, uint16, float16, bfloat16, float32, float64
    """
    check_is_tensor(name, t)
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {dtype_names([t.dtype])}; supported: {dtype_names(SUPPORTED_DTYPES)}")
    return t


def check_same(x: torch.Tensor, y: torch.Tensor, *, names: Tuple[str, str] = ("x", "y")) -> None:
    """x and y share dtype, device and shape.

    Args:
        x: One side of the pair.
        y: The other side.
        names: How messages call them, e.g. ("xs[1]", "ys[1]").

    Raises:
        TypeError: The dtypes differ.
        ValueError: The devices or the shapes differ.
    """
    name_x, name_y = names
    if x.dtype != y.dtype:
        raise TypeError(f"{name_x} and {name_y} must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"{name_x} and {name_y} must be on the same device, got {x.device} and {y.device}")
    if x.shape != y.shape:
        raise ValueError(
            f"{name_x} and {name_y} must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def check_positive_number(name: str, value: object) -> float:
    """`value` as a float, if it is a finite real number above zero (k1, k2, sigma, data_range).

    Raises:
        TypeError: `value` is not a real number (a bool, a string, a tensor...).
        ValueError: It is zero, negative, NaN or infinite.

    Example:
        >>> check_positive_number("k1", 0.01)
        0.01
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_window(win_size: object, sigma: object, gaussian: object) -> None:
    """A window the metric can build: odd positive taps, and a finite positive sigma when it is Gaussian.

    Raises:
        TypeError: win_size is not an int, sigma not a real number, or gaussian not a bool.
        ValueError: win_size is even or not positive, or a Gaussian's sigma is not finite and positive.
    """
    if isinstance(win_size, bool) or not isinstance(win_size, numbers.Integral):
        raise TypeError(f"win_size must be an int, got {type(win_size).__name__} {win_size!r}")
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd integer, got {win_size}")
    check_flag("gaussian", gaussian)
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma must be a real number, got {type(sigma).__name__} {sigma!r}")
    if gaussian and not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")


def check_flag(name: str, value: object) -> None:
    """Raises TypeError unless `value` is a bool (a truthy string is not a yes)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """`value`, if it is one of the strings `choices` (kernel=, compile=).

    Raises:
        TypeError: `value` is not a string.
        ValueError: It is a string that is not one of `choices`.

    Example:
        >>> check_choice("compile", "sometimes", COMPILE_POLICIES)
        Traceback (most recent call last):
        ...
        ValueError: compile must be one of ['auto', 'always', 'never'], got 'sometimes'
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {list(choices)}, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_crop_border(crop_border: object) -> int:
    """`crop_border` itself, if it is an int >= 0 (pixels removed from each side of both images first).

    Raises:
        TypeError: crop_border is not an int (a bool or a float is not).
        ValueError: It is negative.

    Example:
        >>> check_crop_border(-1)
        Traceback (most recent call last):
        ...
        ValueError: crop_border must be an int >= 0 (pixels removed from each side), got -1
    """
    if isinstance(crop_border, bool) or not isinstance(crop_border, numbers.Integral):
        raise TypeError(f"crop_border must be an int, got {type(crop_border).__name__} {crop_border!r}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be an int >= 0 (pixels removed from each side), got {crop_border}")
    return int(crop_border)


def check_precision(precision: object) -> None:
    """Raises ValueError unless `precision` is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")


def check_options(
    *, win_size: int, sigma: float, k1: float, k2: float, gaussian: bool, downsample: str | None, precision: str,
    covariance: str = "population", crop_border: int = 0,
) -> None:
    """Every option that changes a score, as `ssim` and `metric_settings` take them.

    Raises:
        TypeError: An option has the wrong type.
        ValueError: An option is out of range or not one of its choices.
    """
    check_window(win_size, sigma, gaussian)
    check_positive_number("k1", k1)
    check_positive_number("k2", k2)
    if downsample not in DOWNSAMPLE_MODES:
        raise ValueError(f"downsample must be one of {list(DOWNSAMPLE_MODES)}, got {downsample!r}")
    check_precision(precision)
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {list(COVARIANCES)}, got {covariance!r}")
    if covariance == "sample" and win_size == 1:
        raise ValueError("covariance='sample' needs a window of at least 3x3 (N / (N - 1) with N = 1), got win_size=1")
    check_crop_border(crop_border)


def resolve_data_range(dtype: torch.dtype, data_range: object) -> float:
    """L for images of `dtype`: `data_range` itself, or for integer images without one, the dtype's maximum.

    Raises:
        TypeError: data_range is not a real number.
        ValueError: It is not finite and positive, or it is None for float images (never inferred).

    Example:
        >>> resolve_data_range(torch.uint16, None)
        65535.0
    """
    if data_range is None:
        if dtype in INTEGER_DATA_RANGES:
            return INTEGER_DATA_RANGES[dtype]
        raise ValueError(
            f"data_range is required for {dtype_names([dtype])} input (e.g. 1.0 for images in "
            "[0, 1] or 255.0 for [0, 255]), got None; it is never inferred from the values"
        )
    return check_positive_number("data_range", data_range)


def raise_non_finite(x: torch.Tensor, y: torch.Tensor, *, metric: str) -> None:
    """Say why a value came out NaN or inf: non-finite input (which items), or an overflow.

    Called only after a value came out NaN/inf, so valid input pays no extra pass or device sync.

    Raises:
        ValueError: always; the message names the batch items holding NaN or inf, if any.
    """
    for name, t in (("x", x), ("y", y)):
        if t.is_floating_point():
            bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
            if bool(bad.any()):
                where = torch.nonzero(bad).flatten()[:5].tolist()
                raise ValueError(f"{name} must be finite, got NaN or inf in batch item(s) {where}")
    raise ValueError(
        f"{metric} came out NaN or inf for finite input: the values overflow the compute precision; "
        "scale the images to their data_range"
    )


def as_batch(x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(H, W), (C, H, W) or (N, C, H, W) views as (N, C, H, W); shapes already checked equal.

    Raises:
        ValueError: Any other number of dimensions.
    """
    if x.dim() == 2:
        return x[None, None], y[None, None]
    if x.dim() == 3:
        return x[None], y[None]
    if x.dim() == 4:
        return x, y
    raise ValueError(f"x and y must have shape (H, W), (C, H, W) or (N, C, H, W), got {tuple(x.shape)}")


def ragged_pairs(x: Sequence, y: Sequence) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Checked (C, H, W) views of two equal-length lists of images of possibly different sizes.

    Raises:
        TypeError: x or y is not a list or tuple, or an item is not a tensor of a supported dtype.
        ValueError: The lengths differ, a pair differs in shape or device, an item is not (H, W) or
            (C, H, W), or pairs differ in dtype, device or channel count.
    """
    if not isinstance(x, (list, tuple)) or not isinstance(y, (list, tuple)):
        raise TypeError(
            f"x and y must both be tensors or both be lists of tensors, got {type(x).__name__} and {type(y).__name__}"
        )
    if len(x) != len(y):
        raise ValueError(f"x and y must be lists of the same length, got {len(x)} and {len(y)}")
    pairs = []
    for i, (xi, yi) in enumerate(zip(x, y)):
        xi, yi = check_tensor(f"x[{i}]", xi), check_tensor(f"y[{i}]", yi)
        check_same(xi, yi, names=("x", f"y[{i}]"))
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
