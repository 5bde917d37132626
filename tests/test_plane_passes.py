"""The plane passes (`ssim_ray.metric.plane_passes`): compiled and eager give the definition's bits.

MS-SSIM's between-scale halving must equal `wang_downsample(x.to(dtype), 2)` (imfilter 'symmetric' then every
second pixel) to the bit in every dtype, on odd and even sides, one-pixel sides included; PSNR's fused
squared-error sums must equal the int64 sums on uint8 and uint16 planes, crops (strided views) included.
Real photographs with real distortions (JPEG, noise, SR-style bicubic down-and-up).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_impls import chw, photo_pair

from ssim_ray.metric import ms_ssim_terms_and_ssim, mse
from ssim_ray.metric.plane_passes import exact_square_error_sums, halve
from ssim_ray.metric.window import wang_downsample

POLICIES = ["never", "always"]


def photos(height: int, width: int, *, top: int = 0, left: int = 0) -> tuple:
    made = [photo_pair("astronaut", height, width, kind, level, top=top, left=left, seed=i)
            for i, (kind, level) in enumerate([("jpeg", 20), ("noise", 9), ("sr", 2)])]
    x = torch.from_numpy(np.stack([chw(a) for a, _ in made]))
    y = torch.from_numpy(np.stack([chw(b) for _, b in made]))
    return x, y


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("height, width", [(96, 64), (181, 177), (64, 33), (33, 64), (1, 7), (7, 1), (2, 2), (1, 1)])
def test_halve_is_wang_downsample_bitwise(height: int, width: int, policy: str) -> None:
    x, _ = photos(max(height, 16), max(width, 16), top=40, left=60)
    x = x[..., :height, :width]
    cases = {torch.uint8: x, torch.uint16: x.to(torch.int32).mul(257).to(torch.uint16),
             torch.float32: x.float() / 255 + 1e-3, torch.float16: (x.float() / 255).half()}
    for in_dtype, images in cases.items():
        for dtype in (torch.float32, torch.float64):
            want = wang_downsample(images.to(dtype), 2)
            got = halve(images, dtype, policy=policy)
            assert got.dtype == dtype and got.shape == want.shape == (3, 3, -(-height // 2), -(-width // 2))
            assert torch.equal(got, want), (in_dtype, dtype)


def test_halve_averages_an_odd_sides_last_row_with_itself() -> None:
    """'symmetric' mirroring repeats the edge pixel: the last output of an odd side is its row's pair mean."""
    x = torch.arange(15, dtype=torch.uint8).reshape(1, 1, 3, 5)
    got = halve(x, torch.float32, policy="never")[0, 0]
    assert got.tolist() == [[3.0, 5.0, 6.5], [10.5, 12.5, 14.0]]


@pytest.mark.parametrize("dtype, scale", [(torch.uint8, 1), (torch.uint16, 257)])
def test_fused_square_error_sums_equal_the_integer_sums(dtype: torch.dtype, scale: int) -> None:
    x, y = photos(203, 171, top=9, left=13)
    x, y = (x.to(torch.int64) * scale).to(dtype), (y.to(torch.int64) * scale).to(dtype)
    xp, yp = x.reshape(-1, 203, 171), y.reshape(-1, 203, 171)
    for crop in (0, 5, 85):  # 85 leaves a 1-pixel-wide strip: the eager pass takes it
        kept = (slice(None), slice(crop, 203 - crop), slice(crop, 171 - crop))
        want = (xp[kept].to(torch.int64) - yp[kept].to(torch.int64)).pow(2).sum(dim=(-2, -1)).to(torch.float64)
        for policy in POLICIES:
            assert torch.equal(exact_square_error_sums(xp, yp, crop=crop, policy=policy), want), (crop, policy)
    strided = xp[:, ::2], yp[:, ::2]  # another layout: the compiled kernel gets a contiguous copy
    want = (strided[0].to(torch.int64) - strided[1].to(torch.int64)).pow(2).sum(dim=(-2, -1)).to(torch.float64)
    assert torch.equal(exact_square_error_sums(*strided, crop=0, policy="always"), want)


def test_compiled_and_eager_give_the_same_bits_in_a_batch_split_over_threads() -> None:
    """Two torch threads share the planes of a batch between pool threads: the values stay the pairs' own."""
    x, y = photos(181, 199, top=3, left=11)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        threaded = (mse(x, y, per_channel=True, compile="always"),
                    ms_ssim_terms_and_ssim(x, y, compile="always"))
        torch.set_num_threads(1)
        single = (mse(x, y, per_channel=True, compile="never"), ms_ssim_terms_and_ssim(x, y, compile="never"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(threaded[0], single[0])
    assert all(torch.equal(a, b) for a, b in zip(threaded[1], single[1]))
