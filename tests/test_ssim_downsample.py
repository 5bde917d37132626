"""downsample='wang' against a direct numpy transcription of the later MATLAB ssim.m (2009):

    f = max(1, round(min(M, N) / 256));            % MATLAB round: halves away from zero
    lpf = ones(f, f) / f^2;
    img = imfilter(img, lpf, 'symmetric', 'same');  % origin floor((f + 1) / 2), edge pixel repeated
    img = img(1:f:end, 1:f:end);

then scikit-image (Wang's settings) on the transcription's output. Sizes cover f = 1, 2, 3, 4, sides that
are not multiples of f (the bottom/right mirror matters), and the min sides 640, 1152 and 1664 where
Python's round() picks 2, 4, 6 but MATLAB's picks 3, 5, 7.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from skimage.metrics import structural_similarity

from ssim_ray import ssim
from ssim_ray.metric import output_size, wang_downsample_factor
from ssim_ray.metric.window import matlab_round


def matlab_ssim_m_downsample(img: np.ndarray, f: int) -> np.ndarray:
    """imfilter(img, ones(f)/f^2, 'symmetric', 'same') then img(1:f:end, 1:f:end), on one 2-D plane."""
    origin = (f + 1) // 2  # MATLAB's centre of an f x f kernel, 1-based
    padded = np.pad(img.astype(np.float64), ((origin - 1, f - origin), (origin - 1, f - origin)), mode="symmetric")
    height, width = img.shape
    filtered = np.zeros((height, width))
    for k in range(f):
        for l in range(f):
            filtered += padded[k : k + height, l : l + width] / (f * f)
    return filtered[::f, ::f]


def reference_after_downsample(x: np.ndarray, y: np.ndarray, f: int) -> float:
    """(C, H, W) pair -> transcription per channel -> skimage with Wang's settings, L = 255."""
    xd = np.stack([matlab_ssim_m_downsample(c, f) for c in x])
    yd = np.stack([matlab_ssim_m_downsample(c, f) for c in y])
    return float(structural_similarity(xd, yd, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                       data_range=255.0, channel_axis=0))


def photo_pair(height: int, width: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A real photo resized to (height, width) and its JPEG-compressed, noisy copy, (C, H, W) uint8."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.BICUBIC)
    img = img if channels == 3 else img.convert("L")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=40)
    dist = np.array(Image.open(io.BytesIO(buf.getvalue()))).astype(np.float64)
    dist = np.clip(np.rint(dist + rng.normal(0, 4, dist.shape)), 0, 255).astype(np.uint8)
    ref = np.array(img)
    if channels == 1:
        return ref[None], dist[None]
    return ref.transpose(2, 0, 1).copy(), dist.transpose(2, 0, 1).copy()


@pytest.mark.parametrize(
    "side, want_f, python_f",
    [(383, 1, 1), (384, 2, 2), (640, 3, 2), (896, 4, 4), (1152, 5, 4), (1664, 7, 6), (2944, 12, 12)],
)
def test_factor_uses_matlab_rounding(side: int, want_f: int, python_f: int) -> None:
    assert round(side / 256) == python_f  # Python's banker's rounding, what peers use
    assert wang_downsample_factor(side, side + 100) == want_f
    assert wang_downsample_factor(side + 100, side) == want_f
    assert output_size(side, side + 1, downsample="wang") == (-(-side // want_f), -(-(side + 1) // want_f))


def test_matlab_round_rounds_halves_away_from_zero() -> None:
    assert [matlab_round(v) for v in (0.5, 1.5, 2.5, -2.5, 2.4999, 3.0)] == [1, 2, 3, -3, 2, 3]


@pytest.mark.parametrize(
    "height, width, channels",
    [
        (300, 333, 3),  # f = 1: unchanged
        (512, 517, 1),  # f = 2
        (770, 800, 3),  # f = 3, 770 = 3 * 256 + 2: the last sample's box reaches the mirrored edge
        (1030, 1043, 1),  # f = 4, neither side a multiple of 4
        (640, 661, 1),  # Python would say f = 2
        (1152, 1160, 1),  # Python would say f = 4
    ],
)
def test_matches_transcription_of_ssim_m(height: int, width: int, channels: int) -> None:
    x, y = photo_pair(height, width, channels, seed=height)
    f = wang_downsample_factor(height, width)
    want = reference_after_downsample(x, y, f)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    got64 = float(ssim(xt, yt, downsample="wang", precision="fp64"))
    got32 = float(ssim(xt, yt, downsample="wang"))
    assert abs(got64 - want) <= 1e-10, (f, got64, want)
    assert abs(got32 - want) <= 1e-6, (f, got32, want)
    if f > 1:  # and downsampling really happened: the full-resolution score is a different number
        assert abs(float(ssim(xt, yt, precision="fp64")) - want) > 1e-3


@pytest.mark.slow
def test_matches_transcription_at_min_side_1664() -> None:
    """f = 7 (MATLAB) where Python's round() gives 6."""
    x, y = photo_pair(1664, 1701, 1, seed=1664)
    want = reference_after_downsample(x, y, 7)
    assert abs(float(ssim(torch.from_numpy(x), torch.from_numpy(y), downsample="wang", precision="fp64")) - want) <= 1e-10


def test_is_not_the_avg_pool_shortcut() -> None:
    """Peers use avg_pool2d(f): shifted one pixel for odd f >= 3; ssim.m's origin is not where avg_pool puts it."""
    x, y = photo_pair(770, 800, 1, seed=3)
    xt, yt = torch.from_numpy(x).double()[None], torch.from_numpy(y).double()[None]
    pooled = ssim(torch.nn.functional.avg_pool2d(xt, 3), torch.nn.functional.avg_pool2d(yt, 3),
                  data_range=255.0, precision="fp64")
    ours = ssim(xt, yt, data_range=255.0, downsample="wang", precision="fp64")
    assert abs(float(ours) - reference_after_downsample(x, y, 3)) <= 1e-10
    assert abs(float(ours) - float(pooled)) > 1e-4


def test_downsampled_map_has_the_downsampled_size() -> None:
    x, y = photo_pair(640, 700, 1, seed=4)
    _, ssim_map = ssim(torch.from_numpy(x), torch.from_numpy(y), downsample="wang", return_map=True)
    assert ssim_map.shape == (1, 214 - 10, 234 - 10)


def test_downsample_keeps_batch_invariance() -> None:
    x = torch.from_numpy(np.stack([photo_pair(520, 530, 3, seed=s)[0] for s in range(3)]))
    y = torch.from_numpy(np.stack([photo_pair(520, 530, 3, seed=s)[1] for s in range(3)]))
    batched = ssim(x, y, downsample="wang", per_channel=True)
    alone = torch.cat([ssim(x[i : i + 1], y[i : i + 1], downsample="wang", per_channel=True) for i in range(3)])
    assert torch.equal(batched, alone)


@pytest.mark.parametrize("f", [1, 2, 3, 4, 5, 7])
def test_strided_box_decimation_equals_the_gather_bitwise(f: int) -> None:
    """ssim.m's box filter and decimation by strided views equals the index_select definition to the bit,
    odd sides and sides shorter than the window's mirror included (those fall back to the gather)."""
    from ssim_ray.metric.window import _box_decimate, _box_decimate_gathered

    rng = np.random.default_rng(f)
    for side in (2, 3, 5, 8, 13, 64, 181):
        img = torch.from_numpy(rng.random((2, 3, side, side + 4)) * 255).float()
        for dim in (-2, -1):
            try:
                want = _box_decimate_gathered(img, f, dim % img.dim())
            except IndexError:  # a window wider than twice the side: ssim.m's factor never asks for one
                continue
            assert torch.equal(_box_decimate(img, f, dim), want)
