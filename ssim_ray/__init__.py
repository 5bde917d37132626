"""ssim_ray: exact, fast, crash-safe SSIM audits of image-pair datasets on Ray."""

from ssim_ray.metric import METRIC_NAME, ms_ssim, psnr, ssim

__all__ = ["METRIC_NAME", "ms_ssim", "psnr", "ssim"]
