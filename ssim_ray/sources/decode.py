"""Encoded bytes to exact pixels: uint8/uint16 arrays, the file's bit depth, typed decode errors.

One decoder for every format, Pillow, so that both images of a pair are decoded alike and the decoder
and its version can be recorded per row (Pillow releases have shifted decoded pixels before).

Pillow reduces 16-bit color PNG and TIFF files to 8 bits when it opens them (mode RGB/RGBA with a
`;16` raw mode). We never accept that loss: such images are decoded twice by Pillow, once keeping the
high byte of each sample (its default) and once the low byte (the opposite-endian raw mode), and
recombined. 16-bit gray+alpha PNGs are decoded by relabelling the header as 8-bit RGBA, which has the
same bytes per pixel and so the same filtering, then splitting each pixel's bytes. Anything else that
cannot be decoded exactly gets status `unsupported`.

Pillow's pixel cap (`Image.MAX_IMAGE_PIXELS`) is a process-wide setting; `decode_image` sets it to the
configured `max_pixels` on purpose, so that Pillow's own bomb check and ours agree, and checks the
size from the header itself before any pixel is decoded.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import PIL
from PIL import Image, UnidentifiedImageError

from ssim_ray import statuses

FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# What Pillow raises on corrupt or truncated data besides OSError: it surfaces parser errors as they come.
_CORRUPT_DATA_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, struct.error, zlib.error)
_EIGHT_BIT_MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I;16N")
# ITU-R 601-2 luma in Pillow's fixed point (its RGB -> L conversion), so `gray` equals Pillow's `L` for
# 8-bit files and extends the same rounding to 16-bit ones.
_LUMA_FIXED = (19595, 38470, 7471)
# BT.601 studio-swing Y as MATLAB's rgb2ycbcr computes it (and SR benchmarks after it).
_Y_COEFFS = (65.481, 128.553, 24.966)


class DecodeError(Exception):
    """An image that cannot be used, with the status it gets and a one-line message naming the file.

    Attributes:
        status: one of `unreadable`, `too_large`, `unsupported`, `has_alpha`.
    """

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class DecodedImage:
    """Decoded pixels: `pixels` (H, W, C) uint8 or uint16, C-contiguous; `bit_depth` 8 or 16 (of the file)."""

    pixels: np.ndarray
    bit_depth: int
    decoder: str


def decode_image(data: bytes, *, name: str, color: str, alpha: str, max_pixels: int) -> DecodedImage:
    """Decode one encoded image exactly, with the color and alpha policies applied.

    Args:
        data: the encoded file (PNG, JPEG, TIFF, BMP or WebP).
        name: what to call the file in messages (its URL, redacted, or a descriptor).
        color: `rgb` (channels as stored: 1 for gray files, 3 for color), `gray` (ITU-R 601-2 luma with
            Pillow's rounding), or `y` (BT.601 studio-swing luma, see `bt601_y`).
        alpha: `drop` the alpha channel of LA/RGBA files, or `error` (status `has_alpha`).
        max_pixels: width × height above which the image is refused from its header (`too_large`).

    Returns:
        The pixels (H, W, C) in uint8 (8-bit files) or uint16 (16-bit files), the bit depth and the
        decoder ("Pillow 13.0.0 PNG").

    Raises:
        DecodeError: with status `unreadable` (empty, truncated, not an image), `too_large`,
            `unsupported` (a mode that cannot be decoded exactly, e.g. CMYK or float) or `has_alpha`.

    Example:
        >>> buf = io.BytesIO(); Image.new("RGB", (16, 12), (10, 20, 30)).save(buf, "PNG")
        >>> img = decode_image(buf.getvalue(), name="a.png", color="rgb", alpha="drop", max_pixels=10**6)
        >>> img.pixels.shape, img.pixels.dtype.name, img.bit_depth, img.pixels[0, 0].tolist()
        ((12, 16, 3), 'uint8', 8, [10, 20, 30])
    """
    if not data:
        raise DecodeError(statuses.UNREADABLE, f"{name}: empty file (0 bytes)")
    image = _open_checked(data, name=name, max_pixels=max_pixels)
    try:
        pixels, bit_depth, how = _exact_pixels(image, data, name=name)
    except DecodeError:
        raise
    except _CORRUPT_DATA_ERRORS as exc:
        raise DecodeError(statuses.UNREADABLE, f"{name}: cannot decode {image.format}: {_one_line(exc)}") from exc
    pixels = _apply_alpha_policy(pixels, alpha=alpha, name=name)
    pixels = _apply_color_policy(pixels, color=color)
    decoder = f"Pillow {PIL.__version__} {image.format}{how}"
    return DecodedImage(pixels=np.ascontiguousarray(pixels), bit_depth=bit_depth, decoder=decoder)


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
        return _sixteen_bit_gray_alpha_png(data, name=name), 16, " (16-bit gray+alpha: relabelled)"
    if mode in ("RGB", "RGBA") and ";16" in rawmode:
        return _sixteen_bit_color(image, data, rawmode=rawmode, name=name), 16, " (16-bit color: two passes)"
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


def _opposite_endian(rawmode: str) -> str:
    """The raw mode that reads the other byte of each 16-bit sample ('RGB;16B' -> 'RGB;16L')."""
    stem, order = rawmode[:-1], rawmode[-1]
    if order == "N":
        order = "B" if sys.byteorder == "little" else "L"
    else:
        order = {"B": "L", "L": "B"}[order]
    return stem + order


def _sixteen_bit_color(image: Image.Image, data: bytes, *, rawmode: str, name: str) -> np.ndarray:
    """16-bit RGB(A): Pillow keeps the high byte of each sample; a second pass keeps the low one."""
    if len(image.tile) != 1 and image.format == "PNG":
        raise DecodeError(statuses.UNSUPPORTED, f"{name}: 16-bit color PNG with {len(image.tile)} tiles")
    image.load()
    high = np.asarray(image).astype(np.uint16)
    low_image = Image.open(io.BytesIO(data), formats=(image.format,))
    low_image.tile = [_with_rawmode(tile, _opposite_endian(rawmode), rawmode) for tile in low_image.tile]
    low_image.load()
    low = np.asarray(low_image).astype(np.uint16)
    return (high << 8) | low


def _with_rawmode(tile: "Image._Tile", new: str, old: str) -> "Image._Tile":
    """`tile` reading its samples with raw mode `new` instead of `old`."""
    args = tile.args
    if isinstance(args, str):
        return tile._replace(args=new)
    if str(args[0]) != old:
        raise DecodeError(statuses.UNSUPPORTED, f"tile raw mode {args[0]!r}, expected {old!r}")
    return tile._replace(args=(new,) + tuple(args[1:]))


def _sixteen_bit_gray_alpha_png(data: bytes, *, name: str) -> np.ndarray:
    """16-bit LA PNG: same 4 bytes per pixel as 8-bit RGBA, so Pillow unfilters it exactly as RGBA."""
    chunks = list(_png_chunks(data, name=name))
    ihdr = bytearray(chunks[0][1])
    ihdr[8], ihdr[9] = 8, 6  # bit depth 8, color type RGBA
    kept = [(b"IHDR", bytes(ihdr))] + [(kind, body) for kind, body in chunks if kind in (b"IDAT", b"IEND")]
    relabelled = PNG_SIGNATURE + b"".join(_png_chunk(kind, body) for kind, body in kept)
    rgba = np.asarray(Image.open(io.BytesIO(relabelled), formats=("PNG",)).convert("RGBA"))
    gray = (rgba[:, :, 0].astype(np.uint16) << 8) | rgba[:, :, 1]
    alpha = (rgba[:, :, 2].astype(np.uint16) << 8) | rgba[:, :, 3]
    return np.stack([gray, alpha], axis=-1)


def _png_chunks(data: bytes, *, name: str):
    """(type, body) of each PNG chunk, in order."""
    offset = len(PNG_SIGNATURE)
    while offset + 8 <= len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind = data[offset + 4:offset + 8]
        body = data[offset + 8:offset + 8 + length]
        if len(body) != length:
            raise DecodeError(statuses.UNREADABLE, f"{name}: truncated PNG chunk {kind!r}")
        yield kind, body
        offset += 12 + length


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


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
