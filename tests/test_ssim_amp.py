"""precision='amp' keeps the value: moments and formula in fp32 whatever the caller's autocast or matmul
precision, never NaN/inf for finite input.

Pairs are near-identical real photos (JPEG at quality >= 90, Gaussian noise sigma <= 2): that is where
half-precision moments fail (E[x^2] - mu^2 cancels to nothing) and where a real audit lives. Identical
pairs give exactly 1 in any precision and would prove nothing. Tolerance 1e-4 against fp64: the issue's
bound; fp32 moments measure ~1e-7 here.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from ssim_ray import ssim


def near_identical_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Six (reference, distorted) 3 x 256 x 256 crops: JPEG q90/q95 and noise sigma 1/2, uint8."""
    rng = np.random.default_rng(90)
    refs, dists = [], []
    for photo in (data.astronaut(), data.chelsea(), data.coffee()):
        crop = photo[:256, :256]
        for kind in ("jpeg", "noise"):
            if kind == "jpeg":
                buf = io.BytesIO()
                Image.fromarray(crop).save(buf, format="JPEG", quality=int(rng.choice([90, 95])))
                dist = np.array(Image.open(io.BytesIO(buf.getvalue())))
            else:
                sigma = float(rng.choice([1.0, 2.0]))
                dist = np.clip(np.rint(crop + rng.normal(0, sigma, crop.shape)), 0, 255).astype(np.uint8)
            refs.append(crop.transpose(2, 0, 1))
            dists.append(dist.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(refs)), torch.from_numpy(np.stack(dists))


@pytest.fixture(scope="module")
def pairs() -> tuple[torch.Tensor, torch.Tensor]:
    return near_identical_pairs()


@pytest.mark.parametrize("dtype, data_range", [(torch.uint8, None), (torch.float16, 255.0),
                                               (torch.bfloat16, 255.0), (torch.float32, 255.0)])
def test_amp_within_1e4_of_fp64_on_near_identical_real_pairs(pairs, dtype: torch.dtype, data_range) -> None:
    x, y = (t.to(dtype) for t in pairs)
    want = ssim(x, y, data_range=data_range, precision="fp64")
    assert float(want.min()) > 0.9  # near-identical indeed, where half-precision moments go wrong
    assert float(want.max()) < 0.9999  # but not identical
    got = ssim(x, y, data_range=data_range, precision="amp")
    assert got.dtype == torch.float32
    assert float((got.double() - want).abs().max()) <= 1e-4


def test_amp_in_unit_range_float_input(pairs) -> None:
    """The same pairs scaled to [0, 1] floats with data_range=1: the range does not matter to the precision."""
    x, y = (t.float() / 255 for t in pairs)
    want = ssim(x.double(), y.double(), data_range=1.0, precision="fp64")
    got = ssim(x, y, data_range=1.0, precision="amp")
    assert float((got.double() - want).abs().max()) <= 1e-4


@pytest.mark.parametrize("precision", ["amp", "fp32", "fp64"])
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_surrounding_autocast_changes_nothing(pairs, precision: str, autocast_dtype: torch.dtype) -> None:
    x, y = pairs
    plain = ssim(x, y, per_channel=True, precision=precision)
    with torch.autocast("cpu", dtype=autocast_dtype):
        inside = ssim(x, y, per_channel=True, precision=precision)
        _, inside_map = ssim(x[:1], y[:1], precision=precision, return_map=True)
    assert torch.equal(inside, plain)
    assert inside_map.dtype == (torch.float64 if precision == "fp64" else torch.float32)


def test_matmul_precision_and_tf32_flags_change_nothing(pairs) -> None:
    """No matmul or convolution inside: reduced-precision matmul settings have nothing to act on."""
    x, y = pairs
    plain = ssim(x, y, per_channel=True, precision="amp")
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("medium")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        assert torch.equal(ssim(x, y, per_channel=True, precision="amp"), plain)
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[1], before[2]


def _extreme_cases() -> list:
    """Finite inputs that break half-precision or E[x^2] - mu^2 implementations."""
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2
    ramp = torch.arange(64 * 64, dtype=torch.float64).reshape(64, 64)
    return [
        ("uint16 full-range checkerboard vs its inverse", (checker * 65535).to(torch.uint16), ((1 - checker) * 65535).to(torch.uint16), None),
        ("uint16 white vs nearly white", torch.full((64, 64), 65535).to(torch.uint16), torch.full((64, 64), 65534).to(torch.uint16), None),
        ("black vs white uint8", torch.zeros(64, 64, dtype=torch.uint8), torch.full((64, 64), 255, dtype=torch.uint8), None),
        ("flat bright vs flat bright + 1", torch.full((64, 64), 250.0), torch.full((64, 64), 251.0), 255.0),
        ("fp16 values near fp16 max", torch.full((64, 64), 65504.0).half(), (checker * 65504.0).half(), 65504.0),
        ("tiny range 1e-3", (ramp % 7) * 1e-4, (ramp % 5) * 1e-4, 1e-3),
        ("values far outside the range", ramp * 1e6, ramp.flip(0) * 1e6, 1.0),
    ]


@pytest.mark.parametrize("precision", ["amp", "fp32"])
@pytest.mark.parametrize("case", _extreme_cases(), ids=lambda c: c[0])
def test_finite_input_never_gives_nan_or_inf(case, precision: str) -> None:
    _, x, y, data_range = case
    score, ssim_map = ssim(x, y, data_range=data_range, precision=precision, return_map=True)
    assert torch.isfinite(ssim_map).all()
    assert -1.0 <= float(score) <= 1.0
    assert float(ssim_map.max()) <= 1.0 and float(ssim_map.min()) >= -1.0


def naive_half_precision_ssim(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What peers do under autocast: E[x^2] - mu^2 with a Gaussian conv, all in `dtype` (here only as a foil)."""
    r = torch.arange(11, dtype=torch.float64) - 5
    w = torch.exp(-r * r / 4.5)
    w = (w / w.sum()).to(dtype)
    win = (w[:, None] * w[None, :]).expand(x.shape[1], 1, 11, 11).contiguous()
    x, y = x.to(dtype) / 255, y.to(dtype) / 255

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, win, groups=x.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    m = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return m.double().mean(dim=(1, 2, 3))


def test_the_bound_catches_half_precision_moments(pairs) -> None:
    """The 1e-4 bound above is not loose: half-precision moments miss it by orders of magnitude."""
    x, y = pairs
    want = ssim(x, y, precision="fp64")
    naive = naive_half_precision_ssim(x, y, torch.bfloat16)
    assert float((naive.double() - want).abs().max()) > 1e-2
    assert float((naive_half_precision_ssim(x, y, torch.float64).double() - want).abs().max()) < 1e-10  # foil is right in fp64
