"""16-bit files Pillow would reduce to 8 bits, decoded exactly (used by `decode`).

Pillow opens 16-bit color PNG and TIFF files as 8-bit RGB/RGBA (a `;16` raw mode keeping the high byte of
each sample). `sixteen_bit_color` decodes such an image a second time with the opposite-endian raw mode,
which keeps the low byte, and recombines the two. 16-bit gray+alpha PNGs have the same 4 bytes per pixel as
8-bit RGBA: `sixteen_bit_gray_alpha_png` relabels the header, lets Pillow unfilter the rows as RGBA, then
splits each pixel's bytes.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib

import numpy as np
from PIL import Image

from ssim_ray import statuses
from ssim_ray.sources.model import DecodeError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _opposite_endian(rawmode: str) -> str:
    """The raw mode that reads the other byte of each 16-bit sample ('RGB;16B' -> 'RGB;16L')."""
    stem, order = rawmode[:-1], rawmode[-1]
    if order == "N":
        order = "B" if sys.byteorder == "little" else "L"
    else:
        order = {"B": "L", "L": "B"}[order]
    return stem + order


def sixteen_bit_color(image: Image.Image, data: bytes, *, rawmode: str, name: str) -> np.ndarray:
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


def sixteen_bit_gray_alpha_png(data: bytes, *, name: str) -> np.ndarray:
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
