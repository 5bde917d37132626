"""Float64 numpy transcriptions of published metric code that does not install here, and the real test pairs.

Written from the published descriptions (FIELD-NOTES.md, "PSNR, MS-SSIM and the conventions people publish
with"), step by step as the original runs, with no code of ssim_ray: an independent second computation.

- `msssim_m`: Wang, Simoncelli and Bovik's `msssim.m` (2003) with its `ssim_index_new`: per scale
  `filter2(window, img, 'valid')` moments, E[x^2] - mu^2 variances, the SSIM and cs maps and their `mean2`;
  between scales `imfilter(img, ones(2)/4, 'symmetric', 'same')` then `img(1:2:end, 1:2:end)`; the product
  of mcs(1:4).^w(1:4) and mssim(5)^w(5); it refuses min(M, N) / 2^4 < 11.
- `basicsr_to_y`, `basicsr_psnr`, `basicsr_ssim`: BasicSR's `calculate_psnr` / `calculate_ssim`
  (`basicsr/metrics/psnr_ssim.py`) on HWC BGR uint8 images as OpenCV reads them: `crop_border` pixels off
  every side, `to_y_channel` (float32 [0, 1], `bgr2ycbcr(y_only=True)` unrounded, back to [0, 255]) when
  `test_y_channel`, float64, L = 255; SSIM with `cv2.getGaussianKernel(11, 1.5)`'s outer product over the
  valid region, E[x^2] - mu^2 variances, per-channel mean.

The pairs: scikit-image's photographs under real distortions (JPEG, noise, blur, and bicubic down-and-up
scaling by 2, 3 and 4 as super-resolution data has), cropped to odd and even sizes.
"""

from __future__ import annotations

import io
from typing import Tuple

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage
from skimage import data

MSSSIM_WEIGHTS = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])


# ------------------------------------------------------------------------------------------------ msssim.m


def fspecial_gaussian(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """MATLAB fspecial('gaussian', size, sigma): the 2-D kernel, normalised to sum 1."""
    half = (size - 1) / 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    kernel = np.exp(-(xx * xx + yy * yy) / (2.0 * sigma * sigma))
    return kernel / kernel.sum()


def filter2_valid(window: np.ndarray, img: np.ndarray) -> np.ndarray:
    """MATLAB filter2(window, img, 'valid'): 2-D correlation where the window lies inside the image."""
    full = ndimage.correlate(img, window, mode="constant", cval=0.0)
    half = window.shape[0] // 2
    return full[half : img.shape[0] - half, half : img.shape[1] - half]


def ssim_index_new(img1: np.ndarray, img2: np.ndarray, *, k=(0.01, 0.03), window=None, L: float = 255.0):
    """msssim.m's helper: (mssim, mcs) of two 2-D float64 images."""
    window = fspecial_gaussian() if window is None else window
    c1, c2 = (k[0] * L) ** 2, (k[1] * L) ** 2
    mu1, mu2 = filter2_valid(window, img1), filter2_valid(window, img2)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = filter2_valid(window, img1 * img1) - mu1_sq
    sigma2_sq = filter2_valid(window, img2 * img2) - mu2_sq
    sigma12 = filter2_valid(window, img1 * img2) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    cs_map = (2 * sigma12 + c2) / (sigma1_sq + sigma2_sq + c2)
    return ssim_map.mean(), cs_map.mean()


def imfilter_box2_symmetric_same(img: np.ndarray) -> np.ndarray:
    """imfilter(img, ones(2)/4, 'symmetric', 'same'): kernel centre at (1, 1) (1-based, floor((2+1)/2)),
    so output (i, j) averages rows i, i+1 and columns j, j+1; past the end the edge pixel repeats."""
    padded = np.pad(img, ((0, 1), (0, 1)), mode="symmetric")
    h, w = img.shape
    return (0.25 * padded[:h, :w] + 0.25 * padded[1 : h + 1, :w] + 0.25 * padded[:h, 1 : w + 1]
            + 0.25 * padded[1 : h + 1, 1 : w + 1])


def msssim_m_terms(img1: np.ndarray, img2: np.ndarray, *, level: int = 5, L: float = 255.0) -> np.ndarray:
    """(mcs(1..level-1), mssim(level)) of two 2-D images, as msssim.m loops over the scales."""
    if min(img1.shape) / 2 ** (level - 1) < 11:
        raise ValueError("msssim.m refuses: image too small for the number of levels")
    im1, im2 = img1.astype(np.float64), img2.astype(np.float64)
    mssim, mcs = [], []
    for _ in range(level):
        s, c = ssim_index_new(im1, im2, L=L)
        mssim.append(s)
        mcs.append(c)
        im1 = imfilter_box2_symmetric_same(im1)[::2, ::2]
        im2 = imfilter_box2_symmetric_same(im2)[::2, ::2]
    return np.array(mcs[: level - 1] + [mssim[level - 1]])


def msssim_m(img1: np.ndarray, img2: np.ndarray, *, L: float = 255.0) -> float:
    """msssim.m's overall_mssim (method 'product') of two 2-D images; NaN where MATLAB's is complex."""
    terms = msssim_m_terms(img1, img2, L=L)
    if (terms <= 0).any():
        return float("nan")
    return float(np.prod(terms[:4] ** MSSSIM_WEIGHTS[:4]) * terms[4] ** MSSSIM_WEIGHTS[4])


def msssim_m_color(x: np.ndarray, y: np.ndarray, *, L: float = 255.0) -> float:
    """(C, H, W): msssim.m per channel, then the mean over channels (pytorch-msssim's colour convention)."""
    return float(np.mean([msssim_m(a, b, L=L) for a, b in zip(x, y)]))


# ------------------------------------------------------------------------------------------------ BasicSR


def basicsr_to_y(img_bgr: np.ndarray) -> np.ndarray:
    """to_y_channel: float32 / 255, bgr2ycbcr(y_only=True) on float input (dot in float64 + 16, / 255,
    stored float32), then * 255 in float32; a one-channel image is only scaled there and back."""
    img = img_bgr.astype(np.float32) / 255.0
    if img.ndim == 3 and img.shape[2] == 3:
        y = np.dot(img, [24.966, 128.553, 65.481]) + 16.0
        y = y / 255.0
        img = y.astype(np.float32)[..., None]
    return img * 255.0


def _crop(img: np.ndarray, crop_border: int) -> np.ndarray:
    return img if crop_border == 0 else img[crop_border:-crop_border, crop_border:-crop_border, ...]


def basicsr_psnr(img: np.ndarray, img2: np.ndarray, *, crop_border: int, test_y_channel: bool) -> float:
    """calculate_psnr on HWC BGR uint8 images."""
    img, img2 = _crop(img, crop_border), _crop(img2, crop_border)
    if test_y_channel:
        img, img2 = basicsr_to_y(img), basicsr_to_y(img2)
    img, img2 = img.astype(np.float64), img2.astype(np.float64)
    mse = np.mean((img - img2) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0 * 255.0 / mse))


def _basicsr_ssim_plane(img: np.ndarray, img2: np.ndarray) -> float:
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    offsets = np.arange(11) - 5.0
    kernel = np.exp(-(offsets * offsets) / (2 * 1.5 * 1.5))  # cv2.getGaussianKernel(11, 1.5), float64
    kernel = kernel / kernel.sum()

    def blur(a: np.ndarray) -> np.ndarray:
        # cv2.filter2D(a, -1, np.outer(kernel, kernel))[5:-5, 5:-5]; the window is that outer product, so two
        # 1-D passes give the same sums (to float64 rounding) 10x faster, which the sample-set test needs.
        rows = ndimage.correlate1d(a, kernel, axis=0, mode="mirror")
        return ndimage.correlate1d(rows, kernel, axis=1, mode="mirror")[5:-5, 5:-5]

    mu1, mu2 = blur(img), blur(img2)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 ** 2, mu2 ** 2, mu1 * mu2
    sigma1_sq = blur(img ** 2) - mu1_sq
    sigma2_sq = blur(img2 ** 2) - mu2_sq
    sigma12 = blur(img * img2) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return float(ssim_map.mean())


def basicsr_ssim(img: np.ndarray, img2: np.ndarray, *, crop_border: int, test_y_channel: bool) -> float:
    """calculate_ssim on HWC BGR uint8 images (a 2-D image is one channel)."""
    img = img[..., None] if img.ndim == 2 else img
    img2 = img2[..., None] if img2.ndim == 2 else img2
    img, img2 = _crop(img, crop_border), _crop(img2, crop_border)
    if test_y_channel:
        img, img2 = basicsr_to_y(img), basicsr_to_y(img2)
    img, img2 = img.astype(np.float64), img2.astype(np.float64)
    return float(np.mean([_basicsr_ssim_plane(img[..., c], img2[..., c]) for c in range(img.shape[2])]))


# ------------------------------------------------------------------------------------------------ pairs


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert(img.mode)


def distort(img: Image.Image, kind: str, level: float, seed: int = 0) -> Image.Image:
    """A real distortion of a Pillow image: jpeg (quality), noise (sigma), blur (radius), or sr (bicubic
    down by `level` and back up: what a super-resolution model's input looks like upscaled)."""
    if kind == "jpeg":
        return _jpeg(img, int(level))
    if kind == "noise":
        arr = np.asarray(img).astype(np.float64)
        noisy = arr + np.random.default_rng(seed).normal(0.0, level, arr.shape)
        return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), img.mode)
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=level))
    if kind == "sr":
        factor = int(level)
        small = img.resize((img.width // factor, img.height // factor), Image.Resampling.BICUBIC)
        return small.resize(img.size, Image.Resampling.BICUBIC)
    raise ValueError(f"unknown distortion {kind!r}")


def photo_pair(name: str, height: int, width: int, kind: str, level: float, *, mode: str = "RGB",
               top: int = 0, left: int = 0, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """A (height, width) crop of a scikit-image photograph and its distorted copy, HWC (or HW) uint8.

    SR pairs are cut from a crop whose sides are multiples of the factor, as SR datasets' modcrop does.
    """
    img = Image.fromarray(getattr(data, name)()).convert(mode)
    ref = img.crop((left, top, left + width, top + height))
    return np.array(ref), np.array(distort(ref, kind, level, seed))


def chw(a: np.ndarray) -> np.ndarray:
    """HWC (or HW) -> contiguous CHW."""
    return a[None].copy() if a.ndim == 2 else np.ascontiguousarray(a.transpose(2, 0, 1))
