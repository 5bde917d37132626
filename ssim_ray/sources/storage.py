"""fsspec at the edge: open URLs with storage options, name listed files by URL, read bytes with retries,
resolve manifest paths.

Credentials never pass through here as arguments we keep: fsspec and its backends take them from the
environment or their own configuration. URLs that carry a `user:password@` part are redacted (by
`ssim_ray.secrets.redact_text`) before they are put into any message, id or fingerprint.
"""

from __future__ import annotations

import errno
import os
import posixpath
import random
import re
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import fsspec
from fsspec.core import url_to_fs

from ssim_ray.secrets import redact_text

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_LOCAL_PROTOCOLS = ("file", "local")
# errno values that mean "try again", as raised by local and network filesystems alike.
_TRANSIENT_ERRNOS = frozenset(
    {errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
     errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EBUSY}
)
# Errors that say the object is not there or not ours to read: retrying cannot help.
_PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class PathEscapeError(ValueError):
    """A manifest path leaves its base folder, or uses a URL scheme that is not allowed."""


def url_scheme(url: str) -> Optional[str]:
    """The scheme of `url`, lower-cased, or None for a plain path.

    Args:
        url: a URL (`s3://bucket/key`) or a local path.

    Returns:
        The scheme without `://`, lower-cased; None when `url` has none.

    Example:
        >>> url_scheme("S3://bucket/key.png"), url_scheme("/data/key.png")
        ('s3', None)
    """
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else None


def storage_options_for(url: str, storage_options: Mapping[str, Any]) -> Dict[str, Any]:
    """The options fsspec gets for `url`: the configured ones for remote stores, none for local files.

    Local paths get none because options such as `client_kwargs` are meant for the object store and a
    manifest on disk may point at objects in a bucket (or the other way round).

    Args:
        url: the URL about to be opened.
        storage_options: the configured options.

    Returns:
        A new dict to pass to fsspec.

    Example:
        >>> storage_options_for("/data/a.png", {"anon": True}), storage_options_for("s3://b/a.png", {"anon": True})
        ({}, {'anon': True})
    """
    scheme = url_scheme(url) or "file"
    return {} if scheme in _LOCAL_PROTOCOLS else dict(storage_options)


def open_url(url: str, *, storage_options: Mapping[str, Any]) -> Tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path within it for `url`.

    Args:
        url: a local path or any fsspec URL (file://, s3://, gs://, memory://...).
        storage_options: options for remote filesystems (endpoint, region, anon...); never credentials.

    Returns:
        (filesystem, path) as `fsspec.core.url_to_fs` gives them. fsspec caches filesystem instances,
        so repeated calls with the same options are cheap.

    Example:
        >>> fs, path = open_url("memory://bucket/a.png", storage_options={})
        >>> path
        '/bucket/a.png'
    """
    return url_to_fs(url, **storage_options_for(url, storage_options))


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URL for `path` within `fs` that any process can open: plain paths for local files, `scheme://...` otherwise.

    Planning lists files on the driver; workers open them again from these URLs, and messages name them.

    Args:
        fs: the filesystem, from `open_url`.
        path: a path within `fs`, as its listing gives it.

    Returns:
        The path itself for a local filesystem, else the path with its protocol put back.

    Example:
        >>> url_of(*open_url("memory://bucket/a.png", storage_options={}))
        'memory:///bucket/a.png'
        >>> url_of(*open_url("/data/a.png", storage_options={}))
        '/data/a.png'
    """
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return path if "file" in protocols else fs.unstrip_protocol(path)


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying: connection trouble and timeouts, never a missing object.

    Args:
        exc: the error a storage call raised.

    Returns:
        True for connection errors, timeouts and transient errno values (EAGAIN, ECONNRESET...); False
        for a missing object, a permission error and anything else.

    Example:
        >>> is_transient(ConnectionResetError()), is_transient(FileNotFoundError("a.png"))
        (True, False)
    """
    if isinstance(exc, _PERMANENT_ERRORS):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def read_bytes(
    fs: fsspec.AbstractFileSystem,
    path: str,
    *,
    retries: int,
    backoff_s: float = 0.1,
    max_backoff_s: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> bytes:
    """The whole object at `path`, retrying transient errors with exponential backoff and jitter.

    Args:
        fs: the filesystem, from `open_url`.
        path: the path within `fs`.
        retries: how many times a transient error is retried (0: try once).
        backoff_s: the first wait; it doubles after each failure, with up to 50% random jitter so that
            many threads do not retry in step.
        max_backoff_s: the longest single wait.
        sleep: how to wait (tests pass a recorder).

    Returns:
        The bytes of the object.

    Raises:
        FileNotFoundError: the object does not exist (never retried).
        OSError: a permanent error, or a transient one that outlived its retries (the last one).

    Example:
        >>> fs, path = open_url("memory://doc/x.bin", storage_options={})
        >>> fs.pipe_file(path, b"abc")
        >>> read_bytes(fs, path, retries=2)
        b'abc'
    """
    for attempt in range(retries + 1):
        try:
            return fs.cat_file(path)
        except Exception as exc:  # classified below: permanent errors and the last attempt re-raise
            if attempt == retries or not is_transient(exc):
                raise
            wait = min(max_backoff_s, backoff_s * (2**attempt))
            sleep(wait * (1 + 0.5 * random.random()))
    raise AssertionError("unreachable: the loop returns or raises")


def resolve_path(value: str, *, base_url: str, allowed_schemes: Tuple[str, ...]) -> str:
    """The URL a manifest entry points at: absolute URLs as given, relative paths joined to `base_url`.

    Args:
        value: the manifest entry: an absolute URL (`s3://b/k.png`), an absolute local path (only when
            `base_url` is local), or a path relative to `base_url`.
        base_url: the folder relative paths are relative to (the manifest's folder by default).
        allowed_schemes: schemes an absolute URL may use; a local absolute path counts as `file`.

    Returns:
        The absolute URL or local path to read.

    Raises:
        PathEscapeError: a relative path that leaves `base_url` (via `..`), a scheme not allowed, or an
            absolute local path in a manifest whose base is remote.

    Example:
        >>> resolve_path("ref/a.png", base_url="s3://bucket/set", allowed_schemes=("s3",))
        's3://bucket/set/ref/a.png'
        >>> resolve_path("../../etc/passwd", base_url="/data/set", allowed_schemes=("file",))
        Traceback (most recent call last):
        ...
        ssim_ray.sources.storage.PathEscapeError: path '../../etc/passwd' leaves its base folder '/data/set'
    """
    scheme = url_scheme(value)
    if scheme is not None:
        if scheme not in allowed_schemes:
            raise PathEscapeError(f"URL scheme {scheme!r} of {redact_text(value)!r} is not allowed; allowed: {list(allowed_schemes)}")
        return value
    base_scheme = url_scheme(base_url) or "file"
    if value.startswith("/"):
        if base_scheme not in _LOCAL_PROTOCOLS or "file" not in allowed_schemes:
            raise PathEscapeError(
                f"absolute path {value!r} is not allowed with base {redact_text(base_url)!r} "
                f"(expected a relative path, or a URL with a scheme in {list(allowed_schemes)})"
            )
        return value
    return _join_inside(value, base_url=base_url)


def _join_inside(value: str, *, base_url: str) -> str:
    """`base_url`/`value`, refusing any result outside `base_url` (checked after normalising `..`)."""
    prefix_match = _SCHEME.match(base_url)
    prefix = prefix_match.group(0) if prefix_match else ""
    base_path = base_url[len(prefix):].rstrip("/")
    if not prefix or prefix in ("file://", "local://"):
        base_path = os.path.abspath(base_path or ".")
    joined = posixpath.normpath(posixpath.join(base_path or "/", value))
    inside = joined.startswith(base_path + "/") if base_path else not joined.startswith("..")
    if not inside or ".." in joined.split("/"):
        raise PathEscapeError(f"path {value!r} leaves its base folder {redact_text(base_url)!r}")
    return prefix + joined
