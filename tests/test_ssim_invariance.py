"""A pair's score has the same bits whatever its batch: alone, in any batch size 1..64, at any position, in
any ragged grouping, with any thread count, and from run to run; and ssim(x, y) is bitwise
ssim(x, y, per_channel=True).mean(-1), which is what the job computes from per-channel scores.

Every comparison here is torch.equal (bitwise), never a tolerance: the job merges scores computed in
different batches, so "close" would be a bug.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from ssim_ray import ssim
from ssim_ray.metric import mean_over_channels


def real_pairs(count: int, channels: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` different (reference, JPEG-compressed + noisy) crops of real photos, (N, C, H, W) uint8."""
    rng = np.random.default_rng(seed)
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    xs, ys = [], []
    for _ in range(count):
        img = photos[rng.integers(len(photos))]
        top = rng.integers(0, img.shape[0] - height - channels + 1)
        left = rng.integers(0, img.shape[1] - width - channels + 1)
        # Channel c: colour plane c % 3, offset by c pixels, so four channels are four different images.
        ref = np.stack([img[top + c : top + c + height, left + c : left + c + width, c % 3] for c in range(channels)])
        dist = np.stack([jpeg_gray(plane, int(rng.integers(20, 90))) for plane in ref]).astype(np.float64)
        dist = np.clip(np.rint(dist + rng.normal(0, 3, dist.shape)), 0, 255).astype(np.uint8)
        xs.append(ref)
        ys.append(dist)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def jpeg_gray(plane: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(plane).save(buf, format="JPEG", quality=quality)
    return np.array(Image.open(io.BytesIO(buf.getvalue())))


def alone(x: torch.Tensor, y: torch.Tensor, **options) -> torch.Tensor:
    """Each pair scored on its own (batch of one)."""
    return torch.cat([ssim(x[i : i + 1], y[i : i + 1], per_channel=True, **options) for i in range(len(x))])


@pytest.fixture(params=["never", "always"])
def policy(request: pytest.FixtureRequest) -> str:
    """Run a test with the eager tile kernel and again with the compiled one (ssim's `compile=`)."""
    return request.param


BATCH_CASES = [(policy, precision, shape) for policy in ("always", "never") for precision in ("fp32", "fp64")
               for shape in ((3, 37, 53), (1, 64, 21), (4, 11, 300))
               # The eager kernel is 10-20x slower (and thin images waste most of a tile): two cases of it.
               if policy == "always" or (precision, shape) in (("fp32", (3, 37, 53)), ("fp64", (1, 64, 21)))]


@pytest.mark.parametrize("mode, precision, shape", BATCH_CASES)
def test_every_batch_size_from_1_to_64_gives_the_same_bits(mode: str, precision: str, shape: tuple) -> None:
    count = 64 if mode == "always" else 16  # the eager kernel: fewer pairs, same question
    x, y = real_pairs(count, *shape, seed=shape[1])
    want = alone(x, y, precision=precision, compile=mode)
    assert len(set(want[:, 0].tolist())) == count  # different pairs, not one repeated
    # Every size once (compiled, the first case); elsewhere sizes around the kernel's 32-tile chunks.
    if (mode, precision, shape) == BATCH_CASES[0]:
        sizes = range(1, 65)
    else:
        sizes = (1, 2, 3, 7, 16, 31, 33, 64) if mode == "always" else (1, 5, 16)
    for size in sizes:
        got = torch.cat([ssim(x[i : i + size], y[i : i + size], per_channel=True, precision=precision, compile=mode)
                         for i in range(0, count, size)])
        assert torch.equal(got, want), f"batch size {size}: {(got - want).abs().max().item()}"


def test_large_images_batch_of_one_equals_batch_of_sixteen() -> None:
    """The benchmark shape: where a reduction kernel would split work across threads differently.

    Compiled kernel only: the eager one gives the same bits (test_compiled_and_eager_kernels_...)."""
    x, y = real_pairs(16, 3, 256, 256, seed=5)
    batched = ssim(x, y, per_channel=True, compile="always")
    assert torch.equal(batched, alone(x, y, compile="always"))
    assert torch.equal(ssim(x[3:4], y[3:4], per_channel=True, compile="always"), batched[3:4])


def test_position_in_batch_does_not_matter() -> None:
    x, y = real_pairs(24, 3, 40, 45, seed=11)
    want = ssim(x, y, per_channel=True)
    for seed in range(5):
        order = torch.from_numpy(np.random.default_rng(seed).permutation(24))
        assert torch.equal(ssim(x[order], y[order], per_channel=True), want[order])


def test_ragged_groupings_give_the_same_bits_as_alone(policy: str) -> None:
    shapes = [(3, 23, 31), (3, 64, 48), (3, 11, 11), (3, 100, 37)]
    per_shape = 6 if policy == "always" else 3  # the eager kernel is 10-20x slower: fewer pairs
    pairs = [real_pairs(per_shape, *shape, seed=i) for i, shape in enumerate(shapes)]
    xs = [x[j] for x, _ in pairs for j in range(per_shape)]
    ys = [y[j] for _, y in pairs for j in range(per_shape)]
    want = torch.cat([alone(x, y, compile=policy) for x, y in pairs])
    assert torch.equal(ssim(xs, ys, per_channel=True, compile=policy), want)
    for seed in range(4 if policy == "always" else 2):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(xs))
        got = ssim([xs[i] for i in order], [ys[i] for i in order], per_channel=True, compile=policy)
        assert torch.equal(got, want[torch.from_numpy(order)])
        cut = int(rng.integers(1, len(xs)))  # the same pairs split over two calls
        parts = torch.cat([
            ssim([xs[i] for i in order[:cut]], [ys[i] for i in order[:cut]], per_channel=True, compile=policy),
            ssim([xs[i] for i in order[cut:]], [ys[i] for i in order[cut:]], per_channel=True, compile=policy),
        ])
        assert torch.equal(parts, want[torch.from_numpy(order)])


def test_ragged_list_equals_tensor_batch() -> None:
    x, y = real_pairs(5, 3, 30, 40, seed=3)
    assert torch.equal(ssim(list(x), list(y)), ssim(x, y))
    assert torch.equal(ssim(list(x[:, 0]), list(y[:, 0])), ssim(x[:, :1], y[:, :1]))  # (H, W) items: one channel


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_overall_score_is_bitwise_the_mean_of_per_channel_scores(channels: int) -> None:
    x, y = real_pairs(64, channels, 24, 33, seed=channels)
    per_channel = ssim(x, y, per_channel=True)
    assert torch.equal(ssim(x, y), per_channel.mean(-1))
    assert torch.equal(ssim(x, y), mean_over_channels(per_channel))
    for size in (1, 2, 7, 64):  # and the channel mean itself does not depend on how many rows it sees
        assert torch.equal(per_channel[:size].mean(-1), per_channel.mean(-1)[:size])
    assert torch.equal(ssim(x[0], y[0]), per_channel[0].mean(-1))  # 0-d for one unbatched pair


@pytest.mark.parametrize("channels", [5, 6, 7, 8])
def test_many_channels_overall_score_is_mean_over_channels_in_any_batch(channels: int) -> None:
    """From 5 channels torch's mean(-1) changes order with the row count; mean_over_channels does not."""
    g = torch.Generator().manual_seed(channels)
    per_channel = torch.rand(64, channels, generator=g)
    full = mean_over_channels(per_channel)
    assert all(torch.equal(mean_over_channels(per_channel[i : i + 1]), full[i : i + 1]) for i in range(64))
    x = (torch.rand(3, channels, 20, 20, generator=g) * 255).to(torch.uint8)
    y = (torch.rand(3, channels, 20, 20, generator=g) * 255).to(torch.uint8)
    assert torch.equal(ssim(x, y), mean_over_channels(ssim(x, y, per_channel=True)))
    assert torch.equal(ssim(x[1:2], y[1:2]), ssim(x, y)[1:2])


def test_thread_count_does_not_change_bits(policy: str) -> None:
    """Ray workers may run with different thread counts; the bits must not notice."""
    x, y = real_pairs(8, 3, 96, 80, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ssim(x, y, per_channel=True, compile=policy)
        torch.set_num_threads(2)
        two = ssim(x, y, per_channel=True, compile=policy)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_repeated_calls_give_the_same_bits() -> None:
    x, y = real_pairs(8, 3, 50, 70, seed=9)
    first = ssim(x, y, per_channel=True)
    for _ in range(3):
        assert torch.equal(ssim(x, y, per_channel=True), first)


RUN_IN_FRESH_PROCESS = """
import sys, torch
from ssim_ray import ssim
from ssim_ray.metric import mean_over_channels
x, y = torch.load(sys.argv[1])
print(ssim(x, y, per_channel=True).double().numpy().tobytes().hex())
"""


@pytest.mark.slow
def test_fresh_process_gives_the_same_bits(tmp_path: Path) -> None:
    """Run to run: another interpreter (another Ray worker) computes the same bits."""
    x, y = real_pairs(6, 3, 61, 47, seed=21)
    here = ssim(x, y, per_channel=True).double().numpy().tobytes().hex()
    torch.save((x, y), tmp_path / "pairs.pt")
    out = subprocess.run([sys.executable, "-c", RUN_IN_FRESH_PROCESS, str(tmp_path / "pairs.pt")],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_compiled_and_eager_kernels_give_the_same_bits(dtype: torch.dtype, precision: str) -> None:
    """The compiled kernel is only an optimisation: whichever one a process uses, the bits are the same."""
    shapes = [(3, 11, 11), (3, 75, 140), (3, 139, 300), (3, 257, 129)]  # one tile, tile edges, several tiles
    xs = [x[0] for x, _ in (real_pairs(1, *s, seed=i) for i, s in enumerate(shapes))]
    ys = [y[0] for _, y in (real_pairs(1, *s, seed=i) for i, s in enumerate(shapes))]
    xs, ys = [x.to(dtype) for x in xs], [y.to(dtype) for y in ys]
    data_range = None if dtype in (torch.uint8, torch.uint16) else 255.0
    results = {}
    for mode in ("never", "always"):  # (other windows: the same code with other taps; each costs a compile)
        results[mode] = ssim(xs, ys, data_range=data_range, per_channel=True, precision=precision, compile=mode)
    assert torch.equal(results["never"], results["always"])
