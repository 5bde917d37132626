"""What identifies each input when it is read (`LoadedPair.*_version`) and now (`current_versions`, stat only):
the same format from both, so that a resumed run can tell a rewritten input from an untouched one.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from fsspec import register_implementation
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image
from skimage import data

from ssim_ray.config import SourceConfig, SSIMConfig
from ssim_ray.sources import current_versions, iter_shard_pairs, plan_shards


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _noisy(seed: int) -> np.ndarray:
    camera = data.camera()[:96, :128]
    return np.clip(camera + np.random.default_rng(seed).normal(0, 15, camera.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def local_set(tmp_path):
    """Three noisy copies of one reference; pair `d` reuses dist0; `absent` names a file that is not there."""
    (tmp_path / "ref.png").write_bytes(_png(data.camera()[:96, :128]))
    for index in range(3):
        (tmp_path / f"dist{index}.png").write_bytes(_png(_noisy(index)))
    pq.write_table(pa.table({
        "pair_id": ["a", "b", "c", "d", "absent"], "reference": ["ref.png"] * 5,
        "distorted": ["dist0.png", "dist1.png", "dist2.png", "dist0.png", "nowhere.png"],
    }), tmp_path / "paths.parquet")
    (tmp_path / "inline").mkdir()
    pq.write_table(pa.table({"pair_id": ["inline"], "reference": [_png(data.camera()[:96, :128])],
                             "distorted": [_png(_noisy(9))]}), tmp_path / "inline" / "bytes.parquet")
    return tmp_path, SourceConfig(kind="parquet", url=str(tmp_path / "paths.parquet"))


def _loaded(cfg):
    shard = plan_shards(cfg).shards[0]
    return [(p.pair_id, p.reference_version, p.distorted_version)
            for p in iter_shard_pairs(shard, cfg, SSIMConfig(), threads=2, prefetch=4)]


def _current(cfg):
    return list(current_versions(plan_shards(cfg).shards[0], cfg, threads=2))


def test_local_versions_are_size_and_mtime_and_agree_with_the_stat_only_check(local_set):
    root, cfg = local_set
    loaded = _loaded(cfg)
    stat = os.stat(root / "dist1.png")
    assert loaded[1] == ("b", loaded[0][1], f"size={stat.st_size};mtime_ns={stat.st_mtime_ns}")
    assert loaded[4] == ("absent", loaded[0][1], None)  # a missing input has no version, now or later
    assert _current(cfg) == loaded


def test_rewritten_inputs_get_new_versions_untouched_ones_keep_theirs(local_set):
    root, cfg = local_set
    before = _current(cfg)
    target = root / "dist1.png"
    stat = os.stat(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same bytes, new mtime
    touched = _current(cfg)
    payload = bytearray(target.read_bytes())
    payload[-20] ^= 0xFF  # same size, new content (and mtime)
    target.write_bytes(bytes(payload))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000))
    rewritten = _current(cfg)
    (root / "dist2.png").write_bytes(_png(_noisy(42)))  # new content of another size
    replaced = _current(cfg)
    assert touched[1] != before[1] and rewritten[1] != touched[1] and replaced[2] != before[2]
    for index in (0, 3, 4):
        assert before[index] == touched[index] == rewritten[index] == replaced[index]
    assert rewritten[1][2].startswith(f"size={stat.st_size};")


def test_inline_bytes_have_no_version(local_set):
    root, _ = local_set
    cfg = SourceConfig(kind="parquet", url=str(root / "inline" / "bytes.parquet"))
    assert _loaded(cfg) == _current(cfg) == [("inline", None, None)]


def test_prefix_source_versions_in_key_order_and_none_for_an_unpaired_key(tmp_path):
    for side in ("ref", "dist"):
        (tmp_path / side).mkdir()
    (tmp_path / "ref" / "a.png").write_bytes(_png(data.camera()[:64, :64]))
    (tmp_path / "dist" / "a.png").write_bytes(_png(_noisy(1)[:64, :64]))
    (tmp_path / "ref" / "b.png").write_bytes(_png(data.camera()[:64, :64]))
    cfg = SourceConfig(kind="prefix", reference_url=str(tmp_path / "ref"), distorted_url=str(tmp_path / "dist"))
    current = _current(cfg)
    assert _loaded(cfg) == current
    assert current[0][0] == "a.png" and current[0][1].startswith("size=") and current[1] == ("b.png", None, None)


class _StatOnlyFS(MemoryFileSystem):
    """statonly://: info works, any read of an object's bytes is a test failure."""

    protocol = "statonly"
    reads = 0
    infos = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("statonly://", "memory://", 1))

    def _open(self, path, mode="rb", **kwargs):
        type(self).reads += 1
        return super()._open(path, mode=mode, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        type(self).reads += 1
        return super().cat_file(path, start=start, end=end, **kwargs)

    def info(self, path, **kwargs):
        type(self).infos += 1
        return super().info(path, **kwargs)


def test_current_versions_reads_no_image_bytes(tmp_path):
    register_implementation("statonly", _StatOnlyFS, clobber=True)
    fs = _StatOnlyFS()
    fs.pipe_file("/vset/ref.png", _png(data.camera()[:64, :64]))
    fs.pipe_file("/vset/dist.png", _png(_noisy(3)[:64, :64]))
    pq.write_table(pa.table({"reference": ["statonly://vset/ref.png"], "distorted": ["statonly://vset/dist.png"]}),
                   tmp_path / "m.parquet")
    cfg = SourceConfig(kind="parquet", url=str(tmp_path / "m.parquet"), allowed_schemes=["file", "statonly"])
    _StatOnlyFS.reads = 0
    [(pair_id, ref_version, dist_version)] = _current(cfg)
    assert _StatOnlyFS.reads == 0 and ref_version.startswith("size=") and dist_version != ref_version
    assert _loaded(cfg) == [(pair_id, ref_version, dist_version)] and _StatOnlyFS.reads == 2


def test_s3_versions_are_size_and_etag_and_follow_a_rewrite(s3_bucket, s3_storage_options, tmp_path):
    fs = s3fs.S3FileSystem(**s3_storage_options)
    fs.pipe(f"{s3_bucket}/v/ref.png", _png(data.camera()[:64, :64]))
    fs.pipe(f"{s3_bucket}/v/dist.png", _png(_noisy(3)[:64, :64]))
    with fs.open(f"{s3_bucket}/v/pairs.parquet", "wb") as handle:
        pq.write_table(pa.table({"pair_id": ["a"], "reference": ["ref.png"], "distorted": ["dist.png"]}), handle)
    cfg = SourceConfig(kind="parquet", url=f"s3://{s3_bucket}/v/pairs.parquet", storage_options=s3_storage_options)
    loaded = _loaded(cfg)
    etag = fs.info(f"{s3_bucket}/v/dist.png")["ETag"].strip('"')
    size = fs.info(f"{s3_bucket}/v/dist.png")["size"]
    assert loaded == _current(cfg) and loaded[0][2] == f"size={size};etag={etag}"
    fs.pipe(f"{s3_bucket}/v/dist.png", _png(_noisy(4)[:64, :64]))
    after = _current(cfg)
    assert after[0][1] == loaded[0][1] and after[0][2] != loaded[0][2]


def test_an_input_that_cannot_be_read_has_no_version_now_either(local_set):
    """A folder where an image should be: loading records None, so the stat-only look-up must too (or every
    resume would see a change and recompute the shard)."""
    root, _ = local_set
    (root / "folder.png").mkdir()
    pq.write_table(pa.table({"pair_id": ["dir"], "reference": ["ref.png"], "distorted": ["folder.png"]}), root / "dir.parquet")
    cfg = SourceConfig(kind="parquet", url=str(root / "dir.parquet"))
    loaded = _loaded(cfg)
    assert loaded[0][2] is None and loaded[0][1] is not None
    assert _current(cfg) == loaded


def test_an_input_shared_by_several_pairs_is_looked_up_once_per_shard(tmp_path):
    register_implementation("statonly", _StatOnlyFS, clobber=True)
    fs = _StatOnlyFS()
    fs.pipe_file("/shared/ref.png", _png(data.camera()[:64, :64]))
    for index in range(7):
        fs.pipe_file(f"/shared/dist{index}.png", _png(_noisy(index)[:64, :64]))
    pq.write_table(pa.table({"reference": ["statonly://shared/ref.png"] * 7,
                             "distorted": [f"statonly://shared/dist{i}.png" for i in range(7)]}), tmp_path / "m.parquet")
    cfg = SourceConfig(kind="parquet", url=str(tmp_path / "m.parquet"), allowed_schemes=["file", "statonly"])
    _StatOnlyFS.infos = 0
    versions = _current(cfg)
    assert _StatOnlyFS.infos == 1 + 7 and len({v[1] for v in versions}) == 1
