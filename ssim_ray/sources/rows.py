"""A shard's rows as listed, in a worker: the values of each pair (paths, URLs or bytes), where relative
paths resolve, and the pass-through columns; read from the manifest in small Arrow batches, or from the
prefix listing the shard carries. Loading and the stat-only version look-up both walk these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Union

from ssim_ray.config import SourceConfig
from ssim_ray.secrets import redact_text
from ssim_ray.sources.manifest import read_manifest_rows
from ssim_ray.sources.model import ParquetRows, PrefixRows, Shard


@dataclass(frozen=True)
class Row:
    """One pair as listed: values as given (paths, URLs or bytes) and where to resolve them.

    `base_url` is None for prefix rows (their values are URLs the driver listed); `unpaired` is the message
    of a prefix key found on one side only.
    """

    row_index: int
    pair_id: str
    reference: Union[str, bytes, None]
    distorted: Union[str, bytes, None]
    base_url: Optional[str]
    passthrough: Dict[str, Any]
    unpaired: Optional[str] = None


def shard_rows(shard: Shard, source: SourceConfig, *, batch_size: int) -> Iterator[Row]:
    """Every row of `shard`, in shard order, without fetching any image.

    Args:
        shard: from `plan_shards`.
        source: the source config it was planned from (storage options, the sample cache).
        batch_size: rows per Arrow batch read from a Parquet manifest.

    Returns:
        An iterator of `Row`, `row_index` counting from 0 within the shard.

    Raises:
        OSError: the manifest cannot be read.

    Example:
        >>> import os, tempfile
        >>> import pyarrow as pa, pyarrow.parquet as pq
        >>> from ssim_ray.sources import plan_shards
        >>> url = os.path.join(tempfile.mkdtemp(), "pairs.parquet")
        >>> pq.write_table(pa.table({"reference": ["r/1.png"], "distorted": ["d/1.png"], "camera": ["x"]}), url)
        >>> cfg = SourceConfig(kind="parquet", url=url)
        >>> [(r.pair_id, r.reference, r.passthrough) for r in shard_rows(plan_shards(cfg).shards[0], cfg, batch_size=16)]
        [('pairs.parquet#0', 'r/1.png', {'camera': 'x'})]
    """
    if isinstance(shard.rows, PrefixRows):
        return _prefix_rows(shard.rows)
    return _parquet_rows(shard, source, batch_size=batch_size)


def _parquet_rows(shard: Shard, source: SourceConfig, *, batch_size: int) -> Iterator[Row]:
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
        yield Row(offset, pair_id, record[columns.reference], record[columns.distorted], base_url, passthrough)


def _prefix_rows(rows: PrefixRows) -> Iterator[Row]:
    for offset, (key, ref_url, dist_url) in enumerate(rows.keys):
        unpaired = None
        if ref_url is None or dist_url is None:
            side, other = ("distorted_url", "reference_url") if ref_url is None else ("reference_url", "distorted_url")
            unpaired = f"{redact_text(ref_url or dist_url)}: only under source.{side}, no key {key!r} under source.{other}"
        yield Row(offset, key, ref_url, dist_url, None, {}, unpaired=unpaired)
