"""The layout of an output folder: the name of every file a run writes there, and the filesystem access to it.

Layout under `output_url` (any fsspec URL: a local path, file://, s3://, memory://):

    _claim.json                   the claim of the run writing here now: run id, host, pid, heartbeat
    _run.json                     the run manifest: plan fingerprint, metric settings, source (no secrets)
    shards/<shard_id>.parquet     one part file per shard, named by the shard id (a rerun overwrites)
    shards/<shard_id>.commit.json its commit marker, written LAST: rows, bytes, sha256, schema, statistics,
                                  plan fingerprint, metric digest, run id, digest of the inputs' versions
    ssim.parquet                  every committed row, in plan order (written by the merge)
    summary.json                  counts, SSIM statistics, worst pairs, run facts (written by the merge)
    report.html, plots/           the report (written by ssim_ray.report from summary.json)

The commit protocol is in `commit` and `stamps`, the claim in `claim`, the manifest and resume decision in
`resume`, input verification in `inputs`, the merge in `merge`, atomic publication in `publish`.
"""

from __future__ import annotations

import posixpath
from typing import Any, Mapping, Optional, Tuple

import fsspec

SHARDS_DIR = "shards"
PART_SUFFIX = ".parquet"
MARKER_SUFFIX = ".commit.json"
RUN_MANIFEST = "_run.json"
CLAIM_FILE = "_claim.json"
MERGED_FILE = "ssim.parquet"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
# Outputs of a previous run that `output.mode=overwrite` removes (besides shards/); nothing else under
# output_url is touched.
PREVIOUS_OUTPUTS = (MERGED_FILE, SUMMARY_FILE, REPORT_FILE, PLOTS_DIR, RUN_MANIFEST)


def output_filesystem(output_url: str, storage_options: Optional[Mapping[str, Any]]) -> Tuple[Any, str]:
    """The fsspec filesystem of `output_url` and its root path (no trailing slash).

    Args:
        output_url: the run's output folder (any fsspec URL).
        storage_options: fsspec options for `output_url`, or None.

    Returns:
        (filesystem, root path).

    Example:
        >>> output_filesystem("memory://doc-layout/", None)[1]
        '/doc-layout'
    """
    fs, root = fsspec.core.url_to_fs(output_url, **dict(storage_options or {}))
    return fs, root.rstrip("/")


def is_local(fs: Any) -> bool:
    """Whether `fs` is the local filesystem (where rename is atomic and folders must exist before files).

    Example:
        >>> is_local(fsspec.filesystem("file")), is_local(fsspec.filesystem("memory"))
        (True, False)
    """
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def ensure_folder(fs: Any, path: str) -> None:
    """Create the folder `path` on a local filesystem; nothing on others.

    Only a local filesystem needs folders before a file is written into them; on object stores `makedirs`
    may create a bucket, which a run must never do.

    Args:
        fs: an fsspec filesystem.
        path: the folder.

    Example:
        >>> ensure_folder(fsspec.filesystem("memory"), "/doc-layout/nothing-made")
    """
    if is_local(fs):
        fs.makedirs(path, exist_ok=True)


def write_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write a whole file, creating local folders as needed.

    Args:
        fs: an fsspec filesystem.
        path: the file.
        data: its whole content.

    Example:
        >>> fs = fsspec.filesystem("memory")
        >>> write_bytes(fs, "/doc-layout/a.txt", b"hi")
        >>> fs.cat_file("/doc-layout/a.txt")
        b'hi'
    """
    ensure_folder(fs, posixpath.dirname(path))
    fs.pipe_file(path, data)


def part_path(root: str, shard_id: str) -> str:
    """Where the part file of shard `shard_id` lies under the output root.

    Example:
        >>> part_path("/out", "shard-00001")
        '/out/shards/shard-00001.parquet'
    """
    return f"{root}/{SHARDS_DIR}/{shard_id}{PART_SUFFIX}"


def marker_path(root: str, shard_id: str) -> str:
    """Where the commit marker of shard `shard_id` lies under the output root.

    Example:
        >>> marker_path("/out", "shard-00001")
        '/out/shards/shard-00001.commit.json'
    """
    return f"{root}/{SHARDS_DIR}/{shard_id}{MARKER_SUFFIX}"
