"""CUDA tensors go through the same ssim(): compared with the CPU in float64 on real photos, and held to the
same bitwise guarantees (batch size, position, ragged grouping, autocast/TF32, channel mean).

Each test runs with kernel='torch' and again with kernel='triton' (the fused kernel; its ids contain
"triton", so scripts/gpu_check.sh runs the two sets as separate steps). fp64 is the torch path's alone:
the kernel refuses it (tests/test_ssim_kernel_choice.py).

Deselected without a GPU; `pytest -m gpu` on a machine without one is an error (tests/conftest.py).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from ssim_ray import ssim
from ssim_ray.metric import mean_over_channels

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
KERNELS = ["torch", "triton"]


@pytest.fixture(params=KERNELS)
def kernel(request: pytest.FixtureRequest) -> str:
    """ssim()'s kernel for the CUDA tensors under test (references are computed on the CPU torch path)."""
    return request.param


def camera_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-image's test pair: camera against clip(camera + 20 randn), RandomState(5), uint8."""
    cam = data.camera()
    noisy = np.clip(cam + 20.0 * np.random.RandomState(5).randn(*cam.shape), 0, 255).astype(np.uint8)
    return torch.from_numpy(cam), torch.from_numpy(noisy)


def distorted_photos(count: int, size: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` (reference, JPEG q10..90 + noise) RGB crops of real photos, (N, 3, size, size) uint8."""
    rng = np.random.default_rng(count)
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    refs, dists = [], []
    for i in range(count):
        img = photos[i % len(photos)]
        top, left = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        crop = img[top : top + size, left : left + size]
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, format="JPEG", quality=int(rng.integers(10, 91)))
        dist = np.array(Image.open(io.BytesIO(buf.getvalue()))).astype(np.float64)
        dist = np.clip(np.rint(dist + rng.normal(0, 3, dist.shape)), 0, 255).astype(np.uint8)
        refs.append(crop.transpose(2, 0, 1))
        dists.append(dist.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(refs)), torch.from_numpy(np.stack(dists))


def test_golden_camera_on_cuda(kernel: str) -> None:
    x, y = (t.to(CUDA) for t in camera_pair())
    assert abs(float(ssim(x, y, precision="fp64", kernel="torch")) - 0.3579642362) < 1e-10
    assert abs(float(ssim(x, y, kernel=kernel)) - 0.3579642362) < 1e-6


CPU_FP64_CASES = [(kernel, precision, tol) for kernel in KERNELS
                  for precision, tol in (("fp32", 1e-6), ("amp", 1e-6), ("fp64", 1e-10))
                  if not (kernel == "triton" and precision == "fp64")]


@pytest.mark.parametrize("kernel_name, precision, tol", CPU_FP64_CASES)
def test_cuda_matches_cpu_fp64_on_real_photos(kernel_name: str, precision: str, tol: float) -> None:
    x, y = distorted_photos(12)
    want = ssim(x, y, per_channel=True, precision="fp64")
    got = ssim(x.to(CUDA), y.to(CUDA), per_channel=True, precision=precision, kernel=kernel_name)
    assert got.device.type == "cuda"
    assert got.dtype == (torch.float64 if precision == "fp64" else torch.float32)
    assert float((got.cpu().double() - want).abs().max()) <= tol


@pytest.mark.parametrize("dtype, data_range", [(torch.uint16, None), (torch.float16, 255.0), (torch.float32, 255.0)])
def test_cuda_other_dtypes_match_cpu_fp64(kernel: str, dtype: torch.dtype, data_range) -> None:
    x, y = distorted_photos(4)
    if dtype == torch.uint16:  # spread over 16 bits
        x, y = (x.to(torch.int32) * 257).to(torch.uint16), (y.to(torch.int32) * 257).to(torch.uint16)
    else:
        x, y = x.to(dtype), y.to(dtype)
    want = ssim(x, y, data_range=data_range, precision="fp64")
    got = ssim(x.to(CUDA), y.to(CUDA), data_range=data_range, kernel=kernel)
    assert float((got.cpu().double() - want).abs().max()) <= 1e-6


def test_cuda_downsample_matches_cpu_fp64(kernel: str) -> None:
    x, y = distorted_photos(2, size=256)
    x = torch.nn.functional.interpolate(x.double(), size=(770, 800), mode="bilinear").round().to(torch.uint8)
    y = torch.nn.functional.interpolate(y.double(), size=(770, 800), mode="bilinear").round().to(torch.uint8)
    want = ssim(x, y, downsample="wang", precision="fp64")
    got = ssim(x.to(CUDA), y.to(CUDA), downsample="wang", kernel=kernel)
    assert float((got.cpu().double() - want).abs().max()) <= 1e-6


def test_cuda_every_batch_size_gives_the_same_bits(kernel: str) -> None:
    x, y = (t.to(CUDA) for t in distorted_photos(64, size=48))
    want = torch.cat([ssim(x[i : i + 1], y[i : i + 1], per_channel=True, kernel=kernel) for i in range(64)])
    for size in range(1, 65):
        got = torch.cat([ssim(x[i : i + size], y[i : i + size], per_channel=True, kernel=kernel)
                         for i in range(0, 64, size)])
        assert torch.equal(got, want), f"batch size {size}"
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).to(CUDA)
    assert torch.equal(ssim(x[order], y[order], per_channel=True, kernel=kernel), want[order])


def test_cuda_ragged_equals_alone(kernel: str) -> None:
    a, b = distorted_photos(4, size=64)
    c, d = distorted_photos(5, size=120)
    xs = [t.to(CUDA) for t in (*a, *c)]
    ys = [t.to(CUDA) for t in (*b, *d)]
    alone = torch.cat([ssim(xi[None], yi[None], per_channel=True, kernel=kernel) for xi, yi in zip(xs, ys)])
    assert torch.equal(ssim(xs[::-1], ys[::-1], per_channel=True, kernel=kernel), alone.flip(0))


def test_cuda_channel_mean_matches_what_the_job_computes_on_cpu(kernel: str) -> None:
    x, y = (t.to(CUDA) for t in distorted_photos(8))
    per_channel = ssim(x, y, per_channel=True, kernel=kernel)
    overall = ssim(x, y, kernel=kernel)
    assert torch.equal(overall, mean_over_channels(per_channel))
    assert torch.equal(overall.cpu(), per_channel.cpu().mean(-1))  # the worker reduces on the host


def test_cuda_autocast_and_tf32_change_nothing(kernel: str) -> None:
    x, y = (t.to(CUDA) for t in distorted_photos(8))
    plain = ssim(x, y, per_channel=True, precision="amp", kernel=kernel)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        with torch.autocast("cuda", dtype=torch.float16):
            inside = ssim(x, y, per_channel=True, precision="amp", kernel=kernel)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert torch.equal(inside, plain)


def test_cuda_nan_input_is_an_error(kernel: str) -> None:
    x = torch.rand(2, 1, 32, 32, device=CUDA)
    y = x.clone()
    y[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"y must be finite, got NaN or inf in batch item\(s\) \[1\]"):
        ssim(x, y, data_range=1.0, kernel=kernel)
