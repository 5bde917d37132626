"""The report's worst-pair maps at bounded memory (issue 12, point 8): strip by strip, the same numbers.

`map_pair` never holds a pair's whole map: it computes strips of map rows (each from its image rows plus
the window's halo) and keeps the score's sums, a reduced map for display and the lowest window. What it
keeps must be what the whole map gives: the same score as `ssim()`, the same map values, the same window.
Inputs are real photographs with real distortions (JPEG, noise), so maps carry structure.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from ssim_ray.metric import ssim
from ssim_ray.report import pair_map, worst
from ssim_ray.report.pair_map import map_pair
from ssim_ray.report.worst import lowest_window

REPO = Path(__file__).resolve().parents[1]
OPTIONS = {"compile": "never", "kernel": "torch"}


def _tensor(array: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.array(array))  # a writable copy
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _jpeg_pair(photo: np.ndarray, quality: int = 25):
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=quality)
    return _tensor(photo), _tensor(np.asarray(Image.open(io.BytesIO(buffer.getvalue()))))


def _noisy_pair(photo: np.ndarray, sigma: float, seed: int):
    noisy = photo.astype(np.float64) + np.random.default_rng(seed).normal(0, sigma, photo.shape)
    return _tensor(photo), _tensor(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def _whole(ref, dist, **options):
    score, ssim_map = ssim(ref, dist, data_range=255.0, return_map=True, **{**OPTIONS, **options})
    return float(score), ssim_map.to(torch.float64).mean(dim=0).numpy()


PAIRS = {
    "camera jpeg, gray": lambda: _jpeg_pair(skimage.data.camera()[40:340, 60:460]),
    "chelsea noise, rgb": lambda: _noisy_pair(skimage.data.chelsea(), 15.0, 2064892105),
    "coffee jpeg, rgb": lambda: _jpeg_pair(skimage.data.coffee()[:210, :333], quality=10),
}


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("strip_values", [2000, 40_000, 1 << 21])  # many thin strips, a few, one
def test_strip_by_strip_gives_the_whole_maps_score_values_and_window(name, strip_values):
    ref, dist = PAIRS[name]()
    score, values = _whole(ref, dist)
    mapped = map_pair(ref, dist, data_range=255.0, options=OPTIONS, strip_values=strip_values)
    assert mapped.score == score  # the stored score, to the bit
    assert mapped.map_shape == values.shape and mapped.cell == 1
    border = 5
    framed = mapped.display[border:-border, border:-border]
    np.testing.assert_array_equal(framed, values)  # each map value as ssim() computes it
    assert np.isnan(mapped.display[:border]).all() and np.isnan(mapped.display[:, -border:]).all()
    row, col, side = mapped.window
    assert side == 64 and (row, col) == lowest_window(values, side)
    np.testing.assert_array_equal(mapped.zoom, values[row:row + side, col:col + side])


def test_a_large_map_is_shown_as_the_mean_of_each_cell():
    ref, dist = PAIRS["camera jpeg, gray"]()
    _, values = _whole(ref, dist)
    mapped = map_pair(ref, dist, data_range=255.0, options=OPTIONS, display_cells=50, strip_values=5000)
    cell = mapped.cell
    assert cell == 8 and mapped.display.shape == (-(-300 // cell), -(-400 // cell))
    framed = np.full((300, 400), np.nan)
    framed[5:-5, 5:-5] = values
    padded = np.full((mapped.display.shape[0] * cell, mapped.display.shape[1] * cell), np.nan)
    padded[:300, :400] = framed
    cells = padded.reshape(mapped.display.shape[0], cell, -1, cell)
    counts = (~np.isnan(cells)).sum(axis=(1, 3))
    expected = np.where(counts > 0, np.nansum(cells, axis=(1, 3)) / np.maximum(counts, 1), np.nan)
    np.testing.assert_allclose(mapped.display, expected, rtol=0, atol=1e-12)  # sums in another order


def test_the_downsampled_metric_is_mapped_from_one_call_with_its_own_score():
    ref, dist = _jpeg_pair(skimage.data.astronaut()[:, :, 1])  # 512 x 512: downsampled by 2 first
    score, values = _whole(ref, dist, downsample="wang")
    mapped = map_pair(ref, dist, data_range=255.0, options={**OPTIONS, "downsample": "wang"})
    assert mapped.score == score and mapped.map_shape == values.shape == (246, 246)
    assert mapped.scale == pytest.approx(2.0)
    row, col, side = mapped.window
    np.testing.assert_array_equal(mapped.zoom, values[row:row + side, col:col + side])


def test_no_call_computes_more_than_a_strip(monkeypatch):
    calls = []
    real = pair_map.ssim

    def spy(x, y, **options):
        calls.append(tuple(x.shape))
        return real(x, y, **options)

    monkeypatch.setattr(pair_map, "ssim", spy)
    ref, dist = PAIRS["chelsea noise, rgb"]()
    map_pair(ref, dist, data_range=255.0, options=OPTIONS, strip_values=30_000)
    rows = 30_000 // (3 * (451 - 10))
    *strips, zoom = calls
    assert len(strips) == -(-290 // rows) and all(c[1] <= rows + 10 for c in strips)
    assert zoom == (3, 74, 74)  # the lowest window again, for its full-resolution map


@pytest.mark.slow  # a fresh interpreter, a 16-Mpx pair: ~40 s on 2 cores
def test_the_report_step_of_a_large_pair_stays_within_a_bounded_memory():
    """A 4000 x 4000 pair took ~50 bytes per pixel above the decoded pair (800 MB) before the maps were
    computed by strips; now a few hundred MB whatever the size."""
    command = [sys.executable, "scripts/bench_report.py", "--phase", "pair", "--pair-side", "4000"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["images"] == 7
    assert result["peak_mib"] - result["rss_before_mib"] < 300


def test_large_images_are_reduced_for_display_by_block_means_and_the_pictures_line_up():
    photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((1500, 1000), Image.LANCZOS))
    ref, dist = _noisy_pair(photo, 10.0, 7)
    reduced = worst._reduced_pixels(ref, 255.0, 3)
    expected = photo[:999, :1500].reshape(333, 3, 500, 3, 3).astype(np.float64).mean(axis=(1, 3))
    assert reduced.shape == (334, 500, 3)
    np.testing.assert_allclose(reduced[:333], np.round(expected), atol=1)  # float32 block sums, then rounding
    np.testing.assert_allclose(reduced[333], np.round(photo[999].reshape(500, 3, 3).mean(axis=1)), atol=1)
    mapped = map_pair(ref, dist, data_range=255.0, options=OPTIONS)
    plots = {p.name: p for p in worst.pair_images(ref, dist, mapped, data_range=255.0)}
    sizes = {name: (plots[name].width, plots[name].height) for name in plots}
    assert sizes["reference"] == sizes["distorted"] == sizes["map"] == (320, 213)
    assert sizes["zoom_reference"] == sizes["zoom_distorted"] == sizes["zoom_map"] == (192, 192)
