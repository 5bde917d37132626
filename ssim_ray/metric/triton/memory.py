"""Device memory of one fused-kernel call, as torch's CUDA caching allocator counts it: for memory budgets.

The kernel keeps no SSIM maps, so a call holds its two inputs and a few bytes per tile; the GPU tests compare
this count with `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import torch

from ssim_ray.metric.triton import launcher
from ssim_ray.metric.window import check_size

# torch's CUDA caching allocator rounds every block up to 512 bytes.
_ALLOCATION_GRANULE = 512


def _allocated(nbytes: int) -> int:
    """A request of `nbytes` as torch's CUDA caching allocator rounds it."""
    return -(-nbytes // _ALLOCATION_GRANULE) * _ALLOCATION_GRANULE


def triton_workspace_bytes(
    n: int, c: int, h: int, w: int, dtype: torch.dtype, *, win_size: int = 11, per_image_range: bool = False
) -> int:
    """Device bytes one same-shape kernel call holds at its peak: both inputs plus the kernel's own buffers.

    The kernel keeps no SSIM maps: besides x and y it allocates one float64 sum per tile and image-channel
    and the (N, C) float32 scores. Each buffer is rounded up to 512 bytes as torch's CUDA caching allocator
    rounds it; `torch.cuda.max_memory_allocated` for the call can differ only where the allocator hands a
    large buffer a bigger cached block than it asked for (less than 2 MiB per input, measured in the gpu
    tests). The memory probe keeps its own margin on top.

    Args:
        n: Batch size.
        c: Channels.
        h: Height.
        w: Width.
        dtype: Pixel dtype of x and y (one of `SUPPORTED_DTYPES`).
        win_size: Window size (the valid map, hence the number of tiles, depends on it).
        per_image_range: Whether `data_range` is a (N,) tensor; counts one float64 copy of it (an upper
            bound: no copy is made when it is already float64 on the device).

    Returns:
        Bytes.

    Raises:
        ValueError: For sizes below one or smaller than the window.
        TypeError: For an unsupported dtype.

    Example:
        >>> import torch
        >>> triton_workspace_bytes(64, 3, 256, 256, torch.uint8) > 2 * 64 * 3 * 256 * 256
        True
    """
    for name, value in (("n", n), ("c", c), ("h", h), ("w", w)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    launcher.check_pixel_dtype(dtype)
    launcher.check_kernel_window(win_size, 1.0, True)
    check_size(h, w, win_size)
    itemsize = torch.empty((), dtype=dtype).element_size()
    tile_rows, tile_cols = launcher.grid_dims(h, w, win_size, launcher.DEFAULT_TILES)
    sizes = [n * c * h * w * itemsize] * 2 + [n * c * tile_rows * tile_cols * 8, n * c * 4]
    if per_image_range:
        sizes.append(n * 8)
    return sum(_allocated(size) for size in sizes)
