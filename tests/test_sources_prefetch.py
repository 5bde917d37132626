"""Prefetch is bounded in decoded bytes as well as in pairs: big images do not pile up ahead of the consumer.

Images are real photographs upscaled to 1200x1600 RGB (5.76 MB decoded each, 11.5 MB a pair) and stored as
JPEG; a slow consumer lets the loading threads run as far ahead as they are allowed to.
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data

from ssim_ray.config import COLOR_POLICIES, BatchConfig, SourceConfig, SSIMConfig
from ssim_ray.sources import iter_shard_pairs, loading, plan_shards, prefetch
from ssim_ray.sources.decode import decode_image, decoded_size_bound

HEIGHT, WIDTH = 1200, 1600
PAIR_BYTES = 2 * HEIGHT * WIDTH * 3
PAIRS = 10


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def big_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    photo = data.astronaut()
    rows = []
    for index in range(PAIRS):
        crop = photo[20 * index:20 * index + 300, 10 * index:10 * index + 400]
        big = np.asarray(Image.fromarray(crop).resize((WIDTH, HEIGHT), Image.BICUBIC))
        (root / f"ref{index}.jpg").write_bytes(_jpeg(big, 95))
        (root / f"dist{index}.jpg").write_bytes(_jpeg(big, 25))
        rows.append((f"p{index}", f"ref{index}.jpg", f"dist{index}.jpg"))
    pq.write_table(pa.table({"pair_id": [r[0] for r in rows], "reference": [r[1] for r in rows],
                             "distorted": [r[2] for r in rows]}), root / "pairs.parquet")
    return SourceConfig(kind="parquet", url=str(root / "pairs.parquet"))


def _peak_held_ahead(cfg, monkeypatch, *, run_ahead_past=None, **limits):
    """Decoded bytes made by the loading threads and not yet handed to the consumer, at their peak.

    Made: when `decode_image` returns. Handed over: when the pool gives the pair out, counted just before it
    releases the pair's reservation, so that a consumer descheduled after receiving a pair (2 shared cores)
    is not counted as holding it. `run_ahead_past`: after the first pair, wait until that many bytes are
    ahead (the threads need time to run ahead on a loaded machine).
    """
    lock = threading.Lock()
    held = {"now": 0, "peak": 0}
    real_decode, real_take = loading.decode_image, prefetch._take

    def counting_decode(*args, **kwargs):
        image = real_decode(*args, **kwargs)
        with lock:
            held["now"] += image.pixels.nbytes
            held["peak"] = max(held["peak"], held["now"])
        return image

    def counting_take(future, turn, budget):
        pair = future.result()
        with lock:
            held["now"] -= pair.ref.nbytes + pair.dist.nbytes
        return real_take(future, turn, budget)

    monkeypatch.setattr(loading, "decode_image", counting_decode)
    monkeypatch.setattr(prefetch, "_take", counting_take)
    count = 0
    for pair in iter_shard_pairs(plan_shards(cfg).shards[0], cfg, SSIMConfig(), threads=2, **limits):
        assert pair.status == "ok", pair.error
        deadline = time.monotonic() + 60
        while count == 0 and run_ahead_past is not None and held["peak"] <= run_ahead_past and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # a slow consumer: the threads run ahead as far as they may
        count += 1
    assert count == PAIRS and held["now"] == 0
    return held["peak"]


def test_decoded_bytes_held_ahead_never_exceed_the_byte_budget(big_pairs, monkeypatch):
    budget = int(2.5 * PAIR_BYTES)
    peak = _peak_held_ahead(big_pairs, monkeypatch, prefetch=64, prefetch_bytes=budget)
    assert peak <= budget
    # Without a byte bound the same stream holds far more: the pair bound alone lets all 10 pile up.
    assert _peak_held_ahead(big_pairs, monkeypatch, run_ahead_past=budget, prefetch=64,
                            prefetch_bytes=100 * PAIR_BYTES) > budget


def test_a_pair_larger_than_the_budget_still_proceeds_alone(big_pairs, monkeypatch):
    peak = _peak_held_ahead(big_pairs, monkeypatch, prefetch=8, prefetch_bytes=PAIR_BYTES // 4)
    assert peak <= PAIR_BYTES


def test_the_pair_bound_still_holds_with_a_large_byte_budget(big_pairs, monkeypatch):
    peak = _peak_held_ahead(big_pairs, monkeypatch, prefetch=2, prefetch_bytes=100 * PAIR_BYTES)
    assert peak <= 2 * PAIR_BYTES


def test_prefetch_bytes_is_validated_and_defaults_to_a_few_hundred_megabytes():
    assert 2**27 <= BatchConfig().prefetch_bytes <= 2**30
    with pytest.raises(ValueError, match="batch.prefetch_bytes"):
        BatchConfig(prefetch_bytes=0)
    with pytest.raises(ValueError, match="prefetch_bytes"):
        list(iter_shard_pairs(None, SourceConfig(), SSIMConfig(), threads=1, prefetch=1, prefetch_bytes=0))


def _encoded(mode: str) -> bytes:
    photo = data.chelsea()
    image = Image.fromarray(photo[:, :, 0].astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(photo).convert(
        "RGB" if mode == "JPEG-RGB" else mode)
    buffer = io.BytesIO()
    if mode == "JPEG-RGB":
        Image.fromarray(photo).save(buffer, "JPEG")
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("color", COLOR_POLICIES)
@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "JPEG-RGB"])
def test_the_reservation_made_from_the_header_covers_what_decoding_keeps(mode, color):
    payload = _encoded(mode)
    kept = decode_image(payload, name="x", color=color, alpha="drop", max_pixels=10**8).pixels.nbytes
    assert kept <= decoded_size_bound(payload, max_pixels=10**8, color=color)
