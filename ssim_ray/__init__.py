"""ssim_ray: exact, fast, crash-safe SSIM audits of image-pair datasets on Ray."""
