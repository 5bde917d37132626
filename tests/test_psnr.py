"""psnr() against scikit-image's peak_signal_noise_ratio on real photographs with real distortions; +inf for
identical images; batch invariance bitwise; ssim()'s input rules.

Reference parameters, spelled out: `peak_signal_noise_ratio(x, y, data_range=L)` on (C, H, W) arrays, whose
MSE is over all pixels and channels (`mean_squared_error`, float64). Per channel: the same on one channel.

Tolerances (relative): 1e-9 in fp64 (the issue's bound; measured ~1e-15, uint8 squared errors sum exactly),
1e-6 in fp32 (float32 squares of float input; measured ~1e-8).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_impls import chw, photo_pair
from skimage.metrics import peak_signal_noise_ratio

from ssim_ray.metric import mean_over_channels, mse, psnr, psnr_from_mse

FP64_RTOL = 1e-9
FP32_RTOL = 1e-6
DISTORTIONS = [("jpeg", 10), ("jpeg", 50), ("jpeg", 90), ("noise", 3), ("noise", 25), ("blur", 0.8), ("blur", 3.0),
               ("sr", 2), ("sr", 3), ("sr", 4)]


def real_pairs(name: str, height: int, width: int, mode: str = "RGB", top: int = 0, left: int = 0):
    made = [photo_pair(name, height, width, kind, level, mode=mode, top=top, left=left, seed=i)
            for i, (kind, level) in enumerate(DISTORTIONS)]
    return (torch.from_numpy(np.stack([chw(a) for a, _ in made])), torch.from_numpy(np.stack([chw(b) for _, b in made])))


def skimage_psnr(x: torch.Tensor, y: torch.Tensor, data_range: float) -> np.ndarray:
    return np.array([peak_signal_noise_ratio(a.numpy(), b.numpy(), data_range=data_range) for a, b in zip(x, y)])


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want) / np.abs(want)))


@pytest.mark.parametrize("name, height, width, mode", [("astronaut", 301, 257, "RGB"), ("camera", 256, 256, "L"),
                                                        ("coffee", 199, 400, "RGB"), ("chelsea", 120, 451, "RGB")])
def test_uint8_photos_equal_scikit_image(name: str, height: int, width: int, mode: str) -> None:
    x, y = real_pairs(name, height, width, mode)
    want = skimage_psnr(x, y, 255.0)
    got64, got32 = psnr(x, y, precision="fp64").numpy(), psnr(x, y).numpy()
    assert got64.dtype == np.float64 and got32.dtype == np.float32
    assert rel(got64, want) <= FP64_RTOL, got64 - want
    assert rel(got32, want) <= FP32_RTOL, got32 - want
    assert want.min() < 25 < 35 < want.max()  # from bad to good


def test_per_channel_equals_scikit_image_per_channel() -> None:
    x, y = real_pairs("astronaut", 200, 210, top=100, left=50)
    got = psnr(x, y, per_channel=True, precision="fp64").numpy()
    want = np.array([[peak_signal_noise_ratio(a[c].numpy(), b[c].numpy(), data_range=255) for c in range(3)]
                     for a, b in zip(x, y)])
    assert rel(got, want) <= FP64_RTOL
    assert np.ptp(want, axis=1).max() > 0.1  # channels differ: a mix-up would show


@pytest.mark.parametrize("dtype, scale, data_range", [(torch.uint16, 257, None), (torch.float32, 1 / 255, 1.0),
                                                       (torch.float64, 1.0, 255.0), (torch.float16, 1 / 255, 1.0)])
def test_other_dtypes_with_their_ranges(dtype: torch.dtype, scale: float, data_range) -> None:
    x, y = real_pairs("chelsea", 97, 131)
    xs, ys = (t.double() * scale for t in (x, y))
    xs, ys = xs.to(dtype), ys.to(dtype)
    reference_range = 65535.0 if dtype == torch.uint16 else data_range
    want = np.array([peak_signal_noise_ratio(a.double().numpy(), b.double().numpy(), data_range=reference_range)
                     for a, b in zip(xs, ys)])
    assert rel(psnr(xs, ys, data_range=data_range, precision="fp64").numpy(), want) <= FP64_RTOL
    assert rel(psnr(xs, ys, data_range=data_range).numpy(), want) <= FP32_RTOL


def test_identical_images_are_infinite_never_nan() -> None:
    x, y = real_pairs("coffee", 64, 80)
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    y = y.clone()
    y[:, 1] = x[:, 1]  # one channel identical
    per_channel = psnr(x, y, per_channel=True, precision="fp64")
    assert torch.isinf(per_channel[:, 1]).all() and torch.isfinite(per_channel[:, [0, 2]]).all()
    assert torch.isfinite(psnr(x, y)).all()
    assert not torch.isnan(psnr(x.float(), x.float(), data_range=255.0)).any()


def test_crop_border_equals_scikit_image_on_the_cropped_images() -> None:
    x, y = real_pairs("astronaut", 128, 136)
    want = skimage_psnr(x[..., 4:-4, 4:-4], y[..., 4:-4, 4:-4], 255.0)
    assert rel(psnr(x, y, crop_border=4, precision="fp64").numpy(), want) <= FP64_RTOL
    with pytest.raises(ValueError, match="at least one pixel after crop_border=68"):
        psnr(x, y, crop_border=68)


def test_psnr_is_formed_from_the_per_channel_mse_bitwise() -> None:
    """What a job computes once (per-channel MSE) gives psnr()'s own bits, overall and per channel."""
    x, y = real_pairs("rocket", 90, 111)
    for precision in ("fp32", "fp64"):
        per_channel = mse(x, y, per_channel=True, precision=precision)
        assert torch.equal(psnr(x, y, precision=precision), psnr_from_mse(mean_over_channels(per_channel), 255.0))
        assert torch.equal(psnr(x, y, per_channel=True, precision=precision), psnr_from_mse(per_channel, 255.0))
        assert torch.equal(mse(x, y, precision=precision), mean_over_channels(per_channel))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_batch_invariance_bitwise(dtype: torch.dtype) -> None:
    x, y = real_pairs("astronaut", 75, 93, top=200, left=200)
    if dtype == torch.float32:  # float pixels: squares round, so summation order would show
        x, y = x.float() / 255 + 1e-3, y.float() / 255
    options = dict(data_range=1.0 if dtype == torch.float32 else None, per_channel=True)
    want = torch.cat([psnr(x[i : i + 1], y[i : i + 1], **options) for i in range(len(x))])
    for size in (2, 3, 7, len(x)):
        got = torch.cat([psnr(x[i : i + size], y[i : i + size], **options) for i in range(0, len(x), size)])
        assert torch.equal(got, want), size
    order = torch.from_numpy(np.random.default_rng(1).permutation(len(x)))
    assert torch.equal(psnr(x[order], y[order], **options), want[order])
    other_x, other_y = real_pairs("coffee", 40, 301)
    if dtype == torch.float32:
        other_x, other_y = other_x.float() / 255, other_y.float() / 255
    xs, ys = [x[0], other_x[0], x[1]], [y[0], other_y[0], y[1]]
    ragged = psnr(xs, ys, **options)
    assert torch.equal(ragged[[0, 2]], want[:2])
    assert torch.equal(ragged[1], psnr(other_x[0], other_y[0], **options))


def test_amp_and_autocast_change_nothing() -> None:
    x, y = real_pairs("chelsea", 64, 64)
    want = psnr(x, y)
    assert torch.equal(psnr(x, y, precision="amp"), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(psnr(x, y), want)


@pytest.mark.parametrize("bad, error, message", [
    ({"data_range": 0}, ValueError, "data_range"), ({"precision": "fp8"}, ValueError, "precision"),
    ({"per_channel": "yes"}, TypeError, "per_channel"), ({"crop_border": 1.5}, TypeError, "crop_border"),
])
def test_bad_options_say_what_was_expected(bad: dict, error: type, message: str) -> None:
    x = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(error, match=message):
        psnr(x, x, **bad)


def test_input_rules_are_ssims() -> None:
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="data_range is required"):
        psnr(x, x)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[..., :7], data_range=1.0)
    with pytest.raises(TypeError, match="dtype int32"):
        psnr(x.int(), x.int(), data_range=1.0)
    y = x.clone()
    y[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"y must be finite, got NaN or inf in batch item\(s\) \[1\]"):
        psnr(x, y, data_range=1.0)


@pytest.mark.parametrize("policy", ["never", "always"])
@pytest.mark.parametrize("dtype, precision, scale", [(torch.uint8, "fp32", 1), (torch.uint8, "fp64", 1),
                                                     (torch.uint16, "fp64", 257)])
def test_integer_sum_path_equals_float_pairwise_path_bitwise(dtype: torch.dtype, precision: str, scale: int,
                                                             policy: str) -> None:
    """Integer pixels whose squared errors are exact take an int64 sum (eager) or a fused float64 loop
    (compiled); the float pairwise path on the same values (a float copy) must give the same bits, crop
    included: all three are the exact integer sum."""
    x, y = real_pairs("astronaut", 203, 171, top=9, left=13)
    x, y = (x.to(torch.int64) * scale).to(dtype), (y.to(torch.int64) * scale).to(dtype)
    wide = torch.float64 if precision == "fp64" else torch.float32
    for crop in (0, 4):
        got = mse(x, y, per_channel=True, precision=precision, crop_border=crop, compile=policy)
        want = mse(x.to(wide), y.to(wide), per_channel=True, precision=precision, crop_border=crop)
        assert torch.equal(got, want)
