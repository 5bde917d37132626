"""Pair sources: plan a dataset into shards on the driver, stream and decode one shard's pairs in a worker.

The driver plans from metadata only (Parquet footers, or a sorted listing of two prefixes), so its
memory grows with the number of shards, not with the number of pairs. A worker streams its shard's rows
in small Arrow batches, fetches and decodes in a thread pool with a bounded number of pairs in flight,
and yields every pair of the shard exactly once, in order, each with a typed status.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ssim_ray import statuses
from ssim_ray.config import SourceConfig, SSIMConfig
from ssim_ray.metric.structural import output_size
from ssim_ray.secrets import redact_text
from ssim_ray.sources.decode import DecodedImage, DecodeError, decode_image, describe_bytes
from ssim_ray.sources.storage import PathEscapeError, open_url, read_bytes, resolve_path

__all__ = [
    "LoadedPair", "ManifestError", "ParquetRows", "Plan", "PrefixRows", "Shard",
    "iter_shard_pairs", "load_pairs", "plan_shards",
]

SHARD_ID_DIGITS = 8
_GLOB_CHARS = "*?["


class ManifestError(ValueError):
    """The manifest cannot be used: a missing column, a wrong type, a duplicate id. Raised before any work."""


@dataclass(frozen=True)
class ManifestColumns:
    """Column names and kinds: `reference_kind`/`distorted_kind` are `path` (strings) or `bytes` (encoded)."""

    pair_id: Optional[str]
    reference: str
    distorted: str
    reference_kind: str
    distorted_kind: str
    passthrough: Tuple[str, ...]


@dataclass(frozen=True)
class ManifestFile:
    """One Parquet file of a manifest, as planned from its footer."""

    url: str
    key: str
    base_url: str
    num_rows: int
    row_group_rows: Tuple[int, ...]
    footer_sha256: str


@dataclass(frozen=True)
class PrefixRows:
    """A prefix shard's pairs: (key, reference URL or None, distorted URL or None), in key order."""

    keys: Tuple[Tuple[str, Optional[str], Optional[str]], ...]


@dataclass(frozen=True)
class ParquetRows:
    """Where a Parquet shard's rows are: rows [row_start, row_start + num_pairs) of one manifest file.

    `file_url` is None for the built-in sample set, which each worker finds (or makes) in its own cache.
    """

    file_url: Optional[str]
    file_key: str
    base_url: str
    columns: ManifestColumns
    row_start: int
    row_groups: Tuple[int, ...]
    first_group_row: int
    id_suffix: str = ""


@dataclass(frozen=True)
class Shard:
    """One unit of work, retry and output. Small and picklable; `shard_id` sorts in plan order."""

    shard_id: str
    num_pairs: int
    rows: Union[ParquetRows, PrefixRows]


@dataclass(frozen=True)
class Plan:
    shards: Tuple[Shard, ...]
    fingerprint: str
    total_pairs: int
    passthrough_columns: Tuple[str, ...]


@dataclass
class LoadedPair:
    """One pair as the worker gets it: decoded tensors when `status == 'ok'`, else the reason in `error`."""

    pair_id: str
    row_index: int
    reference: str
    distorted: str
    passthrough: Dict[str, Any] = field(default_factory=dict)
    status: str = statuses.OK
    error: Optional[str] = None
    ref: Optional[torch.Tensor] = None
    dist: Optional[torch.Tensor] = None
    bit_depth: Optional[int] = None
    data_range: Optional[float] = None
    decoder: Optional[str] = None


def plan_shards(cfg: SourceConfig) -> Plan:
    """Plan a source into shards of at most `cfg.pairs_per_shard` pairs, from metadata or a listing.

    Args:
        cfg: the source. `parquet`: one file, a folder or a glob at any fsspec URL; `prefix`: two
            prefixes; `sample`: the built-in sample set (made on first use), listed `cfg.copies` times.

    Returns:
        The shards in order, a fingerprint of what defines the plan (source identity, the Parquet footers
        or the listing, pairs per shard, columns; never storage options or credentials), the number of
        pairs and the pass-through columns.

    Raises:
        ManifestError: a missing column, a column of the wrong type, a duplicate or null pair_id, no
            Parquet file at the URL, or two prefix keys that collide when extensions are ignored.

    Example:
        >>> import pyarrow.parquet as pq, tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> table = pa.table({"pair_id": ["a", "b", "c"], "reference": ["r/a.png"] * 3, "distorted": ["d/a.png"] * 3})
        >>> pq.write_table(table, os.path.join(folder, "pairs.parquet"))
        >>> plan = plan_shards(SourceConfig(kind="parquet", url=folder, pairs_per_shard=2))
        >>> [s.num_pairs for s in plan.shards], plan.total_pairs
        ([2, 1], 3)
    """
    if cfg.kind == "prefix":
        return _plan_prefix(cfg)
    if cfg.kind == "sample":
        return _plan_sample(cfg)
    return _plan_parquet(cfg, url=cfg.url, sample=False)


def _plan_sample(cfg: SourceConfig) -> Plan:
    from ssim_ray.sources.sample import SAMPLE_VERSION, ensure_sample_dataset

    manifest_url = ensure_sample_dataset(cache_dir=cfg.cache_dir)
    sample_cfg = dataclasses.replace(
        cfg, kind="parquet", url=manifest_url, base_url=None, pair_id_column="pair_id",
        reference_column="reference", distorted_column="distorted", passthrough_columns=None,
    )
    return _plan_parquet(sample_cfg, url=manifest_url, sample=True, identity=f"sample:{SAMPLE_VERSION}")


def _plan_parquet(cfg: SourceConfig, *, url: str, sample: bool, identity: Optional[str] = None) -> Plan:
    files, columns = _list_manifest(cfg, url=url)
    suffixes = [""] + [f"#copy{k}" for k in range(1, cfg.copies)] if sample else [""]
    shards: List[Shard] = []
    for suffix in suffixes:
        for manifest_file in files:
            shards.extend(_file_shards(manifest_file, columns, cfg=cfg, sample=sample, suffix=suffix, start=len(shards)))
    identity_doc = {
        "source": identity or redact_text(url),
        "base_url": None if cfg.base_url is None else redact_text(cfg.base_url),
        "files": [[f.key, f.footer_sha256] for f in files],
        "copies": len(suffixes),
    }
    return _make_plan(shards, identity_doc, cfg=cfg, passthrough=columns.passthrough, columns=columns)


def _file_shards(
    manifest_file: ManifestFile, columns: ManifestColumns, *, cfg: SourceConfig, sample: bool, suffix: str, start: int
) -> List[Shard]:
    """Row ranges of `pairs_per_shard` rows; each records the row groups it overlaps, from the footer."""
    group_starts = np.concatenate([[0], np.cumsum(manifest_file.row_group_rows)]).astype(np.int64)
    shards = []
    for row_start in range(0, manifest_file.num_rows, cfg.pairs_per_shard):
        row_stop = min(row_start + cfg.pairs_per_shard, manifest_file.num_rows)
        first = int(np.searchsorted(group_starts, row_start, side="right") - 1)
        last = int(np.searchsorted(group_starts, row_stop, side="left") - 1)
        rows = ParquetRows(
            file_url=None if sample else manifest_file.url, file_key=manifest_file.key,
            base_url="" if sample else manifest_file.base_url, columns=columns, row_start=row_start,
            row_groups=tuple(range(first, last + 1)), first_group_row=int(group_starts[first]), id_suffix=suffix,
        )
        identity = f"{manifest_file.key}|{row_start}|{row_stop}|{suffix}"
        shards.append(Shard(shard_id=_shard_id(start + len(shards), identity), num_pairs=row_stop - row_start, rows=rows))
    return shards


def _plan_prefix(cfg: SourceConfig) -> Plan:
    shard_rows, listing_sha256 = _plan_prefix_rows(cfg)
    shards = []
    for index, rows in enumerate(shard_rows):
        identity = f"{rows.keys[0][0]}|{rows.keys[-1][0]}|{len(rows.keys)}"
        shards.append(Shard(shard_id=_shard_id(index, identity), num_pairs=len(rows.keys), rows=rows))
    identity_doc = {
        "source": [redact_text(cfg.reference_url), redact_text(cfg.distorted_url)],
        "ignore_extension": cfg.ignore_extension,
        "listing": listing_sha256,
    }
    return _make_plan(shards, identity_doc, cfg=cfg, passthrough=(), columns=None)


def _shard_id(index: int, identity: str) -> str:
    """`00000012-3fa9c2d1`: the plan position (so ids sort in plan order) and a digest of what it holds."""
    return f"{index:0{SHARD_ID_DIGITS}d}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def _make_plan(
    shards: List[Shard], identity_doc: Dict[str, Any], *, cfg: SourceConfig, passthrough: Tuple[str, ...],
    columns: Optional[ManifestColumns],
) -> Plan:
    doc = dict(identity_doc)
    # max_pixels and allowed_schemes decide statuses (too_large, path_escape): a resumed run must agree on them.
    doc.update(
        kind=cfg.kind, pairs_per_shard=cfg.pairs_per_shard, passthrough=list(passthrough),
        columns=None if columns is None else dataclasses.asdict(columns), max_pixels=cfg.max_pixels,
        allowed_schemes=sorted(cfg.allowed_schemes),
    )
    fingerprint = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    total = sum(shard.num_pairs for shard in shards)
    return Plan(shards=tuple(shards), fingerprint=fingerprint, total_pairs=total, passthrough_columns=tuple(passthrough))


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
        ManifestError: the manifest no longer has the rows that were planned.
        OSError: a storage error that outlived its retries (transient) or that concerns the manifest
            itself; the shard should be retried as a whole.

    Example:
        >>> plan = plan_shards(SourceConfig(kind="sample"))  # doctest: +SKIP
        >>> pairs = list(iter_shard_pairs(plan.shards[0], SourceConfig(kind="sample"), SSIMConfig(),
        ...                               threads=2, prefetch=8))  # doctest: +SKIP
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

    Example:
        >>> plan = plan_shards(SourceConfig(kind="sample"))  # doctest: +SKIP
        >>> [p.pair_id for p in load_pairs(plan.shards[0], SourceConfig(kind="sample"), SSIMConfig(),
        ...                                pair_ids={"camera/jpeg/10"})]  # doctest: +SKIP
        ['camera/jpeg/10']
    """
    wanted = (row for row in _shard_rows(shard, source, batch_size=64) if row.pair_id in pair_ids)
    return list(_load_in_order(wanted, source, ssim, threads=threads, prefetch=max(threads, 1)))


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


def _list_manifest(cfg: SourceConfig, *, url: str) -> Tuple[List[ManifestFile], ManifestColumns]:
    """The manifest's files (sorted) planned from their footers, the columns used, ids checked unique.

    `url` is one Parquet file, a folder of them (`_`/`.`-prefixed files skipped, as Spark writes them), or
    a glob. Raises ManifestError for no file, a missing column, a wrong type, files that disagree, or a
    duplicate or null id.
    """
    fs, root = open_url(url, storage_options=cfg.storage_options)
    paths = _manifest_paths(fs, root, url=url)
    files: List[ManifestFile] = []
    columns: Optional[ManifestColumns] = None
    for path in paths:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            file_columns = _manifest_columns(parquet.schema_arrow, cfg, example=lambda: _example_row(parquet), where=_url_of(fs, path))
            if columns is not None and file_columns != columns:
                raise ManifestError(
                    f"manifest files disagree: {redact_text(_url_of(fs, path))} has columns {file_columns}, "
                    f"the first file has {columns}"
                )
            columns = file_columns
            files.append(_manifest_file(fs, path, parquet.metadata, root=root, cfg=cfg))
    _check_unique_ids(fs, paths, columns, total_rows=sum(f.num_rows for f in files))
    return files, columns


def _manifest_paths(fs: Any, root: str, *, url: str) -> List[str]:
    if any(char in root for char in _GLOB_CHARS):
        paths = sorted(p for p in fs.glob(root) if fs.isfile(p))
    elif fs.isdir(root):
        paths = sorted(
            p for p in fs.find(root)
            if p.endswith((".parquet", ".parq")) and not posixpath.basename(p).startswith(("_", "."))
        )
    elif fs.exists(root):
        paths = [root]
    else:
        paths = []
    if not paths:
        raise ManifestError(f"source.url={redact_text(url)!r}: no Parquet file there (expected a file, a folder or a glob)")
    return paths


def _url_of(fs: Any, path: str) -> str:
    """A URL a worker can open: plain paths for local files, `scheme://...` otherwise."""
    return path if "file" in _protocols(fs) else fs.unstrip_protocol(path)


def _protocols(fs: Any) -> Tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _manifest_file(fs: Any, path: str, metadata: pq.FileMetaData, *, root: str, cfg: SourceConfig) -> ManifestFile:
    url = _url_of(fs, path)
    key = _manifest_key(path, root)
    base_url = cfg.base_url if cfg.base_url is not None else url.rsplit("/", 1)[0]
    footer = pa.BufferOutputStream()
    metadata.write_metadata_file(footer)
    rows = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    return ManifestFile(
        url=url, key=key, base_url=base_url, num_rows=metadata.num_rows, row_group_rows=rows,
        footer_sha256=hashlib.sha256(footer.getvalue().to_pybytes()).hexdigest(),
    )


def _manifest_key(path: str, root: str) -> str:
    """The file's name relative to the manifest URL (used in default pair ids): stable across machines."""
    if path == root:
        return posixpath.basename(path)
    magic = min((root.index(char) for char in _GLOB_CHARS if char in root), default=None)
    folder = root if magic is None else posixpath.dirname(root[:magic])
    return posixpath.relpath(path, folder)


def _column_kind(arrow_type: pa.DataType) -> Optional[str]:
    """`path` for string columns, `bytes` for binary ones, None for anything else."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type):
        return "path"
    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type) or pa.types.is_binary_view(arrow_type):
        return "bytes"
    return None


def _manifest_columns(schema: pa.Schema, cfg: SourceConfig, *, example: Any, where: str) -> ManifestColumns:
    """Check the configured columns exist with usable types; name the column and an example row if not."""
    names = schema.names
    for option, column in (("reference_column", cfg.reference_column), ("distorted_column", cfg.distorted_column)):
        if column not in names:
            raise ManifestError(
                f"{redact_text(where)}: no column {column!r} (source.{option}); columns are {names}; example row 0: {example()}"
            )
        if _column_kind(schema.field(column).type) is None:
            raise ManifestError(
                f"{redact_text(where)}: column {column!r} has type {schema.field(column).type}, expected string (a path "
                f"or URL) or binary (encoded image bytes); example row 0: {example()}"
            )
    pair_id = cfg.pair_id_column if cfg.pair_id_column in names else None
    if pair_id is not None:
        id_type = schema.field(pair_id).type
        if _column_kind(id_type) != "path" and not pa.types.is_integer(id_type):
            raise ManifestError(
                f"{redact_text(where)}: column {pair_id!r} (source.pair_id_column) has type {id_type}, expected string "
                f"or integer; example row 0: {example()}"
            )
    used = {pair_id, cfg.reference_column, cfg.distorted_column}
    if cfg.passthrough_columns is None:
        passthrough = tuple(name for name in names if name not in used)
    else:
        missing = [name for name in cfg.passthrough_columns if name not in names]
        if missing:
            raise ManifestError(
                f"{redact_text(where)}: no column {missing[0]!r} (source.passthrough_columns); columns are {names}; "
                f"example row 0: {example()}"
            )
        passthrough = tuple(name for name in cfg.passthrough_columns if name not in used)
    return ManifestColumns(
        pair_id=pair_id, reference=cfg.reference_column, distorted=cfg.distorted_column,
        reference_kind=_column_kind(schema.field(cfg.reference_column).type),
        distorted_kind=_column_kind(schema.field(cfg.distorted_column).type), passthrough=passthrough,
    )


def _example_row(parquet: pq.ParquetFile) -> Dict[str, Any]:
    """The first row, with long values shortened, to show in a manifest error."""
    if parquet.metadata.num_rows == 0:
        return {}
    record = next(parquet.iter_batches(batch_size=1)).to_pylist()[0]
    return {name: _short(value) for name, value in record.items()}


def _short(value: Any) -> Any:
    if isinstance(value, bytes):
        return describe_bytes(value)
    if isinstance(value, str) and len(value) > 80:
        return value[:77] + "..."
    return value


def _check_unique_ids(fs: Any, paths: List[str], columns: ManifestColumns, *, total_rows: int) -> None:
    """Refuse duplicate or null pair ids, streaming only the id column and keeping 8 bytes per row.

    Python's string hash (SipHash, 64-bit) is enough to find candidates: ids whose hashes collide are
    compared for real in a second pass, so a collision can cost time but never a false error. The hash
    array is allocated once from the footers' row counts and sorted in place (8 bytes per pair, plus
    1 byte per pair for the comparison): the one part of planning that grows with pairs.
    """
    if columns.pair_id is None:
        return
    hashes = np.empty(total_rows, dtype=np.int64)
    filled = 0
    for path in paths:
        filled = _fill_id_hashes(fs, path, columns.pair_id, out=hashes, start=filled)
    if filled != total_rows:
        raise ManifestError(f"column {columns.pair_id!r}: read {filled} ids, the footers promise {total_rows} rows")
    hashes.sort()
    repeated = hashes[1:][hashes[1:] == hashes[:-1]]
    del hashes
    if repeated.size:
        _raise_on_duplicates(fs, paths, columns.pair_id, candidates=set(repeated.tolist()))


def _fill_id_hashes(fs: Any, path: str, column: str, *, out: np.ndarray, start: int) -> int:
    """Write the hashes of one file's ids into out[start:]; return where the next file starts."""
    with fs.open(path, "rb") as handle:
        for offset, values in _id_batches(handle, column):
            if values.null_count:
                row = offset + values.to_pylist().index(None)
                raise ManifestError(f"{redact_text(_url_of(fs, path))}: column {column!r} is null in row {row}; pair ids must be present and unique")
            count = len(values)
            out[start:start + count] = np.fromiter((hash(str(v)) for v in values.to_pylist()), dtype=np.int64, count=count)
            start += count
    return start


def _id_batches(handle: Any, column: str) -> Iterator[Tuple[int, pa.Array]]:
    # pre_buffer would keep every row group's id chunk cached until the scan ends (measured: RSS growing
    # ~40 bytes per row); without it, and without reader threads, the scan's memory stays flat.
    offset = 0
    batches = pq.ParquetFile(handle, pre_buffer=False).iter_batches(batch_size=65536, columns=[column], use_threads=False)
    for batch in batches:
        yield offset, batch.column(0)
        offset += batch.num_rows


def _raise_on_duplicates(fs: Any, paths: List[str], column: str, *, candidates: set) -> None:
    """Second pass over the candidates only: find the first id really seen twice and where."""
    seen: Dict[str, Tuple[str, int]] = {}
    for path in paths:
        with fs.open(path, "rb") as handle:
            for offset, values in _id_batches(handle, column):
                for index, value in enumerate(values.to_pylist()):
                    text = str(value)
                    if hash(text) not in candidates:
                        continue
                    where = (redact_text(_url_of(fs, path)), offset + index)
                    if text in seen:
                        first = seen[text]
                        raise ManifestError(
                            f"column {column!r} (source.pair_id_column): duplicate pair_id {text!r} in row {first[1]} of "
                            f"{first[0]} and row {where[1]} of {where[0]}"
                        )
                    seen[text] = where


def _object_version(info: Dict[str, Any]) -> Any:
    """What tells a rewritten object from the old one: a content hash where the store has one, else mtime."""
    for name in ("ETag", "etag", "md5Hash", "crc32c", "mtime", "LastModified", "last_modified"):
        if info.get(name) is not None:
            value = info[name]
            return value if isinstance(value, (str, int, float)) else str(value)
    return None


def read_manifest_rows(
    file_url: str, *, source: SourceConfig, columns: ManifestColumns, row_groups: Tuple[int, ...], skip: int,
    limit: int, batch_size: int,
) -> Iterator[Dict[str, Any]]:
    """Rows of one manifest file as dicts, streamed in Arrow batches: `limit` rows after skipping `skip`.

    Only the row groups given are read; rows before `skip` within them are decoded and dropped (Parquet
    has no cheaper way to start mid-group), so row groups much larger than a shard cost some reading.

    Args:
        file_url: the manifest file.
        source: for its storage options.
        columns: the columns to read (id, reference, distorted, pass-through).
        row_groups: the row groups that hold the rows, from the shard.
        skip: rows to drop at the start of the first row group.
        limit: rows to return.
        batch_size: rows per Arrow batch (bounds the memory of encoded bytes columns).

    Returns:
        An iterator of {column: value} dicts.

    Example:
        >>> shard = plan_shards(cfg).shards[-1]; rows = shard.rows  # doctest: +SKIP
        >>> list(read_manifest_rows(rows.file_url, source=cfg, columns=rows.columns, row_groups=rows.row_groups,
        ...      skip=rows.row_start - rows.first_group_row, limit=shard.num_pairs, batch_size=64))  # doctest: +SKIP
    """
    fs, path = open_url(file_url, storage_options=source.storage_options)
    names = [name for name in (columns.pair_id, columns.reference, columns.distorted, *columns.passthrough) if name]
    with fs.open(path, "rb") as handle:
        batches = pq.ParquetFile(handle).iter_batches(batch_size=batch_size, row_groups=list(row_groups), columns=names, use_threads=False)
        for batch in batches:
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            batch, skip = batch.slice(skip, limit), 0
            yield from batch.to_pylist()
            limit -= batch.num_rows
            if limit <= 0:
                return


def _plan_prefix_rows(cfg: SourceConfig) -> Tuple[List[PrefixRows], str]:
    """Pairs of a prefix source from two sorted listings, chunked into shards; and the listing's digest.

    Keys are paths relative to each prefix (without the extension when `cfg.ignore_extension`); a key on
    one side only is kept as a pair that will get status `unpaired`.

    Raises:
        ManifestError: a prefix with no objects, or two objects whose keys collide once extensions are dropped.
    """
    reference = _list_prefix(cfg.reference_url, cfg=cfg, option="reference_url")
    distorted = _list_prefix(cfg.distorted_url, cfg=cfg, option="distorted_url")
    digest = hashlib.sha256()
    pairs = []
    for key in sorted(reference.keys() | distorted.keys()):
        ref, dist = reference.get(key), distorted.get(key)
        digest.update(json.dumps([key, ref and ref[1:], dist and dist[1:]]).encode())
        pairs.append((key, ref and ref[0], dist and dist[0]))
    step = cfg.pairs_per_shard
    return [PrefixRows(keys=tuple(pairs[i:i + step])) for i in range(0, len(pairs), step)], digest.hexdigest()


def _list_prefix(url: str, *, cfg: SourceConfig, option: str) -> Dict[str, Tuple[str, int, Any]]:
    """key -> (URL, size, version) of every object under `url`; version: the store's ETag/hash or the mtime."""
    fs, root = open_url(url, storage_options=cfg.storage_options)
    root = root.rstrip("/")
    listing = fs.find(root, detail=True)
    if not listing:
        raise ManifestError(f"source.{option}={redact_text(url)!r}: no objects under this prefix")
    found: Dict[str, Tuple[str, int, Optional[str]]] = {}
    for path in sorted(listing):
        relative = path[len(root) + 1:]
        key = posixpath.splitext(relative)[0] if cfg.ignore_extension else relative
        if key in found:
            raise ManifestError(
                f"source.{option}: {redact_text(found[key][0])} and {redact_text(_url_of(fs, path))} both have key "
                f"{key!r} with source.ignore_extension=true"
            )
        info = listing[path]
        found[key] = (_url_of(fs, path), int(info.get("size") or 0), _object_version(info))
    return found


def iter_shard_rows(shard: Shard, source: SourceConfig) -> Iterator[Tuple[str, str, str, Dict[str, Any]]]:
    """(pair_id, reference, distorted, passthrough) of every pair of a shard, fetching no image.

    The driver uses it to type a whole shard (`worker_failed`) that no actor could finish.
    """
    for row in _shard_rows(shard, source, batch_size=256):
        yield row.pair_id, _describe(row.reference), _describe(row.distorted), row.passthrough
