"""Which pixels of a file are its image: multi-frame files and EXIF orientation follow a named policy.

Multi-frame files (APNG, multi-page TIFF, animated WebP, MPO) are made by Pillow from real photographs;
orientation cases are JPEGs carrying the EXIF Orientation tag, as cameras and phones write them.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps
from skimage import data

from ssim_ray.config import SourceConfig, SSIMConfig
from ssim_ray.sources import iter_shard_pairs, plan_shards
from ssim_ray.sources.decode import DecodeError, decode_image

ORIENTATION = 0x0112
PHOTO = np.ascontiguousarray(data.chelsea()[40:100, 60:140])  # 60x80: not square, so a rotation shows


def _frames():
    rng = np.random.default_rng(3)
    noisy = np.clip(PHOTO + rng.normal(0, 20, PHOTO.shape), 0, 255).astype(np.uint8)
    return [PHOTO, noisy, np.ascontiguousarray(PHOTO[::-1])]


def _multi_frame(fmt: str) -> bytes:
    first, *rest = [Image.fromarray(f) for f in _frames()]
    buffer = io.BytesIO()
    options = {"lossless": True} if fmt == "WEBP" else {}
    if fmt == "MPO":
        rest = rest[:1]
    first.save(buffer, fmt, save_all=True, append_images=rest, **options)
    return buffer.getvalue()


def _decode(payload: bytes, **policies):
    return decode_image(payload, name="image", color="rgb", alpha="drop", max_pixels=10**8, **policies)


@pytest.mark.parametrize("fmt, frames", [("PNG", 3), ("TIFF", 3), ("WEBP", 3), ("MPO", 2)])
def test_multi_frame_file_is_refused_by_default_naming_its_frames_and_the_opt_in(fmt, frames):
    with pytest.raises(DecodeError) as caught:
        _decode(_multi_frame(fmt))
    assert caught.value.status == "multi_frame"
    assert f"{frames} frames" in str(caught.value) and "source.multi_frame=first" in str(caught.value)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_multi_frame_first_decodes_frame_zero_exactly_and_says_so(fmt):
    image = _decode(_multi_frame(fmt), multi_frame="first")
    assert np.array_equal(image.pixels, _frames()[0]) and "frame 1 of 3" in image.decoder


def test_single_frame_files_are_untouched_by_the_policy():
    buffer = io.BytesIO()
    Image.fromarray(PHOTO).save(buffer, "PNG")
    image = _decode(buffer.getvalue())
    assert np.array_equal(image.pixels, PHOTO) and "frame" not in image.decoder


def _jpeg(pixels: np.ndarray, orientation: int = 0, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_turns_the_image_upright_as_pillow_does(orientation):
    payload = _jpeg(PHOTO, orientation)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(payload))).convert("RGB"))
    image = _decode(payload, exif_orientation="apply")
    assert image.orientation == orientation and np.array_equal(image.pixels, upright)
    stored = _decode(payload, exif_orientation="ignore")
    assert stored.pixels.shape == PHOTO.shape


def test_apply_works_on_sixteen_bit_pixels_too():
    wide = (PHOTO[:, :, 0].astype(np.uint16) * 257)
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(wide).save(buffer, "PNG", exif=exif)
    image = _decode(buffer.getvalue(), exif_orientation="apply")
    assert image.bit_depth == 16 and np.array_equal(image.pixels[:, :, 0], np.rot90(wide, -1))


# ------------------------------------------------------------------------------------------ pairs
@pytest.fixture
def orientation_set(tmp_path):
    """A phone photo with orientation 6, and what two kinds of codec pipeline make of it."""
    stored = PHOTO
    upright = np.rot90(stored, -1)
    files = {
        "camera_tag6.jpg": _jpeg(stored, 6, quality=95),
        "camera_tag6_q30.jpg": _jpeg(stored, 6, quality=30),          # re-encoded, tag kept
        "codec_dropped_tag.jpg": _jpeg(stored, 0, quality=30),        # stored pixels kept, tag dropped
        "codec_baked_rotation.jpg": _jpeg(np.ascontiguousarray(upright), 0, quality=30),  # turned upright, no tag
    }
    for name, payload in files.items():
        (tmp_path / name).write_bytes(payload)
    rows = [("kept", "camera_tag6.jpg", "camera_tag6_q30.jpg"), ("dropped", "camera_tag6.jpg", "codec_dropped_tag.jpg"),
            ("baked", "camera_tag6.jpg", "codec_baked_rotation.jpg")]
    pq.write_table(pa.table({"pair_id": [r[0] for r in rows], "reference": [r[1] for r in rows],
                             "distorted": [r[2] for r in rows]}), tmp_path / "pairs.parquet")
    return str(tmp_path / "pairs.parquet")


def _statuses(url, **options):
    cfg = SourceConfig(kind="parquet", url=url, **options)
    pairs = [p for s in plan_shards(cfg).shards for p in iter_shard_pairs(s, cfg, SSIMConfig(), threads=2, prefetch=4)]
    return {p.pair_id: p for p in pairs}


def test_default_refuses_pairs_whose_orientations_differ_and_says_how_to_choose(orientation_set):
    pairs = _statuses(orientation_set)
    assert pairs["kept"].status == "ok" and tuple(pairs["kept"].ref.shape) == (3, 60, 80)
    for pair_id in ("dropped", "baked"):
        pair = pairs[pair_id]
        assert pair.status == "orientation_mismatch"
        assert "orientation 6" in pair.error and "orientation 1" in pair.error
        assert "source.exif_orientation=ignore" in pair.error and "apply" in pair.error and "\n" not in pair.error


def test_ignore_compares_stored_pixels_and_apply_turns_both_sides(orientation_set):
    ignored = _statuses(orientation_set, exif_orientation="ignore")
    assert ignored["dropped"].status == "ok" and ignored["baked"].status == "size_mismatch"
    applied = _statuses(orientation_set, exif_orientation="apply")
    assert applied["baked"].status == "ok" and applied["dropped"].status == "size_mismatch"
    assert tuple(applied["kept"].ref.shape) == tuple(applied["kept"].dist.shape) == (3, 80, 60)
    assert "orientation 6 applied" in applied["kept"].decoder


def test_multi_frame_pair_gets_a_typed_row_unless_frame_zero_is_chosen(tmp_path):
    (tmp_path / "animated.png").write_bytes(_multi_frame("PNG"))
    buffer = io.BytesIO()
    Image.fromarray(_frames()[1]).save(buffer, "PNG")
    (tmp_path / "still.png").write_bytes(buffer.getvalue())
    pq.write_table(pa.table({"pair_id": ["a"], "reference": ["still.png"], "distorted": ["animated.png"]}),
                   tmp_path / "pairs.parquet")
    url = str(tmp_path / "pairs.parquet")
    refused = _statuses(url)["a"]
    assert refused.status == "multi_frame" and "animated.png" in refused.error and "3 frames" in refused.error
    chosen = _statuses(url, multi_frame="first")["a"]
    assert chosen.status == "ok" and np.array_equal(chosen.dist.permute(1, 2, 0).numpy(), _frames()[0])


def test_policies_are_validated_and_part_of_the_plan_fingerprint(orientation_set):
    with pytest.raises(ValueError, match="source.multi_frame"):
        SourceConfig(multi_frame="all")
    with pytest.raises(ValueError, match="source.exif_orientation"):
        SourceConfig(exif_orientation="rotate")
    fingerprints = {
        plan_shards(SourceConfig(kind="parquet", url=orientation_set, **options)).fingerprint
        for options in ({}, {"multi_frame": "first"}, {"exif_orientation": "apply"}, {"exif_orientation": "ignore"})
    }
    assert len(fingerprints) == 4  # each decides statuses or pixels: a resumed run must agree on it
