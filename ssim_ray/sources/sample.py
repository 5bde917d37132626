"""The built-in sample set: scikit-image's bundled photographs under real distortions, made on first use.

Each photograph (gray and color, 300 to 1411 px, from PNG and JPEG originals) is saved losslessly as the
reference and distorted by JPEG at several qualities, Gaussian noise, Gaussian blur and a contrast change;
the stereo motorcycle pair adds one pair of two real viewpoints. A Parquet manifest lists the pairs with
pass-through columns `image`, `distortion`, `level` and `color`, so that summaries can group by them.

The set is deterministic (fixed seeds, fixed encoder settings) and is written into a temporary folder
that is renamed into place: two processes making it at once both succeed and one folder survives whole.

scikit-image is needed only to make the set, so it is imported inside the function that needs it;
without it the error says how to install it (`pip install 'ssim_ray[sample]'`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

SAMPLE_VERSION = "v1"
MANIFEST_NAME = "manifest.parquet"
# (name, skimage.data loader, color) — sources: camera/moon/coins/astronaut/coffee/chelsea/ihc/motorcycle/
# brick/grass are PNG, rocket/hubble/retina JPEG in scikit-image's data folder.
_PHOTOS = (
    ("camera", "camera", "gray"),
    ("moon", "moon", "gray"),
    ("coins", "coins", "gray"),
    ("astronaut", "astronaut", "rgb"),
    ("coffee", "coffee", "rgb"),
    ("chelsea", "chelsea", "rgb"),
    ("immunohistochemistry", "immunohistochemistry", "rgb"),
    ("rocket", "rocket", "rgb"),
    ("hubble_deep_field", "hubble_deep_field", "rgb"),
    ("retina", "retina", "rgb"),
    ("motorcycle", "stereo_motorcycle", "rgb"),
    ("brick", "brick", "gray"),
    ("grass", "grass", "gray"),
)
JPEG_QUALITIES = (10, 20, 30, 50, 70, 90)
NOISE_SIGMAS = (5.0, 10.0, 20.0, 40.0)
BLUR_SIGMAS = (0.5, 1.0, 2.0, 4.0)
CONTRAST_FACTORS = (0.5, 0.8, 1.25)
# PNG compression level: 1 keeps making the set fast; the pixels are the same at any level.
_PNG_LEVEL = 1


def default_cache_dir() -> str:
    """Where sample sets are cached by default: ~/.cache/ssim_ray/sample, or under $XDG_CACHE_HOME.

    Returns:
        The folder (not created here).

    Example:
        >>> default_cache_dir().endswith(os.path.join("ssim_ray", "sample"))
        True
    """
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ssim_ray", "sample")


def ensure_sample_dataset(*, cache_dir: Optional[str] = None) -> str:
    """The sample set's manifest, made on first use; safe when several processes call it at once.

    Args:
        cache_dir: where sample sets live (one folder per version); default `default_cache_dir()`.

    Returns:
        The local path of the Parquet manifest (columns pair_id, reference, distorted, image,
        distortion, level, color; paths relative to the manifest's folder).

    Raises:
        ImportError: the set is not cached and scikit-image (which provides the photographs) is not
            installed; the message says how to install it (`pip install 'ssim_ray[sample]'`).

    Example:
        >>> import tempfile
        >>> manifest = ensure_sample_dataset(cache_dir=tempfile.mkdtemp())  # doctest: +SKIP
        >>> manifest.endswith("manifest.parquet")  # doctest: +SKIP
        True
    """
    root = cache_dir or default_cache_dir()
    final = os.path.join(root, SAMPLE_VERSION)
    manifest = os.path.join(final, MANIFEST_NAME)
    if os.path.exists(manifest):
        return manifest
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{SAMPLE_VERSION}-making-", dir=root)
    try:
        write_sample_dataset(staging)
        _publish(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _publish(staging: str, final: str) -> None:
    """Rename the finished folder into place; if another process got there first, keep theirs."""
    try:
        os.rename(staging, final)
    except OSError:
        if not os.path.exists(os.path.join(final, MANIFEST_NAME)):
            raise


def write_sample_dataset(folder: str) -> int:
    """Write the images and the manifest into `folder` (which must exist); the manifest is written last.

    Args:
        folder: an empty folder.

    Returns:
        The number of pairs.

    Raises:
        ImportError: scikit-image is not installed (`pip install 'ssim_ray[sample]'`).

    Example:
        >>> import tempfile
        >>> write_sample_dataset(tempfile.mkdtemp()) > 200  # doctest: +SKIP
        True
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Pillow and zlib release the GIL while encoding, which is most of the cost: one photo per thread.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        per_photo = pool.map(lambda photo: _write_photo(folder, *photo), _photographs())
        rows = [row for photo_rows in per_photo for row in photo_rows]
    rows.append(_stereo_pair(folder))
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, os.path.join(folder, MANIFEST_NAME))
    return len(rows)


def _write_photo(folder: str, name: str, pixels: np.ndarray, color: str) -> List[Dict[str, Any]]:
    """The reference and every distortion of one photograph, and their manifest rows."""
    reference = f"reference/{name}.png"
    _save(pixels, os.path.join(folder, reference), fmt="PNG")
    rows = []
    for distortion, level, fmt, distorted in _distortions(pixels, seed=_seed(name)):
        extension = "jpg" if fmt == "JPEG" else "png"
        path = f"distorted/{name}/{distortion}_{level:g}.{extension}"
        _save(distorted, os.path.join(folder, path), fmt=fmt, quality=int(level) if fmt == "JPEG" else None)
        rows.append(_row(name, distortion, level, color, reference, path))
    return rows


def _row(name: str, distortion: str, level: float, color: str, reference: str, distorted: str) -> Dict[str, Any]:
    return {
        "pair_id": f"{name}/{distortion}/{level:g}", "reference": reference, "distorted": distorted,
        "image": name, "distortion": distortion, "level": float(level), "color": color,
    }


def _stereo_pair(folder: str) -> Dict[str, Any]:
    """The two real viewpoints of skimage's stereo motorcycle: independent structure, not a synthetic distortion."""
    _, right, _ = _skimage_data().stereo_motorcycle()
    _save(right, os.path.join(folder, "distorted/motorcycle/right_view.png"), fmt="PNG")
    return _row("motorcycle", "stereo_view", 0.0, "rgb", "reference/motorcycle.png", "distorted/motorcycle/right_view.png")


def _skimage_data() -> Any:
    """scikit-image's data module, imported only when a set is made: a cached set, or any other source,
    runs without scikit-image."""
    try:
        from skimage import data
    except ImportError as exc:
        raise ImportError(
            "the built-in sample set needs scikit-image: pip install 'ssim_ray[sample]' (or scikit-image itself); "
            "or point source=parquet at your own manifest"
        ) from exc
    return data


def _photographs() -> Iterator[Tuple[str, np.ndarray, str]]:
    data = _skimage_data()
    for name, loader, color in _PHOTOS:
        loaded = getattr(data, loader)()
        # stereo_motorcycle() returns (left, right, disparity): the left view is the photograph.
        pixels = np.ascontiguousarray(loaded[0] if isinstance(loaded, tuple) else loaded)
        yield name, pixels, color


def _seed(name: str) -> int:
    """A per-image seed that does not depend on Python's randomised string hash."""
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") % (2**32)


def _distortions(pixels: np.ndarray, *, seed: int) -> Iterator[Tuple[str, float, str, Any]]:
    """(distortion, level, format, image): JPEG files keep their own encoded bytes as the distortion."""
    from PIL import Image, ImageFilter

    image = Image.fromarray(pixels)
    for quality in JPEG_QUALITIES:
        yield "jpeg", float(quality), "JPEG", image
    rng = np.random.default_rng(seed)
    for sigma in NOISE_SIGMAS:
        noisy = np.clip(pixels.astype(np.float64) + rng.normal(0.0, sigma, pixels.shape), 0, 255)
        yield "noise", sigma, "PNG", np.round(noisy).astype(np.uint8)
    for sigma in BLUR_SIGMAS:
        yield "blur", sigma, "PNG", image.filter(ImageFilter.GaussianBlur(radius=sigma))
    mean = float(pixels.mean())
    for factor in CONTRAST_FACTORS:
        changed = np.clip(mean + factor * (pixels.astype(np.float64) - mean), 0, 255)
        yield "contrast", factor, "PNG", np.round(changed).astype(np.uint8)


def _save(pixels: Any, path: str, *, fmt: str, quality: Optional[int] = None) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    if fmt == "JPEG":
        image.save(path, "JPEG", quality=quality)
    else:
        image.save(path, "PNG", compress_level=_PNG_LEVEL)
