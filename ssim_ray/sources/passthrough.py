"""Pass-through column types: which manifest columns the results can hold, and their types across files.

A pass-through column is copied from the manifest into every result row as a Python value and typed again
when a shard's rows become a table; the merge then unifies the shards' types. So a column must be one whose
values come back typeable (no map: it returns as key-value pairs Arrow cannot type again; no union), whose
integers fit int64 (a uint64 value from 2^63 on does not), and whose type agrees across the manifest's
files, or unifies permissively (int32 and double become double; a dictionary column counts as its values).
Checked from the Parquet footers before any work (`passthrough_schema`), so that a bad column is refused
up front instead of failing every shard after the run was recorded. The one extra cost is a footer read
per manifest file (planning reads each footer and the id column already), plus reading a uint64 column
whose footer has no statistics.
"""

from __future__ import annotations

import json
from typing import Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ssim_ray.config import SourceConfig
from ssim_ray.secrets import redact_text
from ssim_ray.sources.model import ManifestError
from ssim_ray.sources.storage import open_url

INT64_MAX = 2**63 - 1
_ADVICE = "leave it out with source.passthrough_columns (listing the columns to keep) or convert it in the manifest"


def passthrough_schema(file_urls: Sequence[str], names: Sequence[str], *, cfg: SourceConfig) -> pa.Schema:
    """The pass-through columns' types, checked in every manifest file and unified across them.

    Args:
        file_urls: the manifest's files (each planned once).
        names: the pass-through columns, in result order.
        cfg: the source, for its storage options.

    Returns:
        The unified schema of the pass-through columns (dictionary columns as their value type).

    Raises:
        ManifestError: a column of a type the results cannot hold (naming the file, column and type), a
            uint64 value from 2^63 on, or files whose types for one column cannot be unified (naming both).

    Example:
        >>> import os, tempfile
        >>> url = os.path.join(tempfile.mkdtemp(), "pairs.parquet")
        >>> pq.write_table(pa.table({"reference": ["r.png"], "distorted": ["d.png"], "q": pa.array([90], pa.int8())}), url)
        >>> passthrough_schema([url], ["q"], cfg=SourceConfig(kind="parquet", url=url)).field("q").type
        DataType(int8)
    """
    if not names:
        return pa.schema([])
    per_file: List[Tuple[str, pa.Schema]] = []
    for url in file_urls:
        fs, path = open_url(url, storage_options=cfg.storage_options)
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            schema = pa.schema([_as_values(parquet.schema_arrow.field(name)) for name in names])
            for column in schema:
                _refuse_unstorable(column, url)
                if _holds(column.type, pa.types.is_uint64):
                    _refuse_large_uint64(parquet, column.name, url)
        per_file.append((url, schema))
    return _unify(per_file)


def _as_values(column: pa.Field) -> pa.Field:
    """A dictionary-encoded column as its values: the rows carry the values, not the codes."""
    return column.with_type(_decoded(column.type))


def _decoded(arrow_type: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(arrow_type):
        return _decoded(arrow_type.value_type)
    if pa.types.is_struct(arrow_type):
        return pa.struct([_as_values(arrow_type.field(i)) for i in range(arrow_type.num_fields)])
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        maker = pa.list_ if pa.types.is_list(arrow_type) else pa.large_list
        return maker(_as_values(arrow_type.value_field))
    return arrow_type


def _children(arrow_type: pa.DataType) -> Iterator[pa.DataType]:
    if pa.types.is_struct(arrow_type) or pa.types.is_union(arrow_type):
        yield from (arrow_type.field(i).type for i in range(arrow_type.num_fields))
    elif pa.types.is_map(arrow_type):
        yield from (arrow_type.key_type, arrow_type.item_type)
    elif hasattr(arrow_type, "value_type") and not pa.types.is_dictionary(arrow_type):
        yield arrow_type.value_type


def _holds(arrow_type: pa.DataType, test) -> bool:
    """Whether `arrow_type` or any type nested in it passes `test`."""
    return test(arrow_type) or any(_holds(child, test) for child in _children(arrow_type))


def _refuse_unstorable(column: pa.Field, url: str) -> None:
    reason: Optional[str] = None
    if _holds(column.type, pa.types.is_map):
        reason = "a map comes back from the rows as key-value pairs that Arrow cannot type again"
    elif _holds(column.type, pa.types.is_union):
        reason = "union values cannot be typed again from the rows"
    elif _holds(column.type, lambda t: pa.types.is_struct(t) and t.num_fields == 0):
        reason = "Parquet cannot write a struct without fields"
    if reason:
        raise ManifestError(
            f"{redact_text(url)}: pass-through column {column.name!r} has type {column.type}, which the results "
            f"cannot hold ({reason}); {_ADVICE} (e.g. to a struct or a JSON string)"
        )


def _refuse_large_uint64(parquet: pq.ParquetFile, name: str, url: str) -> None:
    """Refuse uint64 values above int64's range: the rows are typed again as int64. Footer statistics
    when every row group has them, else the column's values."""
    largest = _uint64_max_from_statistics(parquet, name)
    if largest is None:
        largest = max((_uint64_max(batch.column(0)) for batch in parquet.iter_batches(columns=[name])), default=None)
    if largest is not None and largest > INT64_MAX:
        raise ManifestError(
            f"{redact_text(url)}: pass-through column {name!r} holds the uint64 value {largest} ≥ 2^63, which the "
            f"results (int64) cannot hold; {_ADVICE} (e.g. to a string or a binary hash)"
        )


def _uint64_max_from_statistics(parquet: pq.ParquetFile, name: str) -> Optional[int]:
    metadata = parquet.metadata
    largest: Optional[int] = None
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            if chunk.path_in_schema.split(".")[0] != name or chunk.physical_type != "INT64":
                continue
            stats = chunk.statistics
            if stats is None or not stats.has_min_max:
                return None
            if json.loads(stats.logical_type.to_json()).get("isSigned") is False:
                largest = int(stats.max) if largest is None else max(largest, int(stats.max))
    return largest


def _uint64_max(array: pa.Array) -> Optional[int]:
    """The largest uint64 value anywhere in `array` (nested lists and structs included)."""
    found: List[int] = []
    if pa.types.is_uint64(array.type):
        value = pc.max(array).as_py()
        found += [value] if value is not None else []
    elif pa.types.is_struct(array.type):
        found += [v for v in (_uint64_max(array.field(i)) for i in range(array.type.num_fields)) if v is not None]
    elif hasattr(array, "flatten") and not pa.types.is_dictionary(array.type):
        found += [v for v in [_uint64_max(array.flatten())] if v is not None]
    return max(found, default=None)


def _unify(per_file: List[Tuple[str, pa.Schema]]) -> pa.Schema:
    try:
        return pa.unify_schemas([schema for _, schema in per_file], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        failure = error
    for name in per_file[0][1].names:
        fields = [schema.field(name) for _, schema in per_file]
        try:
            pa.unify_schemas([pa.schema([f]) for f in fields], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            examples = {}
            for (url, _), column in zip(per_file, fields):
                examples.setdefault(str(column.type), redact_text(url))
            listed = ", ".join(f"{arrow_type} in {url}" for arrow_type, url in examples.items())
            raise ManifestError(
                f"pass-through column {name!r} has types that Arrow cannot unify across the manifest's files: "
                f"{listed}; make the files agree, or leave the column out with source.passthrough_columns "
                "(listing the columns to keep)"
            ) from None
    raise ManifestError(f"the pass-through columns cannot be unified across the manifest's files: {failure}")
