"""The plane passes (`ssim_ray.metric.plane_passes`): compiled (C) and eager give the definition's bits.

MS-SSIM's between-scale halving (C or numpy on CPU, split among threads; torch elsewhere) must equal
`wang_downsample(x.to(dtype), 2)` (imfilter 'symmetric' then every second pixel) to the bit in every dtype,
on odd and even sides, one-pixel sides included, strided views included; PSNR's squared-error sums must equal
the int64 sums on uint8 and uint16 planes, crops, strided views and views at any byte offset included.
Real photographs with real distortions (JPEG, noise, SR-style bicubic down-and-up).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_impls import chw, photo_pair

from ssim_ray.metric import ms_ssim_terms_and_ssim, mse
from ssim_ray.metric.plane_passes import exact_square_error_sums, halve, halve_pair, halve_pyramid
from ssim_ray.metric.window import wang_downsample

POLICIES = ["never", "always"]


def photos(height: int, width: int, *, top: int = 0, left: int = 0) -> tuple:
    made = [photo_pair("astronaut", height, width, kind, level, top=top, left=left, seed=i)
            for i, (kind, level) in enumerate([("jpeg", 20), ("noise", 9), ("sr", 2)])]
    x = torch.from_numpy(np.stack([chw(a) for a, _ in made]))
    y = torch.from_numpy(np.stack([chw(b) for _, b in made]))
    return x, y


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("height, width", [(96, 64), (181, 177), (64, 33), (33, 64), (1, 7), (7, 1), (2, 2), (1, 1)])
def test_halve_is_wang_downsample_bitwise(height: int, width: int, policy: str, threads: int) -> None:
    x, _ = photos(max(height, 16), max(width, 16), top=40, left=60)
    x = x[..., :height, :width]  # a strided view of bigger planes
    cases = {torch.uint8: x, torch.uint16: x.to(torch.int32).mul(257).to(torch.uint16),
             torch.float32: x.float() / 255 + 1e-3, torch.float16: (x.float() / 255).half(),
             torch.bfloat16: (x.float() / 255).bfloat16(), torch.float64: x.double() / 255 + 1e-3}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for in_dtype, images in cases.items():
            for dtype in (torch.float32, torch.float64):
                want = wang_downsample(images.to(dtype), 2)
                column_major = images.transpose(-2, -1).contiguous().transpose(-2, -1)
                got, other = halve_pair(images, column_major, dtype, policy=policy)
                assert got.dtype == dtype and got.shape == want.shape == (3, 3, -(-height // 2), -(-width // 2))
                assert torch.equal(got, want), (in_dtype, dtype)
                assert torch.equal(other, want), (in_dtype, dtype)  # the same pixels, column-major
                assert torch.equal(halve(images, dtype, policy=policy), want), (in_dtype, dtype)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("height, width", [(96, 64), (64, 36), (4, 8), (2, 4), (64, 34)])
def test_integer_halving_is_wang_downsample_bitwise(height: int, width: int, policy: str, threads: int) -> None:
    """uint8 and uint16 planes: the same bits as the definition, for views, planes that start at an odd byte
    offset, and the largest sums."""
    x, _ = photos(max(height, 16), max(width, 16), top=17, left=29)
    x = x[..., :height, :width]
    flat = torch.cat([torch.zeros(3, dtype=torch.uint8), x.flatten()])[3:].view(x.shape)  # starts mid-word
    white = torch.full((2, 3, height, width), 255, dtype=torch.uint8)
    cases = [x, flat, white, x.to(torch.int32).mul(257).to(torch.uint16), white.to(torch.int32).mul(257).to(torch.uint16),
             (x.to(torch.int32) * 251 + 3).to(torch.uint16)[:, :, :, :]]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for images in cases:
            for dtype in (torch.float32, torch.float64):
                want = wang_downsample(images.to(dtype), 2)
                got, other = halve_pair(images, images.flip(0), dtype, policy=policy)
                assert got.dtype == dtype and torch.equal(got, want), (images.dtype, dtype, policy)
                assert torch.equal(other, want.flip(0)), (images.dtype, dtype, policy)
                assert torch.equal(halve(images, dtype, policy=policy), want), (images.dtype, dtype, policy)
    finally:
        torch.set_num_threads(before)


def test_halve_of_a_batch_large_enough_for_the_pool_is_each_planes_own() -> None:
    """Big enough to be split among two threads: every plane's halving is the one it gets alone."""
    x, y = photos(256, 200)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = halve_pair(x.float() / 7, y, torch.float32)
    finally:
        torch.set_num_threads(before)
    for i in range(x.shape[0]):
        assert torch.equal(got[0][i], wang_downsample((x[i : i + 1].float() / 7), 2)[0])
        assert torch.equal(got[1][i], wang_downsample(y[i : i + 1].float(), 2)[0])


def test_halve_averages_an_odd_sides_last_row_with_itself() -> None:
    """'symmetric' mirroring repeats the edge pixel: the last output of an odd side is its row's pair mean."""
    x = torch.arange(15, dtype=torch.uint8).reshape(1, 1, 3, 5)
    got = halve(x, torch.float32)[0, 0]
    assert got.tolist() == [[3.0, 5.0, 6.5], [10.5, 12.5, 14.0]]


@pytest.mark.parametrize("dtype, scale", [(torch.uint8, 1), (torch.uint16, 257)])
def test_compiled_square_error_sums_equal_the_integer_sums(dtype: torch.dtype, scale: int) -> None:
    x, y = photos(203, 171, top=9, left=13)
    x, y = (x.to(torch.int64) * scale).to(dtype), (y.to(torch.int64) * scale).to(dtype)
    xp, yp = x.reshape(-1, 203, 171), y.reshape(-1, 203, 171)
    for crop in (0, 5, 85):  # 85 leaves a 1-pixel-wide strip: the eager pass takes it
        kept = (slice(None), slice(crop, 203 - crop), slice(crop, 171 - crop))
        want = (xp[kept].to(torch.int64) - yp[kept].to(torch.int64)).pow(2).sum(dim=(-2, -1)).to(torch.float64)
        for policy in POLICIES:
            assert torch.equal(exact_square_error_sums(xp, yp, crop=crop, policy=policy), want), (crop, policy)
    strided = xp[:, ::2], yp[:, ::2]  # another layout: every second row
    want = (strided[0].to(torch.int64) - strided[1].to(torch.int64)).pow(2).sum(dim=(-2, -1)).to(torch.float64)
    assert torch.equal(exact_square_error_sums(*strided, crop=0, policy="always"), want)


@pytest.mark.parametrize("policy", POLICIES)
def test_uint8_square_error_sums_of_crops_offsets_and_extremes(policy: str) -> None:
    """Crops, planes whose tensor starts at an odd byte offset, and every difference at its largest."""
    x, y = photos(200, 172, top=21, left=5)
    xp, yp = x.reshape(-1, 200, 172), y.reshape(-1, 200, 172)
    for crop in (0, 2, 3):  # 3 keeps 194 x 166 = 32204 pixels, a multiple of 4; 2 keeps 196 x 168
        kept = (slice(None), slice(crop, 200 - crop), slice(crop, 172 - crop))
        want = (xp[kept].to(torch.int64) - yp[kept].to(torch.int64)).pow(2).sum(dim=(-2, -1)).to(torch.float64)
        assert torch.equal(exact_square_error_sums(xp, yp, crop=crop, policy=policy), want), crop
    # Bytes that start one past a word: views of a flat buffer at offset 1.
    flat_x = torch.cat([torch.zeros(1, dtype=torch.uint8), xp.flatten()])[1:].view(xp.shape)
    flat_y = torch.cat([torch.zeros(3, dtype=torch.uint8), yp.flatten()])[3:].view(yp.shape)
    assert flat_x.storage_offset() % 4 and flat_y.storage_offset() % 4
    want = (xp.to(torch.int64) - yp.to(torch.int64)).pow(2).sum(dim=(-2, -1)).to(torch.float64)
    assert torch.equal(exact_square_error_sums(flat_x, flat_y, crop=0, policy=policy), want)
    # The extremes: every difference 255 (the C kernel's int32 partial sums at their largest).
    white, black = torch.full((4, 64, 64), 255, dtype=torch.uint8), torch.zeros((4, 64, 64), dtype=torch.uint8)
    assert exact_square_error_sums(white, black, crop=0, policy=policy).tolist() == [255.0**2 * 4096] * 4


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


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("policy", POLICIES)
def test_halve_pyramid_is_wang_downsample_again_and_again(policy: str, threads: int) -> None:
    """MS-SSIM's four halvings in one go (in C: each plane's whole pyramid in one call): level l has the bits of
    wang_downsample applied l times, for every pixel dtype, odd sides at several levels, x and y apart."""
    x, y = photos(181, 177, top=3, left=11)
    cases = {torch.uint8: (x, y), torch.uint16: (x.to(torch.int32).mul(257).to(torch.uint16), y.to(torch.int32).mul(257).to(torch.uint16)),
             torch.float16: ((x.float() / 255).half(), (y.float() / 255).half()),
             torch.bfloat16: ((x.float() / 255).bfloat16(), (y.float() / 255).bfloat16()),
             torch.float32: (x.float() / 7, y.float() / 7), torch.float64: (x.double() / 7, y.double() / 7)}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for in_dtype, (xs, ys) in cases.items():
            for dtype in (torch.float32, torch.float64):
                got = halve_pyramid(xs, ys, dtype, 4, policy=policy)
                want_x, want_y = xs.to(dtype), ys.to(dtype)
                assert len(got) == 4
                for level, (gx, gy) in enumerate(got):
                    want_x, want_y = wang_downsample(want_x, 2), wang_downsample(want_y, 2)
                    assert gx.dtype == dtype and torch.equal(gx, want_x), (in_dtype, dtype, level)
                    assert torch.equal(gy, want_y), (in_dtype, dtype, level)
                assert got[-1][0].shape[-2:] == (12, 12)  # 181 -> 91 -> 46 -> 23 -> 12
                assert halve_pyramid(xs, ys, dtype, 0, policy=policy) == []
    finally:
        torch.set_num_threads(before)
