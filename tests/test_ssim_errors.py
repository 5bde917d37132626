"""Every invalid input is refused with the right exception type and a message naming what was expected and
what was got; nothing is silently coerced (a float image without a range, NaN, a mixed-dtype pair)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssim_ray import ssim
from ssim_ray.metric import gaussian_window_1d, metric_settings

GOOD = torch.rand(2, 3, 32, 32)


def noise(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape))
    return (torch.rand(*shape, generator=g) * 255).to(dtype)


# ------------------------------------------------------------------------------------------ input types


@pytest.mark.parametrize("bad", [np.zeros((32, 32)), [[0.0] * 32] * 32, 3.0, None])
def test_non_tensor_input_is_a_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match="tensor"):
        ssim(bad, GOOD[0, 0], data_range=1.0)


def test_tensor_and_list_mixed_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="both be tensors or both be lists.*Tensor and list"):
        ssim(GOOD, list(GOOD), data_range=1.0)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64])
def test_unsupported_dtype_is_a_type_error_listing_the_supported_ones(dtype: torch.dtype) -> None:
    x = torch.zeros(16, 16, dtype=dtype)
    with pytest.raises(TypeError, match=rf"{str(dtype).replace('torch.', '')}; supported: uint8, uint16, float16"):
        ssim(x, x, data_range=1.0)


def test_mixed_dtypes_are_a_type_error() -> None:
    x = noise(16, 16, dtype=torch.uint8)
    with pytest.raises(TypeError, match="same dtype, got torch.uint8 and torch.float32"):
        ssim(x, x.float(), data_range=255.0)


def test_different_devices_are_a_value_error() -> None:
    x = noise(16, 16)
    with pytest.raises(ValueError, match="same device, got cpu and meta"):
        ssim(x, torch.empty(16, 16, device="meta"), data_range=255.0)


# ------------------------------------------------------------------------------------------------ shapes


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"same shape, got \(3, 32, 32\) and \(3, 32, 31\)"):
        ssim(noise(3, 32, 32), noise(3, 32, 31), data_range=255.0)


@pytest.mark.parametrize("shape", [(32,), (1, 1, 1, 32, 32)])
def test_wrong_number_of_dims_is_a_value_error(shape: tuple) -> None:
    x = noise(*shape)
    with pytest.raises(ValueError, match=r"\(H, W\), \(C, H, W\) or \(N, C, H, W\), got"):
        ssim(x, x, data_range=255.0)


@pytest.mark.parametrize("height, width", [(10, 40), (40, 10), (1, 1)])
def test_image_smaller_than_the_window_is_a_value_error(height: int, width: int) -> None:
    x = noise(height, width)
    with pytest.raises(ValueError, match=rf"at least 11x11 \(the window\) for SSIM, got {height}x{width}"):
        ssim(x, x, data_range=255.0)


def test_image_smaller_than_the_window_after_downsampling_says_so() -> None:
    x = noise(640, 700)  # f = 3 (MATLAB round of 2.5): 214 x 234 after downsampling, >= 251 without it
    with pytest.raises(ValueError, match=r"got 640x700 \(214x234 after downsample='wang'\)"):
        ssim(x, x, data_range=255.0, win_size=251, gaussian=False, downsample="wang")


def test_zero_channels_is_a_value_error() -> None:
    x = torch.zeros(2, 0, 16, 16)
    with pytest.raises(ValueError, match="at least one channel"):
        ssim(x, x, data_range=1.0)


# --------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("win_size", [10, 0, -3])
def test_even_or_non_positive_window_is_a_value_error(win_size: int) -> None:
    with pytest.raises(ValueError, match=f"positive odd integer, got {win_size}"):
        ssim(GOOD, GOOD, data_range=1.0, win_size=win_size)


@pytest.mark.parametrize("win_size", [11.0, True, "11"])
def test_non_integer_window_is_a_type_error(win_size: object) -> None:
    with pytest.raises(TypeError, match="win_size must be an int"):
        ssim(GOOD, GOOD, data_range=1.0, win_size=win_size)


@pytest.mark.parametrize("sigma", [0.0, -1.5, math.nan, math.inf])
def test_bad_sigma_is_a_value_error(sigma: float) -> None:
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        ssim(GOOD, GOOD, data_range=1.0, sigma=sigma)


@pytest.mark.parametrize("name", ["k1", "k2"])
@pytest.mark.parametrize("value, error", [(0.0, ValueError), (-0.01, ValueError), (math.nan, ValueError),
                                          ("0.01", TypeError), (None, TypeError)])
def test_bad_constants(name: str, value: object, error: type) -> None:
    with pytest.raises(error, match=name):
        ssim(GOOD, GOOD, data_range=1.0, **{name: value})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float_input_without_data_range_is_a_value_error(dtype: torch.dtype) -> None:
    x = GOOD.to(dtype)
    with pytest.raises(ValueError, match=rf"data_range is required for {str(dtype).replace('torch.', '')} input.*got None"):
        ssim(x, x)


@pytest.mark.parametrize("data_range, error", [(0, ValueError), (-1.0, ValueError), (math.inf, ValueError),
                                               (math.nan, ValueError), ("255", TypeError), (True, TypeError),
                                               (torch.tensor(255.0), TypeError)])
def test_bad_data_range(data_range: object, error: type) -> None:
    with pytest.raises(error, match="data_range"):
        ssim(GOOD, GOOD, data_range=data_range)


@pytest.mark.parametrize("option, value", [("precision", "fp16"), ("precision", "bf16"), ("downsample", "avg"),
                                           ("downsample", True)])
def test_unknown_choices_are_value_errors(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{option} must be one of .* got {value!r}"):
        ssim(GOOD, GOOD, data_range=1.0, **{option: value})


@pytest.mark.parametrize("option", ["per_channel", "return_map", "gaussian"])
def test_flags_must_be_bools(option: str) -> None:
    with pytest.raises(TypeError, match=f"{option} must be a bool, got str 'yes'"):
        ssim(GOOD, GOOD, data_range=1.0, **{option: "yes"})


# ----------------------------------------------------------------------------------------- NaN and inf


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_input_is_a_value_error_naming_the_item(dtype: torch.dtype, bad: float) -> None:
    x, y = noise(3, 2, 20, 20, dtype=dtype), noise(3, 2, 20, 21, dtype=dtype)[..., :20]
    y[1, 1, 7, 3] = bad
    with pytest.raises(ValueError, match=r"y must be finite, got NaN or inf in batch item\(s\) \[1\]"):
        ssim(x, y, data_range=255.0)
    with pytest.raises(ValueError, match=r"x must be finite"):
        ssim(y, x, data_range=255.0)


@pytest.mark.parametrize("precision", ["fp32", "amp"])
def test_values_that_overflow_fp32_are_an_error_not_a_nan_score(precision: str) -> None:
    x = torch.full((16, 16), 1e200, dtype=torch.float64)
    x[::2] = -1e200
    with pytest.raises(ValueError, match="overflow the compute precision"):
        ssim(x, x * 0.5, data_range=1.0, precision=precision)


# ----------------------------------------------------------------------------------------------- ragged


def test_ragged_lists_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        ssim([GOOD[0], GOOD[1]], [GOOD[0]], data_range=1.0)


def test_ragged_empty_lists() -> None:
    with pytest.raises(ValueError, match="empty lists"):
        ssim([], [], data_range=1.0)


def test_ragged_pair_shape_mismatch_names_the_index() -> None:
    with pytest.raises(ValueError, match=r"x and y\[1\] must have the same shape, got \(3, 32, 32\) and \(3, 31, 32\)"):
        ssim([GOOD[0], GOOD[1]], [GOOD[0], GOOD[1][:, :31]], data_range=1.0)


def test_ragged_mixed_channels_or_dtypes() -> None:
    with pytest.raises(ValueError, match="pair 0 has .* 3 channels, pair 1 has .* 1 channels"):
        ssim([GOOD[0], GOOD[1, 0]], [GOOD[0], GOOD[1, 0]], data_range=1.0)
    with pytest.raises(ValueError, match="share dtype"):
        ssim([GOOD[0], GOOD[1].double()], [GOOD[0], GOOD[1].double()], data_range=1.0)


def test_ragged_items_must_be_single_images() -> None:
    with pytest.raises(ValueError, match=r"x\[0\] must have shape \(H, W\) or \(C, H, W\) in a list, got \(2, 3, 32, 32\)"):
        ssim([GOOD], [GOOD], data_range=1.0)


def test_ragged_item_with_unsupported_dtype_names_it() -> None:
    with pytest.raises(TypeError, match=r"y\[1\] has dtype int32"):
        ssim([GOOD[0], GOOD[1]], [GOOD[0], GOOD[1].int()], data_range=1.0)


# ------------------------------------------------------------------------------------- public helpers


def test_window_and_settings_validate_like_ssim() -> None:
    with pytest.raises(ValueError, match="positive odd integer, got 4"):
        gaussian_window_1d(4, 1.5)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_window_1d(11, -1.0)
    options = dict(win_size=11, sigma=1.5, k1=0.01, k2=0.03, gaussian=True, downsample=None, precision="fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        metric_settings(**{**options, "precision": "half"})
    with pytest.raises(ValueError, match="data_range must be a finite number > 0, got -1"):
        metric_settings(**options, data_range=-1)
    assert metric_settings(**options, data_range="auto")["data_range"] == "auto"
