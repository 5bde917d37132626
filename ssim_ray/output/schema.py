"""The result row: its columns and types (RESULT_SCHEMA), the one function that builds a row, and the table of
a shard's rows.

Every pair becomes exactly one row. The worker builds the rows of the pairs it computed, the driver the
`worker_failed` rows of a shard no actor could finish; both call `result_row`, whose keys are RESULT_SCHEMA's
columns, so a column is added in one place. Manifest columns copied to the results ("pass-through") follow
the schema's columns and must not reuse their names.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from ssim_ray import statuses
from ssim_ray.metric import NONPOSITIVE_TERM, TOO_SMALL

RESULT_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("reference", pa.string()),
        ("distorted", pa.string()),
        ("ssim", pa.float64()),
        ("ssim_per_channel", pa.list_(pa.float64())),
        ("psnr", pa.float64()),
        ("psnr_per_channel", pa.list_(pa.float64())),
        ("ms_ssim", pa.float64()),
        ("ms_ssim_per_channel", pa.list_(pa.float64())),
        ("ms_ssim_undefined", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int32()),
        ("data_range", pa.float64()),
        ("bit_depth", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("decoder", pa.string()),
        ("reference_version", pa.string()),
        ("distorted_version", pa.string()),
        ("shard_id", pa.string()),
    ]
)
RESULT_COLUMNS = tuple(RESULT_SCHEMA.names)
# The score columns of each metric (`config.METRIC_NAMES`). One schema whatever `metrics` says: the columns of a
# metric the run did not compute are null in every row (summary.json's metric block lists the metrics computed).
METRIC_COLUMNS = {
    "ssim": ("ssim", "ssim_per_channel"),
    "psnr": ("psnr", "psnr_per_channel"),
    "ms_ssim": ("ms_ssim", "ms_ssim_per_channel", "ms_ssim_undefined"),
}
# Why an ok pair has no MS-SSIM (`ms_ssim_undefined`): its images are too small for the scales, or a scale's
# term is <= 0 (the fractional power has no real value). The metric's own codes.
MS_SSIM_UNDEFINED_REASONS = (TOO_SMALL, NONPOSITIVE_TERM)
# The columns a row must name (`result_row`'s required arguments); the others are null when absent.
REQUIRED_ROW_KEYS = ("pair_id", "reference", "distorted", "status", "shard_id")


def result_row(
    *,
    pair_id: str,
    reference: Optional[str],
    distorted: Optional[str],
    status: str,
    shard_id: str,
    passthrough: Mapping[str, Any],
    error: Optional[str] = None,
    ssim: Optional[float] = None,
    ssim_per_channel: Optional[Sequence[float]] = None,
    psnr: Optional[float] = None,
    psnr_per_channel: Optional[Sequence[float]] = None,
    ms_ssim: Optional[float] = None,
    ms_ssim_per_channel: Optional[Sequence[float]] = None,
    ms_ssim_undefined: Optional[str] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    channels: Optional[int] = None,
    data_range: Optional[float] = None,
    bit_depth: Optional[int] = None,
    decoder: Optional[str] = None,
    reference_version: Optional[str] = None,
    distorted_version: Optional[str] = None,
) -> Dict[str, Any]:
    """One result row: every RESULT_SCHEMA column, in schema order, then the pass-through columns.

    The row is a plain dict so that the worker can fill in the scores and sizes of an ok pair once its batch
    is computed. The arguments are the schema's columns by name (a test checks they stay in step).

    Args:
        pair_id: the pair's id from the manifest.
        reference: the reference image's path or URL.
        distorted: the distorted image's path or URL.
        status: one of `ssim_ray.statuses`.
        shard_id: the shard the pair belongs to.
        passthrough: the manifest columns copied to the results, by name.
        error: one line saying why the pair is not ok; None when it is.
        ssim: the pair's score (set exactly when status is ok, see `validate_result_table`).
        ssim_per_channel: the score of each channel.
        psnr: the pair's PSNR in dB over all pixels and channels; +inf for identical images (stored as inf);
            None when the pair is not ok or the run does not compute PSNR.
        psnr_per_channel: the PSNR of each channel (+inf for an identical channel).
        ms_ssim: the pair's MS-SSIM; None when not ok, not computed, or undefined (`ms_ssim_undefined`).
        ms_ssim_per_channel: the MS-SSIM of each channel.
        ms_ssim_undefined: why an ok pair has no MS-SSIM, one of MS_SSIM_UNDEFINED_REASONS; None otherwise.
        height: image height, the one the metric saw.
        width: image width.
        channels: image channels.
        data_range: the L of the metric's constants.
        bit_depth: the images' bit depth (8 or 16).
        decoder: what decoded the images.
        reference_version: what identified the reference's bytes when they were read (size and mtime, or
            size and ETag/version id); None when unknown. A resume checks it (`output.inputs`).
        distorted_version: the same for the distorted image.

    Returns:
        A dict with the keys RESULT_COLUMNS, then the keys of `passthrough`.

    Raises:
        ValueError: a pass-through column reuses a result column's name.

    Example:
        >>> row = result_row(pair_id="p0", reference="a.png", distorted="b.png", status="missing",
        ...                  shard_id="s0", passthrough={"codec": "jpeg"}, error="no such file: b.png")
        >>> list(row) == list(RESULT_COLUMNS) + ["codec"], row["ssim"]
        (True, None)
    """
    given = locals()  # the arguments by name: the schema's columns and `passthrough`, nothing else yet
    row = {name: given[name] for name in RESULT_COLUMNS}
    if not row.keys().isdisjoint(passthrough):
        raise ValueError(f"pass-through columns must not reuse result column names {list(RESULT_COLUMNS)}, "
                         f"got {sorted(row.keys() & passthrough.keys())}")
    row.update(passthrough)
    return row


def rows_to_table(
    rows: Sequence[Mapping[str, Any]],
    passthrough_columns: Sequence[str],
    *,
    passthrough_types: Optional[Mapping[str, pa.DataType]] = None,
) -> pa.Table:
    """Build a results table from plain dict rows: RESULT_SCHEMA's columns, then the pass-through ones.

    Args:
        rows: one dict per pair (`result_row`) with the keys REQUIRED_ROW_KEYS and every pass-through
            column; the other result columns (ssim, sizes, error, decoder...) default to null when absent.
        passthrough_columns: manifest columns copied to the results, in this order.
        passthrough_types: the manifest's type of each pass-through column; a column not named here gets
            the type pyarrow infers from its values (null when every value is None; the merge unifies).

    Returns:
        A pyarrow Table with RESULT_SCHEMA's fields followed by the pass-through fields.

    Raises:
        ValueError: a row lacks a key, a pass-through column collides with a result column, or a value does
            not fit its column's type.

    Example:
        >>> row = result_row(pair_id="p0", reference="a.png", distorted="b.png", status="ok", shard_id="s0",
        ...                  passthrough={"codec": "jpeg"}, ssim=0.9, ssim_per_channel=[0.9], height=64,
        ...                  width=64, channels=1, data_range=255.0, bit_depth=8, decoder="pillow-11")
        >>> rows_to_table([row], ["codec"]).num_columns
        22
    """
    clashes = sorted(set(passthrough_columns) & set(RESULT_COLUMNS))
    if clashes:
        raise ValueError(f"pass-through columns must not reuse result column names {list(RESULT_COLUMNS)}, "
                         f"got {clashes}")
    names = list(RESULT_COLUMNS) + list(passthrough_columns)
    required = list(REQUIRED_ROW_KEYS) + list(passthrough_columns)
    for index, row in enumerate(rows):
        missing = [name for name in required if name not in row]
        if missing:
            raise ValueError(f"result row {index} must have keys {required}, got {sorted(row)} (missing {missing})")
    types = dict(passthrough_types or {})
    arrays = []
    for name in names:
        values = [row.get(name) for row in rows]
        wanted = RESULT_SCHEMA.field(name).type if name in RESULT_COLUMNS else types.get(name)
        try:
            arrays.append(pa.array(values, type=wanted))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as error:
            raise ValueError(f"result column {name!r} must hold {wanted or 'one type'}, got {error}") from error
    return pa.Table.from_arrays(arrays, names=names)


def validate_result_table(table: pa.Table, *, shard_id: str) -> None:
    """Check that `table` is a shard's results: RESULT_SCHEMA first, this shard's id, scores only when ok.

    Args:
        table: the rows to check.
        shard_id: the shard they must belong to.

    Raises:
        ValueError: naming the column or row and what was expected and got.

    Also: the other metrics' columns only on ok rows, an MS-SSIM reason from MS_SSIM_UNDEFINED_REASONS only
    where ms_ssim is null, and no NaN in any score column (+inf is PSNR's value for identical images).

    Example:
        >>> validate_result_table(rows_to_table([], []), shard_id="s0")
    """
    head = pa.schema([table.schema.field(i) for i in range(min(table.num_columns, len(RESULT_COLUMNS)))])
    if not head.equals(RESULT_SCHEMA):
        raise ValueError(f"a results table must start with the columns {RESULT_SCHEMA}, got {table.schema}")
    ids = table["shard_id"].unique().to_pylist()
    if table.num_rows and ids != [shard_id]:
        raise ValueError(f"every row's shard_id must be {shard_id!r}, got {ids[:5]}")
    ok = pc.equal(table["status"], statuses.OK)
    scored = pc.is_valid(table["ssim"])
    bad = pc.xor(pc.fill_null(ok, False), scored)
    if pc.any(bad).as_py():
        row = pc.index(bad, True).as_py()
        raise ValueError(
            f"ssim must be set exactly when status is {statuses.OK!r}; got status "
            f"{table['status'][row].as_py()!r} with ssim {table['ssim'][row].as_py()!r} "
            f"for pair_id {table['pair_id'][row].as_py()!r}"
        )
    _check_other_metrics(table, pc.fill_null(ok, False))


def _first_bad(table: pa.Table, bad: Any, what: str) -> None:
    if pc.any(bad).as_py():
        row = pc.index(bad, True).as_py()
        raise ValueError(f"{what}; got status {table['status'][row].as_py()!r}, psnr {table['psnr'][row].as_py()!r}, "
                         f"ms_ssim {table['ms_ssim'][row].as_py()!r}, ms_ssim_undefined "
                         f"{table['ms_ssim_undefined'][row].as_py()!r} for pair_id {table['pair_id'][row].as_py()!r}")


def _check_other_metrics(table: pa.Table, ok: Any) -> None:
    """PSNR and MS-SSIM columns: set only on ok rows, reasons typed and only without a value, never NaN."""
    for name in ("psnr", "ms_ssim"):
        _first_bad(table, pc.and_(pc.is_valid(table[name]), pc.invert(ok)),
                   f"{name} must be null unless status is {statuses.OK!r}")
        _first_bad(table, pc.fill_null(pc.is_nan(table[name]), False), f"{name} must never be NaN")
        flat = pc.list_flatten(table[f"{name}_per_channel"])
        if len(flat) and pc.any(pc.is_nan(flat)).as_py():
            raise ValueError(f"{name}_per_channel must never hold NaN, got {pc.sum(pc.is_nan(flat)).as_py()} NaN values")
    reason = table["ms_ssim_undefined"]
    _first_bad(table, pc.and_(pc.is_valid(reason), pc.invert(pc.is_in(reason, pa.array(MS_SSIM_UNDEFINED_REASONS)))),
               f"ms_ssim_undefined must be null or one of {list(MS_SSIM_UNDEFINED_REASONS)}")
    _first_bad(table, pc.and_(pc.is_valid(reason), pc.or_(pc.is_valid(table["ms_ssim"]), pc.invert(ok))),
               f"ms_ssim_undefined is set only on {statuses.OK!r} rows whose ms_ssim is null")
