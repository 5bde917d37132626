"""The compiled CPU kernel (tile_kernel.c, `ssim_ray.metric.native`): the eager kernel's bits for every pixel dtype,
precision, window and tile variant, whatever the calls' split; and a build that cannot be trusted or cannot be
made leaves the eager kernel, said once, with the same bits.

Every comparison is torch.equal: the compile policy must never change a score (tests/test_ssim_invariance.py
checks the same through `ssim()`).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from reference_impls import chw, photo_pair
from ssim_ray import ssim
from ssim_ray.metric import compiled, native, tiles
from ssim_ray.metric.window import gaussian_window_1d

VARIANTS = [tiles.WANG, tiles.TileVariant(with_cs=True), tiles.TileVariant(cs_only=True),
            tiles.TileVariant(sample_covariance=True)]


def planes_of_photos(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(6, H, W) uint8 planes: two crops of real photos (RGB) and their JPEG / bicubic-SR copies."""
    pairs = [photo_pair("astronaut", height, width, "jpeg", 20, top=40, left=60),
             photo_pair("coffee", height, width, "sr", 3, top=10, left=30)]
    x = np.concatenate([chw(a) for a, _ in pairs])
    y = np.concatenate([chw(b) for _, b in pairs])
    return torch.from_numpy(x), torch.from_numpy(y)


def native_sums(x: torch.Tensor, y: torch.Tensor, grid: tiles.TileGrid, consts: torch.Tensor, taps: list,
                variant: tiles.TileVariant, per_call: int, lib=None) -> torch.Tensor:
    """Every tile's sums by the C kernel, `per_call` tiles a call (calls that start and end mid-strip)."""
    rows, cols = tiles.tile_extents(x.shape[0], grid, x.device)
    if x.dtype not in native.PIXEL_CODES:
        x, y = x.to(consts.dtype), y.to(consts.dtype)
    planes = native.planes_of(x, y, grid.rows, grid.cols, grid.slots, grid.across)
    lib = lib or native.library(native.check_taps(taps))
    bits = native.variant_bits(variant.sample_covariance, variant.with_cs, variant.cs_only)
    taps_tensor = torch.tensor(taps, dtype=consts.dtype)
    parts = [native.tile_sums(lib, planes, start, min(per_call, len(rows) - start), rows[start : start + per_call],
                              cols[start : start + per_call], consts, taps_tensor, bits)
             for start in range(0, len(rows), per_call)]
    return torch.cat(parts)


def eager_sums(x, y, grid, consts, taps, variant) -> torch.Tensor:
    rows, cols = tiles.tile_extents(x.shape[0], grid, x.device)
    return tiles.eager_tile_sums(tiles.pair_tiles(x, y, grid, consts.dtype), rows, cols, consts, taps, variant)


@pytest.mark.parametrize("pixels", [torch.uint8, torch.uint16, torch.float16, torch.bfloat16, torch.float32,
                                    torch.float64])
@pytest.mark.parametrize("compute", [torch.float32, torch.float64])
def test_c_kernel_gives_the_eager_kernels_bits(pixels: torch.dtype, compute: torch.dtype) -> None:
    """Sizes: one small tile, a tile edge inside the image, several strips and slots (the halo rows shared
    down a strip), one row of map; windows of 11 Gaussian, 7 uniform (skimage_default) and 3 taps; all four
    tile variants; calls of 7 tiles (they start and end mid-strip) and of 32."""
    x8, y8 = planes_of_photos(139, 300)
    scale = {torch.uint16: 257}.get(pixels, 1)  # uint16: the full 16-bit range
    x_all, y_all = (x8.to(torch.int32) * scale).to(pixels), (y8.to(torch.int32) * scale).to(pixels)
    data_range = 255.0 * scale
    windows = [(11, 1.5, True), (7, 0.0, False), (3, 0.8, True)]
    for height, width in [(11, 11), (75, 140), (139, 300), (12, 40)]:
        x, y = x_all[:, :height, :width], y_all[:, :height, :width]  # views: row stride of the 300-wide planes
        for win, sigma, gaussian in windows:
            taps = tiles.taps_in(gaussian_window_1d(win, sigma, gaussian=gaussian), compute)
            grid = tiles.tile_grid(height, width, win)
            for variant in VARIANTS:
                values = [(0.01 * data_range) ** 2, (0.03 * data_range) ** 2, win * win / (win * win - 1.0)]
                consts = torch.tensor(values if variant.sample_covariance else values[:2], dtype=compute)
                want = eager_sums(x, y, grid, consts, taps, variant)
                for per_call in (7, 32):
                    got = native_sums(x, y, grid, consts, taps, variant, per_call)
                    assert torch.equal(got, want), (height, width, win, variant, per_call)


def test_c_kernel_reads_strided_and_transposed_planes() -> None:
    """Column strides other than 1 (a transposed view, every second column) read the same pixels."""
    x, y = planes_of_photos(120, 150)
    taps = tiles.taps_in(gaussian_window_1d(11, 1.5), torch.float32)
    consts = torch.tensor([6.5025, 58.5225])
    for view in (lambda t: t.transpose(1, 2), lambda t: t[:, :, ::2], lambda t: t.float().transpose(1, 2)):
        vx, vy = view(x), view(y)
        grid = tiles.tile_grid(vx.shape[1], vx.shape[2], 11)
        want = eager_sums(vx.contiguous(), vy.contiguous(), grid, consts, taps, tiles.WANG)
        assert torch.equal(native_sums(vx, vy, grid, consts, taps, tiles.WANG, 32), want)


@pytest.fixture
def fresh_kernels(monkeypatch: pytest.MonkeyPatch):
    """No built library, compiler or runner remembered in this process, during the test and after it (the
    next test loads the libraries again from this machine's cache)."""
    def clear() -> None:
        for cached in (native.library, native._compiler, native._build_identity):
            cached.cache_clear()

    clear()
    monkeypatch.setattr(compiled, "_kernels", {})
    yield
    clear()


def scores_and_warnings(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ssim(x, y, per_channel=True, compile="always")
    return got, [str(w.message) for w in caught]


def test_a_kernel_directory_that_others_can_write_is_refused(fresh_kernels, monkeypatch, tmp_path) -> None:
    """A library is code this process runs: one from a directory that another user could have written to
    is not loaded. The eager kernel scores instead (same bits), and says so."""
    x, y = (t.reshape(2, 3, 139, 300) for t in planes_of_photos(139, 300))
    want = ssim(x, y, per_channel=True, compile="never")
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path))
    shared = tmp_path / f"ssim_ray_kernels_{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(native.NativeKernelError, match="not this user's own directory"):
        native.library(5)
    got, said = scores_and_warnings(x, y)
    assert torch.equal(got, want)
    assert len([m for m in said if "compiled SSIM kernel failed" in m and "not this user's own" in m]) == 1
    assert not list(shared.iterdir())  # nothing was built into it either


def test_without_a_c_compiler_the_eager_kernel_scores_and_says_so(fresh_kernels, monkeypatch, tmp_path) -> None:
    x, y = (t.reshape(2, 3, 75, 140) for t in planes_of_photos(75, 140))
    want = ssim(x, y, per_channel=True, compile="never")
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path))  # an empty cache: it has to build
    monkeypatch.setattr(native, "COMPILERS", ("ssim-ray-no-such-cc",))
    got, said = scores_and_warnings(x, y)
    assert torch.equal(got, want)
    assert len([m for m in said if "compiled SSIM kernel failed" in m and "no C compiler found" in m]) == 1
    assert not compiled.compiled_in_use(torch.float32, tiles.taps_in(gaussian_window_1d(11, 1.5), torch.float32),
                                        policy="always")


def test_a_build_goes_into_the_users_own_cache_and_is_reused(fresh_kernels, monkeypatch, tmp_path) -> None:
    """The first use builds into a 0700 directory; a later process (here: the cache forgotten) loads that file
    instead of building again."""
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path))
    native.library(5)
    directory = tmp_path / f"ssim_ray_kernels_{os.getuid()}"
    built = list(directory.glob("tile_kernel_*.so"))
    assert len(built) == 1 and directory.stat().st_mode & 0o777 == 0o700
    stamp = built[0].stat().st_mtime_ns
    native.library.cache_clear()
    monkeypatch.setattr(native, "_build", lambda source, defines, target: pytest.fail("built again"))
    native.library(5)
    assert built[0].stat().st_mtime_ns == stamp


def test_a_kernel_directory_that_is_a_link_is_refused(fresh_kernels, monkeypatch, tmp_path) -> None:
    """A link planted where the cache would be (pointing at a directory this user owns) is not followed."""
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path))
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / f"ssim_ray_kernels_{os.getuid()}").symlink_to(target)
    with pytest.raises(native.NativeKernelError, match="not this user's own directory"):
        native.library(5)
    assert not list(target.iterdir())


def test_planes_of_refuses_mismatched_planes() -> None:
    x = torch.zeros(2, 20, 20, dtype=torch.uint8)
    with pytest.raises(ValueError, match="same-shape"):
        native.planes_of(x, x.float(), 16, 16, 1, 1)
    with pytest.raises(ValueError, match="same-shape"):
        native.planes_of(x, x[:, :19], 16, 16, 1, 1)


def test_the_wide_vector_build_gives_the_same_bits() -> None:
    """AVX-512 machines build 64-byte vectors (16 float32 lanes, 8 float64): lanes are independent, so the
    sums must not move. Built here with that width forced (the compiler splits the vectors on AVX2), which
    checks the code's handling of the wider vectors (columns rounded up to 16, buffers) on this machine."""
    lib = native.tile_functions(native._load(native.SOURCE, ("-DHALF=5", "-DVECTOR_BYTES=64")), 5)
    x, y = planes_of_photos(139, 300)
    for compute in (torch.float32, torch.float64):
        taps = tiles.taps_in(gaussian_window_1d(11, 1.5), compute)
        for height, width in [(139, 300), (40, 23), (11, 11)]:
            grid = tiles.tile_grid(height, width, 11)
            for variant in VARIANTS:
                values = [6.5025, 58.5225, 121 / 120]
                consts = torch.tensor(values if variant.sample_covariance else values[:2], dtype=compute)
                xs, ys = x[:, :height, :width], y[:, :height, :width]
                want = eager_sums(xs, ys, grid, consts, taps, variant)
                assert torch.equal(native_sums(xs, ys, grid, consts, taps, variant, 7, lib), want), (height, width)
