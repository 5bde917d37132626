"""Loading, in a worker: stream a shard's rows, fetch and decode each pair on threads, check it, type it.

A worker streams its shard's rows in small Arrow batches (or from the prefix listing carried by the
shard), fetches and decodes them in a thread pool with a bounded number of pairs in flight, and yields
every pair of the shard exactly once, in order, each with a typed status (`ssim_ray.statuses`). A bad
pair becomes a status and a one-line error naming the file; a storage outage raises, so that the shard
is retried as a whole.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Union

import numpy as np
import torch

from ssim_ray import statuses
from ssim_ray.config import SourceConfig, SSIMConfig
from ssim_ray.metric import output_size
from ssim_ray.secrets import redact_text
from ssim_ray.sources.decode import DecodedImage, DecodeError, decode_image, describe_bytes
from ssim_ray.sources.manifest import read_manifest_rows
from ssim_ray.sources.model import LoadedPair, ManifestError, ParquetRows, PrefixRows, Shard
from ssim_ray.sources.storage import PathEscapeError, open_url, read_bytes, resolve_path


@dataclass(frozen=True)
class _Row:
    """One pair as listed: values as given (paths, URLs or bytes) and where to resolve them."""

    row_index: int
    pair_id: str
    reference: Union[str, bytes, None]
    distorted: Union[str, bytes, None]
    base_url: Optional[str]
    passthrough: Dict[str, Any]
    unpaired: Optional[str] = None


class _PairFailure(Exception):
    """A pair that cannot be scored: its status and the one-line message for its row."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def iter_shard_pairs(
    shard: Shard, source: SourceConfig, ssim: SSIMConfig, *, threads: int, prefetch: int
) -> Iterator[LoadedPair]:
    """Every pair of `shard` exactly once, in shard order, fetched and decoded in a thread pool.

    Args:
        shard: from `plan_shards`.
        source: the same source config as planned (its storage options, retries, pixel cap, schemes).
        ssim: the metric config (color, alpha, data_range, window and downsampling for `too_small`).
        threads: fetch-and-decode threads (Pillow and fsspec release the GIL).
        prefetch: pairs in flight or decoded ahead of the consumer; bounds memory together with the
            Arrow batch of encoded rows being read.

    Returns:
        An iterator of `LoadedPair`; bad pairs carry their status and a one-line error.

    Raises:
        ValueError: `threads` or `prefetch` below 1.
        ManifestError: the manifest no longer has the rows that were planned.
        OSError: a storage error that outlived its retries (transient) or that concerns the manifest
            itself; the shard should be retried as a whole.

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
    if threads < 1 or prefetch < 1:
        raise ValueError(f"threads and prefetch must be >= 1, got threads={threads}, prefetch={prefetch}")
    rows = _shard_rows(shard, source, batch_size=max(prefetch, 16))
    count = 0
    for pair in _load_in_order(rows, source, ssim, threads=threads, prefetch=prefetch):
        count += 1
        yield pair
    if count != shard.num_pairs:
        raise ManifestError(f"shard {shard.shard_id}: planned {shard.num_pairs} pairs, found {count}; the manifest changed since planning")


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
        OSError: a storage error that outlived its retries, or one that concerns the manifest itself.

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
    wanted = (row for row in _shard_rows(shard, source, batch_size=64) if row.pair_id in pair_ids)
    return list(_load_in_order(wanted, source, ssim, threads=threads, prefetch=max(threads, 1)))


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
    for row in _shard_rows(shard, source, batch_size=256):
        yield row.pair_id, _describe(row.reference), _describe(row.distorted), row.passthrough


def _load_in_order(rows: Iterator[_Row], source: SourceConfig, ssim: SSIMConfig, *, threads: int, prefetch: int) -> Iterator[LoadedPair]:
    """Load rows on a thread pool, at most `prefetch` ahead of the consumer, yielding in row order."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ssim-load") as pool:
        pending: deque[Future] = deque()
        try:
            for row in rows:
                pending.append(pool.submit(_load_pair, row, source, ssim))
                if len(pending) >= prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _shard_rows(shard: Shard, source: SourceConfig, *, batch_size: int) -> Iterator[_Row]:
    if isinstance(shard.rows, PrefixRows):
        return _prefix_rows(shard.rows, source)
    return _parquet_rows(shard, source, batch_size=batch_size)


def _parquet_rows(shard: Shard, source: SourceConfig, *, batch_size: int) -> Iterator[_Row]:
    rows: ParquetRows = shard.rows
    file_url, base_url = rows.file_url, rows.base_url
    if file_url is None:
        # The sample set: found (or made) in this worker's own cache. Imported here, as only it needs it.
        from ssim_ray.sources.sample import ensure_sample_dataset

        file_url = ensure_sample_dataset(cache_dir=source.cache_dir)
        base_url = file_url.rsplit("/", 1)[0]
    columns = rows.columns
    for offset, record in enumerate(
        read_manifest_rows(file_url, source=source, columns=columns, row_groups=rows.row_groups,
                           skip=rows.row_start - rows.first_group_row, limit=shard.num_pairs, batch_size=batch_size)
    ):
        file_row = rows.row_start + offset
        raw_id = record.get(columns.pair_id) if columns.pair_id else None
        pair_id = (f"{rows.file_key}#{file_row}" if raw_id is None else str(raw_id)) + rows.id_suffix
        passthrough = {name: record[name] for name in columns.passthrough}
        yield _Row(offset, pair_id, record[columns.reference], record[columns.distorted], base_url, passthrough)


def _prefix_rows(rows: PrefixRows, source: SourceConfig) -> Iterator[_Row]:
    for offset, (key, ref_url, dist_url) in enumerate(rows.keys):
        unpaired = None
        if ref_url is None or dist_url is None:
            side, other = ("distorted_url", "reference_url") if ref_url is None else ("reference_url", "distorted_url")
            unpaired = f"{redact_text(ref_url or dist_url)}: only under source.{side}, no key {key!r} under source.{other}"
        yield _Row(offset, key, ref_url, dist_url, None, {}, unpaired=unpaired)


def _load_pair(row: _Row, source: SourceConfig, ssim: SSIMConfig) -> LoadedPair:
    """Fetch, decode and check one pair; a bad pair becomes a status, storage outages raise."""
    pair = LoadedPair(
        pair_id=row.pair_id, row_index=row.row_index, reference=_describe(row.reference),
        distorted=_describe(row.distorted), passthrough=row.passthrough,
    )
    try:
        if row.unpaired is not None:
            raise _PairFailure(statuses.UNPAIRED, row.unpaired)
        ref = _decode_side(row.reference, "reference", row=row, source=source, ssim=ssim)
        dist = _decode_side(row.distorted, "distorted", row=row, source=source, ssim=ssim)
        _check_pair(ref, dist, names=(pair.reference, pair.distorted), ssim=ssim)
    except _PairFailure as failure:
        pair.status, pair.error = failure.status, str(failure)
        return pair
    pair.ref, pair.dist = _to_tensor(ref.pixels), _to_tensor(dist.pixels)
    pair.bit_depth = ref.bit_depth
    pair.data_range = float(ssim.data_range) if ssim.data_range != "auto" else float(2**ref.bit_depth - 1)
    pair.decoder = ref.decoder if ref.decoder == dist.decoder else f"{ref.decoder} / {dist.decoder}"
    return pair


def _describe(value: Union[str, bytes, None]) -> str:
    if isinstance(value, str):
        return redact_text(value)
    return describe_bytes(value)


def _decode_side(value: Union[str, bytes, None], side: str, *, row: _Row, source: SourceConfig, ssim: SSIMConfig) -> DecodedImage:
    data, name = _fetch_side(value, side, row=row, source=source)
    try:
        return decode_image(data, name=f"{side} {name}", color=ssim.color, alpha=ssim.alpha, max_pixels=source.max_pixels)
    except DecodeError as exc:
        raise _PairFailure(exc.status, str(exc)) from exc


def _fetch_side(value: Union[str, bytes, None], side: str, *, row: _Row, source: SourceConfig) -> Tuple[bytes, str]:
    """The encoded bytes of one side and the name to report it by."""
    if value is None:
        raise _PairFailure(statuses.MISSING, f"{side} of pair {row.pair_id!r} is null in the manifest")
    if isinstance(value, bytes):
        return value, f"{describe_bytes(value)} of pair {row.pair_id!r}"
    url = value
    if row.base_url is not None:
        try:
            url = resolve_path(value, base_url=row.base_url, allowed_schemes=tuple(source.allowed_schemes))
        except PathEscapeError as exc:
            raise _PairFailure(statuses.PATH_ESCAPE, f"{side}: {exc}") from exc
    fs, path = open_url(url, storage_options=source.storage_options)
    try:
        return read_bytes(fs, path, retries=source.fetch_retries), redact_text(url)
    except FileNotFoundError as exc:
        raise _PairFailure(statuses.MISSING, f"{side} {redact_text(url)}: not found") from exc
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        raise _PairFailure(statuses.UNREADABLE, f"{side} {redact_text(url)}: {type(exc).__name__}") from exc


def _check_pair(ref: DecodedImage, dist: DecodedImage, *, names: Tuple[str, str], ssim: SSIMConfig) -> None:
    """The checks that make a pair comparable, in the order a user would fix them."""
    ref_h, ref_w, ref_c = ref.pixels.shape
    dist_h, dist_w, dist_c = dist.pixels.shape
    if ref.bit_depth != dist.bit_depth:
        raise _PairFailure(statuses.DEPTH_MISMATCH, f"reference {names[0]} is {ref.bit_depth}-bit, distorted {names[1]} is {dist.bit_depth}-bit")
    if ref_c != dist_c:
        raise _PairFailure(statuses.CHANNEL_MISMATCH, f"reference {names[0]} has {ref_c} channels, distorted {names[1]} has {dist_c}")
    if (ref_h, ref_w) != (dist_h, dist_w):
        raise _PairFailure(statuses.SIZE_MISMATCH, f"reference {names[0]} is {ref_w}x{ref_h}, distorted {names[1]} is {dist_w}x{dist_h}")
    seen_h, seen_w = output_size(ref_h, ref_w, downsample=ssim.downsample)
    if min(seen_h, seen_w) < ssim.win_size:
        after = f" ({seen_w}x{seen_h} after downsample={ssim.downsample!r})" if ssim.downsample else ""
        raise _PairFailure(statuses.TOO_SMALL, f"reference {names[0]}: {ref_w}x{ref_h}{after} is smaller than the {ssim.win_size}x{ssim.win_size} window")


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, C) array to a contiguous (C, H, W) tensor of the same dtype (copied if read-only: torch needs writable)."""
    chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))
    return torch.from_numpy(chw if chw.flags.writeable else chw.copy())
