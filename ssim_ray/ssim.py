"""The `wang2004` SSIM: pure torch, tensors in, tensors out. No I/O, Ray or Hydra here."""

from __future__ import annotations

import math

METRIC_NAME = "wang2004"


def matlab_round(value: float) -> int:
    """Round half away from zero, as MATLAB's round() does (Python's round() rounds half to even)."""
    return int(math.floor(abs(value) + 0.5)) * (1 if value >= 0 else -1)


def wang_downsample_factor(height: int, width: int) -> int:
    """The factor of ssim.m (2009): f = max(1, round(min(H, W) / 256)) with MATLAB rounding."""
    return max(1, matlab_round(min(height, width) / 256))


def output_size(height: int, width: int, *, downsample: str | None) -> tuple[int, int]:
    """Image size the SSIM window sees: unchanged, or after `downsample='wang'` (every f-th pixel)."""
    if downsample is None:
        return height, width
    if downsample != "wang":
        raise ValueError(f"downsample must be None or 'wang', got {downsample!r}")
    f = wang_downsample_factor(height, width)
    return -(-height // f), -(-width // f)
