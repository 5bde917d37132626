"""The metric, pure torch: tensors in, scores out. Imports nothing else of the package; no I/O, Ray,
Hydra or environment variables.

Modules by concern: `structural` (the public `ssim()`, settings, channel mean, batch and ragged handling),
`checks` (input and option rules), `window` (taps, sizes, ssim.m downsampling), `tiles` (moments, the map,
fixed tiles), `compiled` (the CPU kernel and its compile policy), `kernel_choice` (`kernel=`, `compile=`,
`kernel_in_use`), and `triton/` (the fused CUDA kernel and its launcher).
"""

from ssim_ray.metric.checks import COMPILE_POLICIES, KERNELS
from ssim_ray.metric.kernel_choice import kernel_in_use
from ssim_ray.metric.structural import METRIC_NAME, mean_over_channels, metric_settings, ssim
from ssim_ray.metric.window import gaussian_window_1d, output_size, wang_downsample_factor

__all__ = ["COMPILE_POLICIES", "KERNELS", "METRIC_NAME", "gaussian_window_1d", "kernel_in_use", "mean_over_channels",
           "metric_settings", "output_size", "ssim", "wang_downsample_factor"]
