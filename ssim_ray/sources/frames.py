"""Which pixels of a file are its image: how many frames it holds, its EXIF orientation, and turning
decoded pixels upright. Pure functions of an opened Pillow image or a pixel array; the policies
(`source.multi_frame`, `source.exif_orientation`) are applied by `decode` and `loading`.

Frames: APNG, multi-page TIFF and animated WebP count every frame or page Pillow sees. An MPO (a JPEG
holding several pictures) counts its pictures but not its "Large Thumbnail" entries: cameras add one to
ordinary photographs as a preview of the same picture, and refusing every such JPEG would say nothing.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
from PIL import Image

EXIF_ORIENTATION_TAG = 0x0112
# How each EXIF orientation is stored, said as what turns it upright (EXIF 2.3, tag 274).
ORIENTATIONS: Dict[int, str] = {
    1: "upright as stored",
    2: "mirrored left-right",
    3: "needs a 180° turn",
    4: "mirrored top-bottom",
    5: "transposed",
    6: "needs a 90° clockwise turn",
    7: "transversed",
    8: "needs a 90° counter-clockwise turn",
}
_PREVIEW_PREFIX = "Large Thumbnail"


def frame_count(image: Image.Image) -> int:
    """Frames (or pages, or MPO pictures other than previews) of an opened image; 1 for a still image.

    Args:
        image: opened by Pillow (header read, pixels not necessarily decoded).

    Returns:
        The count, at least 1.

    Example:
        >>> import io
        >>> buffer = io.BytesIO()
        >>> frames = [Image.new("L", (8, 8), shade) for shade in (0, 128, 255)]
        >>> frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:])
        >>> frame_count(Image.open(buffer)), frame_count(Image.new("L", (8, 8)))
        (3, 1)
    """
    count = int(getattr(image, "n_frames", 1) or 1)
    if image.format == "MPO":
        entries = (getattr(image, "mpinfo", None) or {}).get(0xB002) or []
        previews = [e for e in entries if str(e.get("Attribute", {}).get("MPType", "")).startswith(_PREVIEW_PREFIX)]
        count = max(1, count - len(previews))
    return count


def orientation_of(image: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 without a tag or with a value outside 1-8 (as Pillow's
    `ImageOps.exif_transpose` treats those).

    For PNG the tag may follow the pixel data: call it after decoding.

    Example:
        >>> import io
        >>> exif = Image.Exif(); exif[EXIF_ORIENTATION_TAG] = 6
        >>> buffer = io.BytesIO(); Image.new("RGB", (8, 4)).save(buffer, "JPEG", exif=exif)
        >>> orientation_of(Image.open(buffer)), orientation_of(Image.new("RGB", (8, 4)))
        (6, 1)
    """
    value = image.getexif().get(EXIF_ORIENTATION_TAG)
    return value if isinstance(value, int) and value in ORIENTATIONS else 1


def to_upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W, C) pixels as stored, turned as EXIF `orientation` says they are meant to be seen.

    Exact for any dtype: only rows and columns move. Equal to Pillow's `ImageOps.exif_transpose`.

    Args:
        pixels: (H, W, C) array.
        orientation: 1-8.

    Returns:
        A C-contiguous array, (W, H, C) for orientations 5-8.

    Example:
        >>> stored = np.arange(6).reshape(2, 3, 1)
        >>> to_upright(stored, 6)[:, :, 0].tolist()
        [[3, 0], [4, 1], [5, 2]]
    """
    turned = {
        1: lambda p: p,
        2: lambda p: p[:, ::-1],
        3: lambda p: p[::-1, ::-1],
        4: lambda p: p[::-1],
        5: lambda p: p.transpose(1, 0, 2),
        6: lambda p: np.rot90(p, -1),
        7: lambda p: p.transpose(1, 0, 2)[::-1, ::-1],
        8: lambda p: np.rot90(p, 1),
    }[orientation](pixels)
    return np.ascontiguousarray(turned)


def describe_orientation(orientation: int) -> str:
    """`orientation 6 (needs a 90° clockwise turn)`: an EXIF orientation as messages name it.

    Example:
        >>> describe_orientation(1)
        'orientation 1 (upright as stored)'
    """
    return f"orientation {orientation} ({ORIENTATIONS[orientation]})"
