"""Which kernel scores a batch: ssim()'s `kernel=` and `compile=` options, what each kernel can serve, and
`kernel_in_use` to say which one scored on a device.

- 'torch': the tile path (`ssim_ray.metric.tiles`), on CPU compiled per the compile policy
  (`ssim_ray.metric.compiled`), eager on other devices. It serves every call.
- 'triton': the fused kernel (`ssim_ray.metric.triton`). It serves float32 scores ('fp32', 'amp') without
  maps, population moments, windows of up to 11 taps, at most 65535 pairs per batch, pixels it reads in their own dtype (not
  float64), on CUDA - or CPU tensors when triton runs interpreted. Anything else is refused with a
  ValueError that lists why, never handed silently to the torch path: the kernel a run records is the one
  that scored. (The two agree within 1e-6, not to the bit.)
- 'auto': the torch path everywhere, for now (`resolve_kernel` says why).

The choice is an argument of every call; nothing here reads or writes the environment.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ssim_ray.metric.checks import (
    COMPILE_POLICIES,
    COVARIANCES,
    KERNELS,
    PRECISIONS,
    check_choice,
    check_window,
    dtype_names,
)
from ssim_ray.metric.compiled import TileBatch, compiled_in_use, torch_tile_sums_of
from ssim_ray.metric.tiles import (
    TileVariant,
    eager_tile_maps,
    pairwise_sum_last,
    plane_sums_in_order,
    pair_tiles,
    stitch,
    taps_in,
    tile_extents,
    tile_grid,
)
from ssim_ray.metric.triton import launcher
from ssim_ray.metric.window import gaussian_window_1d

KERNELS_IN_USE = ("torch-compiled", "torch-eager", "triton")


def resolve_kernel(kernel: str) -> str:
    """'torch' or 'triton': the kernel that `kernel` (already checked) names on this machine."""
    # 'auto' is the torch path everywhere for now: the Triton kernel matches it within 1e-6 under Triton's
    # interpreter and compiles for sm_90, but it has not yet run on a real GPU here (issue 7). Once the
    # "ssim() through the kernel" step of scripts/gpu_check.sh passes on one, a session flips 'auto' to
    # 'triton' for the CUDA batches that `triton_refusals` accepts, and the torch path for the rest.
    return "torch" if kernel == "auto" else kernel


def triton_refusals(
    device: torch.device,
    *,
    precision: str,
    return_map: bool,
    win_size: int,
    pixel_dtype: Optional[torch.dtype] = None,
    batch: Optional[int] = None,
    covariance: str = "population",
) -> List[str]:
    """Why the fused kernel cannot score such a call here, one reason each; empty when it can.

    Args:
        device: Where the tensors are.
        precision: ssim()'s precision.
        return_map: Whether maps are asked for.
        win_size: Window taps.
        pixel_dtype: The dtype the kernel would read (after downsampling); None: not known yet.
        batch: Pairs in the batch; None: not known yet.
        covariance: ssim()'s covariance ('population' or 'sample').

    Returns:
        Reasons as phrases, e.g. "precision='fp64': the kernel computes in float32".
    """
    reasons = []
    if not launcher.triton_installed():
        reasons.append("triton is not installed")
    elif launcher.triton_interpreted():
        if device.type != "cpu":
            reasons.append(f"the tensors are on {device}, but triton runs interpreted in this process "
                           "(TRITON_INTERPRET=1), which serves CPU tensors only")
    elif device.type != "cuda":
        reasons.append(f"the tensors are on {device}: the compiled kernel needs CUDA "
                       "(CPU tensors only under TRITON_INTERPRET=1)")
    elif not torch.cuda.is_available():
        reasons.append("CUDA is not available on this machine")
    if precision == "fp64":
        reasons.append("precision='fp64': the kernel computes in float32")
    if return_map:
        reasons.append("return_map=True: the kernel keeps no SSIM maps")
    if covariance != "population":
        reasons.append(f"covariance={covariance!r}: the kernel computes population moments")
    if win_size > launcher.MAX_WIN_SIZE:
        reasons.append(f"win_size={win_size}: the kernel's window has at most {launcher.MAX_WIN_SIZE} taps")
    if pixel_dtype is not None and pixel_dtype not in launcher.SUPPORTED_DTYPES:
        reasons.append(f"pixels of dtype {dtype_names([pixel_dtype])}: the kernel reads "
                       f"{dtype_names(launcher.SUPPORTED_DTYPES)}")
    if batch is not None and batch > launcher.MAX_BATCH:
        reasons.append(f"{batch} pairs in one batch: the kernel's grid takes at most {launcher.MAX_BATCH}")
    return reasons


def refuse_unservable(kernel: str, reasons: List[str]) -> None:
    """Raise the ValueError that says why `kernel` (resolved) cannot score a call; nothing if it can."""
    if kernel == "triton" and reasons:
        raise ValueError(
            "kernel='triton' cannot score this call: " + "; ".join(reasons)
            + ". kernel='torch' scores every call (the torch path)"
        )


def per_channel_means(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kernel: str,
    policy: str,
    data_range: float,
    window: torch.Tensor,
    window_spec: Tuple[int, float, bool],
    k1: float,
    k2: float,
    dtype: torch.dtype,
    return_map: bool,
    covariance: str = "population",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Mean SSIM per image and channel, (N, C) in `dtype`, of one validated same-shape batch (N, C, H, W).

    `x` and `y` may still be integer or half precision; they are converted here. This is the one place
    that runs the chosen kernel: `kernel` is resolved and accepted (`refuse_unservable`), `policy` is the
    compile policy of the CPU torch kernel.
    """
    if kernel == "triton":
        win_size, sigma, gaussian = window_spec
        means = launcher.ssim_per_channel_triton(
            x, y, data_range=data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2, gaussian=gaussian
        )
        return means, None
    variant = TileVariant(sample_covariance=covariance == "sample")
    means, ssim_map = tile_means(x, y, policy=policy, data_range=data_range, window=window, k1=k1, k2=k2,
                                 dtype=dtype, variant=variant, return_map=return_map)
    return means.to(dtype)[..., 0], ssim_map


def tile_means(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    policy: str,
    data_range: float,
    window: torch.Tensor,
    k1: float,
    k2: float,
    dtype: torch.dtype,
    variant: TileVariant,
    return_map: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Float64 means of the tile maps by the torch path: (N, C, 1) SSIM, (N, C, 2) SSIM and cs with
    `variant.with_cs`, or (N, C, 1) cs with `variant.cs_only`, of one validated same-shape batch (N, C, H, W)
    computed in `dtype` [and the SSIM maps; cs maps for `cs_only`].

    Each mean is an image's own tile sums added in an order fixed by its size, then divided by the size of
    its valid map: the same bits in any batch.
    """
    if not return_map:
        return tile_means_of([(x, y, variant)], policy=policy, data_range=data_range, window=window, k1=k1, k2=k2,
                             dtype=dtype)[0], None
    batch = _tile_batch(x, y, data_range=data_range, window=window, k1=k1, k2=k2, dtype=dtype, variant=variant)
    # diagnostic path: eager, same ops, so the same bits as the compiled sums
    sums, tile_maps = eager_tile_maps(batch.tiles, batch.rows, batch.cols, batch.consts, batch.taps, variant)
    count, channels, height, width = x.shape
    win = window.numel()
    ssim_map = stitch(tile_maps, count * channels, batch.tiles.grid).reshape(count, channels, height - win + 1, -1)
    return _means(sums, batch, x.shape, win), ssim_map


def tile_means_of(
    batches: Sequence[Tuple[torch.Tensor, torch.Tensor, TileVariant]],
    *,
    policy: str,
    data_range: float,
    window: torch.Tensor,
    k1: float,
    k2: float,
    dtype: torch.dtype,
) -> List[torch.Tensor]:
    """`tile_means` (without maps) of several (x, y, variant) batches at once - MS-SSIM's scales - their
    compiled calls sharing one queue of the pool (`compiled.torch_tile_sums_of`): the same bits as one by one."""
    planned = [_tile_batch(x, y, data_range=data_range, window=window, k1=k1, k2=k2, dtype=dtype, variant=variant)
               for x, y, variant in batches]
    sums = torch_tile_sums_of(planned, policy=policy)
    return [_means(part, batch, x.shape, window.numel()) for part, batch, (x, _, _) in zip(sums, planned, batches)]


def _tile_batch(x: torch.Tensor, y: torch.Tensor, *, data_range: float, window: torch.Tensor, k1: float, k2: float,
                dtype: torch.dtype, variant: TileVariant) -> TileBatch:
    """The tiles of a (N, C, H, W) pair batch, their extents and constants, ready to sum."""
    count, channels, height, width = x.shape
    win = window.numel()
    values = [(k1 * data_range) ** 2, (k2 * data_range) ** 2]
    if variant.sample_covariance:  # scikit-image's N / (N - 1) with N the window's pixel count, Gaussian or not
        values.append(win * win / (win * win - 1.0))
    consts = torch.tensor(values, dtype=dtype, device=x.device)
    planes = count * channels
    grid = tile_grid(height, width, win)
    tiles = pair_tiles(x.reshape(planes, height, width), y.reshape(planes, height, width), grid, dtype)
    rows, cols = tile_extents(planes, grid, x.device)
    return TileBatch(tiles, rows, cols, consts, taps_in(window, dtype), variant)


def _means(sums: torch.Tensor, batch: TileBatch, shape: torch.Size, win: int) -> torch.Tensor:
    """(N, C, maps) means from a batch's (K, ...) tile sums: each plane's in a fixed order, then / its map size."""
    count, channels, height, width = shape
    planes = count * channels
    sums = plane_sums_in_order(sums, planes, batch.tiles.grid).reshape(planes, -1, batch.variant.sums_per_tile)
    plane_sums = pairwise_sum_last(sums.transpose(1, 2))
    # A tensor divisor: true division on every device (CUDA turns a scalar divisor into a reciprocal).
    count_px = torch.full_like(plane_sums, (height - win + 1) * (width - win + 1))
    return (plane_sums / count_px).reshape(count, channels, -1)


def _as_device(device: object) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a torch.device or a str such as 'cpu', got {type(device).__name__} {device!r}")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda', got {device!r}") from exc


def kernel_in_use(
    device: object,
    *,
    kernel: str = "auto",
    compile: str = "auto",
    precision: str = "fp32",
    win_size: int = 11,
    sigma: float = 1.5,
    gaussian: bool = True,
    covariance: str = "population",
) -> str:
    """Which kernel `ssim()` runs on `device` with these options, in this process: for a job's records.

    'triton' is the fused kernel; 'torch-compiled' the torch path's compiled CPU kernel (C, built at run
    time: `ssim_ray.metric.native`);
    'torch-eager' the torch path without it (other devices, compile='never', before 'auto' has compiled,
    or where compiling failed). After an ssim() call with the same options this is the kernel that call
    ran (a compile happens as a call starts); before any, the one the first call will run ('always'
    compiles on first use). The compiled kernel is kept per precision, window and covariance, hence those
    options.

    Args:
        device: 'cpu', 'cuda', 'cuda:1' or a torch.device.
        kernel: 'auto', 'torch' or 'triton', as given to ssim().
        compile: 'auto', 'always' or 'never', as given to ssim().
        precision: 'fp32', 'fp64' or 'amp', as given to ssim().
        win_size: Window taps, as given to ssim().
        sigma: Gaussian standard deviation, as given to ssim().
        gaussian: Gaussian (True) or uniform (False) window, as given to ssim().
        covariance: 'population' or 'sample', as given to ssim().

    Returns:
        One of KERNELS_IN_USE: 'torch-compiled', 'torch-eager' or 'triton'.

    Raises:
        TypeError: An option or the device has the wrong type.
        ValueError: An option is not one of its choices, or kernel='triton' cannot run here with these
            options (the same message ssim() gives).

    Example:
        >>> kernel_in_use("cpu", kernel="torch", compile="never")
        'torch-eager'
        >>> kernel_in_use("cuda", kernel="auto")  # the torch path, eager on CUDA
        'torch-eager'
        >>> kernel_in_use("cpu", kernel="triton", precision="fp64")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: kernel='triton' cannot score this call: ...precision='fp64': the kernel computes in float32...
    """
    kernel = resolve_kernel(check_choice("kernel", kernel, KERNELS))
    check_choice("compile", compile, COMPILE_POLICIES)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    check_window(win_size, sigma, gaussian)
    check_choice("covariance", covariance, COVARIANCES)
    device = _as_device(device)
    if kernel == "triton":
        refuse_unservable(kernel, triton_refusals(device, precision=precision, return_map=False, win_size=win_size,
                                                  covariance=covariance))
        return "triton"
    if device.type != "cpu":
        return "torch-eager"
    dtype = torch.float64 if precision == "fp64" else torch.float32
    taps = taps_in(gaussian_window_1d(win_size, sigma, gaussian=gaussian), dtype)
    variant = TileVariant(sample_covariance=covariance == "sample")
    return "torch-compiled" if compiled_in_use(dtype, taps, policy=compile, variant=variant) else "torch-eager"
