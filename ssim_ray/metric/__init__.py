"""The metric, pure torch: tensors in, scores out. Imports nothing else of the package; no I/O, Ray,
Hydra or environment variables."""

from ssim_ray.metric.structural import (
    METRIC_NAME,
    gaussian_window_1d,
    mean_over_channels,
    metric_settings,
    output_size,
    ssim,
    wang_downsample_factor,
)

__all__ = ["METRIC_NAME", "gaussian_window_1d", "mean_over_channels", "metric_settings", "output_size", "ssim",
           "wang_downsample_factor"]
