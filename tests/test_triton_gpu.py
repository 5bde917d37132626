"""The compiled Triton SSIM kernel on a CUDA GPU: full-size photographs against float64, bitwise batch
invariance, the memory footprint the probe relies on.

Every test here carries the `gpu` marker: without CUDA they are deselected (conftest.py), and selecting them
with `-m gpu` on a machine without CUDA is an error. scripts/gpu_check.sh runs them on a GPU machine.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data, filters
from skimage.metrics import structural_similarity

from ssim_ray.metric import ssim, wang_downsample_factor
from ssim_ray.metric.triton import launcher
from ssim_ray.metric.triton.memory import triton_workspace_bytes
from ssim_ray.metric.window import wang_downsample

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
# fp32 moments on centred pixels against float64: the bound for the kernel.
FP32_TOL = 1e-6
# Half-precision storage of fractional pixels ("amp"): the bound against float64.
AMP_TOL = 1e-4
# scikit-image's test pairs, recomputed with its Wang settings (DESIGN.md §2), given to 10 digits.
CAMERA_GOLDEN = 0.3579642362
CHELSEA_GOLDEN = 0.4799434086
GOLDEN_TOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def _compiled_kernel_on_cuda():
    # Fail, never skip: a GPU check that silently fell back to something else would prove nothing.
    assert launcher.triton_available(), "triton is not importable or runs interpreted on this CUDA machine"


# ----------------------------------------------------------------------------------------------- inputs


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue()))).copy()


def _chw(img: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(img))
    return (t[None] if t.dim() == 2 else t.permute(2, 0, 1)).contiguous()


def _distortions(img: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Real distortions of a uint8 photo: JPEG at three qualities, noise, blur, contrast change."""
    rng = np.random.RandomState(seed)
    channel_axis = -1 if img.ndim == 3 else None
    blurred = filters.gaussian(img, sigma=1.5, channel_axis=channel_axis, preserve_range=True)
    return {
        "jpeg10": _jpeg(img, 10),
        "jpeg50": _jpeg(img, 50),
        "jpeg90": _jpeg(img, 90),
        "noise15": np.clip(img + 15 * rng.randn(*img.shape), 0, 255).round().astype(np.uint8),
        "blur1.5": blurred.round().astype(np.uint8),
        "contrast0.7": np.clip(img * 0.7 + 30, 0, 255).round().astype(np.uint8),
    }


PHOTOS = {"camera": data.camera, "astronaut": data.astronaut, "chelsea": data.chelsea, "coffee": data.coffee}
DISTORTIONS = ["jpeg10", "jpeg50", "jpeg90", "noise15", "blur1.5", "contrast0.7"]


def _skimage(x: torch.Tensor, y: torch.Tensor, data_range: float) -> list[float]:
    """Per-channel scikit-image SSIM with Wang's settings, in float64, of (C, H, W) tensors."""
    return [
        structural_similarity(
            xc.double().cpu().numpy(), yc.double().cpu().numpy(), data_range=data_range, gaussian_weights=True,
            sigma=1.5, use_sample_covariance=False,
        )
        for xc, yc in zip(x, y)
    ]


def _kernel(x: torch.Tensor, y: torch.Tensor, data_range) -> torch.Tensor:
    return launcher.ssim_per_channel_triton(x.to(DEVICE), y.to(DEVICE), data_range=data_range)


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


# ----------------------------------------------------------------------------------------- correctness


def test_golden_camera_pair_in_every_storage_dtype():
    rng = np.random.RandomState(5)
    cam = data.camera()
    noisy = np.clip(cam + 20.0 * rng.randn(*cam.shape), 0, 255).astype(np.uint8)
    x, y = _chw(cam)[None], _chw(noisy)[None]
    for dtype in (torch.uint8, torch.float32, torch.float16, torch.bfloat16):
        # Pixel values 0..255 are exact in every one of these dtypes.
        got = _kernel(x.to(dtype), y.to(dtype), 255.0).item()
        assert abs(got - CAMERA_GOLDEN) <= GOLDEN_TOL, (dtype, got)


def test_golden_chelsea_pair_mean_over_channels():
    rng = np.random.RandomState(2064892105)
    img = data.chelsea()
    noisy = np.clip(img + 15.0 * rng.randn(*img.shape), 0, 255).astype(np.uint8)
    got = _kernel(_chw(img)[None], _chw(noisy)[None], 255.0)
    assert got.shape == (1, 3)
    assert abs(got.mean().item() - CHELSEA_GOLDEN) <= GOLDEN_TOL, got


@pytest.mark.parametrize("photo", list(PHOTOS))
def test_full_size_photos_with_real_distortions_match_skimage(photo):
    img = PHOTOS[photo]()
    x = _chw(img)
    distorted = _distortions(img, seed=len(photo))
    ys = torch.stack([_chw(distorted[name]) for name in DISTORTIONS])
    xs = x[None].expand_as(ys).contiguous()
    refs = [_skimage(x, ys[i], 255.0) for i in range(len(DISTORTIONS))]
    for dtype in (torch.uint8, torch.float32):
        got = _kernel(xs.to(dtype), ys.to(dtype), 255.0).cpu()
        for i, name in enumerate(DISTORTIONS):
            assert _max_abs(got[i].tolist(), refs[i]) <= FP32_TOL, (photo, name, dtype, got[i].tolist(), refs[i])


@pytest.mark.parametrize("bits", [12, 16])
def test_high_bit_depth_against_skimage(bits):
    top = 2**bits - 1
    cam = data.camera().astype(np.float64) * top / 255
    rng = np.random.RandomState(bits)
    x = np.round(cam).astype(np.uint16)
    y = np.clip(np.round(filters.gaussian(cam, sigma=1.0, preserve_range=True) + 0.03 * top * rng.randn(*cam.shape)),
                0, top).astype(np.uint16)
    got = _kernel(_chw(x)[None], _chw(y)[None], float(top)).item()
    assert abs(got - _skimage(_chw(x), _chw(y), float(top))[0]) <= FP32_TOL


def test_half_precision_storage_of_fractional_pixels_stays_within_amp_bound():
    """'amp': pixels stored in fp16 (or bf16), moments in fp32, against float64 of the fp32 originals."""
    img = data.astronaut().astype(np.float64) / 255.0
    blurred = filters.gaussian(img, sigma=1.2, channel_axis=-1)
    noisy = np.clip(blurred + 0.02 * np.random.RandomState(1).randn(*img.shape), 0, 1)
    x, y = _chw(img.astype(np.float32))[None], _chw(noisy.astype(np.float32))[None]
    ref = _skimage(x[0], y[0], 1.0)
    fp16 = _kernel(x.half(), y.half(), 1.0)[0].tolist()
    assert _max_abs(fp16, ref) <= AMP_TOL, (fp16, ref)
    fp32 = _kernel(x, y, 1.0)[0].tolist()
    assert _max_abs(fp32, ref) <= FP32_TOL, (fp32, ref)


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_matches_the_torch_path_on_the_cpu(precision):
    img = data.coffee()
    x, y = _chw(img)[None], _chw(_jpeg(img, 30))[None]
    ref = ssim(x, y, data_range=255.0, per_channel=True, precision=precision)
    got = _kernel(x, y, 255.0).cpu()
    assert _max_abs(got, ref) <= FP32_TOL


def test_wang_downsampling_as_a_prior_pass():
    img = data.astronaut()  # 512 x 512: f = 2
    x, y = _chw(img)[None], _chw(_jpeg(img, 20))[None]
    f = wang_downsample_factor(512, 512)
    xd, yd = wang_downsample(x.float(), f), wang_downsample(y.float(), f)
    ref = ssim(x, y, data_range=255.0, downsample="wang", per_channel=True, precision="fp64")
    assert _max_abs(_kernel(xd, yd, 255.0).cpu(), ref) <= FP32_TOL


# --------------------------------------------------------------------------------------- batch invariance


def _random_pairs(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Photo crops at random offsets with noise: distinct, structured pairs."""
    g = torch.Generator().manual_seed(seed)
    photo = _chw(data.astronaut())
    tops = torch.randint(0, 512 - size, (n,), generator=g).tolist()
    lefts = torch.randint(0, 512 - size, (n,), generator=g).tolist()
    x = torch.stack([photo[:, t:t + size, s:s + size] for t, s in zip(tops, lefts)])
    noise = torch.randn(x.shape, generator=g) * 12
    y = (x.float() + noise).clamp(0, 255).round().to(torch.uint8)
    return x.contiguous(), y


def test_a_pairs_scores_have_the_same_bits_in_any_batch_size_and_position():
    x, y = _random_pairs(64, 256, seed=0)
    alone = _kernel(x[17:18], y[17:18], 255.0)
    full = _kernel(x, y, 255.0)
    assert torch.equal(full[17], alone[0])
    for size, position in ((2, 1), (7, 0), (7, 6), (33, 20)):
        order = [i for i in range(64) if i != 17][: size - 1]
        order.insert(position, 17)
        got = _kernel(x[order], y[order], 255.0)
        assert torch.equal(got[position], alone[0]), (size, position)
    assert len(torch.unique(full[:, 0])) == 64  # distinct pairs really got distinct scores


def test_repeated_runs_are_bitwise_identical():
    x, y = _random_pairs(16, 300, seed=1)
    first = _kernel(x, y, 255.0)
    for _ in range(3):
        assert torch.equal(_kernel(x, y, 255.0), first)


def test_ragged_batch_matches_each_pair_alone_bitwise():
    photo = _chw(data.coffee())
    sizes = [(400, 600), (37, 500), (256, 11), (300, 301), (129, 257)]
    xs = [photo[:, :h, :w].contiguous().to(DEVICE) for h, w in sizes]
    ys = [_chw(_jpeg(x.permute(1, 2, 0).cpu().numpy(), 25)).to(DEVICE) for x in xs]
    ranges = torch.tensor([255.0, 255.0, 300.0, 255.0, 510.0], dtype=torch.float64, device=DEVICE)
    ragged = launcher.ssim_per_channel_triton_ragged(xs, ys, data_range=ranges)
    for i, (x, y) in enumerate(zip(xs, ys)):
        alone = launcher.ssim_per_channel_triton(x[None], y[None], data_range=float(ranges[i]))
        assert torch.equal(ragged[i], alone[0]), i
        assert _max_abs(ragged[i].tolist(), _skimage(x, y, float(ranges[i]))) <= FP32_TOL, i


# ------------------------------------------------------------------------------------------------ memory


@pytest.mark.parametrize("shape, dtype", [((64, 3, 256, 256), torch.uint8), ((3, 1, 1000, 700), torch.float32)])
def test_workspace_bytes_equal_the_measured_peak(shape, dtype):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    x = torch.randint(0, 256, shape, device=DEVICE).to(dtype)
    y = torch.randint(0, 256, shape, device=DEVICE).to(dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()  # the randint temporaries are not the kernel's
    launcher.ssim_per_channel_triton(x, y, data_range=255.0)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before
    reported = triton_workspace_bytes(*shape, dtype)
    # Equal up to the caching allocator's segment rounding of the two inputs (at most 2 MiB each).
    assert abs(measured - reported) <= 2 * 2 * 2**20, (measured, reported)


# ----------------------------------- two columns per lane, unrolled rows (offered to the benchmark's sweep)

PAIRED = launcher.TileConfig(128, 64, 2, 2)
UNROLLED = launcher.TileConfig(128, 64, 4, 1, True)


def _paired(x: torch.Tensor, y: torch.Tensor, data_range: float, tiles=PAIRED) -> torch.Tensor:
    window = launcher._window(torch.device(DEVICE), win_size=11, sigma=1.5, k1=0.01, k2=0.03, gaussian=True)
    return launcher._same_shape(x.to(DEVICE), y.to(DEVICE), data_range=data_range, window=window, tiles=tiles)


def test_two_columns_per_lane_match_skimage_and_the_default_tiles():
    img = data.coffee()  # 400 x 600: odd valid width per tile edge, several tiles each way
    x = _chw(img)
    distorted = _distortions(img, seed=3)
    ys = torch.stack([_chw(distorted[name]) for name in DISTORTIONS])
    xs = x[None].expand_as(ys).contiguous()
    got = _paired(xs, ys, 255.0).cpu()
    default = _kernel(xs, ys, 255.0).cpu()
    # Other centring constants than one column per lane: equal to rounding, not to the bit.
    assert _max_abs(got, default) <= 2e-7
    for i in range(len(DISTORTIONS)):
        assert _max_abs(got[i].tolist(), _skimage(x, ys[i], 255.0)) <= FP32_TOL
    # Same pair, other batch: same bits, with this tile shape too.
    assert torch.equal(_paired(xs[3:4], ys[3:4], 255.0).cpu()[0], got[3])


def test_unrolled_row_loop_matches_the_default():
    x, y = _random_pairs(8, 300, seed=2)
    # Same operations in the same order; allow the compiler one rounding's worth of freedom in fusing them.
    assert _max_abs(_paired(x, y, 255.0, tiles=UNROLLED).cpu(), _kernel(x, y, 255.0).cpu()) <= 1e-7
