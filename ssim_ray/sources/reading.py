"""Reading one object with its version: what identifies the bytes read, in the same format as a stat-only
look-up gives it, so that a later run can tell a rewritten input from an untouched one.

Versions: `size=<bytes>;mtime_ns=<int>` for local files (nanoseconds: a rewrite within a second shows);
`size=<bytes>;<field>=<value>` for other filesystems, the field the best of `VERSION_FIELDS` that fsspec's
`info` has (an S3 ETag, a GCS generation, a modification time). A rewrite that keeps both size and mtime
of a local file (`cp -p` of same-sized content) is not seen: that would need a content hash.
"""

from __future__ import annotations

import errno
import os
import time
from stat import S_ISDIR
from typing import Any, Callable, Dict, Optional, Tuple

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile

from ssim_ray.sources.storage import retrying

# Fields of fsspec's `info` that tell a rewritten object from the old one, best first, with the name a
# version string gives each: a content hash or generation where the store has one, else a timestamp.
VERSION_FIELDS = (
    ("ETag", "etag"), ("etag", "etag"), ("generation", "generation"), ("md5Hash", "md5"), ("crc32c", "crc32c"),
    ("mtime", "mtime"), ("LastModified", "last_modified"), ("last_modified", "last_modified"),
    ("Last-Modified", "last_modified"), ("created", "created"),
)


def read_versioned(
    fs: fsspec.AbstractFileSystem,
    path: str,
    *,
    retries: int,
    backoff_s: float = 0.1,
    max_backoff_s: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Tuple[bytes, str]:
    """The whole object at `path` and its version, retrying transient errors with backoff and jitter.

    The version is taken before the bytes, from the same open file where the filesystem allows: `fstat` of
    the open descriptor for local files; the details an opened remote file fetched to open it (s3fs then
    reads with `If-Match` on that ETag, so bytes and version agree); else one `info()` before reading. An
    object rewritten meanwhile so gets an older version than its bytes: a later check sees a change and
    recomputes, never the reverse.

    Args:
        fs: the filesystem, from `storage.open_url`.
        path: the path within `fs`.
        retries: how many times a transient error is retried (0: try once).
        backoff_s: the first wait; it doubles after each failure, with up to 50% random jitter so that
            many threads do not retry in step.
        max_backoff_s: the longest single wait.
        sleep: how to wait (tests pass a recorder).

    Returns:
        (bytes, version) with the version as `version_of` / `local_version` write it.

    Raises:
        FileNotFoundError: the object does not exist (never retried).
        Exception: a permanent error, or a transient one that outlived its retries (the last one).

    Example:
        >>> fs, path = fsspec.filesystem("memory"), "/doc/x.bin"
        >>> fs.pipe_file(path, b"abc")
        >>> data, version = read_versioned(fs, path, retries=2)
        >>> data, version.split(";")[0]
        (b'abc', 'size=3')
    """
    return retrying(lambda: _read_once(fs, path), retries=retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s,
                     sleep=sleep)


def stat_version(fs: fsspec.AbstractFileSystem, path: str, *, retries: int, sleep: Callable[[float], None] = time.sleep) -> str:
    """The version of the object at `path` as `read_versioned` gives it, without reading its bytes.

    Args:
        fs: the filesystem, from `storage.open_url`.
        path: the path within `fs`.
        retries: how many times a transient error is retried.
        sleep: how to wait between tries.

    Returns:
        The version string (one `stat` locally, one `info()` - a HEAD on object stores - otherwise).

    Raises:
        FileNotFoundError: the object does not exist.
        IsADirectoryError: it is a folder (a read would fail too: the version is None from both).
        PermissionError: a local file this process may not read (likewise).

    Example:
        >>> fs, path = fsspec.filesystem("memory"), "/doc/y.bin"
        >>> fs.pipe_file(path, b"abcd")
        >>> stat_version(fs, path, retries=0) == read_versioned(fs, path, retries=0)[1]
        True
    """
    return retrying(lambda: _stat_once(fs, path), retries=retries, backoff_s=0.1, max_backoff_s=5.0, sleep=sleep)


def local_version(stat: os.stat_result) -> str:
    """`size=<bytes>;mtime_ns=<int>` of a local file: nanoseconds, so that a rewrite within a second shows.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile() as handle:
        ...     _ = handle.write(b"twelve bytes"); handle.flush()
        ...     os.utime(handle.name, ns=(0, 1_700_000_000_123_456_789))
        ...     local_version(os.stat(handle.name))
        'size=12;mtime_ns=1700000000123456789'
    """
    return f"size={stat.st_size};mtime_ns={stat.st_mtime_ns}"


def version_of(info: Dict[str, Any]) -> str:
    """`size=<bytes>;<field>=<value>` from fsspec's `info` of an object, the field the best of `VERSION_FIELDS`.

    Args:
        info: what `fs.info(path)` (or an opened file's `details`) gives.

    Returns:
        The version string; the size alone where the store gives none of the fields.

    Example:
        >>> version_of({"size": 5, "ETag": '"9a0364b9e99bb480dd25e1f0284c8555"', "LastModified": 1})
        'size=5;etag=9a0364b9e99bb480dd25e1f0284c8555'
    """
    field = version_field(info)
    if field is None:
        return f"size={info.get('size')}"
    name, value = field
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    return f"size={info.get('size')};{name}={text.strip(chr(34))}"


def version_field(info: Dict[str, Any]) -> Optional[Tuple[str, Any]]:
    """(name, raw value) of the best field of `VERSION_FIELDS` that `info` has, or None.

    Example:
        >>> version_field({"size": 5, "mtime": 1700000000.5}), version_field({"size": 5})
        (('mtime', 1700000000.5), None)
    """
    for key, name in VERSION_FIELDS:
        if info.get(key) is not None:
            return name, info[key]
    return None


def _stat_once(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        stat = os.stat(path)
        if S_ISDIR(stat.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
        if not os.access(path, os.R_OK):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return local_version(stat)
    info = fs.info(path)
    if info.get("type") == "directory":
        raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
    return version_of(info)


def _read_once(fs: fsspec.AbstractFileSystem, path: str) -> Tuple[bytes, str]:
    if isinstance(fs, LocalFileSystem):
        with open(path, "rb") as handle:
            version = local_version(os.fstat(handle.fileno()))
            return handle.read(), version
    with fs.open(path, "rb") as handle:
        info = handle.details if isinstance(handle, AbstractBufferedFile) else fs.info(path)
        version = version_of(info)
        return handle.read(), version
