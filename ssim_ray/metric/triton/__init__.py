"""The `wang2004` SSIM as one fused Triton kernel: `kernels` holds the @triton.jit code, `launcher` its
Python side (checks shared with ssim() through `ssim_ray.metric.checks`, window, geometry, launches), and
`memory` the device bytes of a call.

`ssim(..., kernel="triton")` reaches it through `ssim_ray.metric.kernel_choice`; nothing here imports back.
Importing this package works without triton: `triton_installed()` then says False.
"""

from ssim_ray.metric.triton.launcher import (
    DEFAULT_TILES,
    MAX_BATCH,
    MAX_WIN_SIZE,
    SUPPORTED_DTYPES,
    TileConfig,
    ssim_per_channel_triton,
    ssim_per_channel_triton_ragged,
    triton_available,
    triton_installed,
    triton_interpreted,
)
from ssim_ray.metric.triton.memory import triton_workspace_bytes

__all__ = ["DEFAULT_TILES", "MAX_BATCH", "MAX_WIN_SIZE", "SUPPORTED_DTYPES", "TileConfig", "ssim_per_channel_triton",
           "ssim_per_channel_triton_ragged", "triton_available", "triton_installed", "triton_interpreted",
           "triton_workspace_bytes"]
