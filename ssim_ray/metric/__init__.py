"""The metrics, pure torch: tensors in, scores out. Imports nothing else of the package; no I/O, Ray,
Hydra or environment variables.

Modules by concern: `structural` (the public `ssim()`, its settings and the channel mean), `peak_snr`
(`psnr()`, `mse()`), `multiscale` (`ms_ssim()` as msssim.m defines it, and its undefined cases), `batches`
(how a call becomes same-shape batches, ragged lists included), `checks` (input and option rules), `window`
(taps, sizes, the border crop, ssim.m downsampling), `tiles` (moments, the maps, fixed tiles), `compiled`
(the CPU kernel and its compile policy), `kernel_choice` (`kernel=`, `compile=`, `kernel_in_use`), and
`triton/` (the fused CUDA kernel and its launcher).
"""

from ssim_ray.metric.checks import COMPILE_POLICIES, COVARIANCES, KERNELS
from ssim_ray.metric.kernel_choice import kernel_in_use
from ssim_ray.metric.multiscale import (
    MS_SSIM_WEIGHTS,
    NONPOSITIVE_TERM,
    TOO_SMALL,
    MSSSIMUndefinedError,
    ms_ssim,
    ms_ssim_db,
    ms_ssim_from_terms,
    ms_ssim_nonpositive,
    ms_ssim_settings,
    ms_ssim_terms,
    ms_ssim_terms_and_ssim,
    ms_ssim_too_small,
)
from ssim_ray.metric.peak_snr import mse, psnr, psnr_from_mse, psnr_settings
from ssim_ray.metric.structural import METRIC_NAME, mean_over_channels, metric_settings, ssim
from ssim_ray.metric.window import gaussian_window_1d, output_size, wang_downsample_factor

__all__ = ["COMPILE_POLICIES", "COVARIANCES", "KERNELS", "METRIC_NAME", "MS_SSIM_WEIGHTS", "MSSSIMUndefinedError",
           "NONPOSITIVE_TERM", "TOO_SMALL", "gaussian_window_1d", "kernel_in_use", "mean_over_channels",
           "metric_settings", "ms_ssim", "ms_ssim_db", "ms_ssim_from_terms", "ms_ssim_nonpositive",
           "ms_ssim_settings", "ms_ssim_terms", "ms_ssim_terms_and_ssim", "ms_ssim_too_small", "mse", "output_size", "psnr", "psnr_from_mse",
           "psnr_settings", "ssim", "wang_downsample_factor"]
