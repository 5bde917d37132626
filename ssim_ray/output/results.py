"""Part files, commit markers, the run manifest, and the merge into ssim.parquet and summary.json.

Layout under `output_url` (any fsspec URL: a local path, file://, s3://, memory://):

    _run.json                     the run manifest: plan fingerprint, metric settings, source (no secrets)
    shards/<shard_id>.parquet     one part file per shard, named by the shard id (a rerun overwrites)
    shards/<shard_id>.commit.json its commit marker, written LAST: rows, bytes, sha256, schema, statistics
    ssim.parquet                  every committed row, in plan order (written by `merge`)
    summary.json                  counts, SSIM statistics, worst pairs, run facts (written by `merge`)

A shard is committed when its marker parses, names the shard, and the part file beside it has the size
the marker records (`committed_shard_ids`); `merge` also checks each part's sha256 as it reads it. Object
stores have no atomic rename, so the marker is the commit: a part file without one is ignored and
rewritten by the next attempt, and a marker left over from an earlier attempt is deleted before its part
file is overwritten.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import itertools
import json
import posixpath
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ssim_ray import statuses
from ssim_ray.config import OUTPUT_MODES, AuditConfig, SummaryConfig
from ssim_ray.output.stats import (
    ScoreCollector,
    ShardStats,
    empty_stats,
    merge_stats,
    stats_from_json,
    stats_from_table,
    stats_to_json,
    summary_statistics,
)
from ssim_ray.secrets import scrub

SHARDS_DIR = "shards"
RUN_MANIFEST = "_run.json"
MERGED_FILE = "ssim.parquet"
SUMMARY_FILE = "summary.json"
PART_SUFFIX = ".parquet"
MARKER_SUFFIX = ".commit.json"
COMMIT_FORMAT = "ssim_ray.commit/1"
MANIFEST_FORMAT = "ssim_ray.run/1"
# Outputs of a previous run that `output.mode=overwrite` removes; nothing else under output_url is touched.
PREVIOUS_OUTPUTS = (MERGED_FILE, SUMMARY_FILE, "report.html", "plots", RUN_MANIFEST)

RESULT_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("reference", pa.string()),
        ("distorted", pa.string()),
        ("ssim", pa.float64()),
        ("ssim_per_channel", pa.list_(pa.float64())),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int32()),
        ("data_range", pa.float64()),
        ("bit_depth", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("decoder", pa.string()),
        ("shard_id", pa.string()),
    ]
)
RESULT_COLUMNS = tuple(RESULT_SCHEMA.names)
REQUIRED_ROW_KEYS = ("pair_id", "reference", "distorted", "status", "shard_id")
MARKER_BATCH = 256  # markers fetched per fs.cat call while scanning
_SHARD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


class ResumeConflictError(RuntimeError):
    """The output already holds a run whose plan or metric differs from this one."""


class IncompleteMergeError(RuntimeError):
    """Some planned shards are not committed, so a merge would silently miss rows."""


class CorruptShardError(RuntimeError):
    """A committed part file does not match its marker, or a merge's row count does not match the plan."""


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def output_filesystem(output_url: str, storage_options: Optional[Mapping[str, Any]]) -> Tuple[Any, str]:
    """The fsspec filesystem of `output_url` and its root path (no trailing slash)."""
    fs, root = fsspec.core.url_to_fs(output_url, **dict(storage_options or {}))
    return fs, root.rstrip("/")


def _is_local(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def write_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write a whole file, creating local folders as needed."""
    # Only a local filesystem needs folders; on object stores makedirs may create a bucket, which we never want.
    if _is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def _check_shard_id(shard_id: str) -> None:
    if not isinstance(shard_id, str) or not _SHARD_ID.match(shard_id) or ".." in shard_id:
        raise ValueError(
            "shard_id must be a file-name-safe string (letters, digits, '._=+-', not starting with a "
            f"separator and without '..'), got {shard_id!r}"
        )


def library_versions() -> Dict[str, Optional[str]]:
    """Versions of the libraries that determine results (None for one that is not installed).

    Example:
        >>> sorted(library_versions())[:3]
        ['fsspec', 'numpy', 'pillow']
    """
    import importlib.metadata
    import platform

    versions: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name, dist in (("torch", "torch"), ("ray", "ray"), ("pyarrow", "pyarrow"), ("fsspec", "fsspec"),
                       ("pillow", "pillow"), ("numpy", "numpy"), ("ssim_ray", "ssim_ray")):
        try:
            versions[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return dict(sorted(versions.items()))


def rows_to_table(
    rows: Sequence[Mapping[str, Any]],
    passthrough_columns: Sequence[str],
    *,
    passthrough_types: Optional[Mapping[str, pa.DataType]] = None,
) -> pa.Table:
    """Build a results table from plain dict rows: RESULT_SCHEMA's columns, then the pass-through ones.

    Args:
        rows: one dict per pair with the keys REQUIRED_ROW_KEYS and every pass-through column; the other
            result columns (ssim, sizes, error, decoder...) default to null when absent (a failed pair).
        passthrough_columns: manifest columns copied to the results, in this order.
        passthrough_types: the manifest's type of each pass-through column; a column not named here gets
            the type pyarrow infers from its values (null when every value is None; `merge` unifies).

    Returns:
        A pyarrow Table with RESULT_SCHEMA's fields followed by the pass-through fields.

    Raises:
        ValueError: a row lacks a key, a pass-through column collides with a result column, or a value does
            not fit its column's type.

    Example:
        >>> row = dict(pair_id="p0", reference="a.png", distorted="b.png", ssim=0.9, ssim_per_channel=[0.9],
        ...            height=64, width=64, channels=1, data_range=255.0, bit_depth=8, status="ok",
        ...            error=None, decoder="pillow-11", shard_id="s0", codec="jpeg")
        >>> rows_to_table([row], ["codec"]).num_columns
        15
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

    Example:
        >>> validate_result_table(rows_to_table([], []), shard_id="s0")
    """
    head = pa.schema([table.schema.field(i) for i in range(min(table.num_columns, len(RESULT_COLUMNS)))])
    if not head.equals(RESULT_SCHEMA):
        raise ValueError(f"a results table must start with the columns {RESULT_SCHEMA}, got {table.schema}")
    ids = table["shard_id"].unique().to_pylist()
    if table.num_rows and ids != [shard_id]:
        raise ValueError(f"every row's shard_id must be {shard_id!r}, got {ids[:5]}")
    ok = pa.compute.equal(table["status"], statuses.OK)
    scored = pa.compute.is_valid(table["ssim"])
    bad = pa.compute.xor(pa.compute.fill_null(ok, False), scored)
    if pa.compute.any(bad).as_py():
        row = pa.compute.index(bad, True).as_py()
        raise ValueError(
            "ssim must be set exactly when status is 'ok'; got status "
            f"{table['status'][row].as_py()!r} with ssim {table['ssim'][row].as_py()!r} "
            f"for pair_id {table['pair_id'][row].as_py()!r}"
        )


@dataclass(frozen=True)
class ShardCommit:
    """What a commit marker records about a part file.

    `stats` is None when the marker was read without its statistics (`scan_shards` does, so that a scan of
    many shards holds a few hundred bytes per shard, not its histograms and worst pairs).
    """

    shard_id: str
    rows: int
    bytes: int
    sha256: str
    created: str
    arrow_schema: pa.Schema = field(compare=False)
    stats: Optional[ShardStats] = field(compare=False)

    def to_json(self) -> Dict[str, Any]:
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
            ValueError: the marker is not of format COMMIT_FORMAT, or a field is missing or malformed.
        """
        if data.get("format") != COMMIT_FORMAT:
            raise ValueError(f"commit marker format must be {COMMIT_FORMAT!r}, got {data.get('format')!r}")
        try:
            encoded = data["arrow_schema"]
            cache = schemas if schemas is not None else {}
            if encoded not in cache:
                cache[encoded] = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded)))
            stats = stats_from_json(data["stats"]) if with_stats else None
            if not with_stats and not isinstance(data["stats"], Mapping):
                raise TypeError(f"stats must be an object, got {type(data['stats']).__name__}")
            return cls(data["shard_id"], int(data["rows"]), int(data["bytes"]), str(data["sha256"]),
                       str(data["created"]), cache[encoded], stats)
        except (KeyError, TypeError, pa.ArrowInvalid, ValueError) as error:
            raise ValueError(f"commit marker fields must be complete and well formed, got {error!r}") from error


def shard_stats(table: pa.Table, summary_cfg: SummaryConfig) -> ShardStats:
    """The statistics `write_shard` puts into a marker, with the summary settings of the run.

    Example:
        >>> shard_stats(rows_to_table([], []), SummaryConfig()).overall.rows
        0
    """
    return stats_from_table(table, group_by=summary_cfg.group_by, worst_k=summary_cfg.worst_k,
                            examples_per_status=summary_cfg.examples_per_status)


def _part_path(root: str, shard_id: str) -> str:
    return f"{root}/{SHARDS_DIR}/{shard_id}{PART_SUFFIX}"


def _marker_path(root: str, shard_id: str) -> str:
    return f"{root}/{SHARDS_DIR}/{shard_id}{MARKER_SUFFIX}"


def write_shard(
    output_url: str,
    shard_id: str,
    table: pa.Table,
    *,
    storage_options: Optional[Mapping[str, Any]] = None,
    stats: Optional[ShardStats] = None,
) -> ShardCommit:
    """Write a shard's part file, then its commit marker (the commit), overwriting an earlier attempt.

    Args:
        output_url: the run's output folder (any fsspec URL).
        shard_id: the shard's stable id; names the files.
        table: the shard's results (`rows_to_table`), every row's `shard_id` equal to `shard_id`.
        storage_options: fsspec options for `output_url` (no credentials: they come from the environment).
        stats: the shard's statistics (`shard_stats(table, summary_cfg)`); None computes them here without
            groups, and `merge` recomputes a shard whose marker statistics do not match its settings.

    Returns:
        The ShardCommit recorded in the marker.

    Raises:
        ValueError: a malformed shard id or table, or statistics that do not count the table's rows.

    Example:
        >>> commit = write_shard("memory://doc-out", "s0", rows_to_table([], []))
        >>> commit.rows, "s0" in committed_shard_ids("memory://doc-out")
        (0, True)
    """
    _check_shard_id(shard_id)
    validate_result_table(table, shard_id=shard_id)
    if stats is None:
        stats = stats_from_table(table, group_by=None, worst_k=SummaryConfig().worst_k,
                                 examples_per_status=SummaryConfig().examples_per_status)
    if stats.overall.rows != table.num_rows:
        raise ValueError(f"stats must describe the table's {table.num_rows} rows, got {stats.overall.rows}")
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    commit = ShardCommit(shard_id, table.num_rows, len(data), hashlib.sha256(data).hexdigest(), _utc_now(),
                         table.schema, stats)
    fs, root = output_filesystem(output_url, storage_options)
    marker = _marker_path(root, shard_id)
    # An old marker beside a half-rewritten part would still look committed if the sizes happened to agree.
    if fs.exists(marker):
        fs.rm(marker)
    write_bytes(fs, _part_path(root, shard_id), data)
    write_bytes(fs, marker, json.dumps(commit.to_json(), sort_keys=True).encode("utf-8"))
    return commit


@dataclass(frozen=True)
class ShardScan:
    """The committed shards found under an output, and why other markers were not accepted."""

    commits: Dict[str, ShardCommit]
    rejected: Dict[str, str]


def scan_shards(output_url: str, *, storage_options: Optional[Mapping[str, Any]] = None) -> ShardScan:
    """Read every commit marker under `output_url/shards/` and check it against its part file's size.

    A marker is rejected (with the reason) when it does not parse, names another shard, or its part file is
    missing or of another size. Part files without a marker are ignored. Markers are fetched with `fs.cat`
    in batches of MARKER_BATCH, which object-store filesystems fetch concurrently. Commits come without their statistics
    (see ShardCommit), so memory grows by a few hundred bytes per shard.

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


def build_run_manifest(
    *,
    plan_fingerprint: str,
    total_pairs: int,
    num_shards: int,
    metric: Mapping[str, Any],
    source: Mapping[str, Any],
) -> Dict[str, Any]:
    """The run manifest `_run.json`: what a resumed run must agree with, without credentials.

    Args:
        plan_fingerprint: `Plan.fingerprint`.
        total_pairs: `Plan.total_pairs`.
        num_shards: how many shards the plan has.
        metric: `ssim.metric_settings(...)`: the metric's name and every option.
        source: a description of the source (e.g. `dataclasses.asdict(cfg.source)`); scrubbed here.

    Returns:
        A JSON-serialisable dict.

    Example:
        >>> m = build_run_manifest(plan_fingerprint="abc", total_pairs=3, num_shards=1,
        ...                        metric={"name": "wang2004"}, source={"storage_options": {"secret": "s"}})
        >>> m["source"]["storage_options"]["secret"]
        '<redacted>'
    """
    return {
        "format": MANIFEST_FORMAT,
        "plan_fingerprint": plan_fingerprint,
        "total_pairs": int(total_pairs),
        "num_shards": int(num_shards),
        "metric": scrub(dict(metric)),
        "source": scrub(dict(source)),
        "created": _utc_now(),
    }


def run_manifest(*, plan: Any, cfg: Any) -> Dict[str, Any]:
    """The run manifest of a planned job: `build_run_manifest` from a `sources.Plan` and an AuditJobConfig.

    The metric entry is the metric's name with every `ssim.*` option (window, constants, data_range, color,
    alpha, downsampling, precision): any of them changes scores, so a resume must agree on all of them.

    Args:
        plan: `sources.plan_shards(cfg.source)`.
        cfg: the job's AuditJobConfig.

    Returns:
        The manifest dict for `check_resume_compatible`.

    Example:
        >>> from types import SimpleNamespace
        >>> from ssim_ray.config import AuditJobConfig
        >>> plan = SimpleNamespace(fingerprint="f", total_pairs=2, shards=("s0",))
        >>> run_manifest(plan=plan, cfg=AuditJobConfig())["metric"]["name"]
        'wang2004'
    """
    from ssim_ray.metric.structural import METRIC_NAME

    return build_run_manifest(
        plan_fingerprint=plan.fingerprint,
        total_pairs=plan.total_pairs,
        num_shards=len(plan.shards),
        metric={"name": METRIC_NAME, **asdict(cfg.ssim)},
        source=asdict(cfg.source),
    )


def _flatten(prefix: str, value: Any) -> Dict[str, Any]:
    if isinstance(value, Mapping):
        flat: Dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return flat
    return {prefix: value}


def manifest_differences(existing: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    """What differs between two run manifests in the fields a resume must keep (plan and metric).

    Example:
        >>> manifest_differences({"plan_fingerprint": "a", "metric": {"k1": 0.01}},
        ...                      {"plan_fingerprint": "a", "metric": {"k1": 0.02}})
        ['metric.k1: output has 0.01, this run has 0.02']
    """
    keys = ("plan_fingerprint", "total_pairs", "num_shards", "metric")
    old = _flatten("", {k: existing.get(k) for k in keys})
    now = _flatten("", {k: new.get(k) for k in keys})
    return [f"{name}: output has {old.get(name)!r}, this run has {now.get(name)!r}"
            for name in sorted(set(old) | set(now)) if old.get(name) != now.get(name)]


def clear_outputs(output_url: str, *, storage_options: Optional[Mapping[str, Any]] = None) -> None:
    """Remove a previous run's outputs: markers first (so nothing stays committed), then part files, then
    ssim.parquet, summary.json, report.html, plots/ and _run.json. Nothing else under `output_url`.

    Example:
        >>> clear_outputs("memory://doc-clear")
    """
    fs, root = output_filesystem(output_url, storage_options)
    fs.invalidate_cache(root)
    folder = f"{root}/{SHARDS_DIR}"
    if fs.exists(folder):
        names = [posixpath.basename(p) for p in fs.ls(folder, detail=False)]
        markers = [f"{folder}/{n}" for n in names if n.endswith(MARKER_SUFFIX)]
        if markers:
            fs.rm(markers)
        fs.rm(folder, recursive=True)
    for name in PREVIOUS_OUTPUTS:
        path = f"{root}/{name}"
        if fs.exists(path):
            fs.rm(path, recursive=True)


def _read_manifest(fs: Any, path: str) -> Optional[Dict[str, Any]]:
    if not fs.exists(path):
        return None
    try:
        return json.loads(fs.cat_file(path))
    except (ValueError, UnicodeDecodeError) as error:
        raise ResumeConflictError(
            f"{path} must be a JSON run manifest, got unreadable content ({error}); use a new output.url, or "
            "output.mode=overwrite to discard what is there"
        ) from error


def check_resume_compatible(
    output_url: str,
    run_manifest: Mapping[str, Any],
    *,
    mode: str,
    storage_options: Optional[Mapping[str, Any]] = None,
) -> str:
    """Make sure the output belongs to this run before any shard is computed or skipped.

    - No `_run.json` and no committed shard: write the manifest; returns "new".
    - Same plan fingerprint, pair and shard counts, and metric settings: returns "resume" (the manifest
      already there is kept, with its creation time).
    - Otherwise, with mode "resume": raise, naming each difference. With mode "overwrite": remove the
      previous outputs (`clear_outputs`), write the new manifest; returns "overwrite".

    Args:
        output_url: the run's output folder.
        run_manifest: from `build_run_manifest`.
        mode: `output.mode`, "resume" or "overwrite".
        storage_options: fsspec options for `output_url`.

    Returns:
        "new", "resume" or "overwrite".

    Raises:
        ValueError: an unknown mode.
        ResumeConflictError: the output holds another run (or committed shards without a manifest, or an
            unreadable manifest) and mode is "resume".

    Example:
        >>> m = build_run_manifest(plan_fingerprint="f1", total_pairs=1, num_shards=1, metric={}, source={})
        >>> check_resume_compatible("memory://doc-run", m, mode="resume")
        'new'
        >>> check_resume_compatible("memory://doc-run", m, mode="resume")
        'resume'
    """
    if mode not in OUTPUT_MODES:
        raise ValueError(f"mode must be one of {list(OUTPUT_MODES)}, got {mode!r}")
    fs, root = output_filesystem(output_url, storage_options)
    path = f"{root}/{RUN_MANIFEST}"
    if mode == "overwrite":
        clear_outputs(output_url, storage_options=storage_options)
        write_bytes(fs, path, json.dumps(scrub(dict(run_manifest)), indent=1).encode("utf-8"))
        return "overwrite"
    existing = _read_manifest(fs, path)
    if existing is None:
        committed = committed_shard_ids(output_url, storage_options=storage_options)
        if committed:
            raise ResumeConflictError(
                f"{output_url} holds {len(committed)} committed shards but no {RUN_MANIFEST}, so they cannot be "
                "checked against this run; use a new output.url, or output.mode=overwrite to discard them"
            )
        write_bytes(fs, path, json.dumps(scrub(dict(run_manifest)), indent=1).encode("utf-8"))
        return "new"
    differences = manifest_differences(existing, run_manifest)
    if differences:
        raise ResumeConflictError(
            f"{output_url} holds a run with a different plan or metric, so its shards cannot be reused: "
            + "; ".join(differences)
            + ". Use a new output.url, or output.mode=overwrite to discard the previous results."
        )
    return "resume"


@dataclass(frozen=True)
class RunInfo:
    """What the driver knows about a run that the shards do not; written into summary.json.

    Attributes:
        metric: `ssim.metric_settings(...)`: the metric's name and every option.
        plan_fingerprint: `Plan.fingerprint`.
        total_pairs: `Plan.total_pairs`; a complete merge must have exactly this many rows.
        source: a description of the source (scrubbed of credentials here again).
        wall_seconds: the driver's wall time up to the merge (None for `output.merge_only`).
        processing_seconds: from the first shard started to the last one committed in this run.
        pairs_computed: pairs in the shards computed by this run (resumed shards excluded).
        shards_computed: shards computed by this run.
        shards_resumed: planned shards skipped because already committed.
        batch_sizes: the batch size chosen per shape bucket, e.g. {"3x512x512 uint8": 64}.
        device: where the metric ran, e.g. "cuda: NVIDIA H100" or "cpu".
        num_workers: Ray actors used.
    """

    metric: Mapping[str, Any]
    plan_fingerprint: str
    total_pairs: int
    source: Mapping[str, Any] = field(default_factory=dict)
    wall_seconds: Optional[float] = None
    processing_seconds: Optional[float] = None
    pairs_computed: int = 0
    shards_computed: int = 0
    shards_resumed: int = 0
    batch_sizes: Mapping[str, Any] = field(default_factory=dict)
    device: Optional[str] = None
    num_workers: Optional[int] = None

    def pairs_per_second(self) -> Optional[float]:
        """Pairs computed by this run per second of processing; None when nothing was computed."""
        if not self.processing_seconds or not self.pairs_computed:
            return None
        return self.pairs_computed / self.processing_seconds


def _unified_schema(schemas: Sequence[pa.Schema]) -> pa.Schema:
    if not schemas:
        return RESULT_SCHEMA
    try:
        unified = pa.unify_schemas(list(schemas), promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise ValueError(f"pass-through columns must have compatible types across shards, got: {error}") from error
    if not pa.schema(list(unified)[: len(RESULT_COLUMNS)]).equals(RESULT_SCHEMA):
        raise ValueError(f"part files must start with {RESULT_SCHEMA}, got {unified}")
    return unified


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns in its order: types promoted, absent columns all null."""
    arrays = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def _read_part(fs: Any, root: str, commit: ShardCommit) -> pa.Table:
    data = fs.cat_file(_part_path(root, commit.shard_id))
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != commit.bytes or digest != commit.sha256:
        raise CorruptShardError(
            f"part file of shard {commit.shard_id!r} must match its marker (bytes {commit.bytes}, sha256 "
            f"{commit.sha256}), got bytes {len(data)}, sha256 {digest}; delete "
            f"{SHARDS_DIR}/{commit.shard_id}{MARKER_SUFFIX} and rerun (resume) to recompute that shard"
        )
    table = pq.read_table(pa.BufferReader(data), use_threads=False)  # parts are small: threads only cost
    if table.num_rows != commit.rows:
        raise CorruptShardError(f"shard {commit.shard_id!r} must have {commit.rows} rows, got {table.num_rows}")
    return table


ROW_GROUP_ROWS = 65536  # part files are small; gather them so ssim.parquet has reader-friendly row groups
# Part files read ahead of the one being merged, on threads: on an object store each part is one GET, and
# reading them one at a time makes the merge wait one round trip per shard. Bounds memory to this many parts.
MERGE_READ_AHEAD = 8
_LISTED_IDS = 20  # how many missing or rejected shard ids a summary or an error names


def _planned_commits(scan: ShardScan, plan_shard_ids: Sequence[str], *, allow_incomplete: bool):
    planned = list(plan_shard_ids)
    if len(set(planned)) != len(planned):
        raise ValueError(f"plan_shard_ids must be unique, got {len(planned) - len(set(planned))} duplicates")
    missing = [s for s in planned if s not in scan.commits]
    if missing and not allow_incomplete:
        rejected = {s: scan.rejected[s] for s in missing if s in scan.rejected}
        raise IncompleteMergeError(
            f"{len(missing)} of {len(planned)} planned shards are not committed (e.g. {missing[:_LISTED_IDS]}"
            + (f"; rejected markers: {dict(list(rejected.items())[:_LISTED_IDS])}" if rejected else "")
            + "). Rerun the job with the same output.url to compute them, or merge with allow_incomplete=True "
            "for a summary flagged incomplete."
        )
    return [scan.commits[s] for s in planned if s in scan.commits], missing


def _parts_in_order(fs: Any, root: str, commits: Sequence[ShardCommit], read_ahead: int = MERGE_READ_AHEAD):
    """Each commit's verified part table, in the commits' order, with up to `read_ahead` reads in flight."""
    if read_ahead <= 1 or len(commits) <= 1:
        for commit in commits:
            yield _read_part(fs, root, commit)
        return
    upcoming = iter(commits)
    with ThreadPoolExecutor(max_workers=read_ahead, thread_name_prefix="merge-read") as pool:
        in_flight = deque(pool.submit(_read_part, fs, root, c) for c in itertools.islice(upcoming, read_ahead))
        try:
            while in_flight:
                table = in_flight.popleft().result()  # raises the part's own error (CorruptShardError ...)
                in_flight.extend(pool.submit(_read_part, fs, root, c) for c in itertools.islice(upcoming, 1))
                yield table
        finally:
            for future in in_flight:
                future.cancel()


def _stream_parts(fs: Any, root: str, commits: Sequence[ShardCommit], summary_cfg: SummaryConfig):
    """Append every part to ssim.parquet in plan order; return the merged statistics and the scores."""
    schema = _unified_schema([c.arrow_schema for c in commits])
    merged = empty_stats(group_by=summary_cfg.group_by, worst_k=summary_cfg.worst_k,
                         examples_per_status=summary_cfg.examples_per_status)
    collector = ScoreCollector(capacity=sum(c.rows for c in commits), group_by=summary_cfg.group_by)
    if _is_local(fs):
        fs.makedirs(root, exist_ok=True)
    pending: List[pa.Table] = []
    pending_rows = 0
    target = f"{root}/{MERGED_FILE}"
    try:
        with fs.open(target, "wb") as sink, pq.ParquetWriter(sink, schema, compression="zstd") as writer:
            for part in _parts_in_order(fs, root, commits):
                table = _conform(part, schema)
                # From the verified part itself (~1 ms per 1,000 rows): the summary describes exactly the
                # rows merged, with this merge's settings, and no shard's statistics outlive its turn.
                merged = merge_stats(merged, shard_stats(table, summary_cfg))
                collector.add(table)
                pending.append(table)
                pending_rows += table.num_rows
                if pending_rows >= ROW_GROUP_ROWS:
                    writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
                    pending, pending_rows = [], 0
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
    except BaseException:
        # A partial ssim.parquet must not outlive a failed merge (the next merge rewrites it anyway).
        if fs.exists(target):
            fs.rm(target)
        raise
    if len(merged.groups) > summary_cfg.max_groups:
        raise ValueError(
            f"summary.group_by={summary_cfg.group_by!r} must have at most summary.max_groups="
            f"{summary_cfg.max_groups} distinct values, got {len(merged.groups)}; ssim.parquet is written: "
            "rerun with output.merge_only=true and a coarser summary.group_by (or a larger max_groups)"
        )
    return merged, collector


def merge(
    output_url: str,
    *,
    plan_shard_ids: Sequence[str],
    run_info: RunInfo,
    summary_cfg: SummaryConfig,
    storage_options: Optional[Mapping[str, Any]] = None,
    allow_incomplete: bool = False,
    audit_cfg: Optional[AuditConfig] = None,
) -> Dict[str, Any]:
    """Build ssim.parquet and summary.json from the committed shards of the plan; idempotent.

    Part files are streamed in plan order into one Parquet writer (memory: one part file plus up to
    ROW_GROUP_ROWS rows, and 12 bytes per ok row for exact percentiles: the score and its group code; per
    shard only its small commit facts). Each part's statistics are computed from the part as it streams,
    after its sha256 is checked, and summed into the run's.
    Pass-through columns whose types differ between shards (all-null in one, say) are unified by
    pyarrow's permissive promotion. summary.json is deleted first and written last, so its presence means
    ssim.parquet is complete.

    Args:
        output_url: the run's output folder.
        plan_shard_ids: every shard id of the plan, in plan order.
        run_info: the driver's facts about the run (see RunInfo).
        summary_cfg: group_by, worst_k, examples_per_status, max_groups.
        storage_options: fsspec options for `output_url`.
        allow_incomplete: merge what is committed and flag the summary `"complete": false` instead of
            raising when planned shards are missing (for a look at a partial run; gates still apply).
        audit_cfg: the quality gates; their thresholds get exact below-threshold counts in the summary
            (`below`), which `gates.evaluate_gates` reads.

    Returns:
        The summary, as written to summary.json.

    Raises:
        IncompleteMergeError: planned shards are not committed and allow_incomplete is False.
        CorruptShardError: a part file differs from its marker, or a complete merge's row count differs
            from run_info.total_pairs.
        ValueError: incompatible pass-through types, or too many groups.

    Example:
        >>> import dataclasses
        >>> _ = write_shard("memory://doc-merge", "s0", rows_to_table([], []))
        >>> info = RunInfo(metric={"name": "wang2004"}, plan_fingerprint="f", total_pairs=0)
        >>> merge("memory://doc-merge", plan_shard_ids=["s0"], run_info=info,
        ...       summary_cfg=SummaryConfig())["complete"]
        True
    """
    if not isinstance(run_info, RunInfo):
        raise TypeError(f"run_info must be a results.RunInfo (fields {[f.name for f in fields(RunInfo)]}), "
                        f"got {type(run_info).__name__}")
    started = time.perf_counter()
    fs, root = output_filesystem(output_url, storage_options)
    scan = scan_shards(output_url, storage_options=storage_options)
    commits, missing = _planned_commits(scan, plan_shard_ids, allow_incomplete=allow_incomplete)
    if fs.exists(f"{root}/{SUMMARY_FILE}"):
        fs.rm(f"{root}/{SUMMARY_FILE}")
    stats, collector = _stream_parts(fs, root, commits, summary_cfg)
    rows = stats.overall.rows
    if not missing and rows != run_info.total_pairs:
        raise CorruptShardError(f"a complete merge must have run_info.total_pairs={run_info.total_pairs} rows, "
                                f"got {rows} from {len(commits)} shards")
    thresholds = [t for t in (audit_cfg.min_ssim, audit_cfg.group_min_ssim) if t is not None] if audit_cfg else []
    summary = _summary(stats, collector, run_info, scan, plan_shard_ids, missing, thresholds)
    summary["audit"] = asdict(audit_cfg) if audit_cfg else None
    summary["merge_seconds"] = round(time.perf_counter() - started, 3)
    write_bytes(fs, f"{root}/{SUMMARY_FILE}", json.dumps(summary, indent=1).encode("utf-8"))
    return summary


def _summary(stats, collector, run_info: RunInfo, scan: ShardScan, plan_shard_ids: Sequence[str],
             missing: Sequence[str], thresholds: Sequence[float]) -> Dict[str, Any]:
    planned = set(plan_shard_ids)
    rate = run_info.pairs_per_second()
    summary = {
        "format": "ssim_ray.summary/1",
        "created": _utc_now(),
        "complete": not missing,
        "metric": scrub(dict(run_info.metric)),
        "plan_fingerprint": run_info.plan_fingerprint,
        "pairs": {"planned": run_info.total_pairs, "merged": stats.overall.rows,
                  "ok": stats.overall.moments.count, "failures": stats.overall.failures},
        **summary_statistics(stats, collector, thresholds=thresholds),
        "shards": {
            "total": len(planned), "committed": len(planned) - len(missing), "missing": len(missing),
            "missing_ids": list(missing[:_LISTED_IDS]), "computed": run_info.shards_computed,
            "resumed": run_info.shards_resumed, "unplanned": len(set(scan.commits) - planned),
            "rejected_markers": dict(list(scan.rejected.items())[:_LISTED_IDS]),
        },
        "wall_seconds": run_info.wall_seconds,
        "throughput": {"pairs_per_second": rate, "pairs_computed": run_info.pairs_computed,
                       "processing_seconds": run_info.processing_seconds},
        "batch_sizes": dict(run_info.batch_sizes),
        "runtime": {"device": run_info.device, "num_workers": run_info.num_workers},
        "source": scrub(dict(run_info.source)),
        "versions": library_versions(),
        "files": {"results": MERGED_FILE, "summary": SUMMARY_FILE},
    }
    # Only the configuration parts are scrubbed: group names and statuses are data, not credentials.
    return summary
