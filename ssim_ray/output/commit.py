"""The commit protocol: a shard's part file, then its commit marker, and how committed shards are found.

A shard is committed when its marker parses, names the shard, and the part file beside it has the size the
marker records (`scan_shards`, `committed_shard_ids`); the merge also checks each part's sha256 as it reads
it. Object stores have no atomic rename, so the marker is the commit: a part file without one is ignored
and rewritten by the next attempt, and a marker left over from an earlier attempt is deleted before its
part file is overwritten. File names are in `layout`.

Besides the part's size, hash, schema and statistics, a marker (format COMMIT_FORMAT) records where its rows
come from: the `stamps.CommitStamp` (plan fingerprint, metric digest, writing run) and the digest of its
inputs' versions (`inputs.inputs_digest`). Whether a run may reuse a committed shard is decided from these in
`resume.check_commits` and `inputs.check_inputs`. Markers of format LEGACY_COMMIT_FORMATS still parse (with
no stamp), so that a run can name them when it refuses them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ssim_ray.config import SummaryConfig
from ssim_ray.output.layout import (
    MARKER_SUFFIX,
    PART_SUFFIX,
    SHARDS_DIR,
    marker_path,
    output_filesystem,
    part_path,
    write_bytes,
)
from ssim_ray.output.inputs import inputs_digest, table_versions
from ssim_ray.output.provenance import utc_now
from ssim_ray.output.schema import rows_to_table, validate_result_table
from ssim_ray.output.stamps import CommitStamp
from ssim_ray.output.stats import ShardStats, stats_from_json, stats_to_json
from ssim_ray.output.table_stats import shard_stats

COMMIT_FORMAT = "ssim_ray.commit/2"
# Markers of these formats parse, without a stamp or an inputs digest: a run refuses them by name.
LEGACY_COMMIT_FORMATS = ("ssim_ray.commit/1",)
MARKER_BATCH = 256  # markers fetched per fs.cat call while scanning
_SHARD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


def _check_shard_id(shard_id: str) -> None:
    if not isinstance(shard_id, str) or not _SHARD_ID.match(shard_id) or ".." in shard_id:
        raise ValueError(
            "shard_id must be a file-name-safe string (letters, digits, '._=+-', not starting with a "
            f"separator and without '..'), got {shard_id!r}"
        )


@dataclass(frozen=True)
class ShardCommit:
    """What a commit marker records about a part file.

    `stats` is None when the marker was read without its statistics (`scan_shards` does, so that a scan of
    many shards holds a few hundred bytes per shard, not its histograms and worst pairs). `stamp` is None for
    a marker written without one (`write_shard(stamp=None)`, or a legacy format): no run reuses it.
    `inputs_sha256` is None when no row records an input version (nothing to check on resume).
    """

    shard_id: str
    rows: int
    bytes: int
    sha256: str
    created: str
    arrow_schema: pa.Schema = field(compare=False)
    stats: Optional[ShardStats] = field(compare=False)
    stamp: Optional[CommitStamp] = None
    inputs_sha256: Optional[str] = None
    format: str = COMMIT_FORMAT

    def to_json(self) -> Dict[str, Any]:
        """The marker's JSON object (format COMMIT_FORMAT).

        Raises:
            ValueError: the commit has no statistics (a marker must carry them).
        """
        if self.stats is None:
            raise ValueError(f"a commit marker must carry statistics, got none for shard {self.shard_id!r}")
        return {
            "format": COMMIT_FORMAT,
            "shard_id": self.shard_id,
            "part": f"{self.shard_id}{PART_SUFFIX}",
            "rows": self.rows,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "created": self.created,
            "arrow_schema": base64.b64encode(self.arrow_schema.serialize().to_pybytes()).decode("ascii"),
            "stats": stats_to_json(self.stats),
            "plan_fingerprint": self.stamp.plan_fingerprint if self.stamp else None,
            "metric_sha256": self.stamp.metric_sha256 if self.stamp else None,
            "run_id": self.stamp.run_id if self.stamp else None,
            "inputs_sha256": self.inputs_sha256,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, with_stats: bool = True,
                  schemas: Optional[Dict[str, pa.Schema]] = None) -> "ShardCommit":
        """Parse a marker.

        Args:
            data: the marker's JSON object.
            with_stats: parse the statistics too (else `stats` is None; their presence is still checked).
            schemas: a cache of parsed schemas by their encoded text, so shards with the same schema share
                one object.

        Returns:
            The ShardCommit.

        Raises:
            ValueError: the marker is not of format COMMIT_FORMAT (or a legacy one), or a field is missing or
                malformed.
        """
        marker_format = data.get("format")
        if marker_format != COMMIT_FORMAT and marker_format not in LEGACY_COMMIT_FORMATS:
            raise ValueError(f"commit marker format must be {COMMIT_FORMAT!r}, got {marker_format!r}")
        try:
            encoded = data["arrow_schema"]
            cache = schemas if schemas is not None else {}
            if encoded not in cache:
                cache[encoded] = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded)))
            stats = stats_from_json(data["stats"]) if with_stats else None
            if not with_stats and not isinstance(data["stats"], Mapping):
                raise TypeError(f"stats must be an object, got {type(data['stats']).__name__}")
            stamp = None
            if marker_format == COMMIT_FORMAT and data["plan_fingerprint"] is not None:
                stamp = CommitStamp(data["plan_fingerprint"], data["metric_sha256"], data["run_id"])
            inputs = data.get("inputs_sha256") if marker_format == COMMIT_FORMAT else None
            return cls(data["shard_id"], int(data["rows"]), int(data["bytes"]), str(data["sha256"]),
                       str(data["created"]), cache[encoded], stats, stamp, inputs, marker_format)
        except (KeyError, TypeError, pa.ArrowInvalid, ValueError) as error:
            raise ValueError(f"commit marker fields must be complete and well formed, got {error!r}") from error


def write_shard(
    output_url: str,
    shard_id: str,
    table: pa.Table,
    *,
    storage_options: Optional[Mapping[str, Any]] = None,
    stats: Optional[ShardStats] = None,
    stamp: Optional[CommitStamp] = None,
) -> ShardCommit:
    """Write a shard's part file, then its commit marker (the commit), overwriting an earlier attempt.

    Args:
        output_url: the run's output folder (any fsspec URL).
        shard_id: the shard's stable id; names the files.
        table: the shard's results (`schema.rows_to_table`), every row's `shard_id` equal to `shard_id`.
        storage_options: fsspec options for `output_url` (no credentials: they come from the environment).
        stats: the shard's statistics for its marker (`table_stats.shard_stats(table, summary_cfg)`); None
            computes them here without groups. The merge does not read them: it recomputes each part's
            statistics from the part itself, with the merge's own summary settings.
        stamp: the plan fingerprint, metric digest and run the rows belong to; the job always gives one (a
            marker without it is never reused by a run, see `resume.check_commits`).

    Returns:
        The ShardCommit recorded in the marker (with the digest of the rows' input versions).

    Raises:
        ValueError: a malformed shard id or table, or statistics that do not count the table's rows.

    Example:
        >>> from ssim_ray.output.schema import rows_to_table
        >>> commit = write_shard("memory://doc-out", "s0", rows_to_table([], []))
        >>> commit.rows, "s0" in committed_shard_ids("memory://doc-out")
        (0, True)
    """
    _check_shard_id(shard_id)
    validate_result_table(table, shard_id=shard_id)
    if stats is None:
        stats = shard_stats(table, SummaryConfig(group_by=None))
    if stats.overall.rows != table.num_rows:
        raise ValueError(f"stats must describe the table's {table.num_rows} rows, got {stats.overall.rows}")
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    commit = ShardCommit(shard_id, table.num_rows, len(data), hashlib.sha256(data).hexdigest(), utc_now(),
                         table.schema, stats, stamp, inputs_digest(table_versions(table)))
    fs, root = output_filesystem(output_url, storage_options)
    marker = marker_path(root, shard_id)
    # An old marker beside a half-rewritten part would still look committed if the sizes happened to agree.
    if fs.exists(marker):
        fs.rm(marker)
    write_bytes(fs, part_path(root, shard_id), data)
    write_bytes(fs, marker, json.dumps(commit.to_json(), sort_keys=True).encode("utf-8"))
    return commit


def write_shard_rows(
    output_url: str,
    shard_id: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    passthrough_columns: Sequence[str],
    summary_cfg: SummaryConfig,
    storage_options: Optional[Mapping[str, Any]] = None,
    stamp: Optional[CommitStamp] = None,
) -> ShardCommit:
    """Commit a shard's result rows: their table, with statistics of the run's settings in the marker.

    What the worker does with the rows it computed and the driver with the `worker_failed` rows of a shard
    no actor could finish.

    Args:
        output_url: the run's output folder (any fsspec URL).
        shard_id: the shard's stable id.
        rows: one `schema.result_row` per pair of the shard, in shard order.
        passthrough_columns: the plan's pass-through columns, in order.
        summary_cfg: the run's `summary` settings, for the marker's statistics.
        storage_options: fsspec options for `output_url`.
        stamp: the run's CommitStamp (see `write_shard`).

    Returns:
        The ShardCommit recorded in the marker.

    Raises:
        ValueError: as `schema.rows_to_table` and `write_shard` do.

    Example:
        >>> from ssim_ray.output.schema import result_row
        >>> row = result_row(pair_id="p0", reference="a.png", distorted="b.png", status="worker_failed",
        ...                  shard_id="s0", passthrough={}, error="shard s0 failed on 3 attempt(s)")
        >>> write_shard_rows("memory://doc-rows", "s0", [row], passthrough_columns=[],
        ...                  summary_cfg=SummaryConfig()).rows
        1
    """
    table = rows_to_table(rows, passthrough_columns)
    return write_shard(output_url, shard_id, table, storage_options=storage_options,
                       stats=shard_stats(table, summary_cfg), stamp=stamp)


@dataclass(frozen=True)
class ShardScan:
    """The committed shards found under an output, and why other markers were not accepted.

    Attributes:
        commits: the accepted commits (without statistics) by shard id.
        rejected: the reason each other marker was not accepted, by shard id.
    """

    commits: Dict[str, ShardCommit]
    rejected: Dict[str, str]


def scan_shards(output_url: str, *, storage_options: Optional[Mapping[str, Any]] = None) -> ShardScan:
    """Read every commit marker under `output_url/shards/` and check it against its part file's size.

    A marker is rejected (with the reason) when it does not parse, names another shard, or its part file is
    missing or of another size. Part files without a marker are ignored. Markers are fetched with `fs.cat`
    in batches of MARKER_BATCH, which object-store filesystems fetch concurrently. Commits come without their
    statistics (see ShardCommit), so memory grows by a few hundred bytes per shard.

    Args:
        output_url: the run's output folder.
        storage_options: fsspec options for `output_url`.

    Returns:
        A ShardScan: accepted commits by shard id, and rejected shard ids with the reason.

    Example:
        >>> scan_shards("memory://doc-empty").commits
        {}
    """
    fs, root = output_filesystem(output_url, storage_options)
    folder = f"{root}/{SHARDS_DIR}"
    # Listings are cached per filesystem instance; other processes (the workers) have written since.
    fs.invalidate_cache(folder)
    try:
        listing = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return ShardScan({}, {})
    sizes = {posixpath.basename(info["name"]): info.get("size") for info in listing}
    markers = sorted(name for name in sizes if name.endswith(MARKER_SUFFIX))
    commits, rejected, schemas = {}, {}, {}
    # Batches bound the marker bytes held at once (markers carry statistics: ~10 KB each).
    for start in range(0, len(markers), MARKER_BATCH):
        batch = markers[start:start + MARKER_BATCH]
        fetched = fs.cat([f"{folder}/{name}" for name in batch], on_error="return")
        contents = {posixpath.basename(path): value for path, value in fetched.items()}
        for name in batch:
            shard_id = name[: -len(MARKER_SUFFIX)]
            verdict = _judge_marker(shard_id, contents.get(name), sizes.get(f"{shard_id}{PART_SUFFIX}"), schemas)
            if isinstance(verdict, ShardCommit):
                commits[shard_id] = verdict
            else:
                rejected[shard_id] = verdict
    return ShardScan(commits, rejected)


def _judge_marker(shard_id: str, raw: Any, part_size: Optional[int], schemas: Dict[str, pa.Schema]):
    """The marker's ShardCommit, or the reason (a string) it is not accepted."""
    if raw is None or isinstance(raw, BaseException):
        return f"marker could not be read: {raw!r}"
    try:
        commit = ShardCommit.from_json(json.loads(raw), with_stats=False, schemas=schemas)
    except (ValueError, UnicodeDecodeError) as error:
        return f"marker is not a complete commit: {error}"
    if commit.shard_id != shard_id:
        return f"marker names shard {commit.shard_id!r}, expected {shard_id!r}"
    if part_size is None:
        return "part file is missing"
    if part_size != commit.bytes:
        return f"part file has {part_size} bytes, the marker expected {commit.bytes}"
    return commit


def committed_shard_ids(output_url: str, *, storage_options: Optional[Mapping[str, Any]] = None) -> set:
    """Ids of the shards committed under `output_url`: a valid marker and a part file of the marked size.

    The driver skips these on resume. A part file without a marker, a marker whose part is missing or of
    another size, and an unreadable marker all count as not committed (the shard is recomputed).

    Args:
        output_url: the run's output folder.
        storage_options: fsspec options for `output_url`.

    Returns:
        A set of shard ids.

    Example:
        >>> committed_shard_ids("memory://doc-nothing-here")
        set()
    """
    return set(scan_shards(output_url, storage_options=storage_options).commits)
