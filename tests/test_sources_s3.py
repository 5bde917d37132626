"""Sources on S3 through moto's server on 127.0.0.1 (see conftest), and storage retries.

Covers a manifest on S3 with relative paths, one with absolute s3:// URLs, one with bytes columns, a prefix
pair on S3, credentials kept out of everything we produce, and retry with backoff on transient errors only.
"""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from fsspec import register_implementation
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image
from skimage import data
from skimage.metrics import structural_similarity

from ssim_ray.config import SourceConfig, SSIMConfig
from ssim_ray.sources import iter_shard_pairs, plan_shards
from ssim_ray.sources.reading import read_versioned
from ssim_ray.sources.storage import StorageUnavailableError, is_transient

CAMERA_GOLDEN = 0.3579642362


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _camera_pair():
    camera = data.camera()
    noisy = np.clip(camera + 20.0 * np.random.RandomState(5).randn(*camera.shape), 0, 255).astype(np.uint8)
    return _png(camera), _png(noisy)


def _jpeg_pair():
    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, "JPEG", quality=20)
    return _png(data.chelsea()), buffer.getvalue()


def _put_parquet(fs, path, table):
    with fs.open(path, "wb") as handle:
        pq.write_table(table, handle)


def _load(cfg):
    plan = plan_shards(cfg)
    return plan, [p for s in plan.shards for p in iter_shard_pairs(s, cfg, SSIMConfig(), threads=2, prefetch=4)]


def _wang(pair):
    return structural_similarity(
        pair.ref[0].numpy(), pair.dist[0].numpy(), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=pair.data_range,
    )


@pytest.fixture
def s3(s3_bucket, s3_storage_options):
    fs = s3fs.S3FileSystem(**s3_storage_options)
    camera, noisy = _camera_pair()
    chelsea, chelsea_jpeg = _jpeg_pair()
    for key, payload in {"camera.png": camera, "camera_noisy.png": noisy, "chelsea.png": chelsea, "chelsea_q20.jpg": chelsea_jpeg}.items():
        fs.pipe(f"{s3_bucket}/set/images/{key}", payload)
    return fs, s3_bucket, s3_storage_options


def test_manifest_on_s3_with_relative_paths(s3):
    fs, bucket, options = s3
    table = pa.table({
        "pair_id": ["camera", "chelsea", "gone"], "reference": ["images/camera.png", "images/chelsea.png", "images/camera.png"],
        "distorted": ["images/camera_noisy.png", "images/chelsea_q20.jpg", "images/not_uploaded.png"], "codec": ["png", "jpeg", "png"],
    })
    _put_parquet(fs, f"{bucket}/set/pairs.parquet", table)
    cfg = SourceConfig(kind="parquet", url=f"s3://{bucket}/set/pairs.parquet", storage_options=options, pairs_per_shard=2)
    plan, pairs = _load(cfg)
    assert plan.total_pairs == 3 and [s.num_pairs for s in plan.shards] == [2, 1]
    assert [(p.pair_id, p.status) for p in pairs] == [("camera", "ok"), ("chelsea", "ok"), ("gone", "missing")]
    assert abs(_wang(pairs[0]) - CAMERA_GOLDEN) < 1e-9
    assert pairs[1].passthrough == {"codec": "jpeg"} and pairs[1].ref.shape == (3, 300, 451)
    assert f"s3://{bucket}/set/images/not_uploaded.png" in pairs[2].error


def test_local_manifest_with_absolute_s3_urls(s3, tmp_path):
    _, bucket, options = s3
    table = pa.table({
        "reference": [f"s3://{bucket}/set/images/camera.png", f"s3://{bucket}/set/images/chelsea.png"],
        "distorted": [f"s3://{bucket}/set/images/camera_noisy.png", f"s3://{bucket}/set/images/chelsea_q20.jpg"],
    })
    pq.write_table(table, tmp_path / "pairs.parquet")
    cfg = SourceConfig(kind="parquet", url=str(tmp_path / "pairs.parquet"), storage_options=options)
    _, pairs = _load(cfg)
    assert [(p.pair_id, p.status) for p in pairs] == [("pairs.parquet#0", "ok"), ("pairs.parquet#1", "ok")]
    assert pairs[0].reference == f"s3://{bucket}/set/images/camera.png"
    assert abs(_wang(pairs[0]) - CAMERA_GOLDEN) < 1e-9
    # The same manifest with s3 not among the allowed schemes: every pair refused, none dropped.
    strict = SourceConfig(kind="parquet", url=str(tmp_path / "pairs.parquet"), storage_options=options, allowed_schemes=["file"])
    assert [p.status for p in _load(strict)[1]] == ["path_escape", "path_escape"]


def test_manifest_on_s3_with_bytes_columns(s3):
    fs, bucket, options = s3
    camera, noisy = _camera_pair()
    table = pa.table({"pair_id": ["camera"], "reference": pa.array([camera], pa.binary()), "distorted": pa.array([noisy], pa.binary())})
    _put_parquet(fs, f"{bucket}/bytes/part-0.parquet", table)
    cfg = SourceConfig(kind="parquet", url=f"s3://{bucket}/bytes", storage_options=options)
    _, [pair] = _load(cfg)
    assert pair.status == "ok" and pair.reference == f"<bytes:{len(camera)}>"
    assert abs(_wang(pair) - CAMERA_GOLDEN) < 1e-9


def test_prefix_pair_on_s3(s3):
    fs, bucket, options = s3
    camera, noisy = _camera_pair()
    fs.pipe(f"{bucket}/ref/a/camera.png", camera)
    fs.pipe(f"{bucket}/dist/a/camera.png", noisy)
    fs.pipe(f"{bucket}/dist/a/extra.png", noisy)
    cfg = SourceConfig(kind="prefix", reference_url=f"s3://{bucket}/ref", distorted_url=f"s3://{bucket}/dist/", storage_options=options)
    plan, pairs = _load(cfg)
    assert [(p.pair_id, p.status) for p in pairs] == [("a/camera.png", "ok"), ("a/extra.png", "unpaired")]
    assert abs(_wang(pairs[0]) - CAMERA_GOLDEN) < 1e-9
    assert plan.fingerprint == plan_shards(cfg).fingerprint


def test_credentials_never_appear_in_plans_pairs_or_errors(s3):
    fs, bucket, options = s3
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    table = pa.table({
        "pair_id": ["ok", "userinfo", "presigned"], "reference": ["images/camera.png"] * 3,
        "distorted": [
            "images/camera_noisy.png", "https://user:hunter2-pass@127.0.0.1:1/x.png",
            "https://127.0.0.1:1/x.png?X-Amz-Credential=AKIDhunter2&X-Amz-Signature=hunter2sig&v=1",
        ],
    })
    _put_parquet(fs, f"{bucket}/set/pairs.parquet", table)
    cfg = SourceConfig(kind="parquet", url=f"s3://{bucket}/set/pairs.parquet", storage_options=options)
    plan, pairs = _load(cfg)
    assert pairs[1].status == pairs[2].status == "path_escape"
    produced = repr(plan) + pickle.dumps(plan).hex() + "".join(repr((p.pair_id, p.reference, p.distorted, p.error, p.passthrough)) for p in pairs)
    assert secret == "testing" and "hunter2" not in produced and secret not in produced
    assert "***@127.0.0.1" in pairs[1].error and "X-Amz-Signature=***&v=1" in pairs[2].distorted


class _FlakyMemory(MemoryFileSystem):
    """memory:// that fails a set number of reads (whole or opened) per path: with a connection reset, or a given error."""

    protocol = "flakymem"
    failures: dict = {}
    calls: dict = {}

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("flakymem://", "memory://", 1))

    def _fail_or_count(self, path):
        self.calls[path] = self.calls.get(path, 0) + 1
        remaining, error = self.failures.get(path, (0, None))
        if remaining:
            self.failures[path] = (remaining - 1, error)
            raise error

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._fail_or_count(self._strip_protocol(path))
        return super().cat_file(path, start=start, end=end, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            self._fail_or_count(self._strip_protocol(path))
        return super()._open(path, mode=mode, **kwargs)


@pytest.fixture
def flaky():
    register_implementation("flakymem", _FlakyMemory, clobber=True)
    _FlakyMemory.failures, _FlakyMemory.calls = {}, {}
    fs = _FlakyMemory()
    yield fs
    for path in list(fs.store):
        if path.startswith("/flaky"):
            fs.store.pop(path)


def test_read_retries_transient_errors_with_growing_backoff(flaky):
    flaky.pipe_file("/flaky/a.png", b"payload")
    flaky.failures["/flaky/a.png"] = (3, ConnectionResetError("reset by peer"))
    waits = []
    assert read_versioned(flaky, "/flaky/a.png", retries=4, backoff_s=0.1, sleep=waits.append)[0] == b"payload"
    assert flaky.calls["/flaky/a.png"] == 4 and len(waits) == 3
    # Exponential with up to 50% jitter: 0.1-0.15, 0.2-0.3, 0.4-0.6.
    assert all(0.1 * 2**i <= wait <= 0.15 * 2**i for i, wait in enumerate(waits))


def test_read_never_retries_missing_or_forbidden_objects(flaky):
    with pytest.raises(FileNotFoundError):
        read_versioned(flaky, "/flaky/absent.png", retries=5, sleep=lambda s: pytest.fail("slept on a missing object"))
    assert flaky.calls["/flaky/absent.png"] == 1
    flaky.pipe_file("/flaky/locked.png", b"x")
    flaky.failures["/flaky/locked.png"] = (1, PermissionError("403"))
    with pytest.raises(PermissionError):
        read_versioned(flaky, "/flaky/locked.png", retries=5, sleep=lambda s: pytest.fail("slept on a permanent error"))
    assert not is_transient(FileNotFoundError()) and is_transient(TimeoutError()) and is_transient(OSError(110, "timed out"))


def test_outage_beyond_retries_fails_the_shard_instead_of_typing_pairs(flaky, tmp_path):
    camera, noisy = _camera_pair()
    flaky.pipe_file("/flaky/ref.png", camera)
    flaky.pipe_file("/flaky/dist.png", noisy)
    pq.write_table(pa.table({"reference": ["flakymem://flaky/ref.png"] * 2, "distorted": ["flakymem://flaky/dist.png"] * 2}), tmp_path / "m.parquet")
    schemes = ["file", "flakymem"]
    cfg = SourceConfig(kind="parquet", url=str(tmp_path / "m.parquet"), allowed_schemes=schemes, fetch_retries=2)
    flaky.failures["/flaky/dist.png"] = (2, TimeoutError("slow"))  # within the retries: both pairs ok
    assert [p.status for p in _load(cfg)[1]] == ["ok", "ok"]
    flaky.failures["/flaky/dist.png"] = (100, ConnectionResetError("down"))
    cfg = SourceConfig(kind="parquet", url=str(tmp_path / "m.parquet"), allowed_schemes=schemes, fetch_retries=0)
    with pytest.raises(StorageUnavailableError, match=r"distorted flakymem://flaky/dist.png: storage unavailable after 0 "
                                                      r"retries: ConnectionResetError: down"):
        _load(cfg)
