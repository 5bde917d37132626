"""Properties of SSIM that hold for any input: symmetry (bitwise), ssim(x, x) == 1 exactly, bounded by 1
in absolute value, range scaling, and the shapes of scores and maps. Hypothesis draws sizes, channels,
dtypes and pixel statistics; max_examples is kept small because every example runs the real kernel."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssim_ray import ssim

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def image_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """A pair with structure in common and apart: shared smooth field + independent noise of drawn sizes."""
    n, c = draw(st.integers(1, 3)), draw(st.sampled_from([1, 3, 4]))
    h, w = draw(st.integers(11, 48)), draw(st.integers(11, 48))
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from([torch.uint8, torch.uint16, torch.float32]))
    common, noise = draw(st.floats(0.0, 1.0)), draw(st.floats(0.0, 0.5))
    rng = np.random.default_rng(seed)
    field = np.cumsum(np.cumsum(rng.normal(size=(n, c, h, w)), axis=2), axis=3)
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    x = np.clip(common * field + noise * rng.uniform(size=field.shape), 0, 1)
    y = np.clip(common * field + noise * rng.uniform(size=field.shape), 0, 1)
    if dtype == torch.float32:
        return torch.from_numpy(x).float(), torch.from_numpy(y).float(), 1.0
    top = 255 if dtype == torch.uint8 else 65535
    cast = lambda a: torch.from_numpy(np.rint(a * top).astype(np.int32)).to(dtype)  # noqa: E731
    return cast(x), cast(y), None


@SETTINGS
@given(image_pairs())
def test_symmetric_bitwise(pair) -> None:
    x, y, data_range = pair
    assert torch.equal(ssim(x, y, data_range=data_range, per_channel=True),
                       ssim(y, x, data_range=data_range, per_channel=True))


@SETTINGS
@given(image_pairs())
def test_identity_is_exactly_one(pair) -> None:
    x, _, data_range = pair
    for precision in ("fp32", "fp64", "amp"):
        scores, ssim_map = ssim(x, x, data_range=data_range, per_channel=True, return_map=True, precision=precision)
        assert bool((scores == 1).all()) and bool((ssim_map == 1).all())


@SETTINGS
@given(image_pairs())
def test_bounded_by_one(pair) -> None:
    x, y, data_range = pair
    scores, ssim_map = ssim(x, y, data_range=data_range, per_channel=True, return_map=True)
    assert bool((ssim_map.abs() <= 1).all()) and bool((scores.abs() <= 1).all())
    assert bool(torch.isfinite(scores).all())


@SETTINGS
@given(image_pairs(), st.sampled_from([0.5, 3.0, 1000.0]))
def test_scaling_pixels_and_range_together_keeps_the_score(pair, factor: float) -> None:
    """C1, C2 scale with L^2 like the moments: only rounding differs (fp64 here, so 1e-12)."""
    x, y, data_range = pair
    data_range = data_range or float(torch.iinfo(x.dtype).max)
    base = ssim(x.double(), y.double(), data_range=data_range, precision="fp64")
    scaled = ssim(x.double() * factor, y.double() * factor, data_range=data_range * factor, precision="fp64")
    assert float((base - scaled).abs().max()) <= 1e-12


@SETTINGS
@given(image_pairs())
def test_shapes_of_scores_and_maps(pair) -> None:
    x, y, data_range = pair
    n, c, h, w = x.shape
    scores, maps = ssim(x, y, data_range=data_range, return_map=True)
    assert scores.shape == (n,) and maps.shape == (n, c, h - 10, w - 10)
    assert ssim(x, y, data_range=data_range, per_channel=True).shape == (n, c)
    assert ssim(x[0], y[0], data_range=data_range).shape == ()
    assert ssim(x[0], y[0], data_range=data_range, per_channel=True).shape == (c,)
    assert ssim(x[0, 0], y[0, 0], data_range=data_range, return_map=True)[1].shape == (h - 10, w - 10)
    ragged_scores, ragged_maps = ssim(list(x), list(y), data_range=data_range, return_map=True)
    assert torch.equal(ragged_scores, scores) and all(torch.equal(a, b) for a, b in zip(ragged_maps, maps))


def test_dissimilar_pairs_score_low_and_similar_high() -> None:
    """The sign of the metric: a photo against noise is near 0, against itself plus mild noise near 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 64, 64, generator=g)
    assert abs(float(ssim(x, torch.rand(1, 1, 64, 64, generator=g), data_range=1.0))) < 0.05
    assert float(ssim(x, (x + 0.01 * torch.rand(1, 1, 64, 64, generator=g)).clamp(0, 1), data_range=1.0)) > 0.95


def test_empty_batch_gives_empty_scores_and_maps() -> None:
    x = torch.zeros(0, 3, 40, 50, dtype=torch.uint8)
    scores, maps = ssim(x, x, return_map=True)
    assert scores.shape == (0,) and scores.dtype == torch.float32
    assert maps.shape == (0, 3, 30, 40)
    assert ssim(x, x, per_channel=True, precision="fp64").shape == (0, 3)
