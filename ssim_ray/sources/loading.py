"""Loading, in a worker: a shard's pairs fetched, decoded, checked and typed on threads, in order; and the
stat-only look-up of the same inputs' versions (`current_versions`).

A worker walks its shard's rows (`rows`), fetches both sides of each pair with their versions (`fetch`,
every per-pair failure typed), decodes them (`decode`, with the multi-frame and EXIF orientation policies),
checks that they are comparable, and yields every pair of the shard exactly once, in order, with a typed
status (`ssim_ray.statuses`). Loading threads run ahead of the consumer by at most `prefetch` pairs and
`prefetch_bytes` decoded bytes (`prefetch`). Only a fault of the process (MemoryError) or a storage outage
that outlived its retries raises, so that the shard is retried as a whole; no exception leaving here quotes
a credential (`fetch.redacted_errors`).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Union

import numpy as np
import torch

from ssim_ray import statuses
from ssim_ray.config import DEFAULT_PREFETCH_BYTES, SourceConfig, SSIMConfig
from ssim_ray.metric import output_size
from ssim_ray.secrets import redact_text
from ssim_ray.sources.decode import DecodedImage, DecodeError, decode_image, decoded_size_bound, describe_bytes
from ssim_ray.sources.fetch import PROCESS_FAULTS, Fetched, SharedVersions, error_text, fetch_side, printable, redacted_errors
from ssim_ray.sources.frames import describe_orientation
from ssim_ray.sources.model import LoadedPair, ManifestError, PairFailure, Shard
from ssim_ray.sources.prefetch import Turn, ordered_map
from ssim_ray.sources.rows import Row, shard_rows


def iter_shard_pairs(
    shard: Shard, source: SourceConfig, ssim: SSIMConfig, *, threads: int, prefetch: int,
    prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
) -> Iterator[LoadedPair]:
    """Every pair of `shard` exactly once, in shard order, fetched and decoded in a thread pool.

    Args:
        shard: from `plan_shards`.
        source: the same source config as planned (storage options, retries, pixel cap, schemes, the
            multi-frame and EXIF orientation policies).
        ssim: the metric config (color, alpha, data_range, window and downsampling for `too_small`).
        threads: fetch-and-decode threads (Pillow and fsspec release the GIL).
        prefetch: pairs in flight or decoded ahead of the consumer.
        prefetch_bytes: decoded bytes of the pairs ahead of the consumer, at most (`batch.prefetch_bytes`);
            a pair alone over it still proceeds. With `prefetch` and the Arrow batch of encoded rows being
            read, it bounds the memory of loading.

    Returns:
        An iterator of `LoadedPair`; bad pairs carry their status and a one-line, redacted error; each
        side's version is recorded (see `LoadedPair`).

    Raises:
        ValueError: `threads`, `prefetch` or `prefetch_bytes` below 1.
        ManifestError: the manifest no longer has the rows that were planned.
        StorageUnavailableError: a transient storage error outlived its retries; the shard should be
            retried as a whole.
        OSError: the manifest itself cannot be read.
        MemoryError: a fault of the process.

    Example:
        >>> import io, os, tempfile
        >>> import pyarrow as pa, pyarrow.parquet as pq
        >>> from PIL import Image
        >>> from ssim_ray.sources import plan_shards
        >>> def png(shade):
        ...     out = io.BytesIO()
        ...     Image.new("L", (32, 24), shade).save(out, "PNG")
        ...     return out.getvalue()
        >>> url = os.path.join(tempfile.mkdtemp(), "pairs.parquet")
        >>> pq.write_table(pa.table({"pair_id": ["a", "b"], "reference": [png(10), png(10)],
        ...                          "distorted": [png(20), b""]}), url)
        >>> cfg = SourceConfig(kind="parquet", url=url)
        >>> pairs = iter_shard_pairs(plan_shards(cfg).shards[0], cfg, SSIMConfig(), threads=2, prefetch=4)
        >>> [(p.pair_id, p.status, None if p.ref is None else tuple(p.ref.shape)) for p in pairs]
        [('a', 'ok', (1, 24, 32)), ('b', 'unreadable', None)]
    """
    if threads < 1 or prefetch < 1 or prefetch_bytes < 1:
        raise ValueError(f"threads, prefetch and prefetch_bytes must be >= 1, got threads={threads}, "
                         f"prefetch={prefetch}, prefetch_bytes={prefetch_bytes}")
    with redacted_errors():
        rows = shard_rows(shard, source, batch_size=max(prefetch, 16))
        loaded = _load_in_order(rows, source, ssim, threads=threads, prefetch=prefetch, prefetch_bytes=prefetch_bytes)
        yield from _counted(loaded, shard)


def load_pairs(
    shard: Shard, source: SourceConfig, ssim: SSIMConfig, *, pair_ids: Set[str], threads: int = 2
) -> List[LoadedPair]:
    """Only the pairs of `shard` whose ids are in `pair_ids`, decoded; the shard's other rows are skipped.

    For re-reading a few pairs after a run (the report's worst pairs) without decoding whole shards.

    Args:
        shard: a shard of the plan the pairs were computed in.
        source: the source config of that run.
        ssim: the metric config of that run (color, alpha, data_range).
        pair_ids: the ids wanted; ids not in the shard are simply not returned.
        threads: fetch-and-decode threads.

    Returns:
        The loaded pairs in shard order (with `row_index` their position in the shard).

    Raises:
        StorageUnavailableError: a transient storage error outlived its retries.
        OSError: the manifest itself cannot be read.

    Example:
        >>> import io, os, tempfile
        >>> import pyarrow as pa, pyarrow.parquet as pq
        >>> from PIL import Image
        >>> from ssim_ray.sources import plan_shards
        >>> out = io.BytesIO(); Image.new("RGB", (16, 16), (9, 99, 199)).save(out, "PNG")
        >>> url = os.path.join(tempfile.mkdtemp(), "pairs.parquet")
        >>> pq.write_table(pa.table({"pair_id": ["a", "b", "c"], "reference": [out.getvalue()] * 3,
        ...                          "distorted": [out.getvalue()] * 3}), url)
        >>> cfg = SourceConfig(kind="parquet", url=url)
        >>> [(p.pair_id, p.row_index, p.status) for p in load_pairs(plan_shards(cfg).shards[0], cfg, SSIMConfig(),
        ...                                                         pair_ids={"c", "a", "z"})]
        [('a', 0, 'ok'), ('c', 2, 'ok')]
    """
    with redacted_errors():
        wanted = (row for row in shard_rows(shard, source, batch_size=64) if row.pair_id in pair_ids)
        return list(_load_in_order(wanted, source, ssim, threads=threads, prefetch=max(threads, 1),
                                   prefetch_bytes=DEFAULT_PREFETCH_BYTES))


def iter_shard_rows(shard: Shard, source: SourceConfig) -> Iterator[Tuple[str, str, str, Dict[str, Any]]]:
    """(pair_id, reference, distorted, passthrough) of every pair of a shard, fetching no image.

    The driver uses it to type a whole shard (`worker_failed`) that no actor could finish.

    Args:
        shard: from `plan_shards`.
        source: the source config it was planned from.

    Returns:
        An iterator in shard order; `reference` and `distorted` as a result row names them (redacted
        URLs, or a description of inline bytes).

    Raises:
        OSError: the manifest cannot be read.

    Example:
        >>> import os, tempfile
        >>> import pyarrow as pa, pyarrow.parquet as pq
        >>> from ssim_ray.sources import plan_shards
        >>> url = os.path.join(tempfile.mkdtemp(), "pairs.parquet")
        >>> pq.write_table(pa.table({"reference": ["r/1.png", None], "distorted": ["d/1.png", "d/2.png"],
        ...                          "camera": ["x", "y"]}), url)
        >>> cfg = SourceConfig(kind="parquet", url=url)
        >>> list(iter_shard_rows(plan_shards(cfg).shards[0], cfg))
        [('pairs.parquet#0', 'r/1.png', 'd/1.png', {'camera': 'x'}), ('pairs.parquet#1', '<bytes:null>', 'd/2.png', {'camera': 'y'})]
    """
    with redacted_errors():
        for row in shard_rows(shard, source, batch_size=256):
            yield row.pair_id, _describe(row.reference), _describe(row.distorted), row.passthrough


def current_versions(shard: Shard, source: SourceConfig, *, threads: int) -> Iterator[Tuple[str, Optional[str], Optional[str]]]:
    """(pair_id, reference_version, distorted_version) of every pair of `shard` as its inputs are now, in
    shard order, from a stat or HEAD per input: no image byte is read, nothing is decoded.

    The versions have the format `LoadedPair` records when it reads the inputs, so that a resumed run can
    compare them with the versions stored beside a committed score: an input rewritten since (new size,
    mtime or ETag) differs, an untouched one is equal. None where `LoadedPair` records None: inline bytes,
    nulls, unpaired prefix keys and inputs that cannot be fetched (missing, forbidden, an invalid path, a
    scheme without filesystem...). An input shared by several pairs of the shard (one reference, many
    distorted versions) is looked up once.

    Args:
        shard: from `plan_shards`.
        source: the source config it was planned from.
        threads: look-up threads (a HEAD on an object store is a round trip).

    Returns:
        An iterator of (pair_id, reference_version, distorted_version).

    Raises:
        ValueError: `threads` below 1.
        ManifestError: the manifest no longer has the rows that were planned.
        StorageUnavailableError: a transient storage error outlived its retries.

    Example:
        >>> import io, os, tempfile
        >>> import pyarrow as pa, pyarrow.parquet as pq
        >>> from PIL import Image
        >>> from ssim_ray.sources import plan_shards
        >>> folder = tempfile.mkdtemp()
        >>> Image.new("L", (16, 16), 7).save(os.path.join(folder, "r.png"))
        >>> pq.write_table(pa.table({"pair_id": ["a", "b"], "reference": ["r.png", "r.png"],
        ...                          "distorted": ["r.png", "gone.png"]}), os.path.join(folder, "m.parquet"))
        >>> cfg = SourceConfig(kind="parquet", url=os.path.join(folder, "m.parquet"))
        >>> [(pair_id, ref.startswith("size="), dist is None)
        ...  for pair_id, ref, dist in current_versions(plan_shards(cfg).shards[0], cfg, threads=2)]
        [('a', True, False), ('b', True, True)]
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    version = SharedVersions(source)

    def row_versions(row: Row, turn: Turn) -> Tuple[str, Optional[str], Optional[str]]:
        if row.unpaired is not None:  # loading fetches neither side of an unpaired key
            return row.pair_id, None, None
        return (row.pair_id, version(row.reference, "reference", base_url=row.base_url),
                version(row.distorted, "distorted", base_url=row.base_url))

    with redacted_errors():
        rows = shard_rows(shard, source, batch_size=256)
        looked_up = ordered_map(rows, row_versions, threads=threads, ahead=4 * threads, ahead_bytes=None, name="ssim-stat")
        yield from _counted(looked_up, shard)


def _counted(items: Iterator[Any], shard: Shard) -> Iterator[Any]:
    """`items`, checking at the end that the shard had as many rows as were planned."""
    count = 0
    for item in items:
        count += 1
        yield item
    if count != shard.num_pairs:
        raise ManifestError(f"shard {shard.shard_id}: planned {shard.num_pairs} pairs, found {count}; the manifest changed since planning")


def _load_in_order(rows: Iterator[Row], source: SourceConfig, ssim: SSIMConfig, *, threads: int, prefetch: int,
                   prefetch_bytes: int) -> Iterator[LoadedPair]:
    """Load rows on a thread pool, at most `prefetch` pairs and `prefetch_bytes` decoded bytes ahead, in order."""
    # `_load_pair` is looked up at each call, so that tests can watch it.
    return ordered_map(rows, lambda row, turn: _load_pair(row, source, ssim, turn), threads=threads, ahead=prefetch,
                       ahead_bytes=prefetch_bytes)


def _load_pair(row: Row, source: SourceConfig, ssim: SSIMConfig, turn: Turn) -> LoadedPair:
    """Fetch, decode and check one pair; whatever fails for this pair becomes its status."""
    pair = LoadedPair(
        pair_id=row.pair_id, row_index=row.row_index, reference=_describe(row.reference),
        distorted=_describe(row.distorted), passthrough=row.passthrough,
    )
    try:
        if row.unpaired is not None:
            raise PairFailure(statuses.UNPAIRED, row.unpaired)
        ref_side, dist_side = _fetch_both(row, source, pair)
        turn.reserve(sum(decoded_size_bound(side.data, max_pixels=source.max_pixels, color=ssim.color)
                         for side in (ref_side, dist_side)))
        ref = _decode_side(ref_side, "reference", source=source, ssim=ssim)
        dist = _decode_side(dist_side, "distorted", source=source, ssim=ssim)
        _check_pair(ref, dist, names=(printable(pair.reference), printable(pair.distorted)), ssim=ssim, source=source)
    except PairFailure as failure:
        pair.status, pair.error = failure.status, str(failure)
        turn.settle(0)
        return pair
    pair.ref, pair.dist = _to_tensor(ref.pixels), _to_tensor(dist.pixels)
    turn.settle(pair.ref.nbytes + pair.dist.nbytes)
    pair.bit_depth = ref.bit_depth
    pair.data_range = float(ssim.data_range) if ssim.data_range != "auto" else float(2**ref.bit_depth - 1)
    pair.decoder = ref.decoder if ref.decoder == dist.decoder else f"{ref.decoder} / {dist.decoder}"
    return pair


def _fetch_both(row: Row, source: SourceConfig, pair: LoadedPair) -> Tuple[Fetched, Fetched]:
    """Both sides, each with its version recorded in `pair`, even when the other side failed (so that a
    stat-only check finds the same versions); then the first failure, if any."""
    fetched: List[Union[Fetched, PairFailure]] = []
    for value, side in ((row.reference, "reference"), (row.distorted, "distorted")):
        try:
            fetched.append(fetch_side(value, side, pair_id=row.pair_id, base_url=row.base_url, source=source))
        except PairFailure as failure:
            fetched.append(failure)
    pair.reference_version, pair.distorted_version = (f.version if isinstance(f, Fetched) else None for f in fetched)
    for outcome in fetched:
        if isinstance(outcome, PairFailure):
            raise outcome
    return fetched[0], fetched[1]


def _describe(value: Union[str, bytes, None]) -> str:
    if isinstance(value, str):
        return redact_text(value)
    return describe_bytes(value)


def _decode_side(fetched: Fetched, side: str, *, source: SourceConfig, ssim: SSIMConfig) -> DecodedImage:
    try:
        return decode_image(fetched.data, name=f"{side} {fetched.name}", color=ssim.color, alpha=ssim.alpha,
                            max_pixels=source.max_pixels, multi_frame=source.multi_frame,
                            exif_orientation=source.exif_orientation)
    except DecodeError as exc:
        raise PairFailure(exc.status, str(exc)) from None
    except PROCESS_FAULTS:
        raise
    except Exception as exc:  # a decoder bug or an exotic file: this pair's failure, not the shard's
        raise PairFailure(statuses.UNREADABLE, f"{side} {fetched.name}: cannot decode: {error_text(exc)}") from None


def _check_pair(ref: DecodedImage, dist: DecodedImage, *, names: Tuple[str, str], ssim: SSIMConfig,
                source: SourceConfig) -> None:
    """The checks that make a pair comparable, in the order a user would fix them."""
    ref_h, ref_w, ref_c = ref.pixels.shape
    dist_h, dist_w, dist_c = dist.pixels.shape
    if source.exif_orientation == "error" and ref.orientation != dist.orientation:
        raise PairFailure(
            statuses.ORIENTATION_MISMATCH,
            f"reference {names[0]} has EXIF {describe_orientation(ref.orientation)}, distorted {names[1]} has "
            f"{describe_orientation(dist.orientation)}: set source.exif_orientation=ignore to compare the stored "
            "pixels (a codec kept them and dropped the tag) or apply to turn each image upright by its own tag",
        )
    if ref.bit_depth != dist.bit_depth:
        raise PairFailure(statuses.DEPTH_MISMATCH, f"reference {names[0]} is {ref.bit_depth}-bit, distorted {names[1]} is {dist.bit_depth}-bit")
    if ref_c != dist_c:
        raise PairFailure(statuses.CHANNEL_MISMATCH, f"reference {names[0]} has {ref_c} channels, distorted {names[1]} has {dist_c}")
    if (ref_h, ref_w) != (dist_h, dist_w):
        raise PairFailure(statuses.SIZE_MISMATCH, f"reference {names[0]} is {ref_w}x{ref_h}, distorted {names[1]} is {dist_w}x{dist_h}")
    seen_h, seen_w = output_size(ref_h, ref_w, downsample=ssim.downsample, crop_border=ssim.crop_border)
    if min(seen_h, seen_w) < ssim.win_size:
        steps = [f"crop_border={ssim.crop_border}"] * bool(ssim.crop_border) + [
            f"downsample={ssim.downsample!r}"] * bool(ssim.downsample)
        after = f" ({seen_w}x{seen_h} after {' and '.join(steps)})" if steps else ""
        raise PairFailure(statuses.TOO_SMALL, f"reference {names[0]}: {ref_w}x{ref_h}{after} is smaller than the {ssim.win_size}x{ssim.win_size} window")


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, C) array to a contiguous (C, H, W) tensor of the same dtype (copied if read-only: torch needs writable)."""
    chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))
    return torch.from_numpy(chw if chw.flags.writeable else chw.copy())
