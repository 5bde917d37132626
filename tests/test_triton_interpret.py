"""The Triton SSIM kernel on the CPU (TRITON_INTERPRET=1), against float64 references on real photographs.

Why a child process: triton reads TRITON_INTERPRET when a kernel is *decorated*, that is when
`ssim_ray.metric.triton.kernels` is first imported, which `import ssim_ray` does. This pytest process has
long imported them as compiled CUDA kernels, and setting the variable here would then change nothing (and
setting it for the whole process would turn every other triton user into the interpreter). So this module
writes its inputs to a file, runs this very file as a child with the variable set
(`python tests/test_triton_interpret.py run IN OUT`), and reads back the kernel's raw float32 results;
references and assertions stay in the parent. A second child, with the variable unset, compiles the kernel
for a CUDA target (no GPU needed) to check what only compiled code can get wrong.

The interpreter runs each program in Python (about 13 ms per image row per channel here), so the images are
small crops; the gpu-marked tests in test_triton_gpu.py take the full photographs.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is only installed on Linux x86-64 (see pyproject's test extra)")

from PIL import Image  # noqa: E402
from skimage import data, filters  # noqa: E402
from skimage.metrics import structural_similarity  # noqa: E402

from ssim_ray.metric import ssim, wang_downsample_factor  # noqa: E402
from ssim_ray.metric.triton import kernels, launcher  # noqa: E402
from ssim_ray.metric.triton.memory import triton_workspace_bytes  # noqa: E402
from ssim_ray.metric.window import wang_downsample  # noqa: E402

# Small tiles, so that crops of a few dozen pixels span several tile rows and columns; the second computes
# two adjacent columns per lane (the variant offered to the GPU benchmark).
SMALL_TILES = (16, 8, 1)
PAIRED_TILES = (16, 8, 1, 2)
# fp32 moments on centred pixels against float64: the bound for the kernel.
FP32_TOL = 1e-6
CHILD_TIMEOUT_S = 240


# ----------------------------------------------------------------------------------------------- inputs


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue()))).copy()


def _noisy(img: np.ndarray, sigma: float, seed: int, top: int = 255) -> np.ndarray:
    rng = np.random.RandomState(seed)
    return np.clip(img + sigma * rng.randn(*img.shape), 0, top).round()


def _chw(img: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(img))
    t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    return t.to(dtype).contiguous()


def _photo_pairs() -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Crops of scikit-image's photographs, each against a real distortion of itself (uint8 and more)."""
    camera = data.camera()[96:136, 200:252]
    chelsea = data.chelsea()[60:92, 120:168]
    astronaut = data.astronaut()[100:136, 180:216]
    coffee = data.coffee()[150:185, 300:340]
    blurred = (filters.gaussian(astronaut, sigma=1.2, channel_axis=-1) * 255).round().astype(np.uint8)
    contrast = np.clip(coffee * 0.7 + 30, 0, 255).round().astype(np.uint8)
    camera12 = (data.camera()[300:330, 100:144].astype(np.int64) * 16).astype(np.uint16)
    gray = data.chelsea()[40:80, 200:240].mean(axis=2) / 255.0
    blurred_gray = filters.gaussian(gray, sigma=0.8) + 0.02 * np.random.RandomState(3).randn(*gray.shape)
    return {
        "camera_noise_u8": (_chw(camera, torch.uint8), _chw(_noisy(camera, 20, 5), torch.uint8), 255.0),
        "chelsea_jpeg30_u8": (_chw(chelsea, torch.uint8), _chw(_jpeg(chelsea, 30), torch.uint8), 255.0),
        "astronaut_blur_u8": (_chw(astronaut, torch.uint8), _chw(blurred, torch.uint8), 255.0),
        "coffee_contrast_u8": (_chw(coffee, torch.uint8), _chw(contrast, torch.uint8), 255.0),
        "camera12bit_noise_u16": (
            _chw(camera12, torch.uint16), _chw(_noisy(camera12, 300, 7, top=4095), torch.uint16), 4095.0,
        ),
        # Fractional float32 values, as the torch downsampling (downsample='wang') hands them over.
        "chelsea_gray_blur_f32": (_chw(gray, torch.float32), _chw(blurred_gray, torch.float32), 1.0),
    }


def _cases() -> dict[str, dict]:
    """Every kernel call the child makes, by name."""
    pairs = _photo_pairs()
    cases = {name: {"x": x[None], "y": y[None], "data_range": L} for name, (x, y, L) in pairs.items()}
    gray_x, gray_y, _ = pairs["chelsea_gray_blur_f32"]
    cases["chelsea_gray_blur_f16"] = {"x": gray_x[None].half(), "y": gray_y[None].half(), "data_range": 1.0}
    cases["chelsea_uniform7"] = {**cases["chelsea_jpeg30_u8"], "win_size": 7, "gaussian": False}
    cases["camera_gauss7_sigma1"] = {**cases["camera_noise_u8"], "win_size": 7, "sigma": 1.0}
    one = pairs["camera_noise_u8"]
    cases["window_sized_11x11"] = {
        "x": one[0][None, :, :11, :11], "y": one[1][None, :, :11, :11], "data_range": 255.0,
    }
    # Two columns per lane: a map one column wide (the lane's second column would read past the row), and an
    # odd width, so that the last lane of a tile is pulled back over a column its neighbour owns.
    cases["window_sized_paired"] = {**cases["window_sized_11x11"], "tiles": PAIRED_TILES}
    # Two tile rows (the second partial) by three strips, the last one 9 columns wide.
    cases["camera_odd_width_paired"] = {
        "x": one[0][None, :, :20, :51], "y": one[1][None, :, :20, :51], "data_range": 255.0, "tiles": PAIRED_TILES,
    }
    cases.update(_guarded_cases(pairs))
    cases.update(_invariance_cases(pairs))
    # The camera pair cut to 20 x 30 ("alone" below, computed with the default tiles): the interpreter's cost
    # goes with the rows each program walks, and this crop already spans 2 x 2 small tiles, both partial.
    alone = cases["alone"]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        # uint8 values are exact in every one of these: the kernel must not care which one carries them.
        cases[f"camera_noise_as_{dtype}"] = {
            "x": alone["x"].to(dtype), "y": alone["y"].to(dtype), "data_range": 255.0,
        }
    # The very call of ragged member 1 alone (the same case object: the child runs it once).
    cases["camera_noise_small_tiles"] = cases["ragged_member1_alone"]
    cases["camera_noise_small_tiles_unrolled"] = {**alone, "tiles": SMALL_TILES + (1, True)}
    cases["camera_noise_wang_downsampled"] = _downsampled_case()
    return cases


def _downsampled_case() -> dict:
    """downsample='wang' as a prior pass: the torch path's float32 box filter (f = 2 here), then the kernel."""
    camera = data.camera()[64:448, 100:484]
    x, y = _chw(camera, torch.uint8)[None], _chw(_noisy(camera, 20, 11), torch.uint8)[None]
    f = wang_downsample_factor(*camera.shape)
    return {
        "x": wang_downsample(x.float(), f), "y": wang_downsample(y.float(), f), "data_range": 255.0,
        "originals": (x, y), "factor": f,
    }


def _guarded(img: torch.Tensor) -> torch.Tensor:
    """`img` as float32 inside a buffer of NaN: a read outside the image would turn the score into NaN."""
    guard = torch.full((64,), float("nan"))
    buf = torch.cat([guard, img.float().flatten(), guard])
    return buf[64 : 64 + img.numel()].view(1, *img.shape)


def _guarded_cases(pairs) -> dict[str, dict]:
    """Short windows and maps narrower than a lane's columns: the kernel must read only inside the image."""
    x, y, _ = pairs["camera_noise_u8"]
    cases = {}
    for name, (h, w), win, tiles in (("guarded_win7", (9, 12), 7, SMALL_TILES), ("guarded_win7_paired", (9, 7), 7,
                                     PAIRED_TILES), ("guarded_11x11_paired", (11, 11), 11, PAIRED_TILES)):
        cases[name] = {
            "x": _guarded(x[:, :h, :w]), "y": _guarded(y[:, :h, :w]), "data_range": 255.0, "win_size": win,
            "gaussian": False, "tiles": tiles,
        }
    return cases


def _invariance_cases(pairs) -> dict[str, dict]:
    """The same pair alone, in batches of several sizes and positions, and in ragged lists."""
    x, y, _ = pairs["camera_noise_u8"]
    x, y = x[:, :20, :30], y[:, :20, :30]
    others = [(torch.roll(x, s, dims=2), torch.roll(y, 2 * s, dims=1)) for s in (3, 7, 11, 17)]
    cases = {"alone": {"x": x[None], "y": y[None], "data_range": 255.0}}
    for size, position in ((2, 1), (3, 2), (5, 0)):
        xs = [o[0] for o in others[: size - 1]]
        ys = [o[1] for o in others[: size - 1]]
        xs.insert(position, x)
        ys.insert(position, y)
        cases[f"batch{size}_at{position}"] = {
            "x": torch.stack(xs), "y": torch.stack(ys), "data_range": 255.0, "position": position,
        }
    # A tall and a wide pair cut from the photo pair twice over, around the pair itself.
    tall = (torch.cat([x, x], dim=1)[:, :28, :20].contiguous(), torch.cat([y, y], dim=1)[:, :28, :20].contiguous())
    wide = (torch.cat([x, x], dim=2)[:, :14, :50].contiguous(), torch.cat([y, y], dim=2)[:, :14, :50].contiguous())
    cases["ragged"] = {
        "xs": [tall[0], x, wide[0]], "ys": [tall[1], y, wide[1]], "data_range": 255.0, "tiles": SMALL_TILES,
    }
    cases["ragged_paired"] = {**cases["ragged"], "tiles": PAIRED_TILES}
    for i, (a, b) in enumerate(zip(cases["ragged"]["xs"], cases["ragged"]["ys"])):
        cases[f"ragged_member{i}_alone"] = {"x": a[None], "y": b[None], "data_range": 255.0, "tiles": SMALL_TILES}
        cases[f"ragged_member{i}_alone_paired"] = {**cases[f"ragged_member{i}_alone"], "tiles": PAIRED_TILES}
    u16x, u16y, _ = pairs["camera12bit_noise_u16"]
    cases["u16_range_tensor"] = {
        "x": torch.stack([u16x, u16x, u16x]), "y": torch.stack([u16y, u16y, u16y]),
        "data_range": torch.tensor([4095.0, 65535.0, 4095.0], dtype=torch.float64),
    }
    return cases


# ------------------------------------------------------------------------------------------ references


def _window_f64(win_size: int, sigma: float, gaussian: bool) -> np.ndarray:
    if not gaussian:
        return np.full(win_size, 1.0 / win_size)
    k = np.arange(win_size) - (win_size - 1) / 2
    g = np.exp(-(k**2) / (2 * sigma**2))
    return g / g.sum()


def _ssim_f64(x: np.ndarray, y: np.ndarray, data_range: float, taps: np.ndarray) -> float:
    """Tiny float64 reference: valid-region separable filtering, population moments, mean of the map."""
    x, y = x.astype(np.float64), y.astype(np.float64)

    def blur(img: np.ndarray) -> np.ndarray:
        rows = sum(t * img[:, k : img.shape[1] - len(taps) + 1 + k] for k, t in enumerate(taps))
        return sum(t * rows[k : rows.shape[0] - len(taps) + 1 + k, :] for k, t in enumerate(taps))

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    smap = (2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(smap.mean())


def _skimage(x: torch.Tensor, y: torch.Tensor, data_range: float, *, win_size=11, gaussian=True) -> list[float]:
    """Per-channel scikit-image SSIM with Wang's settings, in float64."""
    return [
        structural_similarity(
            xc.double().numpy(), yc.double().numpy(), data_range=data_range, gaussian_weights=gaussian, sigma=1.5,
            win_size=win_size, use_sample_covariance=False,
        )
        for xc, yc in zip(x, y)
    ]


# -------------------------------------------------------------------------------------- the two children


def _start_child(args: list[str], *, interpret: bool) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # the kernels must run on the CPU tensors they are given
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_child(proc: subprocess.Popen) -> None:
    try:
        stdout, stderr = proc.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"child {proc.args[2:]} ran past {CHILD_TIMEOUT_S} s:\n{stdout}\n{stderr}") from None
    if proc.returncode != 0:
        raise AssertionError(f"child {proc.args[2]} failed with {proc.returncode}:\n{stdout}\n{stderr}")


def _run_child(args: list[str], *, interpret: bool) -> None:
    _wait_child(_start_child(args, interpret=interpret))


def _interpreted_rows(case: dict) -> int:
    """Rough cost of a case in the interpreter, which takes about the same time per row a program walks
    whatever its width: over images, channels and tiles, 10 rows to fill the window plus the tile's rows."""
    tiles = launcher.TileConfig(*case.get("tiles", ()))
    win = case.get("win_size", 11)
    images = list(case["xs"]) if "xs" in case else list(case["x"])
    rows = 0
    for img in images:
        out_h, out_w = img.shape[-2] - win + 1, img.shape[-1] - win + 1
        for row0 in range(0, out_h, tiles.rows):
            n_rows = min(tiles.rows, out_h - row0)
            walked = 11 * -(-n_rows // 11) if tiles.unroll_rows else n_rows
            rows += img.shape[0] * -(-out_w // tiles.block_w) * (10 + walked)
    return rows


def _share_out(cases: dict[str, dict], n_children: int) -> list[dict[str, dict]]:
    """The cases in n_children groups of about equal interpreter time, the costliest placed first; the names of
    one case object go to the same group, which then runs it once."""
    names: dict[int, list[str]] = {}
    for name, case in cases.items():
        names.setdefault(id(case), []).append(name)
    groups: list[dict[str, dict]] = [{} for _ in range(n_children)]
    load = [0] * n_children
    for same in sorted(names.values(), key=lambda same: -_interpreted_rows(cases[same[0]])):
        least = load.index(min(load))
        groups[least].update((name, cases[name]) for name in same)
        load[least] += _interpreted_rows(cases[same[0]])
    return groups


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Every case's kernel output, from interpreter children running side by side (the interpreter is one
    core's Python; the cases are independent calls, so which child runs which changes no bit)."""
    folder = tmp_path_factory.mktemp("triton_interpret")
    cases = _cases()
    groups = _share_out(cases, n_children=max(1, min(2, os.cpu_count() or 1)))
    children = []
    for i, group in enumerate(groups):
        torch.save(group, folder / f"cases{i}.pt")
        args = ["run", str(folder / f"cases{i}.pt"), str(folder / f"out{i}.pt")]
        children.append(_start_child(args, interpret=True))
    for child in children:
        _wait_child(child)
    out: dict = {}
    for i, _ in enumerate(groups):
        part = torch.load(folder / f"out{i}.pt")
        for key in ("interpreted", "triton_available"):
            assert out.setdefault(key, part[key]) == part[key]
        out.update(part)
    assert out.keys() == {"interpreted", "triton_available", *cases}
    return {"cases": cases, "out": out}


def _child_run(cases_path: str, out_path: str) -> None:
    cases = torch.load(cases_path)
    out = {"interpreted": launcher.triton_interpreted(), "triton_available": launcher.triton_available()}
    done: dict[int, torch.Tensor] = {}  # a case object listed under two names runs once
    for name, case in cases.items():
        if id(case) not in done:
            done[id(case)] = _call_kernel(case)
        out[name] = done[id(case)]
    torch.save(out, out_path)


def _call_kernel(case: dict) -> torch.Tensor:
    options = {k: case[k] for k in ("win_size", "sigma", "gaussian") if k in case}
    if "tiles" not in case:
        if "xs" in case:
            return launcher.ssim_per_channel_triton_ragged(
                case["xs"], case["ys"], data_range=case["data_range"], **options
            )
        return launcher.ssim_per_channel_triton(case["x"], case["y"], data_range=case["data_range"], **options)
    tiles = launcher.TileConfig(*case["tiles"])
    device = (case["xs"][0] if "xs" in case else case["x"]).device
    window = launcher._window(
        device, win_size=options.get("win_size", 11), sigma=options.get("sigma", 1.5), k1=0.01, k2=0.03,
        gaussian=options.get("gaussian", True),
    )
    if "xs" in case:
        return launcher._ragged(case["xs"], case["ys"], data_range=case["data_range"], window=window, tiles=tiles)
    return launcher._same_shape(case["x"], case["y"], data_range=case["data_range"], window=window, tiles=tiles)


def _child_compile(out_path: str) -> None:
    """Compile the tile kernel for an sm_90 target (no GPU needed) and save its TTGIR."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {
        "x_ptr": "*u8", "y_ptr": "*u8", "table_ptr": "*fp64", "shape_ptr": "*fp64", "range_ptr": "*fp64",
        "taps_ptr": "*fp32", "partial_ptr": "*fp64", "height": "i32", "width": "i32", "stride_n": "i32",
        "inv_range": "fp32", "c1": "fp32", "c2": "fp32", "n_strips": "i32", "n_tiles": "i32", "WIN": "constexpr",
        "RAGGED": "constexpr", "RANGE_PER_IMAGE": "constexpr", "BLOCK_W": "constexpr", "ROWS": "constexpr",
        "COLS_PER_LANE": "constexpr", "UNROLL_ROWS": "constexpr",
    }
    tiles = launcher.DEFAULT_TILES
    constants = {
        "WIN": 11, "RAGGED": False, "RANGE_PER_IMAGE": False, "BLOCK_W": tiles.block_w, "ROWS": tiles.rows,
        "COLS_PER_LANE": tiles.cols_per_lane, "UNROLL_ROWS": tiles.unroll_rows,
    }
    source = ASTSource(fn=kernels.ssim_tiles_kernel, signature=signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": tiles.num_warps})
    Path(out_path).write_text(compiled.asm["ttgir"])


# ------------------------------------------------------------------------------------------------ tests

PHOTOS = [
    "camera_noise_u8", "chelsea_jpeg30_u8", "astronaut_blur_u8", "coffee_contrast_u8", "camera12bit_noise_u16",
    "chelsea_gray_blur_f32", "chelsea_gray_blur_f16",
]


def _scores(results: dict, name: str) -> list[list[float]]:
    return results["out"][name].tolist()


@pytest.mark.slow
def test_child_ran_the_interpreter_and_dispatch_stays_off(results):
    assert results["out"]["interpreted"] is True
    # The interpreter works on CPU tensors, but ssim() must never pick it as a fast path on its own.
    assert results["out"]["triton_available"] is False


@pytest.mark.slow
@pytest.mark.parametrize("name", PHOTOS)
def test_matches_skimage_float64_on_real_photos(results, name):
    case = results["cases"][name]
    # fp16 case: the reference sees the same half-precision values, upcast.
    ref = _skimage(case["x"][0], case["y"][0], case["data_range"])
    got = _scores(results, name)[0]
    assert len(got) == len(ref)
    assert max(abs(g - r) for g, r in zip(got, ref)) <= FP32_TOL, (got, ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_matches_the_torch_path(results, name, precision):
    case = results["cases"][name]
    ref = ssim(case["x"], case["y"], data_range=case["data_range"], per_channel=True, precision=precision)
    got = results["out"][name]
    # Not bitwise: the torch path forms centred moments in another order (Chan's two-pass update); both are
    # within ~1e-7 of float64 here, so 1e-6 (the bound) has an order of magnitude to spare.
    assert got.shape == ref.shape
    assert (got.double() - ref.double()).abs().max().item() <= FP32_TOL


@pytest.mark.slow
def test_takes_the_float32_that_wang_downsampling_hands_over(results):
    case = results["cases"]["camera_noise_wang_downsampled"]
    assert case["factor"] == 2 and case["x"].dtype == torch.float32
    x, y = case["originals"]
    ref = ssim(x, y, data_range=255.0, downsample="wang", per_channel=True, precision="fp64")
    got = results["out"]["camera_noise_wang_downsampled"]
    assert abs(got.item() - ref.item()) <= FP32_TOL


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, win_size, sigma, gaussian",
    [("camera_noise_u8", 11, 1.5, True), ("camera_gauss7_sigma1", 7, 1.0, True), ("chelsea_uniform7", 7, 1.5, False),
     ("window_sized_11x11", 11, 1.5, True)],
)
def test_matches_own_float64_reference(results, name, win_size, sigma, gaussian):
    case = results["cases"][name]
    taps = _window_f64(win_size, sigma, gaussian)
    ref = [_ssim_f64(xc.numpy(), yc.numpy(), case["data_range"], taps) for xc, yc in zip(case["x"][0], case["y"][0])]
    got = _scores(results, name)[0]
    assert max(abs(g - r) for g, r in zip(got, ref)) <= FP32_TOL, (got, ref)


@pytest.mark.slow
def test_uniform_window_matches_skimage(results):
    case = results["cases"]["chelsea_uniform7"]
    ref = _skimage(case["x"][0], case["y"][0], 255.0, win_size=7, gaussian=False)
    got = _scores(results, "chelsea_uniform7")[0]
    assert max(abs(g - r) for g, r in zip(got, ref)) <= FP32_TOL, (got, ref)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["torch.float16", "torch.bfloat16", "torch.float32"])
def test_dtype_carrying_the_same_values_gives_the_same_bits(results, dtype):
    # Every dtype is converted to the same fp32 value in registers, so the arithmetic is identical.
    assert _scores(results, f"camera_noise_as_{dtype}") == _scores(results, "alone")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["window_sized_paired", "camera_odd_width_paired"])
def test_two_columns_per_lane_match_own_float64_reference(results, name):
    case = results["cases"][name]
    taps = _window_f64(11, 1.5, True)
    ref = _ssim_f64(case["x"][0, 0].numpy(), case["y"][0, 0].numpy(), 255.0, taps)
    assert abs(_scores(results, name)[0][0] - ref) <= FP32_TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["guarded_win7", "guarded_win7_paired", "guarded_11x11_paired"])
def test_reads_nothing_outside_the_image(results, name):
    case = results["cases"][name]
    taps = _window_f64(case["win_size"], 1.5, False)
    ref = _ssim_f64(case["x"][0, 0].numpy(), case["y"][0, 0].numpy(), 255.0, taps)
    got = _scores(results, name)[0][0]
    assert np.isfinite(got), "a guard NaN outside the image reached the score"
    assert abs(got - ref) <= FP32_TOL


@pytest.mark.slow
def test_unrolled_row_loop_gives_the_same_bits(results):
    # The same operations on the same values in the same order; only the names of the window rotate.
    assert _scores(results, "camera_noise_small_tiles_unrolled") == _scores(results, "camera_noise_small_tiles")


@pytest.mark.slow
def test_tile_shape_changes_only_the_fp64_summation(results):
    small, default = _scores(results, "camera_noise_small_tiles")[0], _scores(results, "alone")[0]
    # Same per-pixel values; sums grouped differently in fp64, then rounded to fp32: at most one fp32 ulp.
    assert abs(small[0] - default[0]) <= 6e-8


@pytest.mark.slow
@pytest.mark.parametrize("batch", ["batch2_at1", "batch3_at2", "batch5_at0"])
def test_batch_invariance_is_bitwise(results, batch):
    position = results["cases"][batch]["position"]
    scores = results["out"][batch]
    assert scores.shape == (len(results["cases"][batch]["x"]), 1)
    assert scores[position].tolist() == _scores(results, "alone")[0]
    # The neighbours are different pairs: a kernel ignoring the batch offset would repeat one score.
    assert len(set(scores[:, 0].tolist())) == len(scores)


@pytest.mark.slow
def test_ragged_batch_matches_each_pair_alone_bitwise(results):
    ragged = _scores(results, "ragged")
    assert len(ragged) == 3
    # Small tiles: the members span 3 x 1, 2 x 2 and 1 x 3 tiles of a 3 x 3 grid, so their slots differ from
    # alone, and each one's grid holds tiles outside its map.
    for i, scores in enumerate(ragged):
        assert scores == _scores(results, f"ragged_member{i}_alone")[0]
    for i, scores in enumerate(_scores(results, "ragged_paired")):
        assert scores == _scores(results, f"ragged_member{i}_alone_paired")[0]
        # Other centring constants than one column per lane: equal to rounding, not to the bit.
        assert abs(scores[0] - ragged[i][0]) <= 2e-7
    taps = _window_f64(11, 1.5, True)
    for i, (x, y) in enumerate(zip(results["cases"]["ragged"]["xs"], results["cases"]["ragged"]["ys"])):
        assert abs(ragged[i][0] - _ssim_f64(x[0].numpy(), y[0].numpy(), 255.0, taps)) <= FP32_TOL


@pytest.mark.slow
def test_per_image_range_tensor(results):
    scores = _scores(results, "u16_range_tensor")
    # Same bits as a scalar range: the kernel rounds 1/L from float64 exactly as the host does.
    assert scores[0] == scores[2] == _scores(results, "camera12bit_noise_u16")[0]
    case = results["cases"]["u16_range_tensor"]
    ref = _skimage(case["x"][1], case["y"][1], 65535.0)
    assert abs(scores[1][0] - ref[0]) <= FP32_TOL
    assert abs(scores[1][0] - scores[0][0]) > 1e-3  # the range really changed the score


@pytest.mark.slow
def test_compiled_kernel_carries_the_whole_sliding_window(tmp_path):
    """Regression: with ring entries initialised as aliases of one tensor, Triton carried only the last
    one through the row loops, so compiled code summed stale rows while the interpreter was right."""
    _run_child(["compile", str(tmp_path / "kernel.ttgir")], interpret=False)
    ttgir = (tmp_path / "kernel.ttgir").read_text()
    loops = [line for line in ttgir.splitlines() if "scf.for" in line]
    assert len(loops) == 2, loops
    for loop in loops:
        carried = re.search(r"->\s*\((.*?)\)\s*:", loop)
        assert carried is not None, loop
        # Ten window rows of four moments, each a (BLOCK_W,) float32 tensor.
        window_values = carried.group(1).count(f"tensor<{launcher.DEFAULT_TILES.block_w}xf32")
        assert window_values >= 40, loop


# --------------------------------------------------------------------------------------------- validation


def _u8(*shape: int, device: str = "cpu") -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.uint8, device=device)


@pytest.mark.parametrize(
    "x, y, options, error, message",
    [
        (_u8(1, 1, 16, 16), _u8(1, 1, 16, 17), {}, ValueError,
         r"same shape, got \(1, 1, 16, 16\) and \(1, 1, 16, 17\)"),
        (_u8(1, 16, 16), _u8(1, 16, 16), {}, ValueError, r"4 dimensions, got shape \(1, 16, 16\)"),
        (_u8(1, 1, 16, 16), _u8(1, 1, 16, 16).float(), {}, TypeError, r"same dtype, got torch.uint8 and torch.float32"),
        (_u8(1, 1, 16, 16).double(), _u8(1, 1, 16, 16).double(), {}, TypeError, r"one of uint8, .*got torch.float64"),
        (_u8(1, 1, 16, 16).bool(), _u8(1, 1, 16, 16).bool(), {}, TypeError, r"got torch.bool"),
        (_u8(1, 1, 16, 16), _u8(1, 1, 16, 16), {"win_size": 13}, ValueError, r"from 1 to 11, got 13"),
        (_u8(1, 1, 16, 16), _u8(1, 1, 16, 16), {"win_size": 8}, ValueError, r"positive odd integer, got 8"),
        (_u8(1, 1, 10, 40), _u8(1, 1, 10, 40), {}, ValueError, r"at least 11x11 \(the window\) for SSIM, got 10x40"),
        (_u8(1, 1, 16, 16), _u8(1, 1, 16, 16), {"data_range": 0.0}, ValueError, r"data_range must be .*got 0.0"),
        (_u8(1, 1, 16, 16), _u8(1, 1, 16, 16), {"data_range": float("nan")}, ValueError, r"got nan"),
        (_u8(1, 1, 16, 16), _u8(1, 1, 16, 16), {"data_range": True}, TypeError, r"got bool True"),
        (_u8(2, 1, 16, 16), _u8(2, 1, 16, 16), {"data_range": torch.ones(3)}, ValueError,
         r"shape \(2,\), got .* \(3,\)"),
        (_u8(1, 1, 16, 16), _u8(1, 1, 16, 16), {"k1": 0.0}, ValueError, r"k1 must be a finite number > 0, got 0.0"),
        (_u8(1, 1, 16, 16), _u8(1, 1, 16, 16), {"sigma": -1.0}, ValueError, r"sigma must be .*got -1.0"),
        (_u8(1, 1, 16, 16, device="meta"), _u8(1, 1, 16, 16, device="meta"), {}, ValueError, r"device, got meta"),
        (_u8(65536, 1, 16, 16, device="meta"), _u8(65536, 1, 16, 16, device="meta"), {}, ValueError,
         r"at most 65535 pairs per call .*got 65536"),
    ],
)
def test_invalid_input_names_expected_and_got(x, y, options, error, message):
    """ssim()'s own rules (through ssim_ray.metric.checks, same messages) and the kernel's extra ones."""
    options = {"data_range": 255.0, **options}
    with pytest.raises(error, match=message):
        launcher.ssim_per_channel_triton(x, y, **options)


@pytest.mark.parametrize(
    "xs, ys, message",
    [
        ([], [], r"non-empty and of equal length, got 0 and 0"),
        ([_u8(1, 16, 16)], [_u8(1, 16, 16), _u8(1, 16, 16)], r"got 1 and 2"),
        ([_u8(1, 16, 16), _u8(3, 16, 16)], [_u8(1, 16, 16), _u8(3, 16, 16)], r"xs\[0\] has 1, .*xs\[1\] has 3"),
        ([_u8(1, 16, 16), _u8(1, 16, 20)], [_u8(1, 16, 16), _u8(1, 16, 21)],
         r"xs\[1\] and ys\[1\] must have the same shape"),
        ([_u8(1, 1, 16, 16)], [_u8(1, 1, 16, 16)], r"xs\[0\] must have 3 dimensions"),
    ],
)
def test_invalid_ragged_input_names_expected_and_got(xs, ys, message):
    with pytest.raises(ValueError, match=message):
        launcher.ssim_per_channel_triton_ragged(xs, ys, data_range=255.0)


def test_tile_config_refuses_untested_shapes():
    with pytest.raises(ValueError, match=r"cols_per_lane must be 1 or 2 and divide block_w"):
        launcher.TileConfig(128, 64, 4, 4)


def test_workspace_counts_inputs_and_grows_with_the_batch_only_by_the_kernels_own_buffers():
    one = triton_workspace_bytes(1, 3, 256, 256, torch.uint8)
    many = triton_workspace_bytes(64, 3, 256, 256, torch.uint8)
    inputs = 2 * 64 * 3 * 256 * 256
    # No SSIM maps: beyond the inputs, the kernel holds a few bytes per tile, far below one fp32 map.
    assert inputs < many < inputs + 64 * 3 * 246 * 246 * 4 // 100
    assert many > 64 * (one - 2 * 3 * 256 * 256) // 2
    assert triton_workspace_bytes(2, 3, 256, 256, torch.float32) > 4 * triton_workspace_bytes(
        2, 3, 256, 256, torch.uint8) - 4096
    with pytest.raises(ValueError, match=r"at least 11x11 .*got 8x300"):
        triton_workspace_bytes(1, 1, 8, 300, torch.uint8)
    with pytest.raises(TypeError, match=r"got torch.int32"):
        triton_workspace_bytes(1, 1, 16, 16, torch.int32)


if __name__ == "__main__":
    if sys.argv[1] == "run":
        _child_run(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "compile":
        _child_compile(sys.argv[2])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} run CASES OUT | compile OUT, got {sys.argv[1:]}")
