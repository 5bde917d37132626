"""Parquet manifests on local disk and memory://: planning from footers, streaming, exact pixels."""

from __future__ import annotations

import io
import pickle
import re

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data
from skimage.metrics import structural_similarity

from ssim_ray.config import SourceConfig, SSIMConfig
from ssim_ray.sources import ManifestError, iter_shard_pairs, load_pairs, loading, plan_shards

CAMERA_GOLDEN = 0.3579642362  # DESIGN.md §2: skimage's camera against its noisy camera, Wang's settings
CHELSEA_GOLDEN = 0.4799434086


def _noisy(pixels: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.RandomState(seed)
    return np.clip(pixels + sigma * rng.randn(*pixels.shape), 0, 255).astype(np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def photo_set(tmp_path):
    """Two golden pairs (camera σ=20, chelsea σ=15) and a JPEG pair, written as files under tmp_path/images."""
    images = {
        "camera.png": data.camera(), "camera_noisy.png": _noisy(data.camera(), 20.0, 5),
        "chelsea.png": data.chelsea(), "chelsea_noisy.png": _noisy(data.chelsea(), 15.0, 2064892105),
        "astronaut.png": data.astronaut(),
    }
    (tmp_path / "images").mkdir()
    for name, pixels in images.items():
        (tmp_path / "images" / name).write_bytes(_png(pixels))
    Image.fromarray(data.astronaut()).save(tmp_path / "images" / "astronaut_q30.jpg", quality=30)
    rows = [
        ("camera", "images/camera.png", "images/camera_noisy.png", "noise"),
        ("chelsea", "images/chelsea.png", "images/chelsea_noisy.png", "noise"),
        ("astronaut", "images/astronaut.png", "images/astronaut_q30.jpg", "jpeg"),
    ]
    return tmp_path, images, rows


def _write_manifest(path, rows, *, row_group_size=None, with_ids=True):
    columns = {"reference": [r[1] for r in rows], "distorted": [r[2] for r in rows], "codec": [r[3] for r in rows]}
    if with_ids:
        columns = {"pair_id": [r[0] for r in rows], **columns}
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def _load_all(plan, cfg, ssim_cfg=None, *, threads=2, prefetch=4):
    return [pair for shard in plan.shards for pair in iter_shard_pairs(shard, cfg, ssim_cfg or SSIMConfig(), threads=threads, prefetch=prefetch)]


def _wang(ref, dist, data_range):
    x, y = ref.permute(1, 2, 0).numpy(), dist.permute(1, 2, 0).numpy()
    return structural_similarity(
        x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range, channel_axis=2
    )


def test_decoded_pairs_reproduce_the_golden_ssim_values(photo_set):
    root, _, rows = photo_set
    _write_manifest(root / "pairs.parquet", rows)
    cfg = SourceConfig(kind="parquet", url=str(root / "pairs.parquet"))
    pairs = {pair.pair_id: pair for pair in _load_all(plan_shards(cfg), cfg)}
    camera, chelsea = pairs["camera"], pairs["chelsea"]
    assert camera.status == "ok" and camera.data_range == 255.0 and camera.bit_depth == 8
    assert camera.ref.shape == (1, 512, 512) and chelsea.ref.shape == (3, 300, 451)
    assert camera.ref.is_contiguous() and str(camera.ref.dtype) == "torch.uint8"
    # Both golden values to 1e-9: decoding, layout and data_range are all exact.
    assert abs(_wang(camera.ref, camera.dist, camera.data_range) - CAMERA_GOLDEN) < 1e-9
    assert abs(_wang(chelsea.ref, chelsea.dist, chelsea.data_range) - CHELSEA_GOLDEN) < 1e-9
    assert pairs["astronaut"].decoder == f"Pillow {Image.__version__} PNG / Pillow {Image.__version__} JPEG"
    assert pairs["astronaut"].passthrough == {"codec": "jpeg"} and pairs["astronaut"].reference == "images/astronaut.png"


def test_plan_covers_every_row_once_in_order_across_row_groups(photo_set, tmp_path):
    root, _, rows = photo_set
    many = [(f"p{i:03d}", *rows[i % 3][1:]) for i in range(23)]
    _write_manifest(root / "pairs.parquet", many, row_group_size=5)
    cfg = SourceConfig(kind="parquet", url=str(root / "pairs.parquet"), pairs_per_shard=4)
    plan = plan_shards(cfg)
    assert [s.num_pairs for s in plan.shards] == [4] * 5 + [3] and plan.total_pairs == 23
    # A shard straddling row groups 0 and 1 (rows 4..7) reads exactly those two groups.
    assert plan.shards[1].rows.row_groups == (0, 1)
    loaded = _load_all(plan, cfg, threads=2, prefetch=3)
    assert [p.pair_id for p in loaded] == [r[0] for r in many]
    assert [p.row_index for p in loaded[:8]] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert all(p.status == "ok" for p in loaded)


def test_shard_ids_are_stable_sorted_file_safe_and_shards_are_small(photo_set):
    root, _, rows = photo_set
    _write_manifest(root / "pairs.parquet", [(f"p{i}", *rows[0][1:]) for i in range(300)], row_group_size=64)
    cfg = SourceConfig(kind="parquet", url=str(root / "pairs.parquet"), pairs_per_shard=7)
    first, second = plan_shards(cfg), plan_shards(cfg)
    ids = [s.shard_id for s in first.shards]
    assert ids == [s.shard_id for s in second.shards] and first.fingerprint == second.fingerprint
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9]{8}-[0-9a-f]{8}", shard_id) for shard_id in ids)
    assert max(len(pickle.dumps(s)) for s in first.shards) < 1024
    assert pickle.loads(pickle.dumps(first.shards[3])) == first.shards[3]


def test_fingerprint_follows_content_and_pairs_per_shard_not_credentials(photo_set):
    root, _, rows = photo_set
    _write_manifest(root / "pairs.parquet", rows)
    base = SourceConfig(kind="parquet", url=str(root / "pairs.parquet"), pairs_per_shard=2)
    fingerprint = plan_shards(base).fingerprint
    assert plan_shards(SourceConfig(kind="parquet", url=str(root / "pairs.parquet"), pairs_per_shard=3)).fingerprint != fingerprint
    with_options = SourceConfig(kind="parquet", url=str(root / "pairs.parquet"), pairs_per_shard=2, storage_options={"anon": True})
    assert plan_shards(with_options).fingerprint == fingerprint
    smaller_cap = SourceConfig(kind="parquet", url=str(root / "pairs.parquet"), pairs_per_shard=2, max_pixels=1000)
    assert plan_shards(smaller_cap).fingerprint != fingerprint  # it changes statuses, so resume must notice
    _write_manifest(root / "pairs.parquet", rows[:2] + [("astronaut", rows[2][1], "images/other.jpg", "jpeg")])
    assert plan_shards(base).fingerprint != fingerprint


def test_planning_reads_footers_and_the_id_column_only(photo_set, monkeypatch):
    root, _, rows = photo_set
    _write_manifest(root / "pairs.parquet", [(f"p{i}", *rows[i % 3][1:]) for i in range(50)], row_group_size=8)
    requested = []
    real_iter_batches = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        requested.append(kwargs.get("columns"))
        return real_iter_batches(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("planning read a whole table"))
    plan_shards(SourceConfig(kind="parquet", url=str(root / "pairs.parquet"), pairs_per_shard=5))
    assert requested and all(columns == ["pair_id"] for columns in requested)


def test_folder_and_glob_manifests_with_default_ids_and_per_file_base(photo_set):
    root, _, rows = photo_set
    (root / "manifest").mkdir()
    relative = [(r[0], "../" + r[1], "../" + r[2], r[3]) for r in rows]
    _write_manifest(root / "manifest" / "part-1.parquet", relative[1:], with_ids=False)
    _write_manifest(root / "manifest" / "part-0.parquet", relative[:1], with_ids=False)
    (root / "manifest" / "_SUCCESS").write_bytes(b"")
    cfg = SourceConfig(kind="parquet", url=str(root / "manifest"), base_url=str(root))
    # With base_url at the root, '../images' leaves it: every pair is a path_escape, typed, none dropped.
    escaped = _load_all(plan_shards(cfg), cfg)
    assert [p.status for p in escaped] == ["path_escape"] * 3
    plain = [(r[0], r[1], r[2], r[3]) for r in rows]
    _write_manifest(root / "manifest" / "part-1.parquet", plain[1:], with_ids=False)
    _write_manifest(root / "manifest" / "part-0.parquet", plain[:1], with_ids=False)
    for url in (str(root / "manifest"), str(root / "manifest" / "part-*.parquet")):
        cfg = SourceConfig(kind="parquet", url=url, base_url=str(root))
        loaded = _load_all(plan_shards(cfg), cfg)
        assert [p.pair_id for p in loaded] == ["part-0.parquet#0", "part-1.parquet#0", "part-1.parquet#1"]
        assert [p.status for p in loaded] == ["ok"] * 3


def test_bytes_columns_and_memory_filesystem(photo_set):
    _, images, _ = photo_set
    table = pa.table({
        "pair_id": ["camera"], "reference": pa.array([_png(images["camera.png"])], pa.binary()),
        "distorted": pa.array([_png(images["camera_noisy.png"])], pa.large_binary()), "split": ["test"],
    })
    with fsspec.open("memory://bytes-test/pairs.parquet", "wb") as handle:
        pq.write_table(table, handle)
    cfg = SourceConfig(kind="parquet", url="memory://bytes-test/pairs.parquet")
    [pair] = _load_all(plan_shards(cfg), cfg)
    assert pair.status == "ok" and re.fullmatch(r"<bytes:\d+>", pair.reference)
    assert abs(_wang(pair.ref, pair.dist, pair.data_range) - CAMERA_GOLDEN) < 1e-9
    assert pair.passthrough == {"split": "test"}


def test_passthrough_columns_are_configurable(photo_set):
    root, _, rows = photo_set
    _write_manifest(root / "pairs.parquet", rows)
    cfg = SourceConfig(kind="parquet", url=str(root / "pairs.parquet"), passthrough_columns=[])
    plan = plan_shards(cfg)
    assert plan.passthrough_columns == () and _load_all(plan, cfg)[0].passthrough == {}
    with pytest.raises(ManifestError, match=r"no column 'camera_model' \(source.passthrough_columns\)"):
        plan_shards(SourceConfig(kind="parquet", url=str(root / "pairs.parquet"), passthrough_columns=["camera_model"]))


def test_in_flight_pairs_stay_within_prefetch(photo_set, monkeypatch):
    root, _, rows = photo_set
    _write_manifest(root / "pairs.parquet", [(f"p{i}", *rows[i % 3][1:]) for i in range(20)])
    cfg = SourceConfig(kind="parquet", url=str(root / "pairs.parquet"), pairs_per_shard=20)
    started = []
    real_load = loading._load_pair
    monkeypatch.setattr(loading, "_load_pair", lambda *args: started.append(1) or real_load(*args))
    plan = plan_shards(cfg)
    consumed = 0
    for pair in iter_shard_pairs(plan.shards[0], cfg, SSIMConfig(), threads=2, prefetch=3):
        consumed += 1
        # Submitted but not yet consumed: never more than prefetch.
        assert len(started) - consumed <= 3 - 1
    assert consumed == 20 and len(started) == 20


def test_abandoning_a_shard_midway_stops_its_threads(photo_set):
    root, _, rows = photo_set
    _write_manifest(root / "pairs.parquet", [(f"p{i}", *rows[i % 3][1:]) for i in range(12)])
    cfg = SourceConfig(kind="parquet", url=str(root / "pairs.parquet"), pairs_per_shard=12)
    stream = iter_shard_pairs(plan_shards(cfg).shards[0], cfg, SSIMConfig(), threads=2, prefetch=4)
    assert next(stream).pair_id == "p0"
    stream.close()
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("ssim-load")]


def test_manifest_that_shrank_after_planning_is_an_error_not_a_silent_gap(photo_set):
    root, _, rows = photo_set
    _write_manifest(root / "pairs.parquet", [(f"p{i}", *rows[0][1:]) for i in range(6)])
    cfg = SourceConfig(kind="parquet", url=str(root / "pairs.parquet"), pairs_per_shard=6)
    plan = plan_shards(cfg)
    _write_manifest(root / "pairs.parquet", [(f"p{i}", *rows[0][1:]) for i in range(4)])
    with pytest.raises(ManifestError, match="planned 6 pairs, found 4"):
        list(iter_shard_pairs(plan.shards[0], cfg, SSIMConfig(), threads=1, prefetch=2))


def test_data_range_from_config_and_y_color_policy(photo_set):
    root, _, rows = photo_set
    _write_manifest(root / "pairs.parquet", rows)
    cfg = SourceConfig(kind="parquet", url=str(root / "pairs.parquet"))
    pairs = _load_all(plan_shards(cfg), cfg, SSIMConfig(data_range=4095, color="y"))
    assert {p.data_range for p in pairs} == {4095.0}
    assert all(p.ref.shape[0] == 1 and p.dist.shape[0] == 1 for p in pairs)


def test_load_pairs_decodes_only_the_pairs_asked_for(photo_set, monkeypatch):
    root, _, rows = photo_set
    _write_manifest(root / "pairs.parquet", [(f"p{i}", *rows[i % 3][1:]) for i in range(9)])
    cfg = SourceConfig(kind="parquet", url=str(root / "pairs.parquet"), pairs_per_shard=9)
    shard = plan_shards(cfg).shards[0]
    decoded = []
    real_load = loading._load_pair
    monkeypatch.setattr(loading, "_load_pair", lambda row, *rest: decoded.append(row.pair_id) or real_load(row, *rest))
    pairs = load_pairs(shard, cfg, SSIMConfig(), pair_ids={"p7", "p2", "not-in-shard"})
    assert [(p.pair_id, p.row_index, p.status) for p in pairs] == [("p2", 2, "ok"), ("p7", 7, "ok")]
    assert sorted(decoded) == ["p2", "p7"]
