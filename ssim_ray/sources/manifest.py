"""Parquet manifests: find the files, check the columns and the pair ids, stream the rows.

A manifest is one Parquet file, a folder of them or a glob, at any fsspec URL. Planning reads only what
the footers say plus the id column (to refuse duplicate or null ids before any work); a worker streams
its shard's rows from the row groups the plan recorded. Every error is a `ManifestError` naming the
column, the file and an example row.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ssim_ray.config import SourceConfig
from ssim_ray.secrets import redact_text
from ssim_ray.sources.decode import describe_bytes
from ssim_ray.sources.model import ManifestColumns, ManifestError, ManifestFile
from ssim_ray.sources.storage import open_url, url_of

_GLOB_CHARS = "*?["


def list_manifest(cfg: SourceConfig, *, url: str) -> Tuple[List[ManifestFile], ManifestColumns]:
    """The manifest's files (sorted) planned from their footers, the columns used, ids checked unique.

    Args:
        cfg: the source (column names, pass-through columns, base URL, storage options).
        url: one Parquet file, a folder of them (`_`/`.`-prefixed files skipped, as Spark writes them),
            or a glob.

    Returns:
        The files in order and the columns every one of them has.

    Raises:
        ManifestError: no file, a missing column, a wrong type, files that disagree, or a duplicate or
            null id.

    Example:
        >>> import os, tempfile
        >>> url = os.path.join(tempfile.mkdtemp(), "pairs.parquet")
        >>> pq.write_table(pa.table({"pair_id": ["a", "b"], "reference": ["r.png"] * 2, "distorted": ["d.png"] * 2,
        ...                          "camera": ["x", "y"]}), url)
        >>> files, columns = list_manifest(SourceConfig(kind="parquet", url=url), url=url)
        >>> [(f.key, f.num_rows) for f in files], columns.passthrough
        ([('pairs.parquet', 2)], ('camera',))
    """
    fs, root = open_url(url, storage_options=cfg.storage_options)
    paths = _manifest_paths(fs, root, url=url)
    files: List[ManifestFile] = []
    columns: Optional[ManifestColumns] = None
    for path in paths:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            file_columns = _manifest_columns(parquet.schema_arrow, cfg, example=lambda: _example_row(parquet), where=url_of(fs, path))
            if columns is not None and file_columns != columns:
                raise ManifestError(
                    f"manifest files disagree: {redact_text(url_of(fs, path))} has columns {file_columns}, "
                    f"the first file has {columns}"
                )
            columns = file_columns
            files.append(_manifest_file(fs, path, parquet.metadata, root=root, cfg=cfg))
    _check_unique_ids(fs, paths, columns, total_rows=sum(f.num_rows for f in files))
    return files, columns


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
        >>> import os, tempfile
        >>> url = os.path.join(tempfile.mkdtemp(), "pairs.parquet")
        >>> table = pa.table({"pair_id": ["a", "b", "c"], "reference": ["r.png"] * 3, "distorted": ["d.png"] * 3})
        >>> pq.write_table(table, url, row_group_size=2)
        >>> cfg = SourceConfig(kind="parquet", url=url)
        >>> _, columns = list_manifest(cfg, url=url)
        >>> [row["pair_id"] for row in read_manifest_rows(url, source=cfg, columns=columns, row_groups=(0, 1),
        ...                                               skip=1, limit=2, batch_size=64)]
        ['b', 'c']
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


def _manifest_file(fs: Any, path: str, metadata: pq.FileMetaData, *, root: str, cfg: SourceConfig) -> ManifestFile:
    url = url_of(fs, path)
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
    return ManifestColumns(
        pair_id=pair_id, reference=cfg.reference_column, distorted=cfg.distorted_column,
        reference_kind=_column_kind(schema.field(cfg.reference_column).type),
        distorted_kind=_column_kind(schema.field(cfg.distorted_column).type),
        passthrough=_passthrough_columns(names, cfg, used={pair_id, cfg.reference_column, cfg.distorted_column},
                                         example=example, where=where),
    )


def _passthrough_columns(names: List[str], cfg: SourceConfig, *, used: set, example: Any, where: str) -> Tuple[str, ...]:
    """The columns copied to the results: those configured (which must exist), or every unused one."""
    if cfg.passthrough_columns is None:
        return tuple(name for name in names if name not in used)
    missing = [name for name in cfg.passthrough_columns if name not in names]
    if missing:
        raise ManifestError(
            f"{redact_text(where)}: no column {missing[0]!r} (source.passthrough_columns); columns are {names}; "
            f"example row 0: {example()}"
        )
    return tuple(name for name in cfg.passthrough_columns if name not in used)


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
                raise ManifestError(f"{redact_text(url_of(fs, path))}: column {column!r} is null in row {row}; pair ids must be present and unique")
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
                    where = (redact_text(url_of(fs, path)), offset + index)
                    if text in seen:
                        first = seen[text]
                        raise ManifestError(
                            f"column {column!r} (source.pair_id_column): duplicate pair_id {text!r} in row {first[1]} of "
                            f"{first[0]} and row {where[1]} of {where[0]}"
                        )
                    seen[text] = where
