"""A corpus of broken inputs: each pair gets its typed status, no pair is dropped, manifest errors stop early."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data

from ssim_ray import statuses
from ssim_ray.config import SourceConfig, SSIMConfig
from ssim_ray.sources import ManifestError, iter_shard_pairs, plan_shards


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _bomb_header() -> bytes:
    """A valid PNG header declaring 100,000 x 100,000 pixels, with a tiny body."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def _corpus(root):
    """Files under root/images and the manifest rows (pair_id, reference, distorted) with the status expected."""
    camera, chelsea = data.camera(), data.chelsea()
    noisy = np.clip(camera + np.random.default_rng(1).normal(0, 10, camera.shape), 0, 255).astype(np.uint8)
    wide = (camera.astype(np.uint16) * 257)
    rgba = np.concatenate([chelsea, np.full(chelsea.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    files = {
        "camera.png": _png(camera), "camera_noisy.png": _png(noisy), "camera16.png": _png(wide),
        "chelsea.png": _png(chelsea), "chelsea_gray.png": _png(np.asarray(Image.fromarray(chelsea).convert("L"))),
        "chelsea_rgba.png": _png(rgba), "truncated.png": _png(noisy)[:3000], "empty.png": b"",
        "text.png": b"not an image: a text file with a .png name\n", "tiny.png": _png(camera[:5, :5]),
        "tiny_noisy.png": _png(noisy[:5, :5]), "bomb.png": _bomb_header(), "camera_crop.png": _png(noisy[:500, :480]),
    }
    cmyk = io.BytesIO()
    Image.fromarray(chelsea).convert("CMYK").save(cmyk, "JPEG")
    files["chelsea_cmyk.jpg"] = cmyk.getvalue()
    (root / "images").mkdir()
    for name, payload in files.items():
        (root / "images" / name).write_bytes(payload)
    expected = [
        ("good", "images/camera.png", "images/camera_noisy.png", "ok"),
        ("truncated", "images/camera.png", "images/truncated.png", "unreadable"),
        ("zero-bytes", "images/camera.png", "images/empty.png", "unreadable"),
        ("text-as-png", "images/text.png", "images/camera_noisy.png", "unreadable"),
        ("8-vs-16-bit", "images/camera.png", "images/camera16.png", "depth_mismatch"),
        ("rgb-vs-gray", "images/chelsea.png", "images/chelsea_gray.png", "channel_mismatch"),
        ("5x5", "images/tiny.png", "images/tiny_noisy.png", "too_small"),
        ("bomb-header", "images/camera.png", "images/bomb.png", "too_large"),
        ("dot-dot", "../outside.png", "images/camera_noisy.png", "path_escape"),
        ("http-url", "images/camera.png", "http://127.0.0.1:1/x.png", "path_escape"),
        ("absent", "images/camera.png", "images/no_such_file.png", "missing"),
        ("null-path", None, "images/camera_noisy.png", "missing"),
        ("resized", "images/camera.png", "images/camera_crop.png", "size_mismatch"),
        ("cmyk", "images/chelsea_cmyk.jpg", "images/chelsea.png", "unsupported"),
        ("rgba-ok", "images/chelsea.png", "images/chelsea_rgba.png", "ok"),
        ("good-2", "images/camera_noisy.png", "images/camera.png", "ok"),
    ]
    (root / "outside.png").write_bytes(files["camera.png"])  # exists, but outside the base folder
    return expected


def _manifest(root, rows):
    table = pa.table({
        "pair_id": [r[0] for r in rows], "reference": pa.array([r[1] for r in rows], pa.string()),
        "distorted": [r[2] for r in rows],
    })
    (root / "set").mkdir(exist_ok=True)
    pq.write_table(table, root / "set" / "pairs.parquet")
    return str(root / "set" / "pairs.parquet")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "set").mkdir()
    expected = _corpus(root / "set")
    return root, expected


@pytest.fixture(scope="module")
def corpus_pairs(corpus):
    """The corpus planned in shards of 5 and loaded once for the tests that only read the results."""
    root, expected = corpus
    cfg = SourceConfig(kind="parquet", url=_manifest(root, expected), pairs_per_shard=5)
    return _run(cfg)


def _run(cfg, ssim_cfg=None):
    plan = plan_shards(cfg)
    return plan, [p for s in plan.shards for p in iter_shard_pairs(s, cfg, ssim_cfg or SSIMConfig(), threads=2, prefetch=4)]


def test_every_bad_pair_gets_its_status_and_none_is_dropped(corpus, corpus_pairs):
    _, expected = corpus
    plan, pairs = corpus_pairs
    assert len(pairs) == plan.total_pairs == len(expected)
    assert [(p.pair_id, p.status) for p in pairs] == [(r[0], r[3]) for r in expected]
    for pair in pairs:
        assert pair.status in statuses.SOURCE_STATUSES
        if pair.status == "ok":
            assert pair.error is None and pair.ref is not None and pair.ref.shape == pair.dist.shape
        else:
            assert pair.ref is None and pair.dist is None and "\n" not in pair.error


@pytest.mark.parametrize(
    "pair_id, named",
    [
        ("truncated", "truncated.png"), ("zero-bytes", "empty.png"), ("text-as-png", "text.png"),
        ("8-vs-16-bit", "camera16.png"), ("rgb-vs-gray", "chelsea_gray.png"), ("5x5", "tiny.png"),
        ("bomb-header", "bomb.png"), ("dot-dot", "../outside.png"), ("absent", "no_such_file.png"),
        ("resized", "camera_crop.png"), ("http-url", "http"), ("cmyk", "chelsea_cmyk.jpg"),
    ],
)
def test_each_error_names_the_file(corpus_pairs, pair_id, named):
    _, pairs = corpus_pairs
    [pair] = [p for p in pairs if p.pair_id == pair_id]
    assert named in pair.error


def test_alpha_error_policy_types_the_rgba_pair(corpus):
    root, expected = corpus
    cfg = SourceConfig(kind="parquet", url=_manifest(root, expected))
    _, pairs = _run(cfg, SSIMConfig(alpha="error"))
    statuses = {p.pair_id: p.status for p in pairs}
    assert statuses["rgba-ok"] == "has_alpha" and statuses["good"] == "ok"


def test_gray_policy_makes_rgb_against_gray_comparable(corpus):
    root, expected = corpus
    cfg = SourceConfig(kind="parquet", url=_manifest(root, expected))
    _, pairs = _run(cfg, SSIMConfig(color="gray"))
    assert {p.pair_id: p.status for p in pairs}["rgb-vs-gray"] == "ok"


def test_too_small_follows_the_configured_window(tmp_path):
    (tmp_path / "set" / "images").mkdir(parents=True)
    strip = data.camera()[:12, :300]  # 12 px high: fits an 11-px window, not a 13-px one
    (tmp_path / "set" / "images" / "strip.png").write_bytes(_png(strip))
    (tmp_path / "set" / "images" / "strip_noisy.png").write_bytes(_png(255 - strip))
    cfg = SourceConfig(kind="parquet", url=_manifest(tmp_path, [("strip", "images/strip.png", "images/strip_noisy.png")]))
    _, pairs = _run(cfg, SSIMConfig(win_size=11, downsample="wang"))
    assert pairs[0].status == "ok"
    _, pairs = _run(cfg, SSIMConfig(win_size=13))
    assert pairs[0].status == "too_small" and "300x12" in pairs[0].error and "13x13 window" in pairs[0].error


def test_unpaired_keys_of_a_prefix_source_become_rows(tmp_path):
    for side in ("ref", "dist"):
        (tmp_path / side).mkdir()
    camera = _png(data.camera())
    (tmp_path / "ref" / "a.png").write_bytes(camera)
    (tmp_path / "dist" / "a.png").write_bytes(camera)
    (tmp_path / "ref" / "only_ref.png").write_bytes(camera)
    (tmp_path / "dist" / "only_dist.png").write_bytes(camera)
    cfg = SourceConfig(kind="prefix", reference_url=str(tmp_path / "ref"), distorted_url=str(tmp_path / "dist"))
    plan, pairs = _run(cfg)
    assert plan.total_pairs == len(pairs) == 3
    assert [(p.pair_id, p.status) for p in pairs] == [("a.png", "ok"), ("only_dist.png", "unpaired"), ("only_ref.png", "unpaired")]
    assert "only_ref.png" in pairs[2].error and "distorted_url" in pairs[2].error


def test_duplicate_pair_id_stops_before_any_work(tmp_path):
    rows = [("good", "a.png", "b.png"), ("truncated", "a.png", "c.png"), ("x", "a.png", "d.png"), ("truncated", "e.png", "f.png")]
    with pytest.raises(ManifestError) as caught:
        plan_shards(SourceConfig(kind="parquet", url=_manifest(tmp_path, rows)))
    message = str(caught.value)
    assert "'pair_id'" in message and "'truncated'" in message and "row 1" in message and "row 3" in message


def test_missing_column_stops_before_any_work_naming_it_and_an_example_row(tmp_path):
    pq.write_table(pa.table({"pair_id": ["a"], "reference": ["r.png"], "dist": ["d.png"]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError) as caught:
        plan_shards(SourceConfig(kind="parquet", url=str(tmp_path / "m.parquet")))
    message = str(caught.value)
    assert "no column 'distorted'" in message and "'dist': 'd.png'" in message


def test_wrong_column_type_stops_before_any_work(tmp_path):
    pq.write_table(pa.table({"pair_id": ["a"], "reference": [17], "distorted": ["d.png"]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"column 'reference' has type int64, expected string .* example row 0: .*'reference': 17"):
        plan_shards(SourceConfig(kind="parquet", url=str(tmp_path / "m.parquet")))
    pq.write_table(pa.table({"pair_id": [1.5], "reference": ["r.png"], "distorted": ["d.png"]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"column 'pair_id' .* has type double"):
        plan_shards(SourceConfig(kind="parquet", url=str(tmp_path / "m.parquet")))


def test_null_pair_id_stops_before_any_work(tmp_path):
    pq.write_table(pa.table({"pair_id": ["a", None], "reference": ["r.png"] * 2, "distorted": ["d.png"] * 2}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"column 'pair_id' is null in row 1"):
        plan_shards(SourceConfig(kind="parquet", url=str(tmp_path / "m.parquet")))
