"""Decoding: every stored bit, the file's bit depth, the color and alpha policies, typed errors.

Content is scikit-image's photographs; each lossless case is compared with the array that was written.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage import data

from ssim_ray.sources.decode import DecodeError, bt601_y, decode_image, luma_601, read_size

BIG = 10**8


def _encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def _decode(payload: bytes, *, color: str = "rgb", alpha: str = "drop", max_pixels: int = BIG):
    return decode_image(payload, name="test.img", color=color, alpha=alpha, max_pixels=max_pixels)


def _photo16(channels: int) -> np.ndarray:
    """A real photograph spread over 16 bits with noise in the low byte, so that losing it shows."""
    base = data.chelsea()[:61, :83] if channels >= 3 else data.camera()[:61, :83, None]
    noise = np.random.default_rng(7).integers(0, 256, base.shape[:2] + (channels,))
    wide = base.astype(np.uint32)[:, :, np.arange(channels) % base.shape[2]] * 256 + noise
    return wide.astype(np.uint16)


# Adam7 passes: (first row, first column, row step, column step).
_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))


def _png16(pixels: np.ndarray, *, interlaced: bool = False) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit color), rows cycling through all five filters."""
    height, width, channels = pixels.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    passes = [pixels[r::dr, c::dc] for r, c, dr, dc in _ADAM7] if interlaced else [pixels]
    stream = b"".join(_filtered_rows(image) for image in passes if image.size)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 1 if interlaced else 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(stream)) + _chunk(b"IEND", b"")


def _filtered_rows(pixels: np.ndarray) -> bytes:
    height, width, channels = pixels.shape
    raw = pixels.astype(">u2").reshape(height, width * channels).view(np.uint8).reshape(height, -1).astype(np.int32)
    bpp = 2 * channels
    rows, previous = [], np.zeros(raw.shape[1], np.int32)
    for index, row in enumerate(raw):
        kind = index % 5
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        upper_left = np.concatenate([np.zeros(bpp, np.int32), previous[:-bpp]])
        predictor = [0, left, previous, (left + previous) // 2, _paeth(left, previous, upper_left)][kind]
        rows.append(bytes([kind]) + ((row - predictor) % 256).astype(np.uint8).tobytes())
        previous = row
    return b"".join(rows)


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("TIFF", {}), ("BMP", {}), ("WEBP", {"lossless": True})])
@pytest.mark.parametrize("photo", ["camera", "chelsea"])
def test_lossless_8bit_formats_return_the_array_written(fmt, options, photo):
    pixels = getattr(data, photo)()
    if fmt == "WEBP" and pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)  # WebP stores color only
    decoded = _decode(_encode(pixels, fmt, **options))
    expected = pixels if pixels.ndim == 3 else pixels[:, :, None]
    assert decoded.pixels.dtype == np.uint8 and decoded.bit_depth == 8
    np.testing.assert_array_equal(decoded.pixels, expected)
    assert decoded.decoder.startswith("Pillow ") and fmt in decoded.decoder


def test_jpeg_decodes_as_pillow_does_and_names_the_decoder():
    payload = _encode(data.astronaut(), "JPEG", quality=40)
    decoded = _decode(payload)
    np.testing.assert_array_equal(decoded.pixels, np.asarray(Image.open(io.BytesIO(payload))))
    assert decoded.decoder == f"Pillow {Image.__version__} JPEG"


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_gray_keeps_all_16_bits(fmt):
    pixels = _photo16(1)[:, :, 0]
    decoded = _decode(_encode(pixels, fmt))
    assert decoded.pixels.dtype == np.uint16 and decoded.bit_depth == 16
    np.testing.assert_array_equal(decoded.pixels[:, :, 0], pixels)


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_color_png_keeps_all_16_bits_through_every_filter(channels):
    pixels = _photo16(channels)
    # Pillow alone would return the high byte only: the case this test exists for.
    assert np.asarray(Image.open(io.BytesIO(_png16(pixels)))).dtype == np.uint8
    decoded = _decode(_png16(pixels))
    assert decoded.bit_depth == 16 and decoded.pixels.dtype == np.uint16
    np.testing.assert_array_equal(decoded.pixels, pixels[:, :, :3])


def test_16bit_interlaced_png_keeps_all_16_bits():
    pixels = _photo16(3)
    assert Image.open(io.BytesIO(_png16(pixels, interlaced=True))).info.get("interlace") == 1
    np.testing.assert_array_equal(_decode(_png16(pixels, interlaced=True)).pixels, pixels)
    gray = _photo16(1)
    np.testing.assert_array_equal(_decode(_png16(gray, interlaced=True)).pixels, gray)


def test_16bit_gray_alpha_png_keeps_all_16_bits():
    pixels = _photo16(2)
    decoded = _decode(_png16(pixels))
    np.testing.assert_array_equal(decoded.pixels[:, :, 0], pixels[:, :, 0])
    with pytest.raises(DecodeError) as caught:
        _decode(_png16(pixels), alpha="error")
    assert caught.value.status == "has_alpha"


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_16bit_rgb_tiff_keeps_all_16_bits(compression):
    pixels = _photo16(3)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, photometric="rgb", compression=compression)
    decoded = _decode(buffer.getvalue())
    assert decoded.bit_depth == 16
    np.testing.assert_array_equal(decoded.pixels, pixels)


def test_palette_png_expands_to_its_colors_and_drops_transparency():
    palette_image = Image.fromarray(data.chelsea()).quantize(colors=64)
    buffer = io.BytesIO()
    palette_image.save(buffer, "PNG")
    expected = np.asarray(palette_image.convert("RGB"))
    np.testing.assert_array_equal(_decode(buffer.getvalue()).pixels, expected)
    buffer = io.BytesIO()
    palette_image.save(buffer, "PNG", transparency=0)
    np.testing.assert_array_equal(_decode(buffer.getvalue()).pixels, expected)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_dropped_by_default_or_refused(mode):
    color = data.chelsea() if mode == "RGBA" else data.camera()[:, :, None]
    alpha = np.full(color.shape[:2] + (1,), 200, np.uint8)
    payload = _encode(np.concatenate([color, alpha], axis=-1), "PNG")
    np.testing.assert_array_equal(_decode(payload).pixels, color)
    with pytest.raises(DecodeError) as caught:
        _decode(payload, alpha="error")
    assert caught.value.status == "has_alpha" and "test.img" in str(caught.value)


def test_gray_policy_equals_pillow_luma_for_8bit_and_keeps_16bit():
    rgb = data.astronaut()
    gray = _decode(_encode(rgb, "PNG"), color="gray").pixels[:, :, 0]
    np.testing.assert_array_equal(gray, np.asarray(Image.fromarray(rgb).convert("L")))
    wide = _photo16(3)
    gray16 = luma_601(wide)[:, :, 0].astype(np.float64)
    exact = wide.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    # Pillow's fixed-point weights differ from 0.299/0.587/0.114 by < 1e-5 each: at most ~2 counts at 65535.
    assert gray16.dtype == np.float64 and np.abs(gray16 - exact).max() <= 2.0
    assert _decode(_png16(wide), color="gray").pixels.dtype == np.uint16


def test_y_policy_matches_matlab_rgb2ycbcr_values():
    # MATLAB: rgb2ycbcr(uint8([255 0 0; 0 255 0; 0 0 255; 255 255 255; 0 0 0; 128 128 128])) -> Y column.
    colors = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0], [128, 128, 128]]], np.uint8)
    assert bt601_y(colors)[0, :, 0].tolist() == [81, 145, 41, 235, 16, 126]
    gray = np.array([[[0], [128], [255]]], np.uint8)
    assert bt601_y(gray)[0, :, 0].tolist() == [16, 126, 235]
    wide = np.array([[[65535, 65535, 65535], [0, 0, 0]]], np.uint16)
    assert bt601_y(wide)[0, :, 0].tolist() == [235 * 257, 16 * 257]
    decoded = _decode(_encode(data.chelsea(), "PNG"), color="y")
    assert decoded.pixels.shape == (300, 451, 1) and decoded.pixels.dtype == np.uint8
    assert 16 <= decoded.pixels.min() and decoded.pixels.max() <= 235


def _png_header_only(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _chunk(b"IEND", b"")


def test_pixel_cap_refuses_from_the_header_before_decoding():
    with pytest.raises(DecodeError) as caught:
        _decode(_png_header_only(100_000, 100_000), max_pixels=BIG)
    assert caught.value.status == "too_large"
    camera = _encode(data.camera(), "PNG")
    # Pillow warns between the cap and twice the cap (it raises beyond); we refuse from the cap on.
    with pytest.raises(DecodeError) as caught, pytest.warns(Image.DecompressionBombWarning):
        read_size(camera, name="camera.png", max_pixels=512 * 512 - 1)
    assert caught.value.status == "too_large" and "262144" in str(caught.value)
    assert read_size(camera, name="camera.png", max_pixels=512 * 512) == (512, 512)
    # The cap is the configured one, set on purpose, not Pillow's default.
    assert Image.MAX_IMAGE_PIXELS == 512 * 512


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"", "empty file"),
        (b"this is not an image, just text saved with a .png name\n", "not a PNG/JPEG/TIFF/BMP/WEBP image"),
        (_encode(data.camera(), "PNG")[:5000], "cannot decode PNG"),
        (_encode(data.astronaut(), "JPEG")[:100], "test.img"),
    ],
    ids=["empty", "text", "truncated-png", "truncated-jpeg-header"],
)
def test_bad_bytes_are_unreadable_with_a_message_naming_the_file(payload, expected):
    with pytest.raises(DecodeError) as caught:
        _decode(payload)
    assert caught.value.status == "unreadable"
    assert expected in str(caught.value) and "test.img" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "image", [Image.new("CMYK", (32, 32), (10, 20, 30, 40)), Image.new("F", (32, 32), 0.5)], ids=["cmyk", "float"]
)
def test_modes_without_an_exact_meaning_are_unsupported(image):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG" if image.mode == "CMYK" else "TIFF")
    with pytest.raises(DecodeError) as caught:
        _decode(buffer.getvalue())
    assert caught.value.status == "unsupported" and image.mode in str(caught.value)
