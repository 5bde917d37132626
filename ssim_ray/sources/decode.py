"""Encoded bytes to exact pixels: uint8/uint16 arrays, the file's bit depth, typed decode errors.

One decoder for every format, Pillow, so that both images of a pair are decoded alike and the decoder
and its version can be recorded per row (Pillow releases have shifted decoded pixels before).

Pillow reduces 16-bit color PNG and TIFF files to 8 bits when it opens them (mode RGB/RGBA with a
`;16` raw mode). We never accept that loss: `sixteen_bit` decodes such images exactly (and 16-bit
gray+alpha PNGs). Anything else that cannot be decoded exactly gets status `unsupported`.

Which pixels are the image is a named policy (see `frames`): a file with several frames or pages is
refused (`multi_frame`) unless frame 0 is asked for; the EXIF orientation is read and, when asked, applied
to the decoded pixels (exact for 16-bit data too, as only rows and columns move).

Pillow's pixel cap (`Image.MAX_IMAGE_PIXELS`) is a process-wide setting; `decode_image` sets it to the
configured `max_pixels` on purpose, so that Pillow's own bomb check and ours agree, and checks the
size from the header itself before any pixel is decoded.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import PIL
from PIL import Image, UnidentifiedImageError

from ssim_ray import statuses
from ssim_ray.sources.frames import frame_count, orientation_of, to_upright
from ssim_ray.sources.model import DecodeError
from ssim_ray.sources.sixteen_bit import sixteen_bit_color, sixteen_bit_gray_alpha_png

FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")
# What Pillow raises on corrupt or truncated data besides OSError: it surfaces parser errors as they come.
_CORRUPT_DATA_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, struct.error, zlib.error)
_EIGHT_BIT_MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I;16N")
# Bytes per pixel of each mode once decoded (palette images become RGB(A)); 16-bit color doubles RGB(A).
_DECODED_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 4, "PA": 4, "LA": 2, "RGB": 3, "RGBA": 4, "YCbCr": 3, "CMYK": 4,
                            "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# ITU-R 601-2 luma in Pillow's fixed point (its RGB -> L conversion), so `gray` equals Pillow's `L` for
# 8-bit files and extends the same rounding to 16-bit ones.
_LUMA_FIXED = (19595, 38470, 7471)
# BT.601 studio-swing Y as MATLAB's rgb2ycbcr computes it (and SR benchmarks after it).
_Y_COEFFS = (65.481, 128.553, 24.966)


@dataclass(frozen=True)
class DecodedImage:
    """Decoded pixels: `pixels` (H, W, C) uint8 or uint16 (float32 under `color=y_float`), C-contiguous; `bit_depth`
    8 or 16 (of the file).

    `orientation`: the file's EXIF orientation (1-8) when it was read (policies `apply` and `error`), else 1.
    """

    pixels: np.ndarray
    bit_depth: int
    decoder: str
    orientation: int = 1


def decode_image(data: bytes, *, name: str, color: str, alpha: str, max_pixels: int, multi_frame: str = "error",
                 exif_orientation: str = "ignore") -> DecodedImage:
    """Decode one encoded image exactly, with the frame, orientation, color and alpha policies applied.

    Args:
        data: the encoded file (PNG, JPEG, TIFF, BMP or WebP).
        name: what to call the file in messages (its URL, redacted, or a descriptor).
        color: `rgb` (channels as stored: 1 for gray files, 3 for color), `gray` (ITU-R 601-2 luma with
            Pillow's rounding), `y` (BT.601 studio-swing luma rounded as MATLAB's rgb2ycbcr, see `bt601_y`)
            or `y_float` (BasicSR's unrounded float32 Y, see `bt601_y_float`; the pixels are then float32).
        alpha: `drop` the alpha channel of LA/RGBA files, or `error` (status `has_alpha`).
        max_pixels: width × height above which the image is refused from its header (`too_large`).
        multi_frame: a file with several frames or pages: `error` (status `multi_frame`) or `first`
            (frame 0 as Pillow opens it; the decoder says "frame 1 of N").
        exif_orientation: `ignore` (pixels as stored, the tag not read), `error` (as stored; the tag is
            read into `orientation` for the pair's check) or `apply` (turned upright by the tag).

    Returns:
        The pixels (H, W, C) in uint8 (8-bit files) or uint16 (16-bit files), the bit depth, the
        decoder ("Pillow 13.0.0 PNG") and the EXIF orientation.

    Raises:
        DecodeError: with status `unreadable` (empty, truncated, not an image), `too_large`,
            `unsupported` (a mode that cannot be decoded exactly, e.g. CMYK or float), `has_alpha` or
            `multi_frame`.

    Example:
        >>> buf = io.BytesIO(); Image.new("RGB", (16, 12), (10, 20, 30)).save(buf, "PNG")
        >>> img = decode_image(buf.getvalue(), name="a.png", color="rgb", alpha="drop", max_pixels=10**6)
        >>> img.pixels.shape, img.pixels.dtype.name, img.bit_depth, img.pixels[0, 0].tolist()
        ((12, 16, 3), 'uint8', 8, [10, 20, 30])
    """
    if not data:
        raise DecodeError(statuses.UNREADABLE, f"{name}: empty file (0 bytes)")
    image = _open_checked(data, name=name, max_pixels=max_pixels)
    frames_note = _check_frames(image, policy=multi_frame, name=name)
    try:
        pixels, bit_depth, how = _exact_pixels(image, data, name=name)
        # Read after decoding: a PNG's eXIf chunk may follow its pixel data.
        orientation = 1 if exif_orientation == "ignore" else orientation_of(image)
    except DecodeError:
        raise
    except _CORRUPT_DATA_ERRORS as exc:
        raise DecodeError(statuses.UNREADABLE, f"{name}: cannot decode {image.format}: {_one_line(exc)}") from exc
    if exif_orientation == "apply" and orientation != 1:
        pixels, how = to_upright(pixels, orientation), f"{how} (EXIF orientation {orientation} applied)"
    pixels = _apply_alpha_policy(pixels, alpha=alpha, name=name)
    pixels = _apply_color_policy(pixels, color=color)
    decoder = f"Pillow {PIL.__version__} {image.format}{how}{frames_note}"
    return DecodedImage(pixels=np.ascontiguousarray(pixels), bit_depth=bit_depth, decoder=decoder, orientation=orientation)


def decoded_size_bound(data: bytes, *, max_pixels: int, color: str = "rgb") -> int:
    """Bytes the decoded pixels of `data` take at most, from its header alone (for the prefetch byte budget).

    Args:
        data: the encoded file.
        max_pixels: the pixel cap, as in `decode_image`.
        color: the color policy, as in `decode_image` (`gray`, `y` and `y_float` keep one channel).

    Returns:
        height × width × decoded bytes per pixel; 0 when the header cannot be read (decoding will type it).

    Example:
        >>> buf = io.BytesIO(); Image.new("RGB", (16, 12)).save(buf, "PNG")
        >>> decoded_size_bound(buf.getvalue(), max_pixels=10**6), decoded_size_bound(b"not an image", max_pixels=10**6)
        (576, 0)
    """
    _apply_pixel_cap(max_pixels)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        sixteen_bit = image.mode in _SIXTEEN_BIT_GRAY or ";16" in _rawmode(image)
    except MemoryError:
        raise
    except Exception:  # any bad header: `decode_image` gives it its typed status; here it only holds nothing
        return 0
    pixels = image.width * image.height
    if color == "y_float":
        return pixels * 4  # one float32 channel
    if color in ("gray", "y"):
        return pixels * (2 if sixteen_bit else 1)
    per_pixel = _DECODED_BYTES_PER_PIXEL.get(image.mode, 8)
    return pixels * per_pixel * (2 if sixteen_bit and image.mode in ("RGB", "RGBA") else 1)


def _check_frames(image: Image.Image, *, policy: str, name: str) -> str:
    """'' for a still image; with several frames, a note for the decoder (`first`) or `multi_frame`."""
    frames = frame_count(image)
    if frames == 1:
        return ""
    if policy == "first":
        return f" (frame 1 of {frames})"
    raise DecodeError(
        statuses.MULTI_FRAME,
        f"{name}: {image.format} with {frames} frames; set source.multi_frame=first to score frame 0 (frame 1 of {frames})",
    )


def read_size(data: bytes, *, name: str, max_pixels: int) -> Tuple[int, int]:
    """(height, width) from the header alone, without decoding any pixel.

    Args:
        data: the encoded file.
        name: what to call the file in messages.
        max_pixels: the pixel cap, as in `decode_image`.

    Returns:
        (height, width).

    Raises:
        DecodeError: `unreadable` for a bad header, `too_large` over the cap.

    Example:
        >>> buf = io.BytesIO(); Image.new("L", (16, 12)).save(buf, "PNG")
        >>> read_size(buf.getvalue(), name="a.png", max_pixels=10**6)
        (12, 16)
    """
    if not data:
        raise DecodeError(statuses.UNREADABLE, f"{name}: empty file (0 bytes)")
    image = _open_checked(data, name=name, max_pixels=max_pixels)
    return image.height, image.width


def _open_checked(data: bytes, *, name: str, max_pixels: int) -> Image.Image:
    """Open (header only) and refuse images over the pixel cap before anything is decoded."""
    _apply_pixel_cap(max_pixels)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise DecodeError(statuses.TOO_LARGE, f"{name}: {_one_line(exc)}") from exc
    except UnidentifiedImageError as exc:
        raise DecodeError(statuses.UNREADABLE, f"{name}: not a {'/'.join(FORMATS)} image ({len(data)} bytes)") from exc
    except _CORRUPT_DATA_ERRORS as exc:
        raise DecodeError(statuses.UNREADABLE, f"{name}: bad image header: {_one_line(exc)}") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(
            statuses.TOO_LARGE, f"{name}: {width}x{height} = {width * height} pixels, over source.max_pixels={max_pixels}"
        )
    return image


def _apply_pixel_cap(max_pixels: int) -> None:
    """Make Pillow's own bomb check use the configured cap (it is a process-wide setting in Pillow)."""
    if Image.MAX_IMAGE_PIXELS != max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _rawmode(image: Image.Image) -> str:
    """The raw mode of the first tile: how Pillow will unpack the stored samples (e.g. 'RGB;16B')."""
    if not image.tile:
        return image.mode
    args = image.tile[0].args
    return args if isinstance(args, str) else str(args[0])


def _exact_pixels(image: Image.Image, data: bytes, *, name: str) -> Tuple[np.ndarray, int, str]:
    """(H, W, C) pixels with every stored bit, the bit depth, and a note on how they were decoded."""
    mode, rawmode = image.mode, _rawmode(image)
    if mode == "RGBA" and rawmode == "LA;16B" and image.format == "PNG":
        return sixteen_bit_gray_alpha_png(data, name=name), 16, " (16-bit gray+alpha: relabelled)"
    if mode in ("RGB", "RGBA") and ";16" in rawmode:
        return sixteen_bit_color(image, data, rawmode=rawmode, name=name), 16, " (16-bit color: two passes)"
    if ";16" in rawmode and mode not in _SIXTEEN_BIT_GRAY:
        raise DecodeError(statuses.UNSUPPORTED, f"{name}: {image.format} mode {mode} from {rawmode} cannot be decoded exactly")
    if mode in _SIXTEEN_BIT_GRAY:
        return np.asarray(image).astype(np.uint16)[:, :, None], 16, ""
    converted = _to_eight_bit_mode(image, name=name)
    pixels = np.asarray(converted)
    return (pixels[:, :, None] if pixels.ndim == 2 else pixels), 8, ""


def _to_eight_bit_mode(image: Image.Image, *, name: str) -> Image.Image:
    """Bilevel and palette images as L/RGB/RGBA; modes that would need a guess are refused."""
    if image.mode in _EIGHT_BIT_MODES:
        image.load()
        return image
    if image.mode == "1":
        return image.convert("L")
    if image.mode in ("P", "PA"):
        has_alpha = image.mode == "PA" or "transparency" in image.info
        return image.convert("RGBA" if has_alpha else "RGB")
    if image.mode == "YCbCr":
        return image.convert("RGB")
    # CMYK needs a color profile to become RGB; I/F are 32-bit and have no defined data range here.
    raise DecodeError(statuses.UNSUPPORTED, f"{name}: {image.format} mode {image.mode} is not supported (expected gray, palette, RGB(A))")


def _apply_alpha_policy(pixels: np.ndarray, *, alpha: str, name: str) -> np.ndarray:
    """Drop the alpha channel of LA/RGBA pixels, or refuse them when `alpha='error'`."""
    if pixels.shape[2] not in (2, 4):
        return pixels
    if alpha == "error":
        raise DecodeError(statuses.HAS_ALPHA, f"{name}: has an alpha channel and ssim.alpha='error'")
    return pixels[:, :, :-1]


def _apply_color_policy(pixels: np.ndarray, *, color: str) -> np.ndarray:
    if color == "rgb":
        return pixels
    if color == "gray":
        return pixels if pixels.shape[2] == 1 else luma_601(pixels)
    if color == "y_float":
        return bt601_y_float(pixels)
    return bt601_y(pixels)


def luma_601(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma with Pillow's fixed-point rounding: (19595 R + 38470 G + 7471 B + 2^15) >> 16.

    Args:
        rgb: (H, W, 3) uint8 or uint16.

    Returns:
        (H, W, 1) of the same dtype; equal to Pillow's `convert("L")` for uint8.

    Example:
        >>> luma_601(np.array([[[255, 0, 0]]], dtype=np.uint8))[0, 0].tolist()
        [76]
    """
    wide = rgb.astype(np.int64)
    weighted = wide[..., 0] * _LUMA_FIXED[0] + wide[..., 1] * _LUMA_FIXED[1] + wide[..., 2] * _LUMA_FIXED[2]
    return ((weighted + 0x8000) >> 16).astype(rgb.dtype)[:, :, None]


def bt601_y(pixels: np.ndarray) -> np.ndarray:
    """BT.601 studio-swing luma Y, as MATLAB's `rgb2ycbcr` (and SR benchmarks) compute it.

    8-bit: Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, range 16..235.
    16-bit: Y = 16·257 + (65.481 R + 128.553 G + 24.966 B) / 255 (MATLAB's uint16 scaling), 4112..60395.
    Computed in float64 and rounded half away from zero (MATLAB's conversion to an integer class); the
    result keeps the input dtype, so `data_range` stays that of the file (255 or 65535), as MATLAB's
    `ssim` on a uint8 Y image. A gray image is treated as R = G = B.

    Args:
        pixels: (H, W, 1) or (H, W, 3), uint8 or uint16.

    Returns:
        (H, W, 1) Y of the same dtype.

    Example:
        >>> bt601_y(np.array([[[255, 255, 255], [0, 0, 0]]], dtype=np.uint8))[0, :, 0].tolist()
        [235, 16]
    """
    wide = pixels.astype(np.float64)
    red, green, blue = (wide[..., 0], wide[..., 0], wide[..., 0]) if pixels.shape[2] == 1 else (wide[..., 0], wide[..., 1], wide[..., 2])
    offset = 16.0 if pixels.dtype == np.uint8 else 16.0 * 257
    y = offset + (_Y_COEFFS[0] * red + _Y_COEFFS[1] * green + _Y_COEFFS[2] * blue) / 255.0
    return np.floor(y + 0.5).astype(pixels.dtype)[:, :, None]


def bt601_y_float(pixels: np.ndarray) -> np.ndarray:
    """BT.601 studio-swing luma as BasicSR's `to_y_channel` forms it: float32, NOT rounded.

    BasicSR (`basicsr/metrics/psnr_ssim.py`, behind most super-resolution tables) scales the 8-bit BGR image
    to float32 [0, 1], takes `np.dot(bgr, [24.966, 128.553, 65.481]) + 16.0` in float64, divides by 255 and
    stores float32, then multiplies by 255 in float32. Those steps are repeated here, so the pixels are
    BasicSR's own, bit for bit, and differ from MATLAB's `rgb2ycbcr` (`bt601_y`), which rounds to uint8:
    by 5e-4 to 1.5e-3 in SSIM on bicubic-upscaled pairs (measured). The values stay on the file's scale, so the data range
    is the file's as well (`data_range: auto` gives 255, BasicSR's L); a 16-bit file, which BasicSR does
    not define, gets the same steps with 65535 in place of 255. A one-channel file passes through as
    BasicSR passes it (its `to_y_channel` converts only 3-channel images): the value through the same
    float32 scaling, with no Y formula.

    Args:
        pixels: (H, W, 1) or (H, W, 3) RGB, uint8 or uint16.

    Returns:
        (H, W, 1) float32.

    Example:
        >>> bt601_y_float(np.array([[[255, 255, 255], [10, 20, 30]]], dtype=np.uint8))[0, :, 0].tolist()
        [235.0, 31.587648391723633]
    """
    scale = 255.0 if pixels.dtype == np.uint8 else 65535.0
    unit = pixels.astype(np.float32) / np.float32(scale)
    if pixels.shape[2] == 3:
        bgr = unit[..., ::-1]
        # float64 here, as numpy promotes BasicSR's float32 image against a list of Python floats
        y = (np.dot(bgr, [24.966, 128.553, 65.481]) + 16.0) / 255.0
        unit = y.astype(np.float32)[:, :, None]
    return np.ascontiguousarray(unit * np.float32(scale))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def describe_bytes(data: Optional[bytes]) -> str:
    """A short stand-in for encoded bytes in results and messages.

    Args:
        data: encoded bytes, or None for a null manifest value.

    Returns:
        '<bytes:N>' or '<bytes:null>'.

    Example:
        >>> describe_bytes(b"abc"), describe_bytes(None)
        ('<bytes:3>', '<bytes:null>')
    """
    return "<bytes:null>" if data is None else f"<bytes:{len(data)}>"
